"""An analytic FLOPs model of a decoder under a block mask (paper section 4.3, Table 2).

Counted, at 2 FLOPs per multiply-add, per decoder layer:

    attention block   q, k, v, o projections (GQA: k and v are num_key_value_heads * head_dim wide),
                      scores Q K^T and the weighted sum A V: 2 * heads * queries * keys * head_dim each
    FFN block         gate, up and down projections (gated MLP, as in Llama/Qwen/Mistral/Gemma)
    lm_head           once per position whose logits are computed

The attention matrices are counted as computed: every query against every key in the cache, full
rather than causally halved (eager attention and SDPA's math path build the whole masked matrix). A
sliding-window layer reads at most window - 1 cached keys plus the new ones. Under a mask, a skipped
FFN costs nothing. A skipped attention costs nothing with kv_policy "drop"; with "keep" (the paper's
scheme) its k and v projections still run so the KV cache stays valid (RoPE on K is elementwise).

Not counted, as in torch's FlopCounterMode: embedding lookups, softmax, RoPE, activations, residual
adds, biases and, unless `norms=True`, RMSNorm (about 4 FLOPs per element); all are O(tokens * hidden),
well under 1% of a layer's matmuls. With these conventions the model matches FlopCounterMode exactly
on eager-attention HF models (tests/test_flops.py), and gives the paper's dense Llama-3-8B figure
(32.94T for 2048 tokens with logits at every position).

The paper's Table 2 steps down by 0.28T per two skipped attention blocks: that is W_Q and W_O of 2048
tokens alone, so its accounting still charges a skipped attention's Q K^T and A V. This model does
not: skipping an attention saves those too (they are not computed), so its attention steps are larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from igprune.blocks import ATTN, FFN, KVPolicy
from igprune.files import IGPruneError
from igprune.masks import mask_from_off, skipped_blocks

Phase = Literal["prefill", "decode"]
Logits = Literal["all", "last"]

Order = Literal["attention-first", "ffn-first"]
# Blocks of one kind cost the same in every layer (sliding windows aside), so for a given number of blocks off
# these two orders give the two extremes: any mask's FLOPs lie between them. Which is cheaper depends on the
# model and the length: attention's Q K^T and A V grow with the context, the FFN does not.
ORDERS: dict[str, str] = {
    "attention-first": "attention blocks first, deepest layer first, then FFN blocks, deepest layer first (the "
                       "canonical order: the paper finds attention pruned more often, Figure 4)",
    "ffn-first": "FFN blocks first, deepest layer first, then attention blocks (the other extreme: any mask with "
                 "as many blocks off costs between the two orders)",
}


@dataclass(frozen=True)
class Shape:
    """The sizes that determine a decoder's FLOPs, read from an HF config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    windows: tuple[int | None, ...]  # per layer: sliding window length, or None for full attention

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        try:
            layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
            heads, intermediate = int(config.num_attention_heads), int(config.intermediate_size)
            vocab = int(config.vocab_size)
        except (AttributeError, TypeError) as err:
            raise IGPruneError(f"config lacks a decoder size ({err}); give an HF decoder config") from err
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None) or ["full_attention"] * layers
        windows = tuple(int(window) if window and t == "sliding_attention" else None for t in types)
        return cls(layers, hidden, heads, kv_heads, head_dim, intermediate, vocab,
                   bool(getattr(config, "tie_word_embeddings", False)), windows)

    @property
    def n_blocks(self) -> int:
        return 2 * self.layers

    def attention_params(self) -> int:
        return 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim

    def kv_params(self) -> int:
        return 2 * self.hidden * self.kv_heads * self.head_dim

    def ffn_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def model_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (self.attention_params() + self.ffn_params()) + embeddings


def load_config(name_or_path: str | Path) -> Any:
    """An HF config from a converted zoo model in the cache or a local folder; never downloads."""
    from transformers import AutoConfig

    from igprune.models import ZOO, converted_dir

    folder = converted_dir(str(name_or_path)) if str(name_or_path) in ZOO else Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        hint = f"run `igprune prepare --model {name_or_path}`" if str(name_or_path) in ZOO else "give an HF folder"
        raise IGPruneError(f"no config.json in {folder}; {hint}")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _as_mask(mask: torch.Tensor | Sequence[bool] | None, n_blocks: int) -> list[bool]:
    if mask is None:
        return [True] * n_blocks
    values = torch.as_tensor(mask).to(torch.bool).flatten().tolist()
    if len(values) != n_blocks:
        raise IGPruneError(f"mask has {len(values)} entries but the model has {n_blocks} blocks")
    return values


