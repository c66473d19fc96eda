"""Export one static mask as a heterogeneous GGUF: llama.cpp's `deci` architecture, skipped blocks absent.

`deci` (DeciLM / Llama-Nemotron-NAS) gives every layer its own head counts and FFN width: a layer with
`attention.head_count` 0 (and `head_count_kv` 0) has no attention, its tensors and KV cache absent, and
passes its input straight on; a layer with `feed_forward_length` 0 has no FFN. So, unlike the HF export
(igprune.export), a block skipped alone is left out of the file and costs nothing.

The mask's kept blocks, in model order, are regrouped into GGUF layers: an attention is paired with the
kept FFN right after it (which may belong to the next source layer: "A. .F" becomes one full layer),
an FFN with no attention before it becomes an attention-free layer, and layers skipping both blocks are
gone. Each block keeps its own norm and weights, so the file computes exactly the masked model:
h += Attn(norm(h)) and h += FFN(norm(h)) for the kept blocks in order.

Two layouts that the format allows do not run as written in llama.cpp (read in its src/models/deci.cpp
and llama-model.cpp, and seen running): a layer with an attention and `feed_forward_length` 0 ends with
`continue` before its attention's output is added to the residual stream (that path was written for
Nemotron-Ultra's layers that skip both; the llama-server tested then computes the model without those
attentions, or aborts), and the head size is read only when layer 0 has heads. So an attention followed
by no kept FFN gets a one-wide all-zero FFN, and an attention-free first layer a one-head all-zero
attention: each adds exactly zero, at a cost of 4 x hidden (FFN) or 4 x hidden x head_dim (attention)
weights, and the record lists them.

Families written (those whose layer is exactly deci's: pre-norm RMSNorm, GQA attention with RoPE, SiLU-gated
FFN, nothing else): Llama (config.model_type "llama": LlamaForCausalLM, SmolLM2, Llama 2/3, RoPE default /
linear / llama3), Mistral without a sliding window ("mistral"), and Qwen2 / Qwen2.5 without a sliding window
("qwen2": its Q/K/V biases are deci's optional attention biases), tied or untied embeddings, with a byte-level
BPE tokenizer. Anything else is refused with one line: Qwen3 and SmolLM3 (Q/K norms, NoPE layers), Gemma 2/3
(extra norms, soft-capping, sliding layers) and Phi-3 (fused projections) compute what deci's graph has no
place for. Weights are read, never changed; the file is written beside its final path
and renamed into place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune.blocks import ATTN, FFN, decoder_layers
from igprune.bundle import Bundle
from igprune.export import cluster_mask
from igprune.files import IGPruneError, atomic_path
from igprune.masks import mask_row

FORMAT = "igprune-gguf/1"
ARCH = "deci"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Qwen2's pre-tokenizer: this split, then byte-level without its own regex (llama.cpp's pre-tokenizer "qwen2")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
ROPE_TYPES = ("default", "linear", "llama3")
# weight type -> (GGML tensor type of the 2-D weights, gguf.LlamaFileType); norms and biases stay F32. Quantized
# types are written by gguf-py's reference quantizers (gguf.quants), as llama.cpp's own convert script writes them.
DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3)}
# GGUF token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFLayer:
    """One layer of the file: which source layer's attention and FFN it holds (None: absent)."""

    attention: int | None
    ffn: int | None
    stub_attention: bool = False  # a one-head zero attention stands in (first layer only; see the module doc)
    stub_ffn: bool = False  # a one-wide zero FFN stands in for the absent one (see the module doc)


