"""The `igprune` command line. Each command is a thin shell over the library; errors are one line."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from igprune.files import IGPruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Input-guided dynamic block pruning for LLMs.")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu, cuda, cuda:1")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]


@app.command()
def models() -> None:
    """List the offline model zoo with what is installed and converted here."""
    from igprune.models import ZOO, installed, is_converted

    table = Table("name", "arch", "layers", "blocks", "installed", "cached", "what it is")
    for entry in ZOO.values():
        table.add_row(entry.name, entry.arch, str(entry.layers), str(2 * entry.layers),
                      "yes" if installed(entry) else "no", "yes" if is_converted(entry) else "no", entry.description)
    console.print(table)
    console.print("All zoo weights are 4-bit GGUF dequantised to fp32, not the original releases.")


@app.command()
def prepare(
    model: Annotated[list[str], typer.Option("--model", "-m", help="zoo models to install (repeatable)")] = None,
    data: Annotated[bool, typer.Option(help="also fetch evaluation and calibration data")] = True,
) -> None:
    """Fetch models and data into the cache, idempotently (a second run does nothing)."""
    from igprune.models import DEFAULT_MODEL, prepare_model

    for name in model or [DEFAULT_MODEL]:
        with console.status(f"preparing model {name}"):
            path = prepare_model(name)
        console.print(f"model {name}: {path}")
    if data:
        from igprune.data import prepare_data

        for line in prepare_data():
            console.print(line)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="text to continue")],
    model: ModelOpt = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Greedy generation with the unpruned model."""
    from igprune.models import load_model

    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    inputs = tokenizer(prompt, return_tensors="pt").to(lm.device)
    out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    console.print(tokenizer.decode(out[0], skip_special_tokens=True), markup=False, highlight=False)


def main() -> None:
    """Entry point: run the app and turn IGPruneError into one line on stderr and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app(standalone_mode=False)
    except IGPruneError as err:
        print(f"igprune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("igprune: interrupted", file=sys.stderr)
        sys.exit(130)
