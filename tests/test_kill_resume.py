"""Checkpoint and resume under SIGKILL: `fit` and the long baseline searches are killed at a random moment (no
Python cleanup runs), rerun unchanged, and must finish with exactly the bundle of an uninterrupted run, leaving no
half-written or stray file. The count of kills survived is printed for the README (`pytest -s`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_errors import SRC, run_cli, save_model
from tiny_models import tiny_model

from igprune.bundle import Bundle

# what legitimately differs between a resumed run and an uninterrupted one: timings and the rerun's own counts
VOLATILE = {"seconds", "fit_seconds", "masks_scored", "forward_tokens", "resumed"}
COMMON = ["--seed", "0"]
RUNS = {  # small settings on a tiny model, sized so the work after startup takes a second or two
    "fit": ["fit", "--clusters", "2", "--sparsity", "0.25", "--config", "FIT_CONFIG"],
    "sleb": ["baseline", "sleb", "--blocks", "5", "--granularity", "block"],
    "evopress": ["baseline", "evopress", "--blocks", "6", "--generations", "12", "--offspring", "4"],
    "static-l0": ["baseline", "static-l0", "--blocks", "4", "--samples", "32", "--seq-len", "32", "--option",
                  "shared_steps=40", "--option", "cluster_steps=10", "--option", "batch_size=4"],
}
SURVIVED: list[str] = []


def stable(value):
    """The value without its VOLATILE entries, at any depth."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def check_complete(folder: Path, allow_temporaries: bool) -> None:
    """Every visible file is whole (JSON parses, safetensors load); hidden temporaries only while a rerun is due."""
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if hidden:
            assert allow_temporaries, f"left behind: {path}"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)


FIT_CONFIG = {"recipe": "paper", "data": {"samples": 24},
              "l0": {"shared_steps": 40, "cluster_steps": 20, "batch_size": 4, "seq_len": 16}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model's folder, with the fit run's config file beside it (fit.json)."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "fit.json").write_text(json.dumps(FIT_CONFIG))
    return save_model(tiny_model("llama", layers=8), folder / "tiny")


def kill_once(args: list[str], cwd: Path, checkpoint: Path, delay: float) -> bool:
    """Start `igprune ARGS` in a child process, SIGKILL it `delay` s after its checkpoint folder appears; True if
    it was killed (False: it finished first)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-m", "igprune", *args], cwd=cwd, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while child.poll() is None and not checkpoint.exists():
            time.sleep(0.01)
        time.sleep(delay)
        killed = child.poll() is None
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    if not killed:
        assert child.returncode == 0, child.stderr.read().decode()
    return killed


@pytest.mark.parametrize("name", list(RUNS))
def test_a_killed_run_reruns_to_the_uninterrupted_result(name, model_dir, tmp_path, prepared_data):
    config = str(model_dir.parent / "fit.json")
    args = [config if a == "FIT_CONFIG" else a for a in RUNS[name]] + ["-m", str(model_dir), *COMMON]
    reference_dir, work = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    work.mkdir()
    started = time.perf_counter()
    code, output = run_cli([*args, "-o", "out"], reference_dir)
    assert code == 0, output
    seconds = time.perf_counter() - started
    reference = Bundle.load(reference_dir / "out")
    rng = random.Random(f"kill:{name}")
    delay, killed = rng.uniform(0.0, 0.5 * seconds), False
    for _ in range(4):  # a run that finished before its kill is no test: again, sooner
        killed = kill_once([*args, "-o", "out"], work, work / "out.checkpoint", delay)
        if killed:
            break
        for leftover in (work / "out", work / "out.checkpoint"):
            assert not leftover.exists() or leftover.name == "out"
        Bundle.load(work / "out")  # a finished run's bundle is whole
        shutil.rmtree(work / "out")
        delay /= 3
    assert killed, f"{name} always finished before its kill"
    check_complete(work, allow_temporaries=True)  # a bundle if killed after writing it, else none
    if (work / "out").exists():
        Bundle.load(work / "out")
    code, output = run_cli([*args, "-o", "out"], work)
    assert code == 0, output
    check_complete(work, allow_temporaries=False)
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # the checkpoint is gone once the bundle is written
    resumed = Bundle.load(work / "out")
    assert torch.equal(resumed.masks, reference.masks)
    assert torch.equal(resumed.centroids, reference.centroids)
    assert (resumed.log_alpha is None) == (reference.log_alpha is None)
    if reference.log_alpha is not None:
        assert torch.equal(resumed.log_alpha, reference.log_alpha)
    assert stable(resumed.logs) == stable(reference.logs) and stable(resumed.config) == stable(reference.config)
    SURVIVED.append(f"{name} (killed {delay:.2f} s into its checkpointed work)")


@pytest.fixture(scope="module", autouse=True)
def print_kills_survived():
    """After the module's tests, in whatever order or selection they ran: the kills survived, for
    benchmarks/reliability.py (`pytest -s`). Each kill test asserts its own result."""
    yield
    if SURVIVED:
        print(f"\nreliability: kill test: {len(SURVIVED)} of {len(RUNS)} SIGKILLs survived, identical results: "
              f"{'; '.join(SURVIVED)}")


def interrupt(args: list[str], cwd: Path, ready) -> tuple[int, str]:
    """Start `igprune ARGS`, wait until `ready(child)` returns, then SIGINT it as Ctrl-C would: its exit code and
    stderr. The child starts with SIGINT's default disposition, as a command in a terminal's foreground does: a
    test run in the background (`pytest &`) ignores SIGINT, and its children would inherit that."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-m", "igprune", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready(child)
        assert child.poll() is None, f"finished before its interrupt: {child.stderr.read()}"
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, stderr


def test_ctrl_c_exits_130_with_one_line_and_says_how_to_resume(model_dir, tmp_path, prepared_data):
    """An interrupted command is never taken for a finished one: exit 130, one line, the resumable `fit` naming
    its checkpoint (issue 42: both used to exit 0 silently)."""
    from tiny_models import bundle_config

    def checkpoint_made(child):
        while child.poll() is None and not (tmp_path / "out.checkpoint").exists():
            time.sleep(0.01)

    long = {**FIT_CONFIG, "l0": {**FIT_CONFIG["l0"], "shared_steps": 4000}}
    (tmp_path / "long.json").write_text(json.dumps(long))
    fit = [a.replace("FIT_CONFIG", str(tmp_path / "long.json")) for a in RUNS["fit"]]
    fit = [*fit, "-m", str(model_dir), *COMMON, "-o", "out"]
    code, stderr = interrupt(fit, tmp_path, checkpoint_made)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"igprune: interrupted; rerun the same command to resume from "
                                               f"{Path('out.checkpoint')}")

    mask = torch.ones(1, 16, dtype=torch.bool)
    lm = tiny_model("llama", layers=8)
    Bundle(mask, torch.zeros(1, 0), bundle_config(mask, lm, model=str(model_dir))).save(tmp_path / "static")
    generate = ["generate", "-b", str(tmp_path / "static"), "-p", "x", "--max-new-tokens", "250"]
    code, stderr = interrupt(generate, tmp_path, lambda child: child.stdout.readline())  # its "cluster 0" line
    assert code == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "igprune: interrupted"
    print("\nreliability: Ctrl-C: fit and generate interrupted by SIGINT exit 130 with one line (fit's names its "
          "checkpoint); 0 tracebacks")
