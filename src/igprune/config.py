"""A fit's every knob, typed, with one set of defaults and validated in one place.

A `FitConfig` is what `igprune fit` runs and what a bundle records (bundle.json's "fit"): a recipe
(igprune.recipes) is a named FitConfig, a config file (YAML or JSON, or a bundle.json) changes some of its
fields, and the flags of `igprune fit` change a few more. Each step owns its section: the clusters
(clustering.ClusterConfig), the finder (finders.l0.TrainConfig or finders.search.SearchConfig), the choice
among candidate masks (choosing.ChooseConfig) and the router (routing.RouteConfig).

    config = recipe("paper").updated({"clusters": {"n_clusters": 8}, "l0": {"shared_steps": 100}})
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from igprune.choosing import ChooseConfig
from igprune.clustering import ClusterConfig
from igprune.files import IGPruneError
from igprune.finders.l0 import TrainConfig
from igprune.finders.search import SearchConfig
from igprune.masks import Granularity
from igprune.routing import RouteConfig

Finder = Literal["l0", "search"]
FINDERS: tuple[str, ...] = typing.get_args(Finder)
# TrainConfig fields the fit sets from its own (one sparsity, one seed, one granularity for every step)
_FROM_FIT = ("sparsity", "seed", "granularity")


@dataclass(frozen=True)
class DataConfig:
    """The calibration passages: `samples` of the `source` pool (igprune.data.CALIBRATION_SOURCES), balanced per
    source, each about `max_chars` characters (default: 4 x the finder's seq_len, about one training row)."""

    source: str = "mixed"
    samples: int | None = 4096
    max_chars: int | None = None

    def validate(self) -> None:
        from igprune.data import CALIBRATION_SOURCES, MIN_CHARS

        if self.source not in CALIBRATION_SOURCES:
            raise IGPruneError(f"unknown calibration source {self.source!r}; known: {', '.join(CALIBRATION_SOURCES)}")
        if self.samples is not None and self.samples < 1:
            raise IGPruneError(f"data.samples must be >= 1 (or null: all), got {self.samples}")
        if self.max_chars is not None and self.max_chars < MIN_CHARS:
            raise IGPruneError(f"data.max_chars must be >= {MIN_CHARS}, got {self.max_chars}")


@dataclass(frozen=True)
class FitConfig:
    """Everything a fit depends on besides the model and the user's own texts."""

    recipe: str = "custom"  # the recipe this config started from (igprune.recipes), for the record
    finder: Finder = "l0"  # l0: the paper's hard-concrete training; search: SLEB per cluster from a shared prefix
    sparsity: float = 0.25  # skipped blocks / 2L
    granularity: Granularity = "block"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    clusters: ClusterConfig = field(default_factory=ClusterConfig)
    l0: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    choose: ChooseConfig = field(default_factory=ChooseConfig)
    route: RouteConfig = field(default_factory=RouteConfig)

    def validate(self) -> FitConfig:
        """One-line errors for anything a fit cannot run, before the model loads; returns self."""
        if self.finder not in FINDERS:
            raise IGPruneError(f"finder must be one of {', '.join(FINDERS)}, not {self.finder!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise IGPruneError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.granularity not in ("block", "layer"):
            raise IGPruneError(f"granularity must be 'block' or 'layer', not {self.granularity!r}")
        for section in (self.data, self.clusters, self.search, self.choose, self.route):
            section.validate()
        self.train_config().validate_settings()
        given = self.search.candidates or self.search.global_order
        if given and self.finder != "search":
            raise IGPruneError("search.candidates and search.global_order are used by finder 'search' only: set finder "
                               "to search")
        if given and not self.choose.samples:
            raise IGPruneError("extra candidate and global masks are only used when each cluster chooses its mask: "
                               "set choose.samples > 0")
        if self.route.gate is not None and (self.finder != "search" or not self.choose.samples):
            raise IGPruneError("a gate falls back to the global mask each cluster chooses against: use finder "
                               "'search' with choose.samples > 0, or set route.gate to null")
        return self

    def train_config(self) -> TrainConfig:
        """The L0 trainer's settings with the fit's sparsity, seed and granularity."""
        return dataclasses.replace(self.l0, **{name: getattr(self, name) for name in _FROM_FIT})

    @property
    def seq_len(self) -> int:
        """Tokens per calibration row of the finder in use (passages are cut to about four times this)."""
        return self.l0.seq_len if self.finder == "l0" else self.search.seq_len

    def updated(self, changes: dict[str, Any], where: str = "config") -> FitConfig:
        """This config with `changes` (nested like to_dict's output) applied; unknown names and values of the wrong
        type are one-line errors naming `where` they came from."""
        return _replace(self, changes, where)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as bundle.json records it and `updated` or a config file takes it back."""
        values = dataclasses.asdict(self)
        for name in _FROM_FIT:
            del values["l0"][name]
        return values


def _replace(obj: Any, changes: dict[str, Any], where: str) -> Any:
    if not isinstance(changes, dict):
        raise IGPruneError(f"{where} must be a mapping of option names to values, got {type(changes).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if not (isinstance(obj, TrainConfig) and f.name in _FROM_FIT)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise IGPruneError(f"{where} has no option {', '.join(unknown)}; its options: {', '.join(names)}")
    values = {}
    for name, value in changes.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            values[name] = _replace(current, value, f"{where}.{name}")
        else:
            values[name] = _checked(value, hints[name], f"{where}.{name}")
    return dataclasses.replace(obj, **values)


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits the annotation `hint` (an int is taken for a float); a one-line error otherwise."""
    if _fits(value, hint):
        return float(value) if hint is float and isinstance(value, int) else value
    raise IGPruneError(f"{where} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value) if args else True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def read_config(path: str | Path) -> dict[str, Any]:
    """The changes a config file asks for: YAML or JSON, or a bundle.json (its recorded "fit" config, which
    reproduces that bundle)."""
    path = Path(path)
    if path.is_dir():
        path = path / "bundle.json"
    if not path.is_file():
        raise IGPruneError(f"no config file at {path}; give a YAML or JSON file, or a bundle folder")
    import yaml

    try:  # a UnicodeDecodeError is a ValueError too
        text = path.read_text(encoding="utf-8")
        values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise IGPruneError(f"{path} is not valid UTF-8 {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if isinstance(values, dict) and str(values.get("format", "")).startswith("igprune-bundle"):
        if "fit" not in values and "reproduce" in values:  # a benchmark's bundle made by steps igprune fit lacks
            raise IGPruneError(f"{path} was not made by igprune fit; remake it with: "
                               + " && ".join(values["reproduce"]["commands"]))
        if "fit" not in values:
            raise IGPruneError(f"{path} was written before bundles recorded their fit config; give a config file")
        return values["fit"]
    if not isinstance(values, dict):
        raise IGPruneError(f"{path} must hold a mapping of option names to values")
    return values
