"""`igprune serve` through the real openai client: a tiny model, a 3-cluster bundle built here, a live server.

Every greedy answer is checked token for token against DynamicPrunedModel.generate of that prompt alone.
"""

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import TOPICS, bundle_config, tiny_model, tiny_tokenizer

openai = pytest.importorskip("openai")

from igprune.bundle import Bundle, fingerprint  # noqa: E402
from igprune.dynamic import DynamicPrunedModel, encode_prompts  # noqa: E402
from igprune.encoder import DEFAULT_ENCODER, SentenceEncoder  # noqa: E402
from igprune.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from igprune.serve.engine import Job, Sampling, Scheduler  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = [texts[0] for texts in TOPICS.values()]  # cooking, code, sport: one per cluster
TIMEOUT = 60  # seconds any one call may take


def cluster_masks() -> torch.Tensor:
    """A visibly different mask per cluster: cluster k skips the FFN of layer k."""
    masks = torch.ones(3, 8, dtype=torch.bool)
    for k in range(3):
        masks[k, 2 * k + 1] = False
    return masks


def routed_model(masks: torch.Tensor) -> DynamicPrunedModel:
    """A tiny llama with one centroid per topic and the given mask per cluster."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    encoder = SentenceEncoder()
    centroids = torch.stack([encoder.encode(texts).mean(0) for texts in TOPICS.values()])
    bundle = Bundle(masks, centroids, {"fingerprint": fingerprint(model), "encoder": DEFAULT_ENCODER, "model": "tiny"})
    dynamic = DynamicPrunedModel.from_bundle(model, bundle, tokenizer)
    assert [r.cluster for r in dynamic.route(PROMPTS)] == [0, 1, 2]
    return dynamic


@pytest.fixture(scope="module")
def dynamic():
    return routed_model(cluster_masks())


@pytest.fixture(scope="module")
def app(dynamic):
    return create_app(dynamic, "tiny", ServeSettings(max_batch=4, max_wait_ms=20, max_queue=8, request_timeout=TIMEOUT))


@pytest.fixture(scope="module")
def server(app):
    with BackgroundServer(app).running() as url:
        yield url


def client_of(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def alone(dynamic, prompt: str, max_tokens: int, chat: bool = False) -> tuple[str, int]:
    """(text, tokens) of `prompt` generated alone and greedily, offline; tokens count up to and with EOS."""
    tok = dynamic.tokenizer
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        batch = encode_prompts(tok, dynamic.model.config, [prompt], max_tokens)
    out = dynamic.generate(batch["input_ids"], batch["attention_mask"], texts=[prompt], max_new_tokens=max_tokens,
                           do_sample=False)[0, batch["input_ids"].shape[1]:].tolist()
    eos = dynamic.model.generation_config.eos_token_id
    n = out.index(eos) + 1 if eos in out else len(out)
    return tok.decode(out[:n], skip_special_tokens=True), n


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_until(condition, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_completions_equal_offline_generation_and_name_their_cluster(dynamic, client):
    for k, prompt in enumerate(PROMPTS):
        raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        out = raw.parse()
        text, n = alone(dynamic, prompt, 12)
        assert out.choices[0].text == text and out.usage.completion_tokens == n
        assert out.usage.prompt_tokens == len(dynamic.tokenizer(prompt).input_ids)
        assert out.choices[0].finish_reason == ("length" if n == 12 else "stop")
        assert out.model_extra["igprune"]["cluster"] == k and out.model_extra["igprune"]["blocks_skipped"] == 1
        assert raw.headers["x-igprune-cluster"] == str(k)


def test_streaming_gives_the_same_text_in_pieces(dynamic, client):
    for prompt in PROMPTS:
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text, n = alone(dynamic, prompt, 10)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == n and len(chunks) > 3


def test_chat_uses_the_template_and_refuses_without_one(dynamic, client):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    with pytest.raises(openai.BadRequestError, match="no chat template") as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert err.value.body["code"] == "no_chat_template"
    dynamic.tokenizer.chat_template = TEMPLATE
    try:
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        text, n = alone(dynamic, PROMPTS[2], 8, chat=True)
        assert out.choices[0].message.content == text and out.usage.completion_tokens == n
        assert out.model_extra["igprune"]["cluster"] == 2  # routed by what the user wrote
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    finally:
        dynamic.tokenizer.chat_template = None


def test_a_request_log_holds_what_was_served_as_fit_and_ppl_read_it(dynamic, tmp_path):
    from igprune.data import read_texts
    from igprune.texts import Request, chat_prompt

    log = tmp_path / "served.jsonl"
    settings = ServeSettings(max_batch=2, request_timeout=TIMEOUT, request_log=str(log))
    messages = [{"role": "user", "content": PROMPTS[2]}]
    dynamic.tokenizer.chat_template = TEMPLATE
    try:
        with BackgroundServer(create_app(dynamic, "tiny", settings)).running() as url:
            client = client_of(url)
            plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True))
            chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
        served = read_texts(log, dynamic.tokenizer)  # what `igprune fit --texts` and `ppl --texts` get
        reply = chat.choices[0].message.content
        assert served == [Request(PROMPTS[0], plain.choices[0].text), Request(PROMPTS[1], streamed),
                          Request(chat_prompt(dynamic.tokenizer, messages), reply, PROMPTS[2], templated=True)]
        assert log.stat().st_mode & 0o077 == 0  # owner-only: it holds what users sent
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["igprune"]["cluster"] for r in records] == [0, 1, 2]  # the cluster that served each
        assert records[2]["messages"] == [*messages, {"role": "assistant", "content": reply}]
    finally:
        dynamic.tokenizer.chat_template = None


def test_stop_sequences_cut_the_text_streamed_or_not(dynamic, client):
    text, _ = alone(dynamic, PROMPTS[1], 16)
    stop = text[5:7]
    cut = text.find(stop)
    assert len(stop) == 2 and 0 < cut <= 5
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "@@"])
    assert out.choices[0].text == text[:cut] and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:cut]


def test_seeded_sampling_repeats(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.5, top_p=0.9,
                                         seed=seed).choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_concurrent_requests_of_different_masks_share_batches_and_equal_offline(dynamic, app, client):
    """Eight requests over three clusters (3/3/2) arrive while the worker is held: with mixing on (the default)
    they go out as two full batches of four, each with rows of several masks (left-padded where lengths
    differ), and each answer is still that prompt's offline generation under its own cluster's mask."""
    prompts = [t for texts in TOPICS.values() for t in texts][:8]
    scheduler = app.state.scheduler
    batches, record = [], scheduler.on_batch
    scheduler.on_batch = lambda queues, size, *rest: (batches.append((queues, size)), record(queues, size, *rest))
    try:
        with ThreadPoolExecutor(8) as pool:
            with scheduler.hold():
                futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=10,
                                       temperature=0) for p in prompts]
                wait_until(lambda: sum(scheduler.depth(k) for k in range(3)) == 8)  # routed and queued
                with pytest.raises(openai.RateLimitError) as err:  # the queue holds 8
                    client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4)
                assert err.value.body["code"] == "queue_full"
            outs = [f.result(timeout=TIMEOUT) for f in futures]
        wait_until(lambda: len(batches) == 2)  # a batch is recorded just after its last row is answered
    finally:
        scheduler.on_batch = record
    routes = [r.cluster for r in dynamic.route(prompts)]
    assert sorted(routes.count(k) for k in range(3)) == [2, 3, 3]
    assert [size for _, size in batches] == [4, 4] and all(len(queues) > 1 for queues, _ in batches)
    for prompt, out, cluster in zip(prompts, outs, routes, strict=True):
        assert out.choices[0].text == alone(dynamic, prompt, 10)[0]
        assert out.model_extra["igprune"]["cluster"] == cluster and out.model_extra["igprune"]["batch_size"] == 4


def test_a_batch_fills_from_the_masks_that_add_the_fewest_blocks():
    """The leading queue's requests first, then the mask that adds the fewest kept blocks, though another
    mask's request is older; with mixing off a batch holds one mask, in round-robin order."""
    masks = torch.ones(3, 8, dtype=torch.bool)
    masks[0, [1, 3, 5]] = False
    masks[1, [1, 3]] = False  # adds block 5 to cluster 0's
    masks[2, 7] = False  # adds blocks 1, 3 and 5
    shared = routed_model(masks)
    loop = asyncio.new_event_loop()
    try:
        for mix, expected in ((True, [[0, 0, 1], [2]]), (False, [[0, 0], [1], [2]])):
            scheduler = Scheduler(shared, max_batch=3, max_wait=0, mix=mix)
            for cluster in (0, 0, 2, 1):
                scheduler.admit()
                scheduler.submit(Job([5], Sampling(4), cluster, loop))
            assert [[job.cluster for job in scheduler._take()] for _ in expected] == expected
            assert scheduler.depth() == 0
    finally:
        loop.close()


