"""The documentation stays short, current and linked: README and RESULTS within their lengths, docs/cli.md equal
to what the CLI generates now, and every relative link in README.md, docs/, RESULTS.md and research/ pointing at a
file that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# written on other branches; links to them are checked once they have arrived
ARRIVING = {ROOT / "docs" / "serving.md", ROOT / "docs" / "reliability.md"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_readme_and_results_are_short():
    assert _lines(ROOT / "README.md") <= 200
    assert _lines(ROOT / "benchmarks" / "RESULTS.md") <= 400


def test_cli_reference_is_generated_from_the_cli():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == module.reference(), \
        "docs/cli.md is out of date: run python scripts/cli_reference.py --write"


def _documents() -> list[Path]:
    """README, docs/, RESULTS.md and the research logs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md",
            *sorted((ROOT / "research").glob("**/*.md"))]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(doc: Path):
    # code spans and blocks are not links
    text = re.sub(r"```.*?```|`[^`\n]*`", "", doc.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same file
        path = (doc.parent / target.split("#")[0]).resolve()
        if path in ARRIVING and not path.exists():
            continue
        if not path.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_benchmark_configs_name_known_methods_and_runs_that_exist():
    import yaml

    from igprune.finders import METHODS
    from igprune.recipes import RECIPES

    configs = ROOT / "benchmarks" / "configs"
    headline = yaml.safe_load((configs / "headline.yaml").read_text())
    names = {(r["model"], r["name"]) for r in headline["runs"]}
    assert len(names) == len(headline["runs"])  # each run's results file is its own
    for run in headline["runs"]:
        assert run["method"] in {"dense", "ig-pruning", *METHODS} and run.get("recipe", "paper") in RECIPES, run["name"]
        assert isinstance(run.get("options", {}), dict) or run["options"] in headline["options"], run["name"]
        for other in (run.get("bundle"), run.get("extends")):
            assert other is None or (run["model"], other) in names, (run["name"], other)
    domains = yaml.safe_load((configs / "domains.yaml").read_text())
    for name, spec in domains["chosen"].items():
        assert spec["from"] in domains["fits"] and spec.get("again", spec["from"]) in {*domains["chosen"],
                                                                                         spec["from"]}, name
    assert all(spec["from"] in domains["chosen"] for spec in domains["gated"].values())


def test_every_committed_bundle_records_what_made_it():
    """The whole config of a published bundle is in its bundle.json: igprune fit's ("fit", which `fit --config`
    reruns), igprune baseline's ("options"), or the domain benchmark's steps ("reproduce", runs its config has)."""
    import json

    import yaml

    from igprune.config import read_config
    from igprune.files import IGPruneError

    domains = yaml.safe_load((ROOT / "benchmarks" / "configs" / "domains.yaml").read_text())
    runs = {**domains["fits"], **domains["chosen"], **domains["gated"]}
    folders = sorted(p.parent for p in (ROOT / "benchmarks" / "bundles").rglob("bundle.json"))
    assert len(folders) > 40
    for folder in folders:
        record = json.loads((folder / "bundle.json").read_text())
        assert [k for k in ("fit", "options", "reproduce") if k in record], folder.name
        if "reproduce" in record:
            steps = record["reproduce"]["steps"]
            assert steps[0]["step"] == "fit" and steps[-1]["run"] == folder.name.rsplit("-b", 1)[0], folder.name
            assert all(step["run"] in runs for step in steps), folder.name
            if "fit" not in record:
                with pytest.raises(IGPruneError, match="not made by igprune fit; remake it with: python benchmarks"):
                    read_config(folder)
