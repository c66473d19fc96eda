"""lm-eval task definitions, reading the offline cache: the paper's six zero-shot tasks ("paper6"), the domain
benchmark's six cloze tasks ("domains6", igprune.data.CLOZE) and three generative tasks ("generative": MBPP, GSM8K,
HumanEval; the code tasks run the model's code through igprune.evaluation.execution).

Each shipped YAML (igprune/evaluation/tasks/) includes lm-eval's own task file, so prompts, metrics and
preprocessing (hellaswag's and winogrande's `!function`s resolve beside the included file) are the harness's;
it only replaces the data source with the cache's JSON Lines file. Both the include and the data file are
absolute paths that are only known at run time (where lm-eval is installed, where the cache is), so the
YAMLs are templates that `render_tasks` fills in and writes to <cache>/data/tasks/ for a TaskManager. The cloze
tasks are defined here in full (_cloze.yaml, which each includes).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from igprune.data import CLOZE_TASKS, EVAL_TASKS, GENERATIVE_SOURCES, data_dir, eval_dataset_path
from igprune.files import IGPruneError, atomic_path

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

TEMPLATES = Path(__file__).parent / "tasks"
GROUP = "paper6"
PREFIX = "igprune_"

# lm-eval task names, in the column order of the paper's tables.
PAPER6: list[str] = [PREFIX + task for task in EVAL_TASKS]
DOMAINS6: list[str] = [PREFIX + task for task in CLOZE_TASKS]
GENERATIVE: list[str] = [PREFIX + task for task in GENERATIVE_SOURCES]
# Each group's tasks in column order; a group's average is the mean of its tasks' metrics.
GROUPS: dict[str, list[str]] = {GROUP: PAPER6, "domains6": DOMAINS6, "generative": GENERATIVE}
# The metric the paper reports per task: length-normalised accuracy, except plain accuracy on winogrande.
PAPER_METRIC: dict[str, str] = {name: "acc" if name.endswith("winogrande") else "acc_norm" for name in PAPER6}
# The metric every task is reported in, and the lm-eval filter whose output it is scored on ("none": no filter).
# GSM8K: flexible-extract, the reply's last number (lm-eval's strict-match needs "The answer is N." verbatim).
METRIC: dict[str, str] = {**PAPER_METRIC, **dict.fromkeys(DOMAINS6, "acc_bytes"), PREFIX + "mbpp": "pass_at_1",
                          PREFIX + "humaneval": "pass_at_1", PREFIX + "gsm8k": "exact_match"}
FILTER: dict[str, str] = {PREFIX + "mbpp": "extract_code", PREFIX + "humaneval": "create_test",
                          PREFIX + "gsm8k": "flexible-extract"}


def lm_eval_tasks_dir() -> Path:
    """The installed lm_eval/tasks folder, found without importing lm_eval (which is slow)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise IGPruneError("lm-eval is not installed; run: pip install 'lm-eval[hf]==0.4.13'")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def definition(task: str) -> str:
    """The text that defines `task`: its template and the template it includes from this folder, if any."""
    text = (TEMPLATES / f"{task}.yaml").read_text()
    local = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("include: _")]
    return text + "".join((TEMPLATES / name).read_text() for name in local)


def tasks_dir() -> Path:
    return data_dir() / "tasks"


def _yaml_str(value: str) -> str:
    """The inside of a YAML double-quoted string (JSON escaping is valid there)."""
    return json.dumps(value)[1:-1]


def render_tasks() -> Path:
    """Fill in the templates for this cache and this lm-eval, write those that changed; returns the folder."""
    lm_tasks = lm_eval_tasks_dir()
    out = tasks_dir()
    for template in sorted(TEMPLATES.glob("*.yaml")):
        values = {"lm_eval_tasks": _yaml_str(str(lm_tasks))}
        if template.stem.startswith(PREFIX):
            values["data_file"] = _yaml_str(str(eval_dataset_path(template.stem.removeprefix(PREFIX))))
        text = Template(template.read_text()).substitute(values)
        target = out / template.name
        if not target.is_file() or target.read_text() != text:
            with atomic_path(target) as tmp:
                tmp.write_text(text)
    return out


def task_manager(include_defaults: bool = False) -> TaskManager:
    """A TaskManager that knows PAPER6 and the group "paper6"; lm-eval's ~thousands of built-in tasks are
    indexed too only with include_defaults=True (slower, and not needed: our YAMLs include theirs by path)."""
    folder = render_tasks()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=include_defaults)


def paper_scores(results: dict[str, Any]) -> dict[str, float]:
    """Per-task scores in the paper's metric, plus their mean as "average", from simple_evaluate's output."""
    scores = {}
    for name in PAPER6:
        if name in results["results"]:
            scores[name.removeprefix(PREFIX)] = float(results["results"][name][f"{PAPER_METRIC[name]},none"])
    if scores:
        scores["average"] = sum(scores.values()) / len(scores)
    return scores
