"""A bundle: everything needed to run a pruned model, as a folder of JSON and safetensors (no pickle).

    bundle.json          what made it: method, model id and fingerprint, encoder, N, sparsity, seed,
                         granularity, training settings, final losses, search logs; and a sha256 of
                         tensors.safetensors and of its own content, so a damaged bundle never loads
    tensors.safetensors  centroids (N, d), masks (N, B) bool, and log_alpha (N, units) when trained; with a
                         gate, radii (N,) and the fallback mask (1, B) bool

Static methods (SLEB, ShortenedLlama, EvoPress, static L0) write the same format with N = 1 and no
encoder. The fingerprint ties a bundle to the model it was made for; loading onto another model fails.
Every load checks the digests, the schema (SCHEMA) and that the masks agree with what bundle.json says
of them; any failure is an IGPruneError of one line naming the file. Bundles of format 1 (no digests)
still load, with a warning that `igprune bundle rehash DIR` adds them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from igprune.blocks import decoder_layers
from igprune.files import IGPruneError, atomic_path, sha256_file, write_json

FORMAT = "igprune-bundle/2"
OLD_FORMATS = ("igprune-bundle/1",)  # no digests: loaded with a warning
CONFIG_FILE, TENSOR_FILE = "bundle.json", "tensors.safetensors"
_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings")
_NUMBER = (int, float)
# What every loader relies on: key -> accepted types. REQUIRED must be present; OPTIONAL is checked when present.
REQUIRED: dict[str, tuple[type, ...]] = {
    "method": (str,), "model": (str,), "fingerprint": (dict,), "n_clusters": (int,), "sparsity": _NUMBER,
    "granularity": (str,), "blocks_total": (int,), "blocks_skipped": (int,), "seed": (int,)}
OPTIONAL: dict[str, tuple[type, ...]] = {
    "encoder": (str,), "encoder_tokens": (int, type(None)), "cluster_sizes": (list,), "attn_skipped": (int,),
    "ffn_skipped": (int,), "calibration": (dict,), "logs": (dict,), "gate": (dict,)}
FINGERPRINT: dict[str, tuple[type, ...]] = {
    "architecture": (str,), "num_layers": (int,), "hidden_size": (int,), "config_sha256": (str,),
    "weight_signature": (list,)}


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


def content_sha256(record: dict[str, Any]) -> str:
    """A digest of bundle.json's content without its digests: key order and whitespace do not matter."""
    content = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digests(path: Path, record: dict[str, Any]) -> dict[str, str]:
    return {CONFIG_FILE: content_sha256(record), TENSOR_FILE: sha256_file(path / TENSOR_FILE)}


def _type_errors(record: dict[str, Any], required: dict, optional: dict) -> list[str]:
    """What is missing or of the wrong type in `record`, as short phrases (bool is not accepted as a number)."""
    problems = [f"no {key!r}" for key in required if key not in record]
    for key, types in {**required, **optional}.items():
        value = record.get(key)
        if key in record and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            problems.append(f"{key!r} is {type(value).__name__}, not {' or '.join(t.__name__ for t in types)}")
    return problems


def _read_record(path: Path) -> dict[str, Any]:
    """bundle.json as a dict, or a one-line IGPruneError naming the file."""
    file = path / CONFIG_FILE
    try:
        record = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise IGPruneError(f"{file}: not valid JSON ({detail}); the bundle is damaged, rebuild or recopy it") from err
    if not isinstance(record, dict):
        raise IGPruneError(f"{file}: not a JSON object; the bundle is damaged, rebuild or recopy it")
    return record


def _check_known(path: Path, record: dict[str, Any]) -> None:
    fmt = record.get("format")
    if fmt != FORMAT and fmt not in OLD_FORMATS:
        raise IGPruneError(f"{path / CONFIG_FILE}: unknown bundle format {fmt!r}; this igprune reads {FORMAT} and "
                           f"{', '.join(OLD_FORMATS)}")


def _digests_match(path: Path, record: dict[str, Any]) -> str | None:
    """The name of the first file whose digest differs from the recorded one; None if all match."""
    recorded = record.get("sha256")
    if not isinstance(recorded, dict) or set(recorded) != {CONFIG_FILE, TENSOR_FILE}:
        return CONFIG_FILE
    return next((name for name, digest in _digests(path, record).items() if recorded[name] != digest), None)


