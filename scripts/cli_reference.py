"""Write docs/cli.md, the command-line reference, from the igprune command itself.

Walks the typer app's click command tree and prints, for every command, its help, its usage line and each
argument and option with its help, default and whether it is required. The output depends only on the CLI's
code (no terminal width, no colours), so tests/test_docs.py can check that docs/cli.md is up to date.

    python scripts/cli_reference.py            # print to stdout
    python scripts/cli_reference.py --write    # rewrite docs/cli.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from igprune.cli import app

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = """# Command-line reference

Generated from the `igprune` command by `scripts/cli_reference.py`; do not edit by hand. After changing the
CLI, regenerate it with `python scripts/cli_reference.py --write` (tests/test_docs.py fails until you do).
`igprune COMMAND --help` prints the same in the terminal.

Every knob of `igprune fit` that is not a flag lives in a config file: see [recipes.md](recipes.md).
"""


def _clean(text: str | None) -> str:
    """Help text on one line: typer keeps the docstring's line breaks."""
    return " ".join((text or "").split())


def _escaped(text: str) -> str:
    """Help text for a Markdown table cell."""
    return _clean(text).replace("|", "\\|")


def _commands(group, ctx) -> list[tuple[object, object]]:
    """(command, context) for every command under `group`, depth first in the order `--help` lists them."""
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or getattr(command, "hidden", False):
            continue
        sub = type(ctx)(command, info_name=name, parent=ctx)
        found.append((command, sub))
        if hasattr(command, "list_commands"):
            found += _commands(command, sub)
    return found


def _section(command, ctx) -> str:
    path = ctx.command_path
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `{path}`", "", _clean(command.help), "", "```", f"{path} {usage}", "```"]
    if hasattr(command, "list_commands"):
        names = [n for n in command.list_commands(ctx) if not getattr(command.get_command(ctx, n), "hidden", False)]
        lines += ["", "Commands: " + ", ".join(f"`{path} {n}`" for n in names) + "."]
    records = [p.get_help_record(ctx) for p in command.params if not getattr(p, "hidden", False)]
    records = [r for r in records if r is not None]
    if records:
        lines += ["", "| Argument or option | Meaning |", "| --- | --- |"]
        lines += [f"| `{name}` | {_escaped(help)} |" for name, help in records]
    return "\n".join(lines)


def reference() -> str:
    """docs/cli.md's whole text."""
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="igprune")
    parts = [HEADER.rstrip(), _section(root, ctx)] + [_section(c, sub) for c, sub in _commands(root, ctx)]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    text = reference()
    if "--write" in sys.argv[1:]:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
