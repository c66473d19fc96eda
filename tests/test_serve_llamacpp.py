"""`igprune serve --engine llama.cpp`: a tiny Llama, a 3-cluster bundle (two distinct masks) built here, one
llama-server per mask on 127.0.0.1, the router in front. Greedy answers equal the HF masked model's; a killed
engine costs only its own requests (503 + Retry-After) and comes back."""

import dataclasses
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
import torch
from ranks import free_port
from tiny_models import TOPICS, tiny_bpe_tokenizer, tiny_model

openai = pytest.importorskip("openai")

from igprune.bundle import Bundle, fingerprint  # noqa: E402
from igprune.dynamic import DynamicPrunedModel  # noqa: E402
from igprune.encoder import DEFAULT_ENCODER, SentenceEncoder  # noqa: E402
from igprune.files import IGPruneError  # noqa: E402
from igprune.gguf_check import find_llama_server  # noqa: E402
from igprune.serve import BackgroundServer, ServeSettings  # noqa: E402
from igprune.serve.llamacpp import EngineOptions, EnginePool, create_llamacpp_app, crowding, prepare  # noqa: E402

pytestmark = pytest.mark.skipif(find_llama_server() is None, reason="llama-server not installed (igprune[gguf])")
PROMPTS = [texts[0] for texts in TOPICS.values()]  # cooking, code, sport: one per cluster
TIMEOUT = 60
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """(HF routed model, started pool, router, tokenizer, skipped): clusters 0 and 2 share a mask."""
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.chat_template = TEMPLATE
    model = tiny_model("llama", vocab=len(tokenizer))
    masks = torch.ones(3, 8, dtype=torch.bool)
    masks[0, 3] = masks[2, 3] = False  # layer 1's FFN
    masks[1, 4] = False  # layer 2's attention
    encoder = SentenceEncoder()
    centroids = torch.stack([encoder.encode(texts).mean(0) for texts in TOPICS.values()])
    bundle = Bundle(masks, centroids, {"fingerprint": fingerprint(model), "encoder": DEFAULT_ENCODER, "model": "tiny"})
    dynamic = DynamicPrunedModel.from_bundle(model, bundle, tokenizer)
    router, tok, pool, skipped = prepare(bundle, "tiny", "f32", EngineOptions(threads=1, slots=2, ctx=512),
                                         model=model, tokenizer=tokenizer, cache=tmp_path_factory.mktemp("gguf"))
    assert [len(pool.engines), pool.of] == [2, [0, 1, 0]]
    pool.start()
    yield dynamic, pool, router, tok, skipped, bundle
    pool.stop()


@pytest.fixture(scope="module")
def server(routed):
    dynamic, pool, router, tok, skipped, _ = routed
    app = create_llamacpp_app(router, tok, pool, skipped, "tiny", ServeSettings(request_timeout=TIMEOUT))
    with BackgroundServer(app).running() as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def offline(dynamic, ids: list[int], cluster: int, n: int) -> str:
    with dynamic.use_cluster(cluster) as model:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return dynamic.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_completions_and_chat_equal_the_hf_masked_model_streamed_or_not(routed, client):
    dynamic, *_ = routed
    for k, prompt in enumerate(PROMPTS):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert out.model_extra["igprune"]["cluster"] == k and out.usage.completion_tokens == 8
        assert out.choices[0].text == offline(dynamic, dynamic.tokenizer(prompt).input_ids, k, 8)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
        # the random model writes stray bytes: the engine streams them as its own pieces (see llamacpp.Reply)
        assert streamed.replace("\ufffd", "") == out.choices[0].text.replace("\ufffd", "")
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    ids = dynamic.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert chat.choices[0].message.content == offline(dynamic, list(ids), 1, 6)
    assert chat.model_extra["igprune"]["blocks_skipped"] == 1


