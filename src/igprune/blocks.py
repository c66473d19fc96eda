"""Blocks: the one place where igprune changes how an HF decoder model runs.

A decoder with L layers has B = 2L blocks: block 2i is the attention of layer i, block 2i+1 its FFN.
Under `masked(model, mask)` (or a BlockControl's `masked`/`gated` scopes) every decoder layer runs the
same computation as its own forward, except that each block's contribution to the residual stream is gated:

    h = h + z_attn * Attn(norm(h))        (Gemma2/3: z_attn * post_norm(Attn(pre_norm(h))))
    h = h + z_ffn  * FFN(norm(h))

The user never sees this. The layer objects stay where they are, with their own class, parameters and
state-dict keys: for the duration of a scope each one gets an instance-level `forward` (`gated_forward`
bound to it), which is deleted when the scope ends (research/scope-overhead/scope_overhead.py: a scope costs under 0.1%
of a one-token decode step of smollm2-135m). The shared BlockControl lives outside the module tree (a weak
registry keyed by the model's layer list), so `state_dict()`, `parameters()`, `save_pretrained()` and
`from_pretrained()` are exactly those of the untouched model.

The gate values come from the BlockControl: per-sample soft gates while masks are trained, one binary
mask at inference, or one binary mask per row (`masked_rows`: a batch whose inputs route to different
clusters runs as one batch). With a binary mask a skipped FFN is not computed at all, and a skipped
attention either still writes its K and V to the KV cache (kv_policy="keep", the paper's scheme, so a
cache stays valid for any later mask) or writes only a one-wide placeholder that keeps the cache's
length right (kv_policy="drop": faster, valid while the mask is fixed for the sequence).

With row masks a block that every row keeps (or none does) runs (or is skipped) as under one mask. A
block that only some rows keep is "mixed": a mixed attention runs for the whole batch, so every row's K
and V are written (what "keep" writes; under "drop" too, since the cache is one tensor for the batch and
a block is mixed for the whole generation), and the rows that skip it keep their hidden state, selected
exactly by torch.where; a mixed FFN runs only on the rows that keep it, so its compute is saved.

Layers are recognised by structure (which norms exist), not by model name; see LAYOUTS. Writing K and V
without running the attention ("keep") depends on each family's attention internals, so it is allowed
only for the families in KEEP_FAMILIES, each tested on a tiny config (tests/test_blocks.py).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel

from igprune.files import IGPruneError

ATTN, FFN = 0, 1
KVPolicy = Literal["keep", "drop"]

# config.model_type of the families whose skipped attentions can write their K and V (kv_policy="keep");
# each has a tiny-config test that this equals what the running attention writes.
KEEP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "smollm3")


@dataclass(frozen=True)
class LayerLayout:
    """Names of the norms around each branch of a decoder layer; None where the layer has none."""

    attn_norm: str
    attn_post_norm: str | None
    ffn_norm: str
    ffn_post_norm: str | None


LAYOUTS = {
    # Gemma2/3: a norm before and after each branch ("sandwich").
    "sandwich": LayerLayout("input_layernorm", "post_attention_layernorm",
                            "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    # Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM3 and most others: pre-norm only.
    "pre_norm": LayerLayout("input_layernorm", None, "post_attention_layernorm", None),
}


def detect_layout(layer: nn.Module) -> LayerLayout:
    for layout in LAYOUTS.values():
        names = [n for n in vars(layout).values() if n]
        if all(hasattr(layer, n) for n in [*names, "self_attn", "mlp"]):
            return layout
    raise IGPruneError(
        f"unsupported decoder layer {type(layer).__name__}: igprune needs self_attn, mlp and "
        "input_layernorm/post_attention_layernorm (Llama/Qwen/Mistral) or the Gemma sandwich norms"
    )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder layers (model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise IGPruneError(f"{type(model).__name__} has no model.layers; igprune supports decoder-only HF LMs")
    return layers


def num_blocks(model: PreTrainedModel) -> int:
    return 2 * len(decoder_layers(model))


def block_name(index: int) -> str:
    return f"{'attn' if index % 2 == ATTN else 'ffn'}{index // 2}"


# ---- the gated forward ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayerGate:
    """What one layer's gated forward needs: the shared control, its index and its structure."""

    control: BlockControl
    index: int
    layout: LayerLayout
    rope: Callable | None  # the modeling file's apply_rotary_pos_emb, for writing keys without the attention


