"""Blocks: the one place where igprune patches an HF decoder model.

A decoder with L layers has B = 2L blocks: block 2i is the attention of layer i, block 2i+1 its FFN.
`patch(model)` replaces every decoder layer by a `GatedLayer` that holds the original layer and runs
the same computation, except that each block's contribution to the residual stream is gated:

    h = h + z_attn * Attn(norm(h))        (Gemma2/3: z_attn * post_norm(Attn(pre_norm(h))))
    h = h + z_ffn  * FFN(norm(h))

The gate values come from one shared `BlockControl`: per-sample soft gates while masks are trained,
or one binary mask at inference. With a binary mask a skipped FFN is not computed at all, and a
skipped attention either still writes its K and V to the KV cache (kv_policy="keep", the paper's
scheme, so a cache stays valid for any later mask) or writes only a one-wide placeholder that keeps
the cache's length right (kv_policy="drop": faster, valid while the mask is fixed for the sequence).

Layers are recognised by structure (which norms exist), not by model name; see LAYOUTS.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from igprune.files import IGPruneError

ATTN, FFN = 0, 1
KVPolicy = Literal["keep", "drop"]


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
    # Llama, Mistral, Qwen2, Qwen3 and most others: pre-norm only.
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


class BlockControl:
    """The gate values every GatedLayer reads. Exactly one of `soft` or `mask` is set, or neither (dense).

    soft: float tensor (batch, B), one gate row per sample (mask training).
    mask: bool tensor (B,), one binary mask for the whole batch (inference); True = run.
    """

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.soft: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self._mask_list: list[bool] | None = None  # python copy: no tensor sync per block at inference
        self.kv_policy: KVPolicy = "keep"

    def set_mask(self, mask: torch.Tensor | None, kv_policy: KVPolicy | None = None) -> None:
        if mask is not None:
            mask = torch.as_tensor(mask).to(torch.bool).flatten().cpu()
            if mask.numel() != self.n_blocks:
                raise IGPruneError(f"mask has {mask.numel()} entries but the model has {self.n_blocks} blocks")
        if kv_policy is not None:
            if kv_policy not in ("keep", "drop"):
                raise IGPruneError(f"kv_policy must be 'keep' or 'drop', not {kv_policy!r}")
            self.kv_policy = kv_policy
        self.mask, self.soft = mask, None
        self._mask_list = mask.tolist() if mask is not None else None

    def set_soft(self, gates: torch.Tensor | None) -> None:
        if gates is not None and (gates.dim() != 2 or gates.shape[1] != self.n_blocks):
            raise IGPruneError(f"soft gates must have shape (batch, {self.n_blocks}), got {tuple(gates.shape)}")
        self.soft, self.mask, self._mask_list = gates, None, None

    def gate(self, block: int) -> torch.Tensor | bool:
        """True: run unscaled; False: skip; a (batch,) tensor: run and scale each sample's output."""
        if self._mask_list is not None:
            return self._mask_list[block]
        if self.soft is not None:
            column = self.soft[:, block]
            return column if bool(column.any()) else False  # all-zero gates: skipping is exact
        return True

    @contextlib.contextmanager
    def masked(self, mask: torch.Tensor | None, kv_policy: KVPolicy | None = None) -> Iterator[None]:
        """Run under a binary mask (None = dense) for the duration of a with-block."""
        with self._restoring():
            self.set_mask(mask, kv_policy)
            yield

    @contextlib.contextmanager
    def gated(self, gates: torch.Tensor) -> Iterator[None]:
        """Run under per-sample soft gates (batch, B) for the duration of a with-block."""
        with self._restoring():
            self.set_soft(gates)
            yield

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        saved = (self.mask, self.soft, self._mask_list, self.kv_policy)
        try:
            yield
        finally:
            self.mask, self.soft, self._mask_list, self.kv_policy = saved


class GatedLayer(nn.Module):
    """A decoder layer whose attention and FFN branches are gated by a shared BlockControl."""

    def __init__(self, layer: nn.Module, index: int, control: BlockControl):
        super().__init__()
        self.layer = layer
        self.index = index
        self.layout = detect_layout(layer)
        self.control = control
        attn = layer.self_attn
        self._rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        layer, layout = self.layer, self.layout
        h = hidden_states

        gate = self.control.gate(2 * self.index + ATTN)
        if gate is not False:
            out, _ = layer.self_attn(hidden_states=getattr(layer, layout.attn_norm)(h), **kwargs)
            if layout.attn_post_norm:
                out = getattr(layer, layout.attn_post_norm)(out)
            h = h + _scale(out, gate)
        elif kwargs.get("past_key_values") is not None:
            self._write_cache_only(h, kwargs)

        gate = self.control.gate(2 * self.index + FFN)
        if gate is not False:
            out = layer.mlp(getattr(layer, layout.ffn_norm)(h))
            if layout.ffn_post_norm:
                out = getattr(layer, layout.ffn_post_norm)(out)
            h = h + _scale(out, gate)
        return h

    def _write_cache_only(self, h: torch.Tensor, kwargs: dict) -> None:
        """A skipped attention still advances the KV cache: real K, V ("keep") or a placeholder ("drop")."""
        attn = self.layer.self_attn
        cache = kwargs["past_key_values"]
        if self.control.kv_policy == "drop":
            # Only the length matters (positions and masks read it); one float per token.
            placeholder = h.new_zeros(h.shape[0], 1, h.shape[1], 1)
            cache.update(placeholder, placeholder, attn.layer_idx)
            return
        x = getattr(self.layer, self.layout.attn_norm)(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            keys = attn.k_norm(keys)
        if hasattr(attn, "v_norm"):
            values = attn.v_norm(values)
        if self._rope is None:
            raise IGPruneError(f"{type(attn).__name__}: no apply_rotary_pos_emb found; use kv_policy='drop'")
        cos, sin = kwargs["position_embeddings"]
        _, keys = self._rope(keys, keys, cos, sin)
        cache.update(keys, values, attn.layer_idx)


def _scale(out: torch.Tensor, gate: torch.Tensor | bool) -> torch.Tensor:
    if gate is True:
        return out
    return out * gate.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))


def patch(model: PreTrainedModel) -> BlockControl:
    """Make every block of `model` gateable (idempotent); returns the shared BlockControl.

    With no mask set the patched model computes exactly what the original does.
    """
    layers = decoder_layers(model)
    if isinstance(layers[0], GatedLayer):
        return layers[0].control
    control = BlockControl(2 * len(layers))
    for i in range(len(layers)):
        layers[i] = GatedLayer(layers[i], i, control)
    return control


def unpatch(model: PreTrainedModel) -> None:
    """Put the original decoder layers back."""
    layers = decoder_layers(model)
    for i in range(len(layers)):
        if isinstance(layers[i], GatedLayer):
            layers[i] = layers[i].layer
