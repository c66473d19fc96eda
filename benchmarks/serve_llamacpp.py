"""Serving on llama.cpp behind igprune's router: dense, a static mask and the routed IG bundle, against igprune's HF
server on the same bundle, in one run on the same prompts.

Methods (smollm2-135m, CPU): llama.cpp dense (every block, exported as deci like the others), llama.cpp static
(--static, one mask), llama.cpp routed (--bundle: per distinct mask a shared llama-server and a solo one with
every core, serve/llamacpp.Lanes; --shared adds the run without solo engines), each behind igprune's
llama.cpp front end (serve/llamacpp.py: the same tokenization, routing and OpenAI surface), and igprune's HF
server on --bundle (fp32). Prompts: --requests held-out items of several domains (code, math, QA, Wikipedia and
multilingual cloze contexts; ARC, HellaSwag and PIQA questions; not calibration passages), cut to --prompt-chars,
sent by the openai client, streamed and greedy, from C threads at once. Per (method, C): generated tokens/s,
TTFT and latency p50/p99, failed requests, and the peak memory (PSS) of the serving processes (all
llama-servers together; for HF the benchmark process, which holds the model). Beside them: the FLOPs-ideal
speedup over dense (serve_load.flops_per_token), how many greedy answers of the routed llama.cpp path equal the
HF server's (the first differing character named), whether both routed every prompt alike, the router's time
per prompt, and a fault run: the busiest mask's shared engine killed mid-load at the highest C (its requests
fall back to the mask's solo engine until it is back), every request's outcome.

    nice -n 5 python benchmarks/serve_llamacpp.py [--requests 32 --max-tokens 32 --gguf-type f16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from serve_load import BUNDLES, flops_per_token, one_request, percentile

from igprune.bundle import Bundle, fingerprint
from igprune.data import eval_dataset_path
from igprune.dynamic import DynamicPrunedModel
from igprune.evaluation.speed import machine_info
from igprune.files import write_json
from igprune.models import load_model
from igprune.serve import BackgroundServer, ServeSettings, create_app
from igprune.serve.llamacpp import EngineOptions, create_llamacpp_app, prepare, proportional_bytes

ROOT = Path(__file__).parent
SOURCES = {"cloze_code": "context", "cloze_math": "context", "cloze_qa": "context", "cloze_wiki": "context",
           "cloze_multilingual": "context", "arc_easy": "question", "hellaswag": "ctx", "piqa": "goal"}


def prompts(n: int, chars: int) -> list[str]:
    """n prompts taken in turn from each source's first items, each cut to `chars` characters."""
    per = {s: [json.loads(line)[key] for line in eval_dataset_path(s).read_text().splitlines()[:n]]
           for s, key in SOURCES.items()}
    return [per[s][i // len(per)][:chars] for i, s in zip(range(n), list(per) * n, strict=False)]


def resident(pids: list[int]) -> int:
    """The processes' memory together: PSS, so a GGUF mapped by both engines of a mask counts once."""
    return sum(proportional_bytes(pid) for pid in pids)


def run(client: openai.OpenAI, name: str, texts: list[str], concurrency: int, max_tokens: int,
        pids) -> tuple[dict, list]:
    """One (method, C) row, failures counted rather than raised; peak RSS of pids() sampled every 0.2 s."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], resident(pids()))

    def ask(prompt: str) -> dict:
        try:
            return one_request(client, name, prompt, max_tokens)
        except openai.APIError as err:
            return {"error": f"{getattr(err, 'status_code', None)}: {err}"[:200]}

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(ask, texts, timeout=900))
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    ok = [a for a in answers if "error" not in a]
    ttft, latency = [a["ttft"] for a in ok] or [0.0], [a["latency"] for a in ok] or [0.0]
    return {"concurrency": concurrency, "requests": len(texts), "failed": len(answers) - len(ok),
            "errors": [a["error"] for a in answers if "error" in a][:8],
            "wall_seconds": round(wall, 2), "tokens_per_second": round(sum(a["tokens"] for a in ok) / wall, 2),
            "ttft_p50": round(percentile(ttft, 50), 4), "ttft_p99": round(percentile(ttft, 99), 4),
            "latency_p50": round(percentile(latency, 50), 4), "latency_p99": round(percentile(latency, 99), 4),
            "peak_resident_mb": round(peak[0] / 2**20, 1)}, answers


def dense_bundle(model) -> Bundle:
    masks = torch.ones(1, 2 * model.config.num_hidden_layers, dtype=torch.bool)
    return Bundle(masks, torch.zeros(1, 0), {"fingerprint": fingerprint(model), "model": "smollm2-135m"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--bundle", type=Path, default=BUNDLES / "ig16-b15")
    parser.add_argument("--static", type=Path, default=BUNDLES / "sleb-b15-mixed")
    parser.add_argument("--gguf-type", default="f16")
    parser.add_argument("--threads", type=int, help="threads of each llama-server and of torch (HF server, router); "
                        "default as igprune serve: cores // masks per shared llama-server (every core for a "
                        "mask's solo one), all cores for torch, so every method has the whole machine")
    parser.add_argument("--shared", action="store_true", help="also the routed bundle without solo engines "
                        "(EngineOptions(solo=False)): each mask's one engine has cores // masks threads")
    parser.add_argument("--rounds", type=int, default=3, help="sweeps of every method; medians are reported")
    parser.add_argument("--no-hf", action="store_true", help="leave out igprune's HF server")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve_llamacpp.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = prompts(args.requests, args.prompt_chars)
    model, tokenizer = load_model("smollm2-135m")
    settings = ServeSettings(max_batch=8, max_queue=4 * args.requests, request_timeout=600)
    options = EngineOptions(threads=args.threads, slots=max(args.concurrency))
    routed = Bundle.load(args.bundle)
    bundles = {"llama.cpp dense": dense_bundle(model), f"llama.cpp {args.static.name}": Bundle.load(args.static),
               f"llama.cpp {args.bundle.name} routed": routed}
    options_of = {method: options for method in bundles}
    if args.shared:
        method = f"llama.cpp {args.bundle.name} routed, shared cores"
        bundles[method], options_of[method] = routed, dataclasses.replace(options, solo=False)
    dynamic = None if args.no_hf else DynamicPrunedModel.from_bundle(model, routed, tokenizer)
    rows, answers_of, load_avg, fault = [], {}, [os.getloadavg()[0]], {}

    def sweep(method: str, url: str, pids, shape: dict, round_: int) -> openai.OpenAI:
        """One method's rows at every C, its server started."""
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        one_request(client, method, texts[0], 2)  # warm-up
        for c in args.concurrency:
            row, answers = run(client, method, texts, c, args.max_tokens, pids)
            rows.append({"method": method, "round": round_, **shape, **row})
            answers_of.setdefault(method, answers)
            load_avg.append(os.getloadavg()[0])
            print(f"round {round_} {method} C={c}: {row['tokens_per_second']} tok/s, failed {row['failed']}",
                  flush=True)
        return client

    for round_ in range(args.rounds):  # every method once per round, so drifting load hits them alike
        for method, bundle in bundles.items():
            router, tok, pool, skipped = prepare(bundle, "smollm2-135m", args.gguf_type, options_of[method], model,
                                                 tokenizer)
            pool.start()
            app = create_llamacpp_app(router, tok, pool, skipped, method, settings)
            shape = {"engines": len(pool.engines), "threads_each": pool.options.threads,
                     "solo_threads": pool.solo[0].options.threads if pool.solo else None}
            with BackgroundServer(app).running() as url:
                client = sweep(method, url, lambda pool=pool: [e.process.pid for e in pool.all], shape, round_)
                if method == f"llama.cpp {args.bundle.name} routed" and round_ == args.rounds - 1:
                    fault = kill_mid_load(client, method, texts, max(args.concurrency), args.max_tokens, pool,
                                          [a.get("cluster") for a in answers_of[method]])
                    print(f"fault run: {fault['summary']}", flush=True)
                    fault["metrics_route_seconds"] = route_metric(url)
            pool.stop()
        if dynamic is not None:
            method = f"hf {args.bundle.name}"
            with BackgroundServer(create_app(dynamic, method, settings)).running() as url:
                sweep(method, url, lambda: [os.getpid()], {"engines": 1, "threads_each": torch.get_num_threads()},
                      round_)
    report = summarise(args, model, tokenizer, bundles, texts, rows, answers_of, fault, load_avg)
    write_json(args.out, report)
    print_table(report)
    print(f"wrote {args.out}")


def kill_mid_load(client, name: str, texts: list[str], concurrency: int, max_tokens: int, pool,
                  clusters: list[int]) -> dict:
    """The routed run again at `concurrency`, the engine serving most prompts (`clusters`: each prompt's) killed
    (SIGKILL) 1.5 s in; then how long it took to serve again, and a prompt of its own answered."""
    served = Counter(pool.of[k] for k in clusters)
    victim = pool.engines[served.most_common(1)[0][0]]
    killed = []
    killer = threading.Timer(1.5, lambda: (killed.append(time.monotonic()), os.kill(victim.process.pid,
                                                                                   signal.SIGKILL)))
    killer.start()
    row, answers = run(client, name, texts, concurrency, max_tokens, lambda: [e.process.pid for e in pool.all])
    deadline = time.monotonic() + 120
    while victim.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    back = round(time.monotonic() - killed[0], 1) if victim.state == "ready" else None
    own = next(t for t, k in zip(texts, clusters, strict=True) if pool.of[k] == victim.index)
    try:
        after = bool(one_request(client, name, own, 2)["tokens"])
    except openai.APIError:
        after = False
    failed = [a["error"] for a in answers if "error" in a]
    return {"killed_engine": victim.index, "its_prompts": served[victim.index], "restarts": victim.restarts,
            "state_after": victim.state, "seconds_to_serve_again": back, **row,
            "errors": Counter(e.split(":")[0] for e in failed), "answered_after_restart": after,
            "summary": f"engine {victim.index} killed; {len(failed)} of {len(texts)} failed "
                       f"({dict(Counter(e.split(':')[0] for e in failed))}), restarted {victim.restarts}x, "
                       f"serving again {back} s after the kill"}


def route_metric(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("igprune_route_seconds")}
    return {k: v for k, v in values.items() if k.endswith(("_sum", "_count")) or 'le="0.0' in k}


def summarise(args, model, tokenizer, bundles, texts, rows, answers_of, fault, load_avg) -> dict:
    routed_name = f"llama.cpp {args.bundle.name} routed"
    hf_name = f"hf {args.bundle.name}"
    lengths = [len(ids) for ids in tokenizer(texts).input_ids]
    masks_of = {}
    for method, bundle in bundles.items():
        clusters = [a.get("cluster") or 0 for a in answers_of[method]]
        masks_of[method] = [bundle.route_masks[k] for k in clusters]
    per_token = {m: flops_per_token(model.config, masks, lengths, args.max_tokens) for m, masks in masks_of.items()}
    dense = per_token["llama.cpp dense"]
    ideal = {m: dense / v for m, v in per_token.items()}
    speed = {(r["method"], r["concurrency"], r["round"]): r["tokens_per_second"] for r in rows}
    static_name, dense_name = f"llama.cpp {args.static.name}", "llama.cpp dense"
    compared = {"static / dense": (static_name, dense_name), "routed / dense": (routed_name, dense_name),
                "routed, shared cores / dense": (routed_name + ", shared cores", dense_name),
                "routed / static": (routed_name, static_name), "routed / hf": (routed_name, hf_name)}
    ratios = {}
    for label, (a, b) in compared.items():
        for c in args.concurrency:
            per_round = [speed[a, c, k] / speed[b, c, k] for k in range(args.rounds)
                         if (a, c, k) in speed and (b, c, k) in speed]
            if per_round:  # each round's ratio pairs two runs minutes apart; the median over rounds
                ratios[f"{label}, C={c}"] = {"median": round(statistics.median(per_round), 3),
                                             "min": round(min(per_round), 3), "max": round(max(per_round), 3)}
    agreement = {}
    if hf_name in answers_of:
        pairs = list(zip(answers_of[routed_name], answers_of[hf_name], strict=True))
        same = [a.get("text") == b.get("text") for a, b in pairs]
        agreement = {"equal": sum(same), "of": len(pairs),
                     "same_cluster": sum(a.get("cluster") == b.get("cluster") for a, b in pairs),
                     "differ_at_char": [first_difference(a.get("text", ""), b.get("text", "")) for a, b in pairs
                                        if a.get("text") != b.get("text")],
                     "differences": [near_tie(model, tokenizer, bundles[routed_name], prompt, a, b)
                                     for prompt, (a, b) in zip(texts, pairs, strict=True)
                                     if a.get("text") != b.get("text")]}
    router = prepare_router_timing(bundles[routed_name], texts)
    return {"machine": machine_info(), "model": "smollm2-135m", "settings": {**vars(args), "out": str(args.out),
            "bundle": str(args.bundle), "static": str(args.static)},
            "load_average_during_run": load_avg, "rows": rows, "medians": medians(rows),
            "flops_ideal_speedup": ideal, "ratios": ratios,
            "greedy_agreement_llamacpp_vs_hf": agreement, "router_seconds_per_prompt": router, "fault_run": fault}


@torch.no_grad()
def near_tie(model, tokenizer, bundle: Bundle, prompt: str, llamacpp: dict, hf: dict) -> dict:
    """Where llama.cpp's greedy answer leaves the HF masked model's: the HF model's log-probability gap between
    its own next token and its runner-up there (a near-tie when small), and whether llama.cpp took the runner-up."""
    from igprune.blocks import masked

    ours, theirs = hf.get("text", ""), llamacpp.get("text", "")
    answer = tokenizer(ours, add_special_tokens=False).input_ids
    k = max((j for j in range(len(answer) + 1) if theirs.startswith(tokenizer.decode(answer[:j]))), default=0)
    ids = torch.tensor([tokenizer(prompt).input_ids + answer[:k]])
    with masked(model, bundle.route_masks[hf.get("cluster") or 0]):
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    top = logp.topk(2)
    said = tokenizer.decode(answer[:k])
    runner_up = tokenizer.decode(top.indices[1:2])
    return {"char": first_difference(theirs, ours), "token": k, "hf_next": tokenizer.decode(top.indices[:1]),
            "runner_up": runner_up, "gap_nats": round(float(top.values[0] - top.values[1]), 4),
            "llamacpp_took_runner_up": theirs[len(said):].startswith(runner_up)}


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def prepare_router_timing(bundle: Bundle, texts: list[str]) -> dict:
    """The router's own time per prompt (encode + nearest centroid), one prompt at a time as served."""
    from igprune.routing import Router

    router = Router.from_bundle(bundle, device="cpu")
    router.route(texts[:1])
    times = []
    for t in texts:
        start = time.perf_counter()
        router.route([t])
        times.append(time.perf_counter() - start)
    return {"p50": statistics.median(times), "p99": percentile(times, 99), "threads": torch.get_num_threads()}


MEASURES = ["tokens_per_second", "ttft_p50", "ttft_p99", "latency_p50", "latency_p99", "peak_resident_mb"]


def medians(rows: list[dict]) -> list[dict]:
    """Per (method, C): the median over rounds of each measure, the tokens/s range, failures summed."""
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["concurrency"]), []).append(r)
    return [{**{k: v for k, v in group[0].items() if k not in MEASURES and k not in ("round", "failed", "errors")},
             **{m: statistics.median(g[m] for g in group) for m in MEASURES},
             "tokens_per_second_range": [min(g["tokens_per_second"] for g in group),
                                         max(g["tokens_per_second"] for g in group)],
             "failed": sum(g["failed"] for g in group), "rounds": len(group)} for group in out.values()]


