"""Export one mask as a plain, smaller HF checkpoint: loads with AutoModelForCausalLM.from_pretrained alone.

Layers whose attention and FFN are both skipped are removed: num_hidden_layers shrinks, per-layer config
lists (layer_types, ...) drop their entries, and each kept layer's layer_idx is renumbered so the KV cache
lines up. A layer with only one branch skipped cannot be expressed as such in transformers 5.23: the
Llama, Qwen2, Qwen3, Mistral and Gemma3 configs give every layer the same attention and the same FFN (no
per-layer no-op, no per-layer intermediate size; the models that do have per-layer block types, such as
NemotronH, use other blocks). So that branch is kept with its output projection (o_proj or down_proj,
weight and bias) set to zero: its contribution is exactly zero and the logits equal the masked model's,
but it is still computed. igprune-export.json and README.md in the folder say which layers this applies to.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from igprune.blocks import ATTN, FFN, decoder_layers, unpatch
from igprune.bundle import Bundle, as_bundle
from igprune.files import IGPruneError, atomic_path, write_json
from igprune.masks import mask_row

FORMAT = "igprune-export/1"
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "mlp_layer_types")  # config lists with one entry per layer
OUTPUT_PROJECTIONS = {ATTN: ("self_attn", "o_proj"), FFN: ("mlp", "down_proj")}


@dataclass
class ExportPlan:
    """What export does to each layer of the source model (indices are the source's layer numbers)."""

    mask: str  # mask_row of the exported mask
    layers_before: int
    layers_kept: list[int]
    layers_removed: list[int]
    zeroed_attention: list[int] = field(default_factory=list)  # kept layers whose attention output is zeroed
    zeroed_ffn: list[int] = field(default_factory=list)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> ExportPlan:
        on = mask.to(torch.bool).view(-1, 2).tolist()
        kept = [i for i, (a, f) in enumerate(on) if a or f]
        if not kept:
            raise IGPruneError("the mask skips every block; nothing would be left to export")
        return cls(mask_row(mask), len(on), kept, [i for i, (a, f) in enumerate(on) if not (a or f)],
                   [i for i in kept if not on[i][ATTN]], [i for i in kept if not on[i][FFN]])

    @property
    def note(self) -> str:
        removed = f"{len(self.layers_removed)} of {self.layers_before} layers removed (both blocks skipped)"
        half = len(self.zeroed_attention) + len(self.zeroed_ffn)
        if not half:
            return removed + "; every block left runs in full."
        return (f"{removed}. {half} blocks skipped alone (attention of layers {self.zeroed_attention}, FFN of "
                f"layers {self.zeroed_ffn}, source numbering) are kept with their output projection set to zero: "
                "they add exactly nothing but still cost compute, because transformers 5.23 has no per-layer "
                "way to leave out only the attention or only the FFN of these architectures.")


def prune_model(model: PreTrainedModel, mask: torch.Tensor, inplace: bool = False) -> tuple[PreTrainedModel,
                                                                                             ExportPlan]:
    """A plain HF model computing what `model` computes under `mask` (copied unless inplace; inplace consumes it)."""
    layers = decoder_layers(model)
    if mask.numel() != 2 * len(layers):
        raise IGPruneError(f"mask has {mask.numel()} entries but the model has {2 * len(layers)} blocks")
    plan = ExportPlan.from_mask(mask.cpu())
    target = model if inplace else copy.deepcopy(model)
    unpatch(target)
    layers = decoder_layers(target)
    with torch.no_grad():
        for kind, indices in ((ATTN, plan.zeroed_attention), (FFN, plan.zeroed_ffn)):
            for i in indices:
                _zero_output(layers[i], kind)
    kept = torch.nn.ModuleList([layers[i] for i in plan.layers_kept])
    for new, old in enumerate(plan.layers_kept):
        for module in kept[new].modules():
            if getattr(module, "layer_idx", None) == old:
                module.layer_idx = new
    target.model.layers = kept
    config = target.config
    for key in PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == plan.layers_before:
            setattr(config, key, [values[i] for i in plan.layers_kept])
    config.num_hidden_layers = len(plan.layers_kept)
    return target, plan


def _zero_output(layer: torch.nn.Module, kind: int) -> None:
    branch, name = OUTPUT_PROJECTIONS[kind]
    projection = getattr(getattr(layer, branch, None), name, None)
    if not isinstance(projection, torch.nn.Linear):
        raise IGPruneError(f"{type(layer).__name__} has no {branch}.{name} linear layer to zero; igprune can export "
                           "only layers with both blocks skipped or none for this architecture")
    projection.weight.zero_()
    if projection.bias is not None:
        projection.bias.zero_()


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, mask: torch.Tensor,
                 out: str | Path, source: dict[str, Any] | None = None, inplace: bool = False) -> dict[str, Any]:
    """Write the pruned checkpoint, the tokenizer and igprune-export.json to `out` atomically; returns the record."""
    params_before = _n_parameters(model)
    pruned, plan = prune_model(model, mask, inplace=inplace)
    record = {"format": FORMAT, **(source or {}), "source_model": getattr(model, "name_or_path", None),
              **asdict(plan), "layers_after": len(plan.layers_kept),
              "parameters": {"before": params_before, "after": _n_parameters(pruned)}, "note": plan.note}
    out = Path(out)
    with atomic_path(out) as tmp:
        pruned.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "igprune-export.json", record)
        (tmp / "README.md").write_text(_readme(record))
    return record


def export_bundle(bundle: str | Path | Bundle, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                  out: str | Path, cluster: int = 0, inplace: bool = False) -> dict[str, Any]:
    """Export cluster `cluster`'s mask of a bundle (a folder or a loaded Bundle) made for `model`."""
    mask, source = cluster_mask(bundle, model, cluster)
    return export_model(model, tokenizer, mask, out, source, inplace=inplace)


def cluster_mask(bundle: str | Path | Bundle, model: PreTrainedModel, cluster: int) -> tuple[torch.Tensor,
                                                                                          dict[str, Any]]:
    """One cluster's mask of a bundle checked against `model`, and where it came from (for the export record)."""
    bundle, where = as_bundle(bundle)
    bundle.check_model(model, where or "")
    if not 0 <= cluster < bundle.n_clusters:
        raise IGPruneError(f"cluster must be in [0, {bundle.n_clusters - 1}] for this bundle, not {cluster}")
    source = {"bundle": where, "method": bundle.config.get("method"), "cluster": cluster,
              "sparsity": bundle.config.get("sparsity")}
    return bundle.masks[cluster], source


def _n_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _readme(record: dict[str, Any]) -> str:
    return (f"# {record.get('source_model')} pruned by igprune ({record.get('method')}, cluster "
            f"{record.get('cluster')})\n\n"
            "A plain transformers checkpoint: `AutoModelForCausalLM.from_pretrained(this_folder)`, no igprune code "
            "and no trust_remote_code.\n\n"
            f"- mask (per source layer: A/F run, . skipped): `{record['mask']}`\n"
            f"- layers: {record['layers_before']} -> {record['layers_after']}; parameters: "
            f"{record['parameters']['before']:,} -> {record['parameters']['after']:,}\n\n"
            f"{record['note']}\n\nDetails in igprune-export.json.\n")
