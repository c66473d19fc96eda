"""Requests (igprune.texts.Request): clustered by the prompt, scored on the response, by every finder."""

import hashlib
import json
import math

import pytest
import torch
from tiny_models import TOPICS, tiny_model, tiny_tokenizer

from igprune.blocks import masked
from igprune.data import read_texts
from igprune.evaluation.perplexity import token_nll
from igprune.files import IGPruneError
from igprune.finders import Calibration, Scorer, make_calibration
from igprune.finders.l0 import MaskTrainer, TrainConfig, tokenize
from igprune.finders.search import find_order_mask
from igprune.pruner import IGPruner
from igprune.texts import Request, clean_texts, digest, tokens

COOKING, CODE, SPORT = TOPICS.values()
# cooking questions answered with code: a prompt and a response that a topic embedding tells apart
REQUESTS = [Request(f"Question {i}: {COOKING[i % 3]}\n", CODE[i % 3]) for i in range(6)]


def test_a_request_scores_only_its_response_tokens():
    tok = tiny_tokenizer()
    request = Request("Say hi: ", "hi!")
    ids, scored = tokens(tok, request)
    prompt = tok("Say hi: ").input_ids
    assert ids == prompt + tok("hi!", add_special_tokens=False).input_ids
    assert scored == [False] * len(prompt) + [True] * 3
    assert tokens(tok, "plain")[1] == [True] * len(tok("plain").input_ids)
    with pytest.warns(UserWarning, match="dropped 2 empty"):
        assert clean_texts(["a", Request("", "x"), Request("p", " ")]) == ["a"]
    assert digest(["a", "b"]) == hashlib.sha256(b"a\0b").hexdigest()  # plain lists keep the digest they had
    assert digest([Request("ab", "c")]) != digest([Request("a", "bc")])


@pytest.mark.parametrize("packing", ["texts", "joined"])
def test_calibration_rows_score_responses_and_read_prompts(packing):
    tok = tiny_tokenizer()
    calibration = make_calibration(tok, [*REQUESTS, *SPORT], 4, 128, seed=3, packing=packing)
    assert calibration.scored is not None and calibration.scored.shape == calibration.input_ids.shape
    scored_text = "".join(tok.decode(row[flags]) for row, flags in zip(calibration.input_ids, calibration.scored,
                                                                       strict=True))
    assert "Question" not in scored_text  # no prompt token is a target
    assert any(code[:10] in scored_text for code in CODE) and any(s[:10] in scored_text for s in SPORT)
    assert calibration.info["scored_tokens"] == int(calibration.scored[:, 1:].sum())
    plain = make_calibration(tok, list(SPORT), 2, 16, packing=packing)
    assert plain.scored is None and "scored_tokens" not in plain.info  # passages: every token, as before


def test_a_row_whose_prompt_fills_it_is_dropped():
    tok = tiny_tokenizer()
    long = [Request("x" * 40, "short answer"), Request("y" * 40, "another one")]
    with pytest.warns(UserWarning, match="fills only 1 of 2"):
        calibration = make_calibration(tok, [*long, COOKING[0] * 2], 2, 24, packing="texts", seed=0)
    assert tok.decode(calibration.input_ids[0]).startswith(COOKING[0][:20]) and calibration.scored is None
    with pytest.raises(IGPruneError, match="fewer than 2 tokens to score"):
        make_calibration(tok, long, 2, 24, packing="texts")


def test_a_scorer_scores_a_request_as_a_log_likelihood_task_scores_its_answer():
    model, tok = tiny_model("llama", layers=4), tiny_tokenizer()
    request = REQUESTS[0]
    ids, scored = tokens(tok, request)
    calibration = make_calibration(tok, [request], 1, len(ids) + 1, packing="texts")  # the whole request, EOS
    mask = find_order_mask(model, ["attn1", "ffn2"], "block")
    scorer = Scorer(model, calibration)
    [(total, count)] = scorer.row_nll(mask)
    with masked(model, mask):
        [(expected, n)] = token_nll(model, [ids], 1, context=[scored.index(True)])
    assert count == n == len(request.response) and total == pytest.approx(expected, rel=1e-4)
    assert scorer.perplexity(mask) == pytest.approx(math.exp(expected / n), rel=1e-4)
    # KL to dense weighs the same positions: a request's KL and its complement's add up to the whole row's
    row, flags = calibration.input_ids, calibration.scored
    kl = {name: Scorer(model, Calibration(row, scored=s)).kl(mask) for name, s in
          (("response", flags), ("rest", ~flags), ("all", torch.ones_like(flags)))}
    weight = float(torch.cat([flags[:, 1:], flags[:, -1:]], dim=1).sum())
    assert kl["response"] * weight + kl["rest"] * (row.shape[1] - weight) == pytest.approx(kl["all"] * row.shape[1])
    assert Scorer(model, calibration).kl(torch.ones_like(mask)) == pytest.approx(0.0, abs=1e-6)