@dataclass
class GGUFPlan:
    """How the mask's kept blocks are laid out as GGUF layers (source layer numbers)."""

    mask: str
    layers_before: int
    layers: list[GGUFLayer]
    skipped_attention: list[int] = field(default_factory=list)
    skipped_ffn: list[int] = field(default_factory=list)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> GGUFPlan:
        on = mask.to(torch.bool).view(-1, 2).tolist()
        kept = [(i, kind) for i, row in enumerate(on) for kind in (ATTN, FFN) if row[kind]]
        if not kept:
            raise IGPruneError("the mask skips every block; nothing would be left to export")
        layers: list[GGUFLayer] = []
        for i, kind in kept:
            if kind == FFN and layers and layers[-1].ffn is None and layers[-1].attention is not None:
                layers[-1].ffn = i  # the attention just before it, of this layer or an earlier one
            elif kind == FFN:
                layers.append(GGUFLayer(None, i))
            else:
                layers.append(GGUFLayer(i, None))
        for layer in layers:
            layer.stub_ffn = layer.ffn is None
        layers[0].stub_attention = layers[0].attention is None
        return cls(mask_row(mask), len(on), layers,
                   [i for i, row in enumerate(on) if not row[ATTN]], [i for i, row in enumerate(on) if not row[FFN]])

    @property
    def stubs(self) -> dict[str, list[int]]:
        return {"attention": [n for n, s in enumerate(self.layers) if s.stub_attention],
                "ffn": [n for n, s in enumerate(self.layers) if s.stub_ffn]}

    @property
    def note(self) -> str:
        text = (f"{self.layers_before} source layers -> {len(self.layers)} GGUF layers (llama.cpp arch 'deci'); "
                f"{len(self.skipped_attention)} skipped attentions and {len(self.skipped_ffn)} skipped FFNs are "
                "absent (no tensors, no KV cache).")
        stubs = self.stubs
        if stubs["ffn"]:
            text += (f" GGUF layers {stubs['ffn']} hold an attention followed by no FFN and carry a one-wide zero "
                     "FFN: llama.cpp's deci graph drops the attention of a layer whose feed_forward_length is 0.")
        if stubs["attention"]:
            text += (" GGUF layer 0 has no attention of the source and carries a one-head zero attention: "
                     "llama.cpp reads the head size only when layer 0 has heads.")
        return text


def check_model(model: PreTrainedModel) -> None:
    """Refuse, in one line, a model this writer does not express as deci."""
    check_config(model.config)
    _check_layers(model)


def check_config(config: Any) -> None:
    """Refuse, in one line, a model config this writer does not express as deci (no weights needed)."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise IGPruneError(f"GGUF export (llama.cpp deci) supports model types {', '.join(SUPPORTED_MODEL_TYPES)}, "
                           f"not {kind!r}; use the HF export (igprune export) or serve it with --engine hf")
    if getattr(config, "use_sliding_window", False) or (kind == "mistral" and getattr(config, "sliding_window", None)):
        raise IGPruneError(f"GGUF export does not write sliding-window attention ({kind} with a sliding window)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise IGPruneError(f"GGUF export needs a SiLU-gated FFN, not hidden_act={config.hidden_act!r}")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise IGPruneError(f"GGUF export supports RoPE types {', '.join(ROPE_TYPES)}, not "
                           f"{rope.get('rope_type')!r}")


def _check_layers(model: PreTrainedModel) -> None:
    for i, layer in enumerate(decoder_layers(model)):
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            if not isinstance(getattr(getattr(layer, path.split(".")[0], None), path.split(".")[1], None),
                              torch.nn.Linear):
                raise IGPruneError(f"layer {i} has no {path} linear layer; GGUF export needs the plain Llama layer")


def export_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mask: torch.Tensor, out: str | Path,
                dtype: str = "f32", tokenizer_pre: str | None = None,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `model` under `mask` as a deci GGUF file at `out` (atomically); returns what was written."""
    if dtype not in DTYPES:
        raise IGPruneError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_model(model)
    layers = decoder_layers(model)
    mask = torch.as_tensor(mask).to(torch.bool).cpu().flatten()
    if mask.numel() != 2 * len(layers):
        raise IGPruneError(f"mask has {mask.numel()} entries but the model has {2 * len(layers)} blocks")
    plan = GGUFPlan.from_mask(mask)
    vocab = _vocab(tokenizer, model.config.vocab_size, tokenizer_pre)
    tensors = list(_tensors(model, plan))
    record = {"format": FORMAT, **(source or {}), "source_model": getattr(model, "name_or_path", None),
              "architecture": ARCH, "dtype": dtype, "tokenizer_pre": vocab["pre"], **asdict(plan),
              "layers_after": len(plan.layers), "stubs": plan.stubs,
              "parameters": {"before": _n_parameters(model), "after": sum(int(np.prod(s)) for _, s, _ in tensors)},
              "note": plan.note}
    with atomic_path(Path(out)) as tmp:
        _write(tmp, model, plan, vocab, tensors, dtype, record)
    return record


