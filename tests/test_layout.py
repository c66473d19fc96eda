"""The package's architecture, checked: imports only go down (no cycle, function-level imports counted), and only
blocks.py and the exporters reach into an HF model's internals."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# what only blocks.py (and the exporters, which rewrite a model's layers) may touch
INTERNALS = re.compile(r"\.model\.(layers|norm|embed_tokens)\b|last_hidden_state|get_output_embeddings|get_decoder|"
                       r"register_forward(_pre)?_hook|\.self_attn\b|\.mlp\b")
MAY_TOUCH = {"igprune.blocks", "igprune.export", "igprune.gguf_export", "igprune.gguf_check"}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its body, its own parent packages left out."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        edges |= {c for c in candidates if c in known and c != name and not name.startswith(c + ".")}
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_a_module_that_imports_it_back():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "igprune.finders.search" in graph["igprune.pruner"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_blocks_and_the_exporters_know_hf_internals():
    touching = {name for name, path in modules().items() if INTERNALS.search(path.read_text())}
    assert "igprune.blocks" in touching  # the pattern finds what it is meant to
    assert touching <= MAY_TOUCH, f"HF internals outside blocks.py: {sorted(touching - MAY_TOUCH)}"
