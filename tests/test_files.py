"""Writing files: a failed write leaves the old version; content digests see every byte, whatever the dtype."""

import pytest
import torch

from igprune.files import atomic_path, read_json, sha256_tensors, write_json


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_write_leaves_the_old_version_and_no_temporaries(tmp_path, kind):
    final = tmp_path / "artefact"

    def write(text):
        with atomic_path(final) as tmp:
            if kind == "folder":
                tmp.mkdir()
                (tmp / "part").write_text(text)
            else:
                tmp.write_text(text)
            if text == "broken":
                raise RuntimeError("crash mid-write")

    read = (lambda: (final / "part").read_text()) if kind == "folder" else final.read_text
    write("first")
    write("second")  # replaces a complete version
    assert read() == "second"
    with pytest.raises(RuntimeError):
        write("broken")
    assert read() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]


def test_json_round_trips(tmp_path):
    data = {"a": [1, 2.5, None], "b": {"c": "text"}}
    write_json(tmp_path / "sub" / "x.json", data)
    assert read_json(tmp_path / "sub" / "x.json") == data


def test_tensor_digest_sees_content_dtype_and_order():
    ids = torch.arange(12).view(3, 4)
    assert sha256_tensors(ids) == sha256_tensors(ids.clone()) == sha256_tensors(ids.t().t().contiguous())
    assert sha256_tensors(ids) == sha256_tensors(ids.t().contiguous().t())  # layout does not matter
    assert sha256_tensors(ids) != sha256_tensors(ids + (ids == 5).long())
    assert sha256_tensors(ids) != sha256_tensors(ids.int())
    assert sha256_tensors(ids[:1], ids[1:]) != sha256_tensors(ids[1:], ids[:1])
    halves = torch.ones(4, dtype=torch.bfloat16)  # no numpy dtype: hashed by its bytes
    assert sha256_tensors(halves) != sha256_tensors(halves * 2)


def test_what_a_killed_writer_left_is_swept_by_the_next_write(tmp_path):
    """SIGKILL skips every cleanup: a dead writer's temporary is removed, a live one's kept, and a folder caught
    between its two renames gets its old version back."""
    import os
    import subprocess
    import sys

    from igprune.files import tidy

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    final = tmp_path / "ckpt" / "masks"
    final.parent.mkdir()
    stale = final.with_name(f".masks.{int(dead.stdout)}.abc.tmp")
    live = final.with_name(f".masks.{os.getpid()}.xyz.tmp")
    stale.mkdir()
    live.mkdir()
    old = final.with_name(".masks.old")
    old.mkdir()
    (old / "trainer.json").write_text("{}")
    tidy(tmp_path)
    assert (final / "trainer.json").is_file() and not old.exists()  # the swap undone: the old version is back
    assert not stale.exists() and live.exists()
    with atomic_path(final) as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in final.parent.iterdir()) == [live.name, "masks"]


def test_removing_a_folder_sweeps_what_a_killed_removal_left_aside(tmp_path):
    """remove_tree renames the folder aside before deleting it; a kill between the two leaves the aside copy, which
    the next removal of that folder (e.g. a rerun's, after it wrote its bundle) must take away."""
    import subprocess
    import sys

    from igprune.files import remove_tree

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.checkpoint.{int(dead.stdout)}.abc.tmp"
    (aside / "out.checkpoint").mkdir(parents=True)
    (aside / "out.checkpoint" / "trainer.json").write_text("{}")
    remove_tree(tmp_path / "out.checkpoint")  # already gone: only the aside copy is left
    assert list(tmp_path.iterdir()) == []
