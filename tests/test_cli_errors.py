"""The CLI on bad input and damaged bundles, as a table: each row is a command, the exit code and a fragment of the
message it must give. Every row must end without a traceback, print one readable line per problem and write
nothing; the counts are printed for the README's reliability section (`pytest -s`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import bundle_config, tiny_model, tiny_tokenizer

from igprune import cli
from igprune.bundle import FORMAT, Bundle

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(args: list[str], cwd: Path) -> tuple[int, str]:
    """`igprune ARGS` in this process (as the entry point runs it): exit code and stdout + stderr.

    An exception escaping main() is what a user would see as a traceback: it fails the test that ran it.
    """
    out, before = io.StringIO(), os.getcwd()
    argv, showwarning = sys.argv, warnings.showwarning
    os.chdir(cwd)
    sys.argv = ["igprune", *args]
    try:
        with redirect_stdout(out), redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("always")
            try:
                cli.main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        os.chdir(before)
        sys.argv, warnings.showwarning = argv, showwarning
    return code, out.getvalue()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time: what "nothing written" compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_bundles(root: Path) -> dict[str, Path]:
    """Two tiny models and, for the first, a static and a 3-cluster bundle in the current format."""
    model_a, model_b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    paths = {"model_a": save_model(model_a, root / "model-a"), "model_b": save_model(model_b, root / "model-b")}
    static = torch.ones(1, 8, dtype=torch.bool)
    static[0, [3, 6]] = False
    Bundle(static, torch.zeros(1, 0), bundle_config(static, model_a, model=str(paths["model_a"]))).save(root / "static")
    masks = torch.ones(3, 8, dtype=torch.bool)
    for k, off in enumerate(([1, 5], [2, 6], [3, 7])):
        masks[k, off] = False
    config = bundle_config(masks, model_a, model=str(paths["model_a"]), cluster_sizes=[5, 4, 4], encoder_tokens=64)
    Bundle(masks, torch.randn(3, 384), config, torch.randn(3, 8), {"train": {"loss": [1.0, 0.5]}}).save(root / "ig")
    return {**paths, "static": root / "static", "ig": root / "ig"}


def edit_json(folder: Path, change) -> None:
    record = json.loads((folder / "bundle.json").read_text())
    change(record)
    (folder / "bundle.json").write_text(json.dumps(record, indent=2))


def as_format_1(folder: Path) -> None:
    """Rewrite a bundle as igprune-bundle/1 wrote it: no digests."""
    edit_json(folder, lambda r: (r.pop("sha256"), r.update(format="igprune-bundle/1")))


def flip_tensor_byte(folder: Path) -> None:
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x5A  # inside the last tensor's data, past the header
    (folder / "tensors.safetensors").write_bytes(bytes(data))


def zero_mask_row(folder: Path) -> None:
    """Every block of cluster 0 off, written as a valid safetensors file (what a careless edit would do)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "tensors.safetensors")
    tensors["masks"][0] = False
    save_file(tensors, folder / "tensors.safetensors")


def damage(kind: str):
    """The ways to damage a copy of a bundle, by name (the table's `damage` column)."""
    return {
        "truncate": lambda d: os.truncate(d / "tensors.safetensors", 100),
        "bad-json": lambda d: (d / "bundle.json").write_text('{"format": "igprune-bundle/2", "method": '),
        "not-object": lambda d: (d / "bundle.json").write_text("[1, 2]"),
        "binary-json": lambda d: (d / "bundle.json").write_bytes(b"\xff\xfe{}"),
        "flip": flip_tensor_byte,
        "zero-row": zero_mask_row,
        "blocks-total": lambda d: edit_json(d, lambda r: r.update(blocks_total=60)),
        "no-encoder": lambda d: edit_json(d, lambda r: r.pop("encoder")),
        "format-9": lambda d: edit_json(d, lambda r: r.update(format="igprune-bundle/9")),
        "no-digests": lambda d: edit_json(d, lambda r: r.pop("sha256")),
        "v1": as_format_1,
        "v1-truncate": lambda d: (as_format_1(d), os.truncate(d / "tensors.safetensors", 100)),
        "v1-zero-row": lambda d: (as_format_1(d), zero_mask_row(d)),
        "v1-blocks-total": lambda d: (as_format_1(d), edit_json(d, lambda r: r.update(blocks_total=60))),
        "v1-blocks-skipped": lambda d: (as_format_1(d), edit_json(d, lambda r: r.update(blocks_skipped=3))),
        "v1-no-encoder": lambda d: (as_format_1(d), edit_json(d, lambda r: r.pop("encoder"))),
        "v1-no-model": lambda d: (as_format_1(d), edit_json(d, lambda r: r.pop("model"))),
        "v1-bad-type": lambda d: (as_format_1(d), edit_json(d, lambda r: r.update(n_clusters="3"))),
        "v1-bool-count": lambda d: (as_format_1(d), edit_json(d, lambda r: r.update(seed=True))),
        "v1-sizes": lambda d: (as_format_1(d), edit_json(d, lambda r: r.update(cluster_sizes=[5, 4]))),
        "v1-fingerprint": lambda d: (as_format_1(d), edit_json(d, lambda r: r["fingerprint"].pop("num_layers"))),
        "no-tensors": lambda d: (d / "tensors.safetensors").unlink(),
    }[kind]