def test_concurrent_requests_of_both_masks_equal_one_at_a_time(routed, client):
    """Six clients at once over both masks (solo and shared engines): every answer equals its lone one, and the
    lanes end idle."""
    from concurrent.futures import ThreadPoolExecutor

    _, pool, *_ = routed
    assert pool.lanes is not None and len(pool.all) == 4

    def ask(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    alone = [ask(p) for p in PROMPTS]
    with ThreadPoolExecutor(6) as workers:
        together = list(workers.map(ask, PROMPTS * 2))
    assert together == alone * 2
    assert (pool.lanes.running, pool.lanes.waiting) == (0, [])
    assert sum(e.in_flight for e in pool.all) == 0


def get(url: str) -> tuple[int, dict | str, object]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if body.startswith("{") else body, r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def post(url: str, body: dict) -> tuple[int, dict, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def kill(engines: list) -> None:
    """SIGKILL each engine's process (its restart held off 3 s, long enough to be asked meanwhile)."""
    for engine in engines:
        engine.options = dataclasses.replace(engine.options, restart_delay=3.0)
        os.kill(engine.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(e.state == "ready" for e in engines) and time.monotonic() < deadline:
        time.sleep(0.02)


def back(engines: list) -> None:
    deadline = time.monotonic() + TIMEOUT
    while any(e.state != "ready" for e in engines) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_killed_engine_answers_503_meanwhile_others_serve_and_it_comes_back(routed, server):
    _, pool, *_ = routed
    ask = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    kill([pool.solo[1]])  # a lone request of mask 1 runs on its shared engine meanwhile
    assert post(server + "/v1/completions", {**ask, "prompt": PROMPTS[1]})[0] == 200
    back([pool.solo[1]])
    engines = [e for e in pool.all if e.index == 1]  # cluster 1's mask, both engines
    restarts = [e.restarts for e in engines]
    kill(engines)
    status, body, headers = post(server + "/v1/completions", {**ask, "prompt": PROMPTS[1]})
    assert status == 503 and body["error"]["code"] == "engine_unavailable" and headers["Retry-After"]
    assert get(server + "/health")[0] == 503
    assert post(server + "/v1/completions", {**ask, "prompt": PROMPTS[0]})[0] == 200  # the other mask's engine
    back(engines)
    assert [e.restarts for e in engines] == [r + 1 for r in restarts]
    assert post(server + "/v1/completions", {**ask, "prompt": PROMPTS[1]})[0] == 200
    status, health, _ = get(server + "/health")
    assert status == 200 and [(e["lane"], e["state"]) for e in health["engines"]] == \
        [("shared", "ready")] * 2 + [("solo", "ready")] * 2
    metrics = get(server + "/metrics")[1]
    assert 'igprune_engine_restarts{lane="solo",mask="1"} 2.0' in metrics
    assert 'igprune_engine_restarts{lane="shared",mask="1"} 1.0' in metrics and "igprune_route_seconds_count" in metrics
    assert 'igprune_requests_total{cluster="1",endpoint="completions",status="503"}' in metrics


def test_a_refused_connection_is_answered_by_the_masks_other_engine(routed, server):
    """An engine that died a moment ago still reads "ready" until its supervisor looks (a tenth of a second): a
    request it refuses goes to the mask's other engine, or is a 503 when that one refuses too."""
    _, pool, *_ = routed
    ask = {"model": "tiny", "max_tokens": 4, "temperature": 0, "prompt": PROMPTS[1]}
    engines = [e for e in pool.all if e.index == 1]
    urls = [e.url for e in engines]
    before = [e.restarts for e in engines]
    dead = [f"http://127.0.0.1:{free_port()}" for _ in engines]  # nothing listens there: connection refused
    try:
        pool.solo[1].url = dead[0]  # a lone request runs on the solo engine
        status, body, _ = post(server + "/v1/completions", ask)
        assert status == 200 and body["choices"][0]["text"]
        for engine, url in zip(engines, dead, strict=True):
            engine.url = url
        status, body, headers = post(server + "/v1/completions", ask)
        assert status == 503 and body["error"]["code"] == "engine_unavailable" and headers["Retry-After"]
    finally:
        for engine, url in zip(engines, urls, strict=True):
            engine.url = url
    assert [e.in_flight for e in pool.all] == [0] * 4 and [e.restarts for e in engines] == before
    assert post(server + "/v1/completions", ask)[0] == 200


def test_bad_requests_are_openai_errors(server):
    status, body, _ = post(server + "/v1/completions", {"model": "other", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = post(server + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10_000})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_exports_are_cached_and_start_up_failures_are_one_line(routed, tmp_path, monkeypatch):
    dynamic, pool, *_, bundle = routed
    kept = [e.gguf.stat().st_mtime_ns for e in pool.engines]
    again = prepare(bundle, "tiny", "f32", model=dynamic.model, tokenizer=dynamic.tokenizer,
                    cache=pool.engines[0].gguf.parent.parent)[2]
    assert [e.gguf for e in again.engines] == [e.gguf for e in pool.engines]
    assert [e.gguf.stat().st_mtime_ns for e in again.engines] == kept  # not written again
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    options = EngineOptions(threads=1, slots=1, ctx=128, start_timeout=30)
    for paths, what in (([broken], "broken.gguf is not a readable GGUF"), ([tmp_path / "gone.gguf"], "does not exist")):
        with pytest.raises(IGPruneError, match=what) as err:
            EnginePool(paths, [0], options).start()
        assert "\n" not in str(err.value)
    monkeypatch.setenv("IGPRUNE_LLAMA_SERVER", str(tmp_path / "no-llama-server"))
    with pytest.raises(IGPruneError, match="does not exist"):
        prepare(bundle, "tiny", "f32", model=dynamic.model, tokenizer=dynamic.tokenizer, cache=tmp_path)


def test_a_file_with_the_smollm_pre_tokenizer_is_served(routed, tmp_path):
    """The shipped llama-server aborts loading any file whose tokenizer.ggml.pre is "smollm" (the registry's SmolLM2
    GGUFs); the engine runs it with another pre-tokenizer, unused as token ids are sent."""
    from igprune.gguf_export import export_gguf

    dynamic, *_ = routed
    export_gguf(dynamic.model, dynamic.tokenizer, torch.ones(8, dtype=torch.bool), tmp_path / "s.gguf",
                tokenizer_pre="smollm")
    pool = EnginePool([tmp_path / "s.gguf"], [0], EngineOptions(threads=1, slots=1, ctx=128))
    pool.start()
    try:
        assert pool.engines[0].state == "ready" and "tokenizer.ggml.pre=str:gpt-2" in pool.engines[0].args()
    finally:
        pool.stop()


def test_cli_serve_engine_llama_cpp_refuses_other_families_and_auto_says_why(tmp_path, monkeypatch):
    from tiny_models import saved_bundle, tiny_tokenizer
    from typer.testing import CliRunner

    from igprune.cli import app as cli

    mask = torch.tensor([[True, False] + [True] * 6])
    _, bundle = saved_bundle(tmp_path, tiny_model("qwen3"), tiny_tokenizer(), mask)
    calls = []
    monkeypatch.setattr("igprune.serve.serve", lambda *args: calls.append(args))
    refused = CliRunner().invoke(cli, ["serve", "--bundle", str(bundle), "--engine", "llama.cpp"])
    assert refused.exit_code != 0 and not calls
    message = str(refused.exception)
    assert "\n" not in message and "cannot serve" in message and "'qwen3'" in message and "--engine hf" in message
    auto = CliRunner().invoke(cli, ["serve", "--bundle", str(bundle), "--engine", "auto"])
    assert auto.exit_code == 0, auto.output
    assert "engine: hf, as llama.cpp cannot serve" in " ".join(auto.output.split()) and len(calls) == 1


def test_more_engines_than_cores_is_said_at_start_up():
    """Engines outnumbering the cores each get fewer threads than a dense engine would: serve says so."""
    assert crowding(engines=2, threads=1, cores=2, solo=False) is None
    note = crowding(engines=5, threads=1, cores=2, solo=False)
    assert note is not None and "5 engines on 2 cores" in note and "\n" not in note
    assert crowding(engines=5, threads=1, cores=2, solo=True) is None  # a lone request has every core