def gated_forward(layer: nn.Module, gate_info: _LayerGate, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A decoder layer's forward with each branch gated; bound to the layer as its `forward` inside a scope.

    With `control.checkpoint` and autograd on, the layer's activations are recomputed in the backward pass instead
    of kept (gradient checkpointing): the recomputation reads the same gates, so backward must run inside the scope.
    """
    hook = getattr(layer, "_hf_hook", None)  # accelerate's, under a device_map: this forward replaces its wrapper
    if hook is not None:  # so run it here: inputs onto the layer's device, offloaded weights loaded
        (hidden_states,), kwargs = hook.pre_forward(layer, hidden_states, **kwargs)
    if gate_info.control.checkpoint and torch.is_grad_enabled():
        out = torch.utils.checkpoint.checkpoint(_gated_layer, layer, gate_info, hidden_states, use_reentrant=False,
                                                **kwargs)
    else:
        out = _gated_layer(layer, gate_info, hidden_states, **kwargs)
    return hook.post_forward(layer, out) if hook is not None else out


def _gated_layer(layer: nn.Module, gate_info: _LayerGate, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    control, layout, first = gate_info.control, gate_info.layout, 2 * gate_info.index
    h = hidden_states
    if control._rows is not None:  # also when no block is mixed: a wrong number of masks is always an error
        control._rows.check(h.shape[0])

    gate = control.gate(first + ATTN)
    if gate is not False:
        out, _ = layer.self_attn(hidden_states=getattr(layer, layout.attn_norm)(h), **kwargs)
        if layout.attn_post_norm:
            out = getattr(layer, layout.attn_post_norm)(out)
        if _mixed(control, gate):  # every row's K and V are in the cache; the rows that skip keep h as it is
            keep, _ = control.rows_keeping(first + ATTN, h)
            h = torch.where(keep.view(-1, *([1] * (h.dim() - 1))), h + out, h)
        else:
            h = h + _scale(out, gate)
    elif kwargs.get("past_key_values") is not None:
        _write_cache_only(layer, gate_info, h, kwargs)

    gate = control.gate(first + FFN)
    if _mixed(control, gate):  # only the rows that keep it run
        _, rows = control.rows_keeping(first + FFN, h)
        h = h.index_add(0, rows, _ffn(layer, layout, h.index_select(0, rows)))
    elif gate is not False:
        h = h + _scale(_ffn(layer, layout, h), gate)
    return h


def _mixed(control: BlockControl, gate: torch.Tensor | bool) -> bool:
    """Whether row masks are set and only some rows keep this block (gate is their keep column)."""
    return control.rows is not None and not isinstance(gate, bool)


def _ffn(layer: nn.Module, layout: LayerLayout, h: torch.Tensor) -> torch.Tensor:
    out = layer.mlp(getattr(layer, layout.ffn_norm)(h))
    return getattr(layer, layout.ffn_post_norm)(out) if layout.ffn_post_norm else out


def is_gated(layer: nn.Module) -> bool:
    """Whether `layer` runs gated_forward now (inside a scope, or patched)."""
    forward = vars(layer).get("forward")
    return isinstance(forward, functools.partial) and forward.func is gated_forward


def _scale(out: torch.Tensor, gate: torch.Tensor | bool) -> torch.Tensor:
    if gate is True:
        return out
    # a model sharded over devices (device_map) runs each layer on its own device; the gates follow it
    return out * gate.to(device=out.device, dtype=out.dtype).view(-1, *([1] * (out.dim() - 1)))


def _write_cache_only(layer: nn.Module, gate_info: _LayerGate, h: torch.Tensor, kwargs: dict) -> None:
    """A skipped attention still advances the KV cache: real K, V ("keep") or a placeholder ("drop")."""
    attn = layer.self_attn
    cache = kwargs["past_key_values"]
    if gate_info.control.kv_policy == "drop":
        # Only the length matters (positions and masks read it); one float per token.
        placeholder = h.new_zeros(h.shape[0], 1, h.shape[1], 1)
        cache.update(placeholder, placeholder, attn.layer_idx)
        return
    family = gate_info.control.family
    if family not in KEEP_FAMILIES:
        raise IGPruneError(f"kv_policy='keep' is tested only for {', '.join(KEEP_FAMILIES)}, not {family!r}; "
                           "use kv_policy='drop'")
    x = getattr(layer, gate_info.layout.attn_norm)(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    if hasattr(attn, "qkv_proj"):  # Phi-3: one fused projection, queries first; only its K and V rows run
        start = attn.config.num_attention_heads * attn.head_dim
        bias = attn.qkv_proj.bias
        kv = F.linear(x, attn.qkv_proj.weight[start:], None if bias is None else bias[start:])
        keys, values = kv.split(attn.num_key_value_heads * attn.head_dim, dim=-1)
    else:
        keys, values = attn.k_proj(x), attn.v_proj(x)
    keys, values = keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)
    if hasattr(attn, "k_norm"):
        keys = attn.k_norm(keys)
    if hasattr(attn, "v_norm"):
        values = attn.v_norm(values)
    if getattr(attn, "use_rope", True):  # SmolLM3 leaves every fourth layer without RoPE
        cos, sin = kwargs["position_embeddings"]
        _, keys = gate_info.rope(keys, keys, cos, sin)
    cache.update(keys, values, attn.layer_idx)


# ---- the control and its scopes ------------------------------------------------------------------------


class _RowMasks:
    """Binary masks per row, (rows, B): each block's all-keep / all-skip / mixed state, worked out once, and the
    mixed blocks' keep columns and row indices per (batch, device), so a decode step reads no tensor to decide."""

    def __init__(self, masks: torch.Tensor):
        self.masks = masks
        every, some = masks.all(0).tolist(), masks.any(0).tolist()
        # per block: True (every row keeps it), False (none does) or None (mixed)
        self.state = [True if e else None if s else False for e, s in zip(every, some, strict=True)]
        self._fitted: dict[tuple[int, torch.device], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def fitted(self, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the (batch,) keep column and the indices of the rows that keep it, on `device`.

        HF generate repeats each input row k times in place (num_return_sequences, beams): a batch of k times
        the mask rows repeats each mask k times the same way.
        """
        key = (batch, device)
        if key not in self._fitted:
            self.check(batch)
            masks = self.masks.repeat_interleave(batch // self.masks.shape[0], dim=0)
            self._fitted[key] = [(column.to(device), column.nonzero().flatten().to(device)) for column in masks.T]
        return self._fitted[key]

    def check(self, batch: int) -> None:
        if batch % self.masks.shape[0]:
            raise IGPruneError(f"a batch of {batch} rows cannot run under {self.masks.shape[0]} row masks: give one "
                               "mask per input row (generate repeats them for num_return_sequences and beams)")


class BlockControl:
    """The gate values every layer of one model reads while a scope is active.

    Values set outside a scope (`set_mask`, `set_soft`, `set_rows`) take effect only inside one, or after
    `patch`. At most one of `soft`, `mask` or `rows` is set; none is dense.
    soft: float tensor (batch, B), one gate row per sample (mask training).
    mask: bool tensor (B,), one binary mask for the whole batch (inference); True = run.
    rows: bool tensor (batch, B), one binary mask per row of the batch (inference, mixed clusters).
    """

    def __init__(self, model: PreTrainedModel):
        layers = decoder_layers(model)
        self.n_blocks = 2 * len(layers)
        self.family: str = getattr(model.config, "model_type", type(model).__name__)
        self._layers = list(layers)
        self._gates = [_LayerGate(self, i, detect_layout(layer), _rope_of(layer))
                       for i, layer in enumerate(self._layers)]
        self.soft: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self._mask_list: list[bool] | None = None  # python copy: no tensor sync per block at inference
        self._rows: _RowMasks | None = None
        self.kv_policy: KVPolicy = "keep"
        self._depth = 0  # open scopes
        self._pinned = False  # patch() keeps the gated forward installed until unpatch()
        self.checkpoint = False  # recompute each layer in the backward pass (mask training on long sequences)

    # ---- gate values

    def set_mask(self, mask: torch.Tensor | None, kv_policy: KVPolicy | None = None) -> None:
        if mask is not None:
            mask = torch.as_tensor(mask).to(torch.bool).flatten().cpu()
            if mask.numel() != self.n_blocks:
                raise IGPruneError(f"mask has {mask.numel()} entries but the model has {self.n_blocks} blocks")
        self._set_policy(kv_policy)
        self.mask, self.soft, self._rows = mask, None, None
        self._mask_list = mask.tolist() if mask is not None else None

    def set_rows(self, masks: torch.Tensor, kv_policy: KVPolicy | None = None) -> None:
        """One binary mask per row of the batch, (batch, B); True = run."""
        masks = torch.as_tensor(masks).to(torch.bool).cpu()
        if masks.dim() != 2 or masks.shape[0] == 0 or masks.shape[1] != self.n_blocks:
            raise IGPruneError(f"row masks must have shape (batch, {self.n_blocks}), got {tuple(masks.shape)}")
        self._set_policy(kv_policy)
        self.mask, self.soft, self._mask_list, self._rows = None, None, None, _RowMasks(masks)

    def _set_policy(self, kv_policy: KVPolicy | None) -> None:
        if kv_policy is not None:
            if kv_policy not in ("keep", "drop"):
                raise IGPruneError(f"kv_policy must be 'keep' or 'drop', not {kv_policy!r}")
            self.kv_policy = kv_policy

    @property
    def rows(self) -> torch.Tensor | None:
        return None if self._rows is None else self._rows.masks

    def set_soft(self, gates: torch.Tensor | None) -> None:
        if gates is not None and (gates.dim() != 2 or gates.shape[1] != self.n_blocks):
            raise IGPruneError(f"soft gates must have shape (batch, {self.n_blocks}), got {tuple(gates.shape)}")
        self.soft, self.mask, self._mask_list, self._rows = gates, None, None, None

    def gate(self, block: int) -> torch.Tensor | bool:
        """True: run unscaled; False: skip; a float (batch,) tensor: run and scale each sample's output; a bool
        (rows,) tensor: run for the rows that keep the block (row masks, some rows keep it and some do not)."""
        if self._mask_list is not None:
            return self._mask_list[block]
        if self._rows is not None:
            state = self._rows.state[block]
            return self._rows.masks[:, block] if state is None else state
        if self.soft is not None:
            column = self.soft[:, block]
            return column if bool(column.any()) else False  # all-zero gates: skipping is exact
        return True

    def rows_keeping(self, block: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a mixed block under row masks: the keep column and the indices of the rows that keep it, fitted to
        the batch of `h` (its rows and device)."""
        return self._rows.fitted(h.shape[0], h.device)[block]

    # ---- scopes

    @contextlib.contextmanager
    def masked(self, mask: torch.Tensor | None, kv_policy: KVPolicy | None = None) -> Iterator[None]:
        """Run under a binary mask (None = dense) for the duration of a with-block."""
        with self._restoring(), self.active():
            self.set_mask(mask, kv_policy)
            yield

    @contextlib.contextmanager
    def masked_rows(self, masks: torch.Tensor, kv_policy: KVPolicy | None = None) -> Iterator[None]:
        """Run each row of the batch under its own binary mask, (batch, B), for the duration of a with-block."""
        with self._restoring(), self.active():
            self.set_rows(masks, kv_policy)
            yield

    @contextlib.contextmanager
    def gated(self, gates: torch.Tensor) -> Iterator[None]:
        """Run under per-sample soft gates (batch, B) for the duration of a with-block."""
        with self._restoring(), self.active():
            self.set_soft(gates)
            yield

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The gated forward is installed for the duration of a with-block (nested scopes share one install)."""
        if self._depth == 0 and not self._pinned:
            self._install()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and not self._pinned:
                self._uninstall()

    @property
    def installed(self) -> bool:
        return self._depth > 0 or self._pinned

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        saved = (self.mask, self.soft, self._mask_list, self._rows, self.kv_policy)
        try:
            yield
        finally:
            self.mask, self.soft, self._mask_list, self._rows, self.kv_policy = saved

    def _install(self) -> None:
        # an instance attribute shadows the class's forward; it is no parameter, buffer or submodule
        for layer, gate_info in zip(self._layers, self._gates, strict=True):
            layer.__dict__["forward"] = functools.partial(gated_forward, layer, gate_info)

    def _uninstall(self) -> None:
        for layer in self._layers:
            if is_gated(layer):
                del layer.__dict__["forward"]


def _rope_of(layer: nn.Module) -> Callable | None:
    return getattr(sys.modules[type(layer.self_attn).__module__], "apply_rotary_pos_emb", None)


# One control per model, held outside the module tree; a model that is garbage-collected drops its entry.
_CONTROLS: weakref.WeakKeyDictionary[nn.ModuleList, BlockControl] = weakref.WeakKeyDictionary()


def control_of(model: PreTrainedModel) -> BlockControl:
    """The model's BlockControl (created on first use). The model runs as usual outside the control's scopes."""
    layers = decoder_layers(model)
    control = _CONTROLS.get(layers)
    if control is None or control._layers != list(layers):
        control = _CONTROLS[layers] = BlockControl(model)
    return control


@contextlib.contextmanager
def masked(model: PreTrainedModel, mask: torch.Tensor | list[bool] | None,
           kv_policy: KVPolicy = "keep") -> Iterator[PreTrainedModel]:
    """Run `model` under a binary block mask (True = run; None = dense) for the duration of a with-block.

    Inside, the model is the user's own HF model with its own APIs: forward, `generate` with any arguments,
    `pipeline("text-generation", model=model)`. Outside, it is exactly as it was.

        with igprune.masked(model, bundle.masks[0]):
            out = model.generate(**batch, do_sample=True, num_return_sequences=2)
    """
    with control_of(model).masked(mask, kv_policy):
        yield model


@contextlib.contextmanager
def masked_rows(model: PreTrainedModel, masks: torch.Tensor, kv_policy: KVPolicy = "keep") -> Iterator[PreTrainedModel]:
    """Run `model` with row i of every batch under its own binary mask `masks[i]` ((batch, B), True = run).

    Each row computes what it computes alone under its mask (`masked`), in one batch; a block is computed for the
    rows that keep it (an attention that only some rows keep runs for all, see the module docstring).

        with igprune.masked_rows(model, bundle.masks[[3, 0]]):  # two prompts: clusters 3 and 0
            out = model.generate(**two_prompts, num_return_sequences=2)
    """
    with control_of(model).masked_rows(masks, kv_policy):
        yield model


def patch(model: PreTrainedModel) -> BlockControl:
    """Keep the gated forward installed until `unpatch(model)`; returns the model's BlockControl.

    Scopes install it themselves; pinning it only saves that (small) cost. With no mask set the patched
    model computes exactly what the original does, and its parameters and state-dict keys are unchanged.
    """
    control = control_of(model)
    if not control.installed:
        control._install()
    control._pinned = True
    return control


def unpatch(model: PreTrainedModel) -> None:
    """Undo `patch`: the layers run their own forward again (at once, unless a scope is still open)."""
    control = control_of(model)
    control._pinned = False
    if control._depth == 0:
        control._uninstall()


# ---- reading the model: final hidden states, logits, a layer's input ---------------------------------------------


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's final hidden states (batch, T, d), after its last norm and before the output layer: what
    scoring needs without vocabulary-sized logits for every position at once."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output logits for final hidden states, in float32, soft-capped as its forward does (Gemma 2):
    every path that scores tokens forms logits here."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


@contextlib.contextmanager
def layer_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Record the hidden state each decoder layer receives, in layer order, for every forward inside the block."""
    inputs: list[torch.Tensor] = []

    def record(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        yield inputs
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def replaced_input(model: PreTrainedModel, layer: int, hidden: torch.Tensor | None) -> Iterator[None]:
    """Feed `hidden` to decoder layer `layer` in place of whatever the layers before it produced (None: no change),
    so a forward whose earlier layers would recompute a recorded state can skip them (mask them off)."""
    if hidden is None:
        yield
        return

    def swap(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = decoder_layers(model)[layer].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def block_parameters(model: PreTrainedModel) -> list[list[nn.Parameter]]:
    """Each block's weights (B lists): an attention with the norms around it, an FFN with its norms, so a
    per-block importance (ShortenedLlama's Taylor+) sums over what skipping the block removes."""
    params = []
    for layer in decoder_layers(model):
        layout = detect_layout(layer)
        for branch, norms in ((layer.self_attn, (layout.attn_norm, layout.attn_post_norm)),
                              (layer.mlp, (layout.ffn_norm, layout.ffn_post_norm))):
            modules = [branch, *(getattr(layer, n) for n in norms if n)]
            params.append([p for module in modules for p in module.parameters()])
    return params