@dataclass(frozen=True)
class Case:
    """One row: which bundle copy to damage and how (or none), the command, and what it must give."""

    name: str
    args: list[str]  # BUNDLE, MODEL_A and MODEL_B stand for the damaged copy and the two model folders
    code: int
    fragment: str
    bundle: str | None = None  # "static" or "ig": the bundle to copy
    damage: str | None = None
    data: bool = False  # needs the prepared calibration data
    texts: str | None = None  # the contents of TEXTS, a file of the user's own inputs
    config: str | None = None  # the contents of CONFIG, a fit config file (YAML)


LONG = "word " * 10_000  # 50,000 characters
FIT = ["fit", "-m", "MODEL_A", "-o", "out", "--config", "CONFIG"]  # with a config file CONFIG
CASES = [
    # broken bundle files
    Case("truncated tensors", ["inspect", "BUNDLE"], 2, "tensors.safetensors: sha256", "ig", "truncate"),
    Case("v1: truncated tensors", ["inspect", "BUNDLE"], 2, "tensors.safetensors: not a readable", "ig",
         "v1-truncate"),
    Case("invalid JSON", ["inspect", "BUNDLE"], 2, "bundle.json: not valid JSON", "ig", "bad-json"),
    Case("JSON not an object", ["inspect", "BUNDLE"], 2, "bundle.json: not a JSON object", "static", "not-object"),
    Case("bundle.json not text", ["inspect", "BUNDLE"], 2, "not UTF-8", "static", "binary-json"),
    Case("missing tensors file", ["inspect", "BUNDLE"], 2, "is not an igprune bundle", "static", "no-tensors"),
    Case("not a bundle", ["inspect", "nowhere"], 2, "is not an igprune bundle"),
    Case("unknown format", ["inspect", "BUNDLE"], 2, "unknown bundle format 'igprune-bundle/9'", "ig", "format-9"),
    Case("digests removed", ["inspect", "BUNDLE"], 2, "bundle.json: sha256 missing", "ig", "no-digests"),
    # corrupted bundles that used to load silently
    Case("byte flipped in tensors", ["inspect", "BUNDLE"], 2, "tensors.safetensors: sha256", "ig", "flip"),
    Case("mask row zeroed", ["route", "a text", "-b", "BUNDLE"], 2, "tensors.safetensors: sha256", "ig", "zero-row"),
    Case("blocks_total edited", ["inspect", "BUNDLE"], 2, "bundle.json: sha256", "static", "blocks-total"),
    Case("missing encoder", ["inspect", "BUNDLE"], 2, "bundle.json: sha256", "ig", "no-encoder"),
    Case("v1: mask row zeroed", ["generate", "-b", "BUNDLE", "-p", "hi"], 2, "blocks_skipped is 2", "ig",
         "v1-zero-row"),
    Case("v1: blocks_total edited", ["inspect", "BUNDLE"], 2, "blocks_total is 60", "static", "v1-blocks-total"),
    Case("v1: blocks_skipped edited", ["inspect", "BUNDLE"], 2, "blocks_skipped is 3", "static", "v1-blocks-skipped"),
    Case("v1: missing encoder", ["inspect", "BUNDLE"], 2, "3 clusters need an 'encoder'", "ig", "v1-no-encoder"),
    Case("v1: missing model", ["inspect", "BUNDLE"], 2, "bundle.json: no 'model'", "ig", "v1-no-model"),
    Case("v1: wrong type", ["inspect", "BUNDLE"], 2, "'n_clusters' is str, not int", "ig", "v1-bad-type"),
    Case("v1: bool for a count", ["inspect", "BUNDLE"], 2, "'seed' is bool, not int", "static", "v1-bool-count"),
    Case("v1: cluster sizes", ["inspect", "BUNDLE"], 2, "cluster_sizes [5, 4] do not fit 3", "ig", "v1-sizes"),
    Case("v1: fingerprint key", ["inspect", "BUNDLE"], 2, "fingerprint: no 'num_layers'", "ig", "v1-fingerprint"),
    Case("rehash a damaged bundle", ["bundle", "rehash", "BUNDLE"], 2, "do not match", "ig", "flip"),
    Case("rehash a damaged v1 bundle", ["bundle", "rehash", "BUNDLE"], 2, "blocks_skipped is 2", "ig", "v1-zero-row"),
    Case("damaged bundle in plot", ["plot", "heatmap", "-b", "BUNDLE", "-o", "x.png"], 2, "sha256", "ig", "flip"),
    Case("damaged bundle in export", ["export", "-b", "BUNDLE", "-o", "x"], 2, "sha256", "static", "flip"),
    Case("damaged bundle in ppl", ["ppl", "-b", "BUNDLE", "-o", "x.json"], 2, "sha256", "static", "flip"),
    # a bundle on the wrong model: rejected in one short line
    Case("wrong model", ["generate", "-b", "BUNDLE", "-m", "MODEL_B", "-p", "hi"], 2, "made for a model with other "
         "weights", "static"),
    Case("export cluster out of range", ["export", "-b", "BUNDLE", "-o", "x", "--cluster", "3"], 2,
         "--cluster must be in [0, 0]", "static"),
    # arguments
    Case("no new tokens", ["generate", "-m", "MODEL_A", "-p", "hi", "--max-new-tokens", "0"], 2,
         "--max-new-tokens must be at least 1"),
    Case("negative new tokens", ["generate", "-m", "MODEL_A", "-p", "hi", "--max-new-tokens", "-5"], 2,
         "--max-new-tokens must be at least 1"),
    Case("gain by cluster without a reference", ["table", "ig.json", "--by-cluster"], 2,
         "--by-cluster splits the gain over a reference by cluster: add --against"),
    Case("zero clusters", ["fit", "-m", "MODEL_A", "-o", "out", "--clusters", "0"], 2, "n_clusters", data=True),
    Case("unknown recipe", ["fit", "-m", "MODEL_A", "-o", "out", "--recipe", "magic"], 2, "unknown recipe 'magic'"),
    Case("config file missing", ["fit", "-m", "MODEL_A", "-o", "out", "--config", "nope.yaml"], 2,
         "no config file at nope.yaml"),
    Case("config not YAML", FIT, 2, "config.yaml is not valid UTF-8 yaml", config="finder: [\n"),
    Case("config not a mapping", FIT, 2, "must hold a mapping", config="- 1\n"),
    Case("config not UTF-8", FIT, 2, "config.yaml is not valid UTF-8 yaml", config="finder: \udcff\n"),
    Case("config with a format that is no text", FIT, 2, "config has no option format", config="format: 3\n"),
    Case("config and recipe disagree", [*FIT, "--recipe", "fast"], 2, "starts from recipe 'paper'",
         config="recipe: paper\n"),
    Case("unknown config option", FIT, 2, "config.l0 has no option steps", config="l0: {steps: 3}\n"),
    Case("sparsity inside a section", FIT, 2, "config.l0 has no option sparsity", config="l0: {sparsity: 0.5}\n"),
    Case("config value of the wrong type", FIT, 2, "config.clusters.n_clusters must be int, got 'two'",
         config="clusters: {n_clusters: two}\n"),
    Case("unknown finder", FIT, 2, "config.finder must be 'l0' or 'search'", config="finder: magic\n"),
    Case("gate without the search", FIT, 2,
         "a gate falls back to the global mask each cluster chooses against: use finder 'search'",
         config="finder: l0\nroute: {gate: 0.95}\n"),
    Case("gate quantile above one", FIT, 2, "the gate quantile must be in (0, 1]",
         config="finder: search\nroute: {gate: 1.5}\n"),
    Case("shared fraction above one", FIT, 2, "shared_fraction must be in",
         config="finder: search\nsearch: {shared_fraction: 1.5}\n"),
    Case("negative choose samples", FIT, 2, "choose.samples must be a whole number >= 0",
         config="choose: {samples: -1}\n"),
    Case("negative choose margin", FIT, 2, "choose margin must be a number of standard errors >= 0",
         config="choose: {margin: -1}\n"),
    Case("choose margin neither number nor auto", FIT, 2, "config.choose.margin must be float or 'auto'",
         config="choose: {margin: loose}\n"),
    Case("unknown packing", FIT, 2, "packing must be 'joined' or 'texts'", config="search: {packing: windows}\n"),
    Case("unknown search metric", FIT, 2, "metric must be 'ppl' or 'kl'", config="search: {metric: nll}\n"),
    Case("candidate without the search", FIT, 2, "search.candidates and search.global_order are used by finder "
         "'search'", config="finder: l0\nsearch: {candidates: [[attn1, ffn2]]}\n"),
    Case("candidate without choosing", FIT, 2, "set choose.samples > 0",
         config="finder: search\nsearch: {candidates: [[attn1, ffn2]]}\nchoose: {samples: 0}\n"),
    Case("global at another sparsity", [*FIT, "--clusters", "2", "--blocks", "1"], 2, "the global mask skips",
         config="finder: search\ndata: {samples: 8}\nsearch: {seq_len: 16, global_order: [attn1, ffn2]}\n",
         data=True),
    Case("candidate at another sparsity", [*FIT, "--clusters", "2", "--blocks", "1"], 2,
         "every extra candidate must skip 1 blocks", data=True,
         config="finder: search\ndata: {samples: 8}\nsearch: {seq_len: 16, candidates: [[attn1, ffn2]]}\n"),
    Case("more clusters than texts", [*FIT, "--clusters", "100000"], 2, "100000 clusters but only 8", data=True,
         config="data: {samples: 8}\nl0: {seq_len: 16}\n"),
    Case("texts file missing", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "nope.jsonl"], 2,
         "nope.jsonl: cannot read it as UTF-8 JSONL"),
    Case("texts not JSON", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "TEXTS"], 2,
         "texts.jsonl:2: not valid JSON", texts='{"text": "fine"}\ndef f(): pass\n'),
    Case("texts without text", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "TEXTS"], 2,
         "texts.jsonl:1: no non-empty string under 'prompt' and 'response'", texts='{"prompt": "hi"}\n'),
    Case("texts file empty", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "TEXTS"], 2,
         "texts.jsonl: no texts", texts="\n"),
    Case("texts chat without a reply", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "TEXTS"], 2,
         "texts.jsonl:1: a chat must end with the assistant's non-empty reply",
         texts='{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n'),
    Case("texts chat on a model without a template", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "TEXTS"], 2,
         "texts.jsonl:1: the model has no chat template",
         texts='{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'),
    Case("ppl texts reply past seq-len", ["ppl", "-m", "MODEL_A", "-o", "out.json", "--texts", "TEXTS", "--seq-len",
                                          "8"], 2, "a request's prompt fills all 8 tokens",
         texts='{"prompt": "a prompt longer than eight", "response": "yes"}\n'),
    Case("eval max-new-tokens 0", ["eval", "-m", "MODEL_A", "-o", "out.json", "--tasks", "generative",
                                   "--max-new-tokens", "0"], 2, "max_new_tokens must be a positive number"),
    Case("seq-len too short", FIT, 2, "seq_len >= 2", config="l0: {seq_len: 1}\n"),
    Case("max-chars too short", FIT, 2, "data.max_chars must be >= 200", config="data: {max_chars: 10}\n"),
    Case("sparsity out of range", ["fit", "-m", "MODEL_A", "-o", "out", "--sparsity", "1.5"], 2,
         "sparsity must be in [0, 1)"),
    Case("model path missing", ["generate", "-m", "/no/such/model", "-p", "hi"], 2, "no model folder at /no/such"),
    Case("relative model path missing", ["fit", "-m", "./nope", "-o", "out"], 2, "no model folder at nope"),
    Case("unknown zoo model", ["generate", "-m", "nosuchmodel", "-p", "hi"], 2, "unknown model 'nosuchmodel'"),
    Case("unknown dtype", ["generate", "-m", "MODEL_A", "-p", "hi", "--dtype", "float8"], 2, "unknown dtype"),
    Case("empty text to route", ["route", "", "-b", "BUNDLE"], 2, "empty text: give some text to route", "ig"),
    Case("blank text to route", ["route", "ok", "  ", "-b", "BUNDLE"], 2, "empty text", "ig"),
    Case("empty prompt", ["generate", "-m", "MODEL_A", "-p", ""], 2, "empty text: give some text to generate from"),
    Case("baseline samples", ["baseline", "sleb", "-m", "MODEL_A", "-o", "out", "--samples", "0"], 2,
         "--samples must be at least 1"),
    Case("baseline option", ["baseline", "sleb", "-m", "MODEL_A", "-o", "out", "--option", "nope=1"], 2,
         "sleb has no option nope"),
    Case("unknown method", ["baseline", "nomethod", "-o", "out"], 2, "unknown method 'nomethod'"),
    Case("missing option", ["fit"], 2, "Missing option '--out'"),
    # issue 42: the last tracebacks and silent choices
    Case("device not on this machine", ["generate", "-m", "MODEL_A", "-p", "hi", "--device", "cuda:99"], 2,
         "device 'cuda:99'"),
    Case("unknown device", ["generate", "-m", "MODEL_A", "-p", "hi", "--device", "gpu"], 2, "unknown device 'gpu'"),
    Case("out under a file", ["fit", "-m", "MODEL_A", "-o", "TEXTS/sub"], 2, "is a file, not a folder", texts="x"),
    Case("out is a file", ["baseline", "sleb", "-m", "MODEL_A", "-o", "TEXTS"], 2, "is a file; give a folder",
         texts="x"),
    Case("export of one cluster of several unasked", ["export", "-b", "BUNDLE", "-o", "x.gguf", "--format", "gguf"],
         2, "has 3 cluster masks and an export holds one: choose it with --cluster", "ig"),
    Case("route tokens below one", ["route", "hi", "-b", "BUNDLE", "--route-tokens", "0"], 2,
         "--route-tokens must be at least 1", "ig"),
    Case("port out of range", ["serve", "-b", "BUNDLE", "--port", "99999"], 2, "Invalid value for '--port'", "static"),
    Case("negative request timeout", ["serve", "-b", "BUNDLE", "--timeout", "-1"], 2, "--timeout must be above 0",
         "static"),
    Case("no documents to evaluate", ["eval", "-m", "MODEL_A", "-o", "x.json", "--limit", "0"], 2,
         "--limit must be at least 1"),
    Case("no passages to score", ["ppl", "-m", "MODEL_A", "-o", "x.json", "--seq-len", "0"], 2,
         "--seq-len must be at least 2"),
    Case("texts with a lone surrogate", ["fit", "-m", "MODEL_A", "-o", "out", "--texts", "TEXTS"], 2,
         "texts.jsonl:2: holds a lone surrogate", texts='{"text": "fine"}\n{"text": "a \\ud800 b"}\n'),
    # warnings a person can read (these run, exit 0, and write nothing)
    Case("format-1 bundle", ["inspect", "BUNDLE"], 0, "igprune: warning: bundle", "ig", "v1"),
    Case("50,000-character prompt", ["generate", "-m", "MODEL_A", "-p", LONG, "--max-new-tokens", "2"], 0,
         "igprune: warning: 1 prompt(s) longer than the 254 tokens"),
]


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    return make_bundles(tmp_path_factory.mktemp("originals"))