def test_clusters_with_equal_masks_share_a_queue_and_its_batches():
    """Clusters 0 and 2 with one mask, mixing off: their held requests go out as one batch, as a static mask's
    would, cluster 1's as another, and each answer is still that prompt's offline generation under its
    cluster's mask."""
    masks = cluster_masks()
    masks[2] = masks[0]
    shared = routed_model(masks)
    app = create_app(shared, "tiny", ServeSettings(max_batch=8, max_wait_ms=20, max_queue=8, request_timeout=TIMEOUT,
                                                   mix_masks=False))
    scheduler = app.state.scheduler
    assert scheduler.queue_of == [0, 1, 0]
    prompts = [t for texts in TOPICS.values() for t in texts][:8]
    with BackgroundServer(app).running() as url, ThreadPoolExecutor(8) as pool:
        client = client_of(url)
        with scheduler.hold():
            futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=10, temperature=0)
                       for p in prompts]
            wait_until(lambda: sum(scheduler.depth(k) for k in range(3)) == 8)  # per cluster, in shared queues
        outs = [f.result(timeout=TIMEOUT) for f in futures]
    routes = [r.cluster for r in shared.route(prompts)]
    assert {0, 2} <= set(routes)
    for prompt, out, cluster in zip(prompts, outs, routes, strict=True):
        assert out.choices[0].text == alone(shared, prompt, 10)[0]
        assert out.model_extra["igprune"]["cluster"] == cluster
        together = [c for c in routes if scheduler.queue_of[c] == scheduler.queue_of[cluster]]
        assert out.model_extra["igprune"]["batch_size"] == len(together)