def _check_format(path: Path, record: dict[str, Any]) -> None:
    """The format is known and, where digests are recorded (always in the current format), they match."""
    _check_known(path, record)
    if record.get("sha256") is None and record["format"] != FORMAT:
        warnings.warn(f"bundle {path} has no checksums (format {record['format']}), so damage to it cannot be "
                      f"detected; run `igprune bundle rehash {path}` to add them", stacklevel=3)
        return
    bad = _digests_match(path, record)
    if bad is not None:
        raise IGPruneError(f"{path / bad}: sha256 missing or not the one recorded in {CONFIG_FILE}; the bundle "
                           "was damaged or edited, rebuild or recopy it")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / TENSOR_FILE
    try:
        tensors = load_file(file)
    except Exception as err:  # safetensors raises its own error types for any malformed file
        raise IGPruneError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0][:120]}); "
                           "the bundle is damaged, rebuild or recopy it") from err
    missing = [k for k in ("masks", "centroids") if k not in tensors]
    if missing:
        raise IGPruneError(f"{file}: no {' or '.join(missing)} tensor; the bundle is damaged")
    return tensors


@dataclass(repr=False)
class Bundle:
    masks: torch.Tensor  # (N, B) bool, True = run
    centroids: torch.Tensor  # (N, d) float32; (1, 0) for static bundles
    config: dict[str, Any] = field(default_factory=dict)
    log_alpha: torch.Tensor | None = None  # (N, units) for trained masks
    logs: dict[str, Any] = field(default_factory=dict)  # learning curves, search logs
    source: Path | None = field(default=None, compare=False)  # the folder it was loaded from or saved to
    # The gate (routing.gate_radii): an input farther from its nearest centroid than that cluster's radius
    # runs under the fallback mask, route N, instead of the cluster's.
    radii: torch.Tensor | None = None  # (N,) float32
    fallback: torch.Tensor | None = None  # (1, B) bool

    @property
    def n_clusters(self) -> int:
        return self.masks.shape[0]

    @property
    def static(self) -> bool:
        return self.n_clusters == 1

    @property
    def route_masks(self) -> torch.Tensor:
        """The mask of every route: the clusters', then the fallback's when the bundle has a gate."""
        return self.masks if self.fallback is None else torch.cat([self.masks, self.fallback])

    @property
    def one_mask(self) -> bool:
        """Whether every route carries the same mask: routing then changes nothing."""
        masks = self.route_masks
        return bool((masks == masks[0]).all())

    def with_gate(self, radii: torch.Tensor, fallback: torch.Tensor, quantile: float) -> Bundle:
        """A copy that sends inputs beyond a cluster's radius (the `quantile` of its members' distances) to
        `fallback`, the mask every cluster starts from, instead of a mask chosen on text unlike them."""
        config = {**self.config, "gate": {"quantile": quantile}}
        bundle = Bundle(self.masks, self.centroids, config, self.log_alpha, self.logs,
                        radii=radii.float(), fallback=fallback.to(torch.bool).reshape(1, -1))
        bundle.validate()
        return bundle

    def global_bundle(self) -> Bundle:
        """The gate's fallback, the fit's global mask, as a one-cluster (static) bundle: what every input gets when
        the router cannot tell, to deploy or compare on its own."""
        if self.fallback is None:
            raise IGPruneError(f"{self} has no global mask: only a fit with a gate keeps one (route.gate)")
        keep = ("model", "fingerprint", "sparsity", "granularity", "blocks_total", "blocks_skipped", "seed",
                "calibration", "recipe", "fit")
        config = {**{k: self.config[k] for k in keep if k in self.config}, "method": "global", "n_clusters": 1,
                  "global_of": self.config.get("method", "?")}
        bundle = Bundle(self.fallback.clone(), torch.zeros(1, 0), config,
                        logs={"search": {"order": self.logs.get("search", {}).get("global_order")}})
        bundle.validate()
        return bundle

    def __str__(self) -> str:
        """Its folder: messages name a bundle by where it is, never by its tensors."""
        return str(self.source) if self.source is not None else "(unsaved bundle)"

    def __repr__(self) -> str:
        return (f"Bundle({self.config.get('method', '?')}, {self.n_clusters} cluster(s) x {self.masks.shape[-1]} "
                f"blocks, {self})")

    def save(self, path: str | Path) -> Path:
        """Write the bundle folder atomically, with digests; an existing bundle there is replaced only on success."""
        path = Path(path)
        tensors = {"masks": self.masks.to(torch.bool).contiguous(), "centroids": self.centroids.float().contiguous()}
        if self.log_alpha is not None:
            tensors["log_alpha"] = self.log_alpha.detach().float().cpu().contiguous()
        if self.radii is not None and self.fallback is not None:
            tensors.update(radii=self.radii.float().contiguous(), fallback=self.fallback.to(torch.bool).contiguous())
        # digested as it will be read back (tuples as lists, keys as strings)
        record = json.loads(json.dumps({"format": FORMAT, **self.config, "logs": self.logs}))
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / TENSOR_FILE)
            write_json(tmp / CONFIG_FILE, {"format": FORMAT, "sha256": _digests(tmp, record), **record})
        self.source = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read and check a bundle: digests, schema, masks against bundle.json; IGPruneError if anything is off."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / TENSOR_FILE).is_file():
            raise IGPruneError(f"{path} is not an igprune bundle (no {CONFIG_FILE}/{TENSOR_FILE}); "
                               "make one with `igprune fit` or `igprune baseline`")
        try:
            record = _read_record(path)
            _check_format(path, record)
            tensors = _read_tensors(path)
        except OSError as err:
            raise IGPruneError(f"{err.filename or path}: cannot be read ({err.strerror or err})") from err
        config = {k: v for k, v in record.items() if k not in ("format", "sha256", "logs")}
        bundle = cls(tensors["masks"], tensors["centroids"], config, tensors.get("log_alpha"), record.get("logs", {}),
                     source=path, radii=tensors.get("radii"), fallback=tensors.get("fallback"))
        bundle.validate()
        return bundle

    def validate(self) -> None:
        """The schema holds and the tensors agree with it and with each other; else a one-line IGPruneError."""
        cfg = self.config
        problems = _type_errors({**cfg, "logs": self.logs}, REQUIRED, OPTIONAL)
        if isinstance(cfg.get("fingerprint"), dict):
            problems += [f"fingerprint: {p}" for p in _type_errors(cfg["fingerprint"], FINGERPRINT, {})]
        if problems:
            where = self.source / CONFIG_FILE if self.source else self
            raise IGPruneError(f"{where}: {'; '.join(problems)}; the bundle is damaged or was not made by igprune")
        problems = self._tensor_problems()
        if problems:
            raise IGPruneError(f"{self}: {TENSOR_FILE} disagrees with {CONFIG_FILE}: {'; '.join(problems)}; "
                               "the bundle is damaged or was edited")

    def _tensor_problems(self) -> list[str]:
        """Disagreements between the tensors, and between them and what bundle.json records of them."""
        cfg, masks, problems = self.config, self.masks, []
        if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] % 2:
            return [f"masks are {masks.dtype} of shape {tuple(masks.shape)}, not (N, 2L) bool"]
        if bool((masks.view(torch.uint8) > 1).any()):
            return ["masks hold values other than true and false"]
        (n, blocks), layers = masks.shape, cfg["fingerprint"]["num_layers"]
        if n != cfg["n_clusters"]:
            problems.append(f"{n} masks but n_clusters is {cfg['n_clusters']}")
        if blocks != cfg["blocks_total"] or blocks != 2 * layers:
            problems.append(f"masks over {blocks} blocks but blocks_total is {cfg['blocks_total']} and the model "
                            f"has {2 * layers}")
        pairs = masks.view(n, -1, 2)
        for key, off in (("blocks_skipped", (~masks).sum(1)), ("attn_skipped", (~pairs[..., 0]).sum(1)),
                         ("ffn_skipped", (~pairs[..., 1]).sum(1))):
            if key in cfg and any(o != cfg[key] for o in off.tolist()):
                problems.append(f"masks skip {sorted(set(off.tolist()))} blocks where {key} is {cfg[key]}")
        if self.centroids.dim() != 2 or self.centroids.shape[0] != n:
            problems.append(f"centroids of shape {tuple(self.centroids.shape)} do not fit {n} masks")
        if self.log_alpha is not None and (self.log_alpha.dim() != 2 or self.log_alpha.shape[0] != n):
            problems.append(f"log_alpha of shape {tuple(self.log_alpha.shape)} does not fit {n} masks")
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in (self.centroids, self.log_alpha)):
            problems.append("centroids or log_alpha hold NaN or infinity")
        problems += self._gate_problems()
        if n > 1 and not cfg.get("encoder"):
            problems.append(f"{n} clusters need an 'encoder' in {CONFIG_FILE} to route by")
        sizes = cfg.get("cluster_sizes")
        if sizes is not None and (len(sizes) != n or any(type(s) is not int for s in sizes)):
            problems.append(f"cluster_sizes {sizes} do not fit {n} clusters")
        return problems

    def _gate_problems(self) -> list[str]:
        """A gate is radii for every cluster, a fallback mask skipping as many blocks as they do, and its record."""
        radii, fallback, n = self.radii, self.fallback, self.n_clusters
        if radii is None and fallback is None and "gate" not in self.config:
            return []
        if radii is None or fallback is None or "gate" not in self.config:
            return ["a gate needs radii, a fallback mask and its 'gate' record together"]
        problems = []
        if radii.shape != (n,) or not bool(torch.isfinite(radii).all()) or bool((radii < 0).any()):
            problems.append(f"gate radii of shape {tuple(radii.shape)} are not {n} finite distances")
        if fallback.dtype != torch.bool or fallback.shape != (1, self.masks.shape[1]):
            problems.append(f"the fallback mask is {fallback.dtype} of shape {tuple(fallback.shape)}, not "
                            f"(1, {self.masks.shape[1]}) bool")
        elif int((~fallback).sum()) != int((~self.masks[0]).sum()):
            problems.append(f"the fallback mask skips {int((~fallback).sum())} blocks, the clusters' "
                            f"{int((~self.masks[0]).sum())}")
        return problems

    def check_model(self, model: PreTrainedModel, where: str = "") -> None:
        """Refuse a model the bundle was not made for; `where` names the bundle (default: its folder)."""
        where = where or str(self)
        check_fingerprint(self.config.get("fingerprint", {}), model, where)
        if self.masks.shape[1] != 2 * len(decoder_layers(model)):
            raise IGPruneError(f"bundle {where} has masks over {self.masks.shape[1]} blocks but the model has "
                               f"{2 * len(decoder_layers(model))}; load it with the model named in its bundle.json")


