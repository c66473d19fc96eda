"""The public API at the top level, loaded lazily; importing igprune changes nothing in the process."""

import os
import subprocess
import sys

import igprune


def test_every_public_name_resolves_from_the_top_level():
    assert set(igprune.__all__) == {"IGPruneError", *igprune._PUBLIC}
    for name in igprune.__all__:
        assert getattr(igprune, name) is not None, name


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("MPLBACKEND", None)
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_import_igprune_is_cheap():
    assert run_python("import sys, igprune; print('torch' in sys.modules, 'transformers' in sys.modules)") == \
        "False False"


def test_importing_the_library_leaves_the_process_alone():
    code = ("import os, matplotlib; before = matplotlib.get_backend(); "
            "import igprune.evaluation.figures, igprune.encoder; from igprune.encoder import SentenceEncoder; "
            "SentenceEncoder(); print(os.environ.get('HF_HUB_OFFLINE'), matplotlib.get_backend() == before)")
    assert run_python(code) == "None True"