def _prepare(case: Case, originals: dict[str, Path], work: Path) -> list[str]:
    import shutil

    if case.bundle:
        shutil.copytree(originals[case.bundle], work / "bundle")
        if case.damage:
            damage(case.damage)(work / "bundle")
    if case.texts is not None:
        (work / "texts.jsonl").write_text(case.texts)
    if case.config is not None:
        (work / "config.yaml").write_text(case.config, errors="surrogateescape")  # \udcff: the byte 0xff
    names = {"BUNDLE": str(work / "bundle"), "MODEL_A": str(originals["model_a"]),
             "MODEL_B": str(originals["model_b"]), "TEXTS": str(work / "texts.jsonl"),
             "CONFIG": str(work / "config.yaml")}
    return [names.get(a, names["TEXTS"] + a[5:] if a.startswith("TEXTS/") else a) for a in case.args]


TALLY = {"tried": 0, "rejected": 0, "warned": 0, "tracebacks": 0, "written": 0}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(case, originals, tmp_path, request):
    if case.data:
        request.getfixturevalue("prepared_data")
    args = _prepare(case, originals, tmp_path)
    before = snapshot(tmp_path)
    TALLY["tried"] += 1
    code, output = run_cli(args, tmp_path)
    written = snapshot(tmp_path) != before
    TALLY["written"] += written
    TALLY["tracebacks"] += "Traceback" in output
    assert "Traceback" not in output and "Error:" not in output.replace("igprune: error:", "")
    assert not written, f"{case.name} wrote {set(snapshot(tmp_path)) ^ set(before)}"
    assert code == case.code, output
    assert case.fragment in output, output
    assert ".py:" not in output and "Bundle(" not in output  # no source paths, never the bundle's contents
    if code == 2:
        lines = [line for line in output.splitlines() if line.startswith("igprune: error:")]
        assert len(lines) == 1 and len(lines[0]) < 600, output
        TALLY["rejected"] += 1
    else:
        TALLY["warned"] += 1