def flops(config: Any, mask: torch.Tensor | Sequence[bool] | None = None, seq_len: int = 1,
          kv_policy: KVPolicy = "keep", phase: Phase = "prefill", context: int | None = None, batch: int = 1,
          logits: Logits | None = None, norms: bool = False) -> dict[str, int]:
    """FLOPs of one forward pass per component, and their "total".

    prefill: `seq_len` new tokens per row on top of `context` cached ones (default 0); logits at every
    position unless logits="last" (what generate's first step computes).
    decode: one new token per row with `context` cached tokens (default `seq_len`: the first step after
    a prompt of that length).
    """
    shape = config if isinstance(config, Shape) else Shape.from_config(config)
    if kv_policy not in ("keep", "drop"):
        raise IGPruneError(f"kv_policy must be 'keep' or 'drop', not {kv_policy!r}")
    if phase == "prefill":
        queries, cached = seq_len, context or 0
    elif phase == "decode":
        queries, cached = 1, seq_len if context is None else context
    else:
        raise IGPruneError(f"phase must be 'prefill' or 'decode', not {phase!r}")
    if queries < 1 or cached < 0 or batch < 1:
        raise IGPruneError(f"need seq_len >= 1, context >= 0 and batch >= 1 (got {seq_len}, {context}, {batch})")
    run = _as_mask(mask, shape.n_blocks)
    tokens = batch * queries
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out = dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj", "attn_scores", "attn_values", "gate_proj",
                         "up_proj", "down_proj", "norms", "lm_head"), 0)
    for layer in range(shape.layers):
        window = shape.windows[layer] if layer < len(shape.windows) else None
        keys = (min(cached, window - 1) if window else cached) + queries
        attention_runs = run[2 * layer + ATTN]
        if attention_runs or kv_policy == "keep":
            out["k_proj"] += 2 * tokens * shape.hidden * kv_width
            out["v_proj"] += 2 * tokens * shape.hidden * kv_width
            out["norms"] += 4 * tokens * shape.hidden
        if attention_runs:
            out["q_proj"] += 2 * tokens * shape.hidden * q_width
            out["o_proj"] += 2 * tokens * q_width * shape.hidden
            out["attn_scores"] += 2 * batch * shape.heads * queries * keys * shape.head_dim
            out["attn_values"] += 2 * batch * shape.heads * queries * keys * shape.head_dim
        if run[2 * layer + FFN]:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[name] += 2 * tokens * shape.hidden * shape.intermediate
            out["norms"] += 4 * tokens * shape.hidden
    logits = logits or ("all" if phase == "prefill" else "last")
    out["lm_head"] = 2 * batch * (queries if logits == "all" else 1) * shape.hidden * shape.vocab
    out["norms"] = out["norms"] + 4 * tokens * shape.hidden if norms else 0  # per-block norms + the final one
    out["total"] = sum(out.values())
    return out


def decode_flops(config: Any, mask: torch.Tensor | Sequence[bool] | None, context: int, steps: int,
                 kv_policy: KVPolicy = "keep", batch: int = 1) -> int:
    """Total FLOPs of `steps` one-token decode forwards, the first with `context` cached tokens."""
    return sum(flops(config, mask, kv_policy=kv_policy, phase="decode", context=context + i, batch=batch)["total"]
               for i in range(steps))


def params_skipped(config: Any, mask: torch.Tensor | Sequence[bool] | None,
                   kv_policy: KVPolicy = "keep") -> dict[str, float]:
    """Weights a mask leaves unread (a "keep" skipped attention still reads W_K and W_V), as counts and
    shares of the decoder layers' and of the whole model's weights (biases and norm vectors left out)."""
    shape = config if isinstance(config, Shape) else Shape.from_config(config)
    run = _as_mask(mask, shape.n_blocks)
    attention = shape.attention_params() - (shape.kv_params() if kv_policy == "keep" else 0)
    skipped = sum(attention if i % 2 == ATTN else shape.ffn_params() for i, r in enumerate(run) if not r)
    layers = shape.layers * (shape.attention_params() + shape.ffn_params())
    return {"skipped": skipped, "share_of_layers": skipped / layers, "share_of_model": skipped / shape.model_params()}