def rehash(path: str | Path, force: bool = False) -> str:
    """Add the digests to a bundle (format 1 to 2), keeping the rest of bundle.json as it is; atomic.

    The bundle must otherwise pass every check of `Bundle.load`. Digests that exist and do not match are
    renewed only with `force` (after a deliberate edit). Returns what was done, in a few words.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / TENSOR_FILE).is_file():
        raise IGPruneError(f"{path} is not an igprune bundle (no {CONFIG_FILE}/{TENSOR_FILE})")
    record = _read_record(path)
    _check_known(path, record)
    if record.get("sha256") is not None and not force:
        if _digests_match(path, record) is not None:
            raise IGPruneError(f"{path}: its digests do not match its files (damaged or edited); if you edited it "
                               "on purpose, rerun with --force")
        return "digests present and matching; nothing to do"
    content = {k: v for k, v in record.items() if k not in ("format", "sha256")}
    tensors = _read_tensors(path)
    Bundle(tensors["masks"], tensors["centroids"], {k: v for k, v in content.items() if k != "logs"},
           tensors.get("log_alpha"), content.get("logs", {}), source=path, radii=tensors.get("radii"),
           fallback=tensors.get("fallback")).validate()
    new = {"format": FORMAT, **content}
    write_json(path / CONFIG_FILE, {"format": FORMAT, "sha256": _digests(path, new), **content})
    return f"digests written (format {FORMAT})"


def as_bundle(bundle: Bundle | str | Path) -> tuple[Bundle, str | None]:
    """A bundle given as itself or as its folder (loaded), and that folder for messages (None for an object)."""
    if isinstance(bundle, Bundle):
        return bundle, None
    return Bundle.load(bundle), str(bundle)