def export_bundle_gguf(bundle: str | Path | Bundle, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       out: str | Path, cluster: int = 0, **options: Any) -> dict[str, Any]:
    """Export cluster `cluster`'s mask of a bundle (a folder or a loaded Bundle) made for `model` as GGUF."""
    mask, source = cluster_mask(bundle, model, cluster)
    return export_gguf(model, tokenizer, mask, out, source=source, **options)


# ---- model side ---------------------------------------------------------------------------------------


def _rope(config: Any) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half Q/K rows to llama.cpp's interleaved-pair RoPE layout (per head: evens, odds -> pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama3_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-frequency divisors llama.cpp applies for rope_type llama3 (the rope_freqs tensor)."""
    base = rope["rope_theta"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


Tensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def _tensors(model: PreTrainedModel, plan: GGUFPlan) -> Iterator[Tensor]:
    """(GGUF name, numpy shape, getter of float32 values) for every tensor of the file, in file order; getters
    copy, never alias. The stored type is chosen at write time (_storage)."""
    config, layers = model.config, decoder_layers(model)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads

    def get(t: torch.Tensor, permute: int | None = None) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            w = t.detach().to("cpu", torch.float32)
            if permute is not None:
                w = _rope_permute(w, permute)
            return w.numpy().copy()
        return read

    def item(name: str, t: torch.Tensor, permute: int | None = None) -> Tensor:
        return name, tuple(t.shape), get(t, permute)

    embed = model.get_input_embeddings().weight
    yield item("token_embd.weight", embed)
    if _rope(config)["rope_type"] == "llama3":
        factors = _llama3_factors(_rope(config), _head_dim(config))
        yield "rope_freqs.weight", tuple(factors.shape), get(factors)
    hidden, head_dim = config.hidden_size, _head_dim(config)
    for n, spec in enumerate(plan.layers):
        if spec.stub_attention:
            yield f"blk.{n}.attn_norm.weight", (hidden,), lambda: np.ones(hidden, np.float32)
            for short, shape in (("q", (head_dim, hidden)), ("k", (head_dim, hidden)), ("v", (head_dim, hidden)),
                                 ("output", (hidden, head_dim))):
                yield f"blk.{n}.attn_{short}.weight", shape, lambda s=shape: np.zeros(s, np.float32)
        if spec.attention is not None:
            layer = layers[spec.attention]
            attn = layer.self_attn
            yield item(f"blk.{n}.attn_norm.weight", layer.input_layernorm.weight)
            for short, proj, heads in (("q", attn.q_proj, n_head), ("k", attn.k_proj, n_kv), ("v", attn.v_proj, None),
                                       ("output", attn.o_proj, None)):
                yield item(f"blk.{n}.attn_{short}.weight", proj.weight, permute=heads)
                if proj.bias is not None:
                    yield item(f"blk.{n}.attn_{short}.bias", proj.bias, permute=heads)
        if spec.ffn is not None:
            layer = layers[spec.ffn]
            yield item(f"blk.{n}.ffn_norm.weight", layer.post_attention_layernorm.weight)
            for short in ("gate", "up", "down"):
                proj = getattr(layer.mlp, f"{short}_proj")
                yield item(f"blk.{n}.ffn_{short}.weight", proj.weight)
                if proj.bias is not None:
                    yield item(f"blk.{n}.ffn_{short}.bias", proj.bias)
        elif spec.stub_ffn:
            yield f"blk.{n}.ffn_norm.weight", (hidden,), lambda: np.ones(hidden, np.float32)
            for short, shape in (("gate", (1, hidden)), ("up", (1, hidden)), ("down", (hidden, 1))):
                yield f"blk.{n}.ffn_{short}.weight", shape, lambda s=shape: np.zeros(s, np.float32)
    yield item("output_norm.weight", model.model.norm.weight)
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embed.data_ptr():
        yield item("output.weight", output.weight)  # untied; tied models let llama.cpp reuse token_embd


def _n_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---- tokenizer side -----------------------------------------------------------------------------------


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer whose splitting equals the HF tokenizer's, for the shapes known to match."""
    def byte_level(s: dict[str, Any]) -> bool:
        return s.get("type") == "ByteLevel" and s.get("use_regex", True) and not s.get("add_prefix_space", False)

    if not spec:
        return None
    if byte_level(spec):
        return "gpt-2"  # the GPT-2 regex alone
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else None
    if (steps and len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"  # each digit alone, then the GPT-2 regex
    if (steps and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        return "qwen2"
    return None


def _vocab(tokenizer: PreTrainedTokenizerBase, n_vocab: int, pre: str | None) -> dict[str, Any]:
    """GGUF's tokenizer.ggml.* content for a byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2')."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise IGPruneError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise IGPruneError("GGUF export writes byte-level BPE tokenizers only (tokenizer.ggml.model 'gpt2'); this "
                           f"tokenizer's model is {bpe.get('type')!r}")
    pre = pre or _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise IGPruneError("could not tell which llama.cpp pre-tokenizer matches this tokenizer's "
                           f"{json.dumps(spec.get('pre_tokenizer'))[:120]}; pass tokenizer_pre (--tokenizer-pre)")
    ids = dict(bpe["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    ids.update({t["content"]: i for i, t in added.items()})
    if max(ids.values()) >= n_vocab:
        raise IGPruneError(f"the tokenizer has ids up to {max(ids.values())} but the model only {n_vocab} embeddings")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in ids.items():
        tokens[i] = text
        types[i] = NORMAL if i not in added else (CONTROL if added[i].get("special") else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    probe = tokenizer("a").input_ids
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "special": special,
            "add_bos": bool(probe) and probe[0] == special["bos"],
            "add_eos": bool(probe) and probe[-1] == special["eos"],
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}


# ---- the file -----------------------------------------------------------------------------------------


def _write(path: Path, model: PreTrainedModel, plan: GGUFPlan, vocab: dict[str, Any], tensors: list[Tensor],
           dtype: str, record: dict[str, Any]) -> None:
    import gguf

    config, rope = model.config, _rope(model.config)
    head_dim = _head_dim(config)
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_type("model")
    writer.add_name(f"{getattr(model, 'name_or_path', '') or 'model'} (igprune {plan.mask.count('.')} blocks skipped)")
    writer.add_file_type(DTYPES[dtype][1])
    writer.add_block_count(len(plan.layers))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_vocab_size(config.vocab_size)
    writer.add_head_count([config.num_attention_heads if s.attention is not None else int(s.stub_attention)
                           for s in plan.layers])
    writer.add_head_count_kv([config.num_key_value_heads if s.attention is not None else int(s.stub_attention)
                              for s in plan.layers])
    writer.add_feed_forward_length([config.intermediate_size if s.ffn is not None else int(s.stub_ffn)
                                    for s in plan.layers])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for role, token in vocab["special"].items():
        if token is not None:
            getattr(writer, f"add_{role}_token_id")(int(token))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
    writer.add_array("igprune.attention_source", [-1 if s.attention is None else s.attention for s in plan.layers])
    writer.add_array("igprune.ffn_source", [-1 if s.ffn is None else s.ffn for s in plan.layers])
    writer.add_string("igprune.export", json.dumps(record))
    stored = [_storage(name, shape, dtype) for name, shape, _ in tensors]
    for (name, shape, _), qtype in zip(tensors, stored, strict=True):
        size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) // size[0] * size[1],
                               raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (name, shape, read), qtype in zip(tensors, stored, strict=True):  # one tensor in memory at a time
            array = read()
            if array.shape != shape:
                raise IGPruneError(f"{name}: shape {array.shape}, planned {shape}")
            writer.write_tensor_data(_encode(array, qtype))
    finally:
        writer.close()


def _storage(name: str, shape: tuple[int, ...], dtype: str):
    """The GGML type a tensor is stored as: 1-D (norms, biases) F32; 2-D the weight type, but Q8_0 for the
    embedding and output matrices of 4-bit files (as llama.cpp's quantizer keeps them wider: the logits are read
    straight off them, and a tied model's output is its embedding), and F16 for a quantized type whose block does
    not divide the row (the one-wide stub FFN's down matrix)."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[DTYPES[dtype][0]]
    if name in ("token_embd.weight", "output.weight") and dtype.startswith("q4"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)