@pytest.fixture(scope="module", autouse=True)
def print_tally():
    """After the module's tests, in whatever order or selection they ran: the table's counts, for
    benchmarks/reliability.py (`pytest -s`). Each row asserts its own outcome."""
    yield
    if TALLY["tried"]:
        print(f"\nreliability: CLI table: {TALLY['tried']} of {len(CASES)} cases tried, {TALLY['rejected']} rejected "
              f"with one line and exit 2, {TALLY['warned']} run with a readable warning; {TALLY['tracebacks']} "
              f"tracebacks, {TALLY['written']} left files behind")


def test_the_entry_point_exits_2_with_one_line_in_a_real_process(originals, tmp_path):
    """The same as the table, through `python -m igprune` (once: a process start costs seconds)."""
    import shutil

    shutil.copytree(originals["ig"], tmp_path / "bundle")
    os.truncate(tmp_path / "bundle" / "tensors.safetensors", 100)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "igprune", "inspect", str(tmp_path / "bundle")], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "tensors.safetensors" in done.stderr
    assert "Traceback" not in done.stderr


def test_rehash_upgrades_a_format_1_bundle_and_keeps_everything_else(originals, tmp_path):
    import shutil

    shutil.copytree(originals["ig"], tmp_path / "bundle")
    as_format_1(tmp_path / "bundle")
    before = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    code, output = run_cli(["bundle", "rehash", str(tmp_path / "bundle")], tmp_path)
    assert code == 0 and "digests written" in output, output
    after = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert after["format"] == FORMAT and set(after["sha256"]) == {"bundle.json", "tensors.safetensors"}
    assert list(after)[2:] == list(before)[1:] and {k: after[k] for k in before if k != "format"} == {
        k: v for k, v in before.items() if k != "format"}
    code, output = run_cli(["inspect", str(tmp_path / "bundle")], tmp_path)
    assert code == 0 and "warning" not in output
    assert run_cli(["bundle", "rehash", str(tmp_path / "bundle")], tmp_path)[1].count("nothing to do") == 1
    edit_json(tmp_path / "bundle", lambda r: r.update(note="edited on purpose"))
    assert run_cli(["bundle", "rehash", str(tmp_path / "bundle")], tmp_path)[0] == 2
    code, output = run_cli(["bundle", "rehash", "--force", str(tmp_path / "bundle")], tmp_path)
    assert code == 0 and Bundle.load(tmp_path / "bundle").config["note"] == "edited on purpose"