def test_bad_requests_get_openai_error_bodies_and_the_server_lives(server, client):
    cases = [
        (dict(prompt="", max_tokens=4), "prompt"),
        (dict(prompt="hi", temperature=5), "temperature"),
        (dict(prompt="hi", n=2), "n"),
        (dict(prompt="hi", max_tokens=10_000), "max_tokens"),
        (dict(prompt=["a", "b"]), "prompt"),
        (dict(prompt="hi", stop=["a"] * 5), "stop"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", **kwargs)
        body = err.value.body
        assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"], kwargs
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="hi")
    for data in (b"{not json", b'{"model": "tiny"}', b"[]"):
        status, body = post(server + "/v1/completions", data)
        assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    with urllib.request.urlopen(server + "/health", timeout=TIMEOUT) as response:
        assert json.loads(response.read())["status"] == "ok"
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_metrics_count_requests_and_tokens_per_cluster(server, client):
    client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=3, temperature=0)

    def metrics() -> str:
        with urllib.request.urlopen(server + "/metrics", timeout=TIMEOUT) as response:
            return response.read().decode()

    wait_until(lambda: 'igprune_batch_size_count{mask="1"}' in metrics())  # recorded just after the answer
    text = metrics()
    assert 'igprune_requests_total{cluster="1",endpoint="completions",status="200"}' in text
    assert 'igprune_completion_tokens_total{cluster="1"}' in text and 'igprune_queue_depth{cluster="2"}' in text
    assert "igprune_time_to_first_token_seconds_bucket" in text and "igprune_batch_size_bucket" in text
    assert 'igprune_batch_size_count{mask="1"}' in text and "igprune_batch_masks_bucket" in text
    routed = re.search(r"^igprune_route_seconds_count (\S+)$", text, re.M)  # every request routed, timed
    assert routed and float(routed.group(1)) >= 1


def test_a_request_queued_too_long_times_out(dynamic):
    app = create_app(dynamic, "tiny", ServeSettings(request_timeout=0.3))
    with BackgroundServer(app).running() as url, app.state.scheduler.hold():
        with pytest.raises(openai.APIStatusError, match="timed out") as err:
            client_of(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4)
        assert err.value.status_code == 504


def test_a_client_leaving_mid_stream_does_not_hurt_the_next(dynamic, client):
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert out.choices[0].text == alone(dynamic, PROMPTS[1], 6)[0]


