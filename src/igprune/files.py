"""Where igprune keeps its files, and how it writes them so nothing is ever half-written.

Every artefact (converted models, evaluation sets, bundles, results) is written to a temporary
sibling first and renamed into place: a crash leaves the old version or nothing, never a torso.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class IGPruneError(Exception):
    """A user-facing error: its message is one line that says what to do. The CLI prints only that."""


def cache_root() -> Path:
    """The cache folder: $IGPRUNE_HOME, else ~/.cache/igprune."""
    root = os.environ.get("IGPRUNE_HOME") or Path.home() / ".cache" / "igprune"
    return Path(root).expanduser()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """A digest of tensors' bytes (any dtype), to tell later whether data is the data something was made from."""
    import torch

    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _sweep(final: Path) -> None:
    """Undo what a writer of `final` killed mid-write left (SIGKILL runs no cleanup): remove the temporaries
    of writers that are gone, and finish a folder swap (the old version back if the new one is not in place)."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = tmp.name[len(final.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def tidy(folder: Path) -> None:
    """Sweep every artefact under `folder` (see _sweep): call before reading what a killed run may have left."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in sorted(folder.rglob(".*"), key=lambda p: -len(p.parts)):
        name = leftover.name
        if name.endswith(".old"):
            _sweep(leftover.with_name(name[1:-len(".old")]))
        elif name.endswith(".tmp") and name.count(".") >= 4:
            _sweep(leftover.with_name(name[1:].rsplit(".", 3)[0]))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` (a file or a folder); rename it into place on success.

    On error the temporary is removed and `final` is untouched. The temporary's name holds the writer's pid,
    so a later writer removes what a killed one left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            target.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(folder: Path) -> None:
    """Remove a folder all at once: renamed aside first, so a kill midway never leaves a part of it to be read;
    what an earlier removal killed midway left aside is swept too."""
    folder = Path(folder)
    _sweep(folder)
    if not folder.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    folder.rename(aside / folder.name)
    shutil.rmtree(aside, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, record: Any) -> None:
    """Add one JSON line to a log with a single O_APPEND write: concurrent writers never interleave, and a crash
    leaves whole lines (the ones written) and nothing else. A new log is its owner's only: it holds what users sent."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        os.close(fd)