def print_table(report: dict) -> None:
    head = ["method", "masks x threads", "solo engines", "C", "tok/s (range)", "TTFT p50", "TTFT p99",
            "latency p50", "latency p99", "failed", "peak PSS"]
    print(f"medians over {report['settings']['rounds']} rounds")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in report["medians"]:
        low, high = r["tokens_per_second_range"]
        print(f"| {r['method']} | {r['engines']} x {r['threads_each']} | {r.get('solo_threads') or '-'} | "
              f"{r['concurrency']} | {r['tokens_per_second']:.1f} ({low:.0f}-{high:.0f}) | "
              f"{r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p99'] * 1000:.0f} ms | {r['latency_p50'] * 1000:.0f} ms | "
              f"{r['latency_p99'] * 1000:.0f} ms | {r['failed']} | {r['peak_resident_mb']:.0f} MB |")
    ideal = report["flops_ideal_speedup"]
    print("FLOPs-ideal speedup over dense: " + ", ".join(f"{m} {v:.3f}" for m, v in ideal.items()))
    print("ratios, median over rounds (range): " + ", ".join(f"{k} {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
                                                           for k, v in report["ratios"].items()))
    print(f"greedy agreement: {report['greedy_agreement_llamacpp_vs_hf']}")
    print(f"router per prompt: {report['router_seconds_per_prompt']}")
    print(f"fault run: {report['fault_run'].get('summary')}; load average {report['load_average_during_run']}")


if __name__ == "__main__":
    main()