def canonical_order(n_blocks: int, order: Order = "attention-first") -> list[int]:
    """The order in which blocks are skipped when no mask is given (see ORDERS)."""
    if order not in ORDERS:
        raise IGPruneError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    layers = range(n_blocks // 2 - 1, -1, -1)
    first, then = (ATTN, FFN) if order == "attention-first" else (FFN, ATTN)
    return [2 * i + first for i in layers] + [2 * i + then for i in layers]


def canonical_mask(n_blocks: int, n_off: int, order: Order = "attention-first") -> torch.Tensor:
    """A mask skipping the first `n_off` blocks of the canonical order."""
    if not 0 <= n_off < n_blocks:
        raise IGPruneError(f"cannot skip {n_off} of {n_blocks} blocks; choose 0 to {n_blocks - 1}")
    return mask_from_off(canonical_order(n_blocks, order)[:n_off], n_blocks)


def table_row(config: Any, label: str, masks: Sequence[torch.Tensor], seq_len: int = 2048,
              kv_policies: Sequence[KVPolicy] = ("keep", "drop"), batch: int = 1) -> dict[str, Any]:
    """One Table-2 row for a set of masks (one, or a bundle's per-cluster masks): FLOPs of a `seq_len`-token
    prefill with logits at every position, averaged over the masks, with the min-max range of % of dense."""
    shape = Shape.from_config(config)
    stacked = torch.stack([torch.as_tensor(m).to(torch.bool).flatten() for m in masks])
    counts = [skipped_blocks(m) for m in stacked]
    row: dict[str, Any] = {
        "label": label,
        "masks": len(stacked),
        "blocks_total": shape.n_blocks,
        "blocks_skipped": sum(c["total"] for c in counts) / len(counts),
        "attn_off": sum(c["attn"] for c in counts) / len(counts),
        "ffn_off": sum(c["ffn"] for c in counts) / len(counts),
    }
    row["sparsity"] = row["blocks_skipped"] / shape.n_blocks
    for policy in kv_policies:
        dense = flops(shape, None, seq_len, policy, batch=batch)["total"]
        totals = [flops(shape, m, seq_len, policy, batch=batch)["total"] for m in stacked]
        shares = [params_skipped(shape, m, policy)["share_of_model"] for m in stacked]
        row[policy] = {
            "flops": sum(totals) / len(totals),
            "percent_of_dense": 100 * sum(totals) / len(totals) / dense,
            "percent_range": [100 * min(totals) / dense, 100 * max(totals) / dense],
            "params_skipped_share": sum(shares) / len(shares),
        }
    return row


def canonical_table(config: Any, max_sparsity: float = 0.41, step: int = 2, seq_len: int = 2048,
                    kv_policies: Sequence[KVPolicy] = ("keep", "drop"),
                    order: Order = "attention-first") -> list[dict[str, Any]]:
    """Rows for 0, step, 2*step, ... skipped blocks (up to max_sparsity) in a canonical order."""
    n_blocks = Shape.from_config(config).n_blocks
    counts = range(0, min(n_blocks - 1, math.floor(max_sparsity * n_blocks)) + 1, step)
    return [table_row(config, order, [canonical_mask(n_blocks, k, order)], seq_len, kv_policies) for k in counts]


def bundle_table(config: Any, bundles: Sequence[str | Path], seq_len: int = 2048,
                 kv_policies: Sequence[KVPolicy] = ("keep", "drop")) -> list[dict[str, Any]]:
    """One row per bundle (its clusters' masks averaged, equally weighted); dense first."""
    from igprune.bundle import Bundle

    n_blocks = Shape.from_config(config).n_blocks
    rows = [table_row(config, "dense", [torch.ones(n_blocks, dtype=torch.bool)], seq_len, kv_policies)]
    for path in bundles:
        bundle = Bundle.load(path)
        if bundle.masks.shape[1] != n_blocks:
            raise IGPruneError(f"bundle {path} has {bundle.masks.shape[1]}-block masks; this config has {n_blocks}")
        label = f"{Path(path).name} ({bundle.config.get('method', '?')}, N={bundle.n_clusters})"
        rows.append(table_row(config, label, list(bundle.masks), seq_len, kv_policies))
    return rows


def human(n: float) -> str:
    """12345678 -> '12.35M' (the paper writes 32.94T)."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table: sparsity, FLOPs and % of dense per KV policy, parameters skipped."""
    policies = [p for p in ("keep", "drop") if rows and p in rows[0]]
    labelled = len({row["label"] for row in rows}) > 1
    head = ["mask"] * labelled + ["blocks off", "sparsity", "attn off", "FFN off"]
    for p in policies:
        head += [f"FLOPs ({p})", f"% of dense ({p})", f"params skipped ({p})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"]] * labelled + [f"{row['blocks_skipped']:g}/{row['blocks_total']}",
                                              f"{100 * row['sparsity']:.2f}%",
                 f"{row['attn_off']:g}", f"{row['ffn_off']:g}"]
        for p in policies:
            low, high = row[p]["percent_range"]
            spread = f" ({low:.1f}-{high:.1f})" if high - low >= 0.05 else ""
            cells += [human(row[p]["flops"]), f"{row[p]['percent_of_dense']:.1f}%{spread}",
                      f"{100 * row[p]['params_skipped_share']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
