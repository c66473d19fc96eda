"""A bundle: everything needed to run a pruned model, as a folder of JSON and safetensors (no pickle).

    bundle.json          what made it: method, model id and fingerprint, encoder, N, sparsity, seed,
                         granularity, training settings, final losses, search logs
    tensors.safetensors  centroids (N, d), masks (N, B) bool, and log_alpha (N, units) when trained

Static methods (SLEB, ShortenedLlama, EvoPress, static L0) write the same format with N = 1 and no
encoder. The fingerprint ties a bundle to the model it was made for; loading onto another model fails.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from igprune.blocks import decoder_layers
from igprune.files import IGPruneError, atomic_path, read_json, write_json

FORMAT = "igprune-bundle/1"
_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings")


def fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture, sizes, a hash of the shape-defining config and a dtype-independent weight signature."""
    cfg = model.config
    shape = {k: getattr(cfg, k, None) for k in _CONFIG_KEYS}
    layers = decoder_layers(model)
    return {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "num_layers": len(layers),
        "hidden_size": cfg.hidden_size,
        "config_sha256": hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest(),
        # mean |w| of the embeddings and of the first layer: survives fp32/bf16 casts, differs across checkpoints
        "weight_signature": [round(float(p.detach().float().abs().mean()), 4) for p in
                             (model.get_input_embeddings().weight, *list(layers[0].parameters())[:1])],
    }


def check_fingerprint(saved: dict[str, Any], model: PreTrainedModel, where: str) -> None:
    """Refuse to apply a bundle to a model it was not made for."""
    current = fingerprint(model)
    for key in ("architecture", "num_layers", "hidden_size", "config_sha256"):
        if saved.get(key) != current[key]:
            raise IGPruneError(f"bundle {where} was made for another model ({key}: {saved.get(key)} vs "
                               f"{current[key]}); load it with the model named in its bundle.json")
    old, new = saved.get("weight_signature", []), current["weight_signature"]
    if len(old) != len(new) or any(abs(a - b) > 0.01 * max(abs(a), 1e-6) for a, b in zip(old, new, strict=False)):
        raise IGPruneError(f"bundle {where} was made for a model with other weights (signature {old} vs {new}); "
                           "load it with the model named in its bundle.json")


@dataclass
class Bundle:
    masks: torch.Tensor  # (N, B) bool, True = run
    centroids: torch.Tensor  # (N, d) float32; (1, 0) for static bundles
    config: dict[str, Any] = field(default_factory=dict)
    log_alpha: torch.Tensor | None = None  # (N, units) for trained masks
    logs: dict[str, Any] = field(default_factory=dict)  # learning curves, search logs

    @property
    def n_clusters(self) -> int:
        return self.masks.shape[0]

    @property
    def static(self) -> bool:
        return self.n_clusters == 1

    def save(self, path: str | Path) -> Path:
        """Write the bundle folder atomically; an existing bundle there is replaced only on success."""
        path = Path(path)
        tensors = {"masks": self.masks.to(torch.bool).contiguous(), "centroids": self.centroids.float().contiguous()}
        if self.log_alpha is not None:
            tensors["log_alpha"] = self.log_alpha.detach().float().cpu().contiguous()
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / "tensors.safetensors")
            write_json(tmp / "bundle.json", {"format": FORMAT, **self.config, "logs": self.logs})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        path = Path(path)
        if not (path / "bundle.json").is_file() or not (path / "tensors.safetensors").is_file():
            raise IGPruneError(f"{path} is not an igprune bundle (no bundle.json/tensors.safetensors); "
                               "make one with `igprune fit` or `igprune baseline`")
        config = read_json(path / "bundle.json")
        if config.pop("format", None) != FORMAT:
            raise IGPruneError(f"{path}: unknown bundle format; expected {FORMAT}")
        logs = config.pop("logs", {})
        tensors = load_file(path / "tensors.safetensors")
        return cls(tensors["masks"], tensors["centroids"], config, tensors.get("log_alpha"), logs)

    def check_model(self, model: PreTrainedModel, where: str = "") -> None:
        check_fingerprint(self.config.get("fingerprint", {}), model, where)


def as_bundle(bundle: Bundle | str | Path) -> tuple[Bundle, str | None]:
    """A bundle given as itself or as its folder (loaded), and that folder for messages (None for an object)."""
    if isinstance(bundle, Bundle):
        return bundle, None
    return Bundle.load(bundle), str(bundle)
