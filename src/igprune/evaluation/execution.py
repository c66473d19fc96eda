"""Running model-written code to score it (MBPP, HumanEval pass@1), never in the evaluating process.

Each program runs in a fresh `python -I -B` child (spawned, not forked: it shares no memory with the model) in a
new temporary directory that is removed afterwards, in its own session so the whole process group is killed at the
time limit, with:

* rlimits: address space (`memory` bytes), CPU seconds, file size (16 MiB), open files, no core dumps;
* no network: a new network namespace with no interfaces (`unshare --net`) where the kernel allows it (root or
  user namespaces), and in every case an audit hook that refuses sockets;
* an audit hook that refuses writing, deleting, renaming or chmod-ing files outside the temporary directory, and
  starting processes (subprocess, os.system, exec, fork) or loading native code (ctypes);
* an empty environment and no stdin.

This contains the accidents a weak model writes (infinite loops, huge allocations, stray file writes, `rm`). It is
NOT a security sandbox: audit hooks can be bypassed by determined Python code, the file system stays readable, and
without a network namespace nothing but the hook stands between the code and the network. Run untrusted models'
code in a container or VM.

`pass_at_1` has the signature and meaning of lm-eval's code_eval metric (HF evaluate's, which loads its code from
the hub and so cannot run offline): a prediction passes when prediction + "\\n" + reference runs without error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

TIMEOUT = 10.0  # seconds of wall time per program (lm-eval's code_eval allows 3 s per test program)
MEMORY = 1 << 30  # bytes of address space per program
FILE_SIZE = 16 << 20  # bytes a program may write to one file (inside its directory)
WORKERS = 2  # programs run at once

# Run by the child before the program: rlimits, then the audit hook. Arguments: the only directory the program may
# change, the program's file, bytes of address space, CPU seconds, bytes per file.
_GUARD = r"""
import os, resource, sys
for _limit, _value in ((resource.RLIMIT_AS, sys.argv[3]), (resource.RLIMIT_CPU, sys.argv[4]),
                       (resource.RLIMIT_FSIZE, sys.argv[5]), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_limit, (int(_value), int(_value)))
_root = os.path.realpath(sys.argv[1])
_inside = lambda p: isinstance(p, int) or os.path.realpath(os.fsdecode(p)).startswith(_root + os.sep)
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATHS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime", "os.link",
          "os.symlink", "os.rename", "os.replace", "shutil.rmtree", "os.setxattr", "os.removexattr", "shutil.copyfile"}
_DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill", "winreg.")
def _hook(event, args):
    if event.startswith(_DENIED):
        raise PermissionError(f"igprune sandbox: {event} is not allowed")
    if event == "open" and args[0] is not None:
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & _WRITES) and not _inside(args[0]):
            raise PermissionError(f"igprune sandbox: writing {args[0]!r} outside the working directory")
    elif event in _PATHS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"igprune sandbox: {event} outside the working directory")
_source = open(sys.argv[2], encoding="utf-8").read()
sys.argv = sys.argv[2:3]
sys.addaudithook(_hook)
exec(compile(_source, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended: "passed", "failed" (an exception or non-zero exit) or "timeout"."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def network_namespace() -> bool:
    """Whether `unshare --net` works here (it needs root or unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    for args in (["--net"], ["--net", "--map-root-user"]):
        try:
            if subprocess.run(["unshare", *args, "true"], capture_output=True, timeout=10).returncode == 0:
                _NET_ARGS[:] = args
                return True
        except (OSError, subprocess.TimeoutExpired):
            pass
    return False


_NET_ARGS: list[str] = []


def isolation() -> dict[str, object]:
    """What isolation this machine gives a program, for a results file's provenance."""
    return {"process": "spawned python -I -B, own session", "tempdir": "removed afterwards",
            "network_namespace": network_namespace(), "audit_hook": "no sockets, processes, ctypes, or writes "
            "outside the tempdir", "timeout_s": TIMEOUT, "memory_bytes": MEMORY, "file_size_bytes": FILE_SIZE}


def run_program(program: str, timeout: float = TIMEOUT, memory: int = MEMORY) -> Outcome:
    """Run `program` as described in the module docstring; its exit decides the outcome."""
    folder = tempfile.mkdtemp(prefix="igprune-exec-")
    try:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        command = [sys.executable, "-I", "-B", "-c", _GUARD, folder, path, str(memory), str(int(timeout) + 1),
                   str(FILE_SIZE)]
        if network_namespace():
            command = ["unshare", *_NET_ARGS, *command]
        errors = os.path.join(folder, "stderr.txt")  # a file, so output is bounded by RLIMIT_FSIZE, not our memory
        with open(errors, "wb") as err:
            process = subprocess.Popen(command, cwd=folder, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return Outcome("timeout", f"no result in {timeout:g} s")
        if process.returncode == 0:
            return Outcome("passed")
        with open(errors, "rb") as err:
            err.seek(max(0, os.path.getsize(errors) - 4096))
            lines = err.read().decode("utf-8", "replace").strip().splitlines()
        return Outcome("failed", lines[-1][:200] if lines else f"exit status {process.returncode}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_programs(programs: list[str], timeout: float = TIMEOUT, memory: int = MEMORY) -> list[Outcome]:
    """Each program's outcome, WORKERS at a time."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory), programs))


# ------------------------------------------------------------------------------ lm-eval metric and filters


def pass_at_1(references: list[str], predictions: list[list[str]] | list[str]) -> float:
    """lm-eval metric (the shape of its code_eval pass@1): the share of the first predictions whose program,
    prediction + newline + reference (the tests), runs without error."""
    firsts = [p if isinstance(p, str) else p[0] for p in predictions]
    outcomes = run_programs([f"{p}\n{r}" for p, r in zip(firsts, references, strict=True)])
    return sum(o.passed for o in outcomes) / len(outcomes)


def reply_code(text: str) -> str:
    """The code of a reply whose opening fence ended the prompt: the reply up to its closing fence. (lm-eval's mbpp
    extract_code_blocks matches "```" + reply against "```(\\w+)?\\n?(.*?)```", whose optional language tag then
    swallows the code's first word, "def" or "import", so nearly every answer would fail.)"""
    return text.split("```", 1)[0]


def mbpp_code(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter (in place of mbpp_instruct's build_predictions): each reply's code."""
    return [[reply_code(r) for r in resp] for resp in resps]


def humaneval_program(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter (humaneval_instruct's build_predictions_instruct): the prompt's signature and docstring, then
    the reply up to its closing fence."""
    return [[doc["prompt"] + reply_code(r) for r in resp] for resp, doc in zip(resps, docs, strict=True)]