def test_the_l0_trainer_learns_from_responses_only():
    tok = tiny_tokenizer()
    ids, attention, scored = tokenize(tok, [*REQUESTS, *SPORT], 128)
    assert torch.equal(scored.sum(1)[:6], torch.tensor([len(r.response) for r in REQUESTS]))
    assert torch.equal(scored[6:], attention[6:].bool())
    labels = torch.arange(len(ids)) % 2
    config = TrainConfig(sparsity=0.5, shared_steps=4, cluster_steps=4, batch_size=4, seq_len=128, seed=0)

    def fit(**kwargs):
        return MaskTrainer(tiny_model("llama", layers=4), 2, config, progress=False).fit(ids, attention, labels,
                                                                                          **kwargs)

    plain, same, requests = fit(), fit(scored=attention.bool()), fit(scored=scored)
    assert plain.identity == same.identity and plain.log.loss == same.log.loss  # all attended: as before
    assert requests.identity["samples"] != plain.identity["samples"]  # a plain checkpoint is not reused
    assert requests.log.loss != plain.log.loss


@pytest.mark.parametrize("finder", ["l0", "search"])
def test_igpruner_clusters_requests_by_their_prompts(finder, monkeypatch):
    model, tok = tiny_model("llama", layers=4), tiny_tokenizer()
    embedded = []

    def topics(self, xs):  # a topic indicator in place of the sentence encoder (no download)
        embedded.extend(xs)
        return torch.tensor([[float(any(t in x for t in topic)) for topic in TOPICS.values()] for x in xs])

    monkeypatch.setattr(IGPruner, "_embed", topics)
    texts = [*[f"{t} ({i})" for i, t in enumerate(CODE * 3)], *REQUESTS]
    config = {"finder": finder, "clusters": {"min_cluster_size": 1}, "choose": {"samples": 0}, "route": {"gate": None},
              "l0": {"shared_steps": 2, "cluster_steps": 2, "batch_size": 4, "seq_len": 128},
              "search": {"samples": 2, "seq_len": 128, "shared_samples": 2}}
    pruner = IGPruner(model, tok, config=config, n_clusters=2, sparsity=0.5, progress=False).fit(texts)
    assert [r.prompt for r in REQUESTS] == embedded[-6:]  # the router's view: prompts only
    labels = pruner.clustering_.labels.tolist()
    assert len(set(labels[-6:])) == 1 and labels[-1] not in labels[:9]  # cooking prompts, not the code answers


def test_read_texts_takes_passages_and_prompt_response_pairs(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "a passage"}, {"prompt": "Q: ", "response": "A"}]))
    assert read_texts(path) == ["a passage", Request("Q: ", "A")]
    path.write_text(json.dumps({"prompt": "Q: "}))
    with pytest.raises(IGPruneError, match="texts.jsonl:1: no non-empty string under 'prompt' and 'response'"):
        read_texts(path)


def chat_tokenizer():
    """The tiny tokenizer with a chat template and a BOS it adds, as many chat models' tokenizers have."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    return tok


def test_a_chat_is_read_as_served_routed_by_its_messages_and_scored_on_the_reply(tmp_path):
    from igprune.texts import chat_request, chat_route_text, routed

    tok = chat_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": COOKING[0]},
                {"role": "assistant", "content": CODE[0]}]
    request = chat_request(tok, messages)
    # the prompt igprune serve builds for these messages, tokenized as it tokenizes them (no second BOS)
    served = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert request.prompt == served and request.response == CODE[0] and request.templated
    ids, scored = tokens(tok, request)
    assert ids[:len(tok(served, add_special_tokens=False).input_ids)] == tok(served, add_special_tokens=False).input_ids
    assert ids.count(1) == 1 and sum(scored) == len(CODE[0])
    assert routed(request) == chat_route_text(messages[:-1]) == f"Be brief.\n{COOKING[0]}"  # as serve routes it
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    assert read_texts(path, tok) == [request]
    with pytest.raises(IGPruneError, match="a chat needs the model's tokenizer"):
        read_texts(path)
    with pytest.raises(IGPruneError, match="the model has no chat template"):
        read_texts(path, tiny_tokenizer())
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}))
    with pytest.raises(IGPruneError, match='texts.jsonl:1: "messages" must be two or more'):
        read_texts(path, tok)


def test_perplexity_scores_given_requests_on_their_replies_routed_by_their_prompts():
    import contextlib
    from types import SimpleNamespace

    from igprune.evaluation.perplexity import perplexity, score_texts

    model, tok = tiny_model("llama", layers=4), tiny_tokenizer()
    texts = [*REQUESTS[:3], *SPORT]
    scores, _ = score_texts(model, tok, texts, 128)
    for text, (total, count) in zip(texts, scores, strict=True):
        ids, flags = tokens(tok, text)
        [(expected, n)] = token_nll(model, [ids], 1, context=[max(1, flags.index(True))])
        assert count == n and total == pytest.approx(expected, rel=1e-4)
    assert [n for _, n in scores[:3]] == [len(r.response) for r in REQUESTS[:3]]
    results = perplexity(model, tok, texts=texts, source="own.jsonl", seq_len=128, progress=False)
    assert results["split"] == "given" and results["requests"] == 3 and results["data"] == "own.jsonl"
    assert results["tokens"] == sum(n for _, n in scores)
    with pytest.raises(IGPruneError, match="a request's prompt fills all 16 tokens"):
        score_texts(model, tok, texts, 16)

    seen = []  # what a routed model is shown: a request's prompt, a passage's scored text

    def route(xs):
        seen.extend(xs)
        return [SimpleNamespace(cluster=0) for _ in xs]

    routed_model = SimpleNamespace(route=route, use_cluster=lambda k: contextlib.nullcontext())
    assert score_texts(model, tok, texts, 128, pruned=routed_model)[0] == scores
    assert seen == [r.prompt for r in REQUESTS[:3]] + list(SPORT)