def test_cli_serve_loads_the_bundle_and_listens_on_localhost(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from igprune.cli import app as cli

    folder, model = tmp_path / "tiny", tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    mask = torch.tensor([[True, False] + [True] * 6])
    Bundle(mask, torch.zeros(1, 0), bundle_config(mask, model, model=str(folder))).save(tmp_path / "b1")
    calls = []
    monkeypatch.setattr("igprune.serve.serve", lambda *args: calls.append(args))
    for flags in ([], ["--no-mix-masks", "--log-requests", str(tmp_path / "served.jsonl")]):
        result = CliRunner().invoke(cli, ["serve", "--bundle", str(tmp_path / "b1"), "--max-queue", "5", *flags])
        assert result.exit_code == 0, result.output
    (served, name, host, port, settings), (*_, unmixed) = calls
    assert (name, host, port, settings.max_queue, settings.mix_masks) == ("b1", "127.0.0.1", 8000, 5, True)
    assert not unmixed.mix_masks and settings.request_log is None
    assert unmixed.request_log == str(tmp_path / "served.jsonl")
    nowhere = CliRunner().invoke(cli, ["serve", "--bundle", str(tmp_path / "b1"), "--log-requests",
                                       str(tmp_path / "no" / "log.jsonl")])
    assert nowhere.exit_code != 0 and "give a file in an existing folder" in str(nowhere.exception)
    with socket.create_server(("127.0.0.1", 0)) as taken:  # refused before the model loads, not by uvicorn after
        busy = CliRunner().invoke(cli, ["serve", "--bundle", str(tmp_path / "b1"), "--port",
                                        str(taken.getsockname()[1])])
    assert busy.exit_code != 0 and "cannot listen on 127.0.0.1" in str(busy.exception)
    assert torch.equal(served.masks, mask)


def test_values_generation_cannot_take_are_refused_naming_the_field(server):
    """Strict types and the ranges generation can take: each a 400 naming the field, never a 500 (issue 42)."""
    ok = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    cases = [
        ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": "7"}, "seed"),
        ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"), ({"temperature": "1"}, "temperature"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"prompt": "a \ud800 b"}, "prompt"), ({"prompt": ["a \udfff"]}, "prompt.0"), ({"stop": "\ud800"}, "stop"),
        ({"max_tokens": 2.0}, "max_tokens"),
    ]
    for change, param in cases:
        status, body = post(server + "/v1/completions", json.dumps({**ok, **change}).encode())
        assert status == 400 and body["error"]["param"] == param, (change, body)
        assert body["error"]["type"] == "invalid_request_error"
    status, body = post(server + "/v1/completions", json.dumps(ok).encode()[:-1] + b', "seed": NaN, "top_p": NaN}')
    assert status == 400 and body["error"]["param"] == "top_p" and "finite" in body["error"]["message"]
    status, body = post(server + "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "x\ud800"}]}).encode())
    assert status == 400 and body["error"]["param"] == "messages.0.content" and "surrogate" in body["error"]["message"]
    status, body = post(server + "/v1/completions", b'{"model": "tiny", "prompt": "hi",}')
    assert status == 400 and body["error"]["param"] is None and "not valid JSON" in body["error"]["message"]
    print(f"\nreliability: serve: {len(cases) + 3} requests generation cannot take, each refused with a 400 naming "
          "its field; 0 500s")


def test_a_tiny_temperature_is_greedy_and_every_seed_in_range_samples(dynamic, client):
    """A positive temperature however small picks the greedy token (it used to make nan probabilities); seeds at
    both ends of the range torch takes sample."""
    text, _ = alone(dynamic, PROMPTS[0], 8)
    for temperature in (1e-40, 1e-300, 5e-324):
        out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=temperature, seed=1)
        assert out.choices[0].text == text
    for seed in (2**64 - 1, -(2**63)):
        out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=seed)
        assert out.choices[0].finish_reason in ("length", "stop")


def test_a_poisoned_request_fails_alone_and_its_batch_is_answered_as_if_alone(dynamic, app, client, caplog):
    """A request whose generation fails (a token id past the vocabulary, as a tokenizer that does not match the
    model would give) shares a batch with valid ones, plain and streamed: the batch is rerun request by request,
    every valid answer equals its answer alone, and only the poisoned one gets a 500 whose message holds a request
    id and no details."""
    scheduler = app.state.scheduler
    poison = Job([5, 10_000], Sampling(8), 0, asyncio.new_event_loop(), "cmpl-poisoned")
    prompts = PROMPTS + [PROMPTS[0]]
    with ThreadPoolExecutor(4) as pool, caplog.at_level("WARNING", logger="igprune.serve"):
        with scheduler.hold():
            futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=8, temperature=0)
                       for p in prompts[:2]]
            streamed = pool.submit(lambda: "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=prompts[2], max_tokens=8, temperature=0, stream=True)))
            wait_until(lambda: sum(scheduler.depth(k) for k in range(3)) == 3)
            scheduler.admit()
            scheduler.submit(poison)
        outs = [f.result(timeout=TIMEOUT).choices[0].text for f in futures] + [streamed.result(timeout=TIMEOUT)]
        wait_until(lambda: poison.finish is not None)
    assert outs == [alone(dynamic, p, 8)[0] for p in prompts[:3]]
    assert "a batch of 4 failed; rerunning its 4 unanswered requests one by one" in caplog.text
    assert "request cmpl-poisoned failed in generation" in caplog.text
    poison.loop.run_until_complete(asyncio.sleep(0))
    event = poison.events.get_nowait()
    assert event[:2] == ("error", 500) and "cmpl-poisoned" in event[2] and "index" not in event[2].lower()
    poison.loop.close()
    print(f"\nreliability: isolation: a poisoned request in a batch of 4: {len(outs)} of {len(outs)} other requests "
          "answered as if alone, only the poisoned one failed (500 with a request id)")
    seeded = [client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=5)
              for _ in range(2)]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text  # the server is fine afterwards


def test_a_crash_answers_500_with_a_request_id_and_leaves_the_details_to_the_log(dynamic, server, monkeypatch,
                                                                                 caplog):
    def broken(texts):
        raise RuntimeError("cannot open /secret/place/weights.bin")

    monkeypatch.setattr(dynamic, "route", broken)
    with caplog.at_level("ERROR", logger="igprune.serve"):
        status, body = post(server + "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi"}).encode())
    assert status == 500 and body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    assert "/secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    rid = body["error"]["message"].split("request id ")[1]
    assert rid.startswith("req-") and rid in caplog.text and "/secret/place/weights.bin" in caplog.text


def test_a_reply_cut_inside_a_character_drops_it_instead_of_sending_u_fffd(dynamic):
    """Byte-level tokens: max_tokens ends the reply after the first byte of "é"; the text ends before it."""
    from tiny_models import tiny_bpe_tokenizer

    scheduler, loop = Scheduler(dynamic), asyncio.new_event_loop()
    scheduler.tokenizer = tok = tiny_bpe_tokenizer()
    a, first_byte = tok.convert_tokens_to_ids(["a", "Ã"])  # "é" is bytes C3 A9, byte-level "Ã©"
    try:
        job = Job([5], Sampling(2), 0, loop)
        assert not scheduler._on_token(job, a) and scheduler._on_token(job, first_byte)
        loop.run_until_complete(asyncio.sleep(0))
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        assert job.text == "a" and events == [("delta", "a"), ("done", "length")]
    finally:
        loop.close()


def test_a_batch_failing_midway_reruns_its_requests_without_repeating_what_was_sent(dynamic, monkeypatch):
    """The poisoned row fails at its fourth token, after the other rows have sent text: each is rerun alone and
    its events still add up to its answer alone, each piece once."""
    scheduler, loop = Scheduler(dynamic, max_batch=4, max_wait=0), asyncio.new_event_loop()
    jobs = [Job(dynamic.tokenizer(p).input_ids, Sampling(8), k, loop, f"cmpl-{k}") for k, p in enumerate(PROMPTS)]
    poison = Job(jobs[0].prompt_ids, Sampling(8), 0, loop, "cmpl-poisoned")
    on_token = scheduler._on_token

    def failing(job, token):
        if job is poison and len(job.ids) == 3:
            raise RuntimeError("poisoned")
        return on_token(job, token)

    monkeypatch.setattr(scheduler, "_on_token", failing)
    try:
        scheduler._run([*jobs, poison])
        loop.run_until_complete(asyncio.sleep(0))
        for job, prompt in zip(jobs, PROMPTS, strict=True):
            events = [job.events.get_nowait() for _ in range(job.events.qsize())]
            assert "".join(e[1] for e in events if e[0] == "delta") == alone(dynamic, prompt, 8)[0]
            assert [e[0] for e in events].count("done") == 1 and events[-1][0] == "done"
            assert len([e for e in events if e[0] == "delta"]) > 3  # it had sent text before the failure
        poisoned = [poison.events.get_nowait() for _ in range(poison.events.qsize())]
        assert poisoned[-1][:2] == ("error", 500) and "done" not in [e[0] for e in poisoned]
    finally:
        loop.close()
