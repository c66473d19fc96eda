"""Every command once through the CLI, on a tiny random model saved as an HF folder (`--model /path`)."""

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from igprune.bundle import Bundle
from igprune.cli import app
from igprune.evaluation import results
from igprune.finders.search import candidate_blocks
from igprune.masks import mask_row
from igprune.routing import Router
from igprune.texts import Request, digest


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    tiny_model("llama", layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def config_file(path, **changes) -> str:
    """A fit config file (JSON) holding `changes`, nested as bundle.json's "fit"."""
    path.write_text(json.dumps(changes))
    return str(path)


TINY_L0 = {"data": {"samples": 40}, "l0": {"shared_steps": 2, "cluster_steps": 2, "batch_size": 4, "seq_len": 64}}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return " ".join(result.output.split())


def test_every_command_runs_on_a_tiny_model(tiny_folder, tmp_path, prepared_data, monkeypatch):
    monkeypatch.setattr(results, "cache_root", lambda: tmp_path / "cache")  # eval's result cache, not the user's
    model, bundle = tiny_folder, tmp_path / "bundle"
    out = invoke("fit", "--model", model, "--out", bundle, "--clusters", "2", "--recipe", "paper", "--config",
                 config_file(tmp_path / "l0.json", **TINY_L0))
    assert "2 clusters, sizes" in out  # a dynamic bundle, so routing runs below
    refit = tmp_path / "refit"  # a bundle's recorded config reproduces it
    invoke("fit", "--model", model, "--out", refit, "--config", bundle)
    assert torch.equal(Bundle.load(refit).masks, Bundle.load(bundle).masks)
    assert Bundle.load(refit).config["fit"] == Bundle.load(bundle).config["fit"]
    assert "cluster" in invoke("inspect", bundle)
    assert "distance" in invoke("route", "--bundle", bundle, "def f(x):", "Once upon a time")
    assert invoke("generate", "--bundle", bundle, "--model", model, "--prompt", "The sun", "--max-new-tokens", "3")
    assert invoke("generate", "--model", model, "--prompt", "The sun", "--max-new-tokens", "3")
    sleb = tmp_path / "sleb"
    invoke("baseline", "sleb", "--model", model, "--blocks", "2", "--samples", "2", "--seq-len", "16", "--out", sleb)
    assert "matches the masked model" in invoke("export", "--bundle", sleb, "--out", tmp_path / "plain")
    searched = tmp_path / "searched"  # SLEB per cluster, each cluster free to choose the static SLEB mask too
    sleb_blocks = candidate_blocks(Bundle.load(sleb).masks[0])
    invoke("fit", "--model", model, "--out", searched, "--clusters", "2", "--blocks", "2", "--config",
           config_file(tmp_path / "search.json", finder="search", data={"samples": 40}, choose={"samples": 2,
                       "margin": 1.5}, search={"seq_len": 16, "samples": 2, "candidates": [sleb_blocks]}))
    fitted = Bundle.load(searched)
    assert fitted.config["fit"]["choose"]["margin"] == 1.5 and fitted.logs["search"]["choose"]["margin"] == 1.5
    assert fitted.config["fit"]["search"]["candidates"] == [sleb_blocks]
    assert len(fitted.logs["search"]["choose"]["perplexity"][0]) == 4  # 2 cluster masks, the global one, SLEB's
    shortened = tmp_path / "shortened"
    invoke("baseline", "shortened-ppl", "--model", model, "--blocks", "2", "--samples", "2", "--seq-len", "16",
           "--out", shortened)
    chosen = tmp_path / "chosen"  # nothing searched: each cluster chooses between SLEB's mask and ShortenedLlama's
    fitted, statics = None, [Bundle.load(sleb).masks[0], Bundle.load(shortened).masks[0]]
    invoke("fit", "--model", model, "--out", chosen, "--clusters", "2", "--blocks", "2", "--config",
           config_file(tmp_path / "chosen.json", finder="search", data={"samples": 40}, route={"gate": 0.5},
                       choose={"samples": 2, "margin": "auto"},
                       search={"seq_len": 16, "shared_fraction": 1.0, "global_order": sleb_blocks,
                               "candidates": [candidate_blocks(statics[1])]}))
    fitted = Bundle.load(chosen)
    assert fitted.config["gate"] == {"quantile": 0.5} and fitted.radii.shape == (2,)  # inputs unlike a cluster's
    assert torch.equal(fitted.fallback[0], statics[0])  # texts run under the global mask, SLEB's here
    assert "fallback" in invoke("inspect", chosen) and "radius" in invoke("inspect", chosen)
    assert {mask_row(m) for m in fitted.masks} <= {mask_row(m) for m in statics}
    choice = fitted.logs["search"]["choose"]  # a cluster left the global mask only past its Bonferroni bar
    assert fitted.config["fit"]["choose"]["margin"] == "auto" and len(choice["margins"]) == 2
    assert all(c == choice["default"] or z > bar
               for c, z, bar in zip(choice["chosen"], choice["z_best_vs_default"], choice["margins"], strict=True))
    assert "bar" in invoke("inspect", chosen)  # inspect shows each cluster's choice
    assert fitted.logs["search"]["shared_calibration"] is None  # no shared search ran
    assert all(c["order"] == candidate_blocks(statics[0]) for c in fitted.logs["search"]["clusters"])
    requests = tmp_path / "requests.jsonl"  # the user's own inputs, clustered beside the calibration passages
    own = [f"SELECT name, total FROM orders WHERE customer_id = {i} ORDER BY total DESC;" for i in range(12)]
    answered = [Request(t, f"  -- returns {i} rows") for i, t in enumerate(own[:4])]  # prompt read, answer scored
    requests.write_text("".join(json.dumps({"text": t}) + "\n" for t in own[4:])
                        + "".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in answered))
    with pytest.warns(UserWarning, match="4 request.* no response token within their first 64"):  # SQL prompts
        out = invoke("fit", "--model", model, "--out", tmp_path / "requests", "--clusters", "2", "--recipe", "paper",
                     "--config", config_file(tmp_path / "l0.json", **TINY_L0), "--texts", requests)
    assert "and 12 of" in out and "requests.jsonl" in out
    fitted = Bundle.load(tmp_path / "requests")
    assert fitted.config["calibration"]["extra"] == 12 and sum(fitted.config["cluster_sizes"]) == 52
    assert fitted.config["calibration"]["extra_sha256"] == digest([*own[4:], *answered])
    assert fitted.config["calibration"]["extra_requests"] == 4
    routes = Router.from_bundle(fitted, always_embed=True).route(own)
    assert len({r.cluster for r in routes}) == 1  # alike requests share a cluster
    scores = tmp_path / "eval.json"
    invoke("eval", "--bundle", bundle, "--model", model, "--tasks", "arc_easy", "--limit", "2", "--out", scores)
    assert "|" in invoke("table", scores)
    reference = tmp_path / "dense.json"  # the same documents, dense: the bundle's gain over it, paired by document
    invoke("eval", "--model", model, "--tasks", "arc_easy", "--limit", "2", "--out", reference)
    compared = invoke("table", scores, reference, "--against", reference, "--by-cluster")
    gains = compared.split("Gain over dense.json, paired by document:")[1]
    assert gains.count("| IG-Pruning (N=2) | ") == 1 and " ± " in gains and "Dense" not in gains  # not itself
    assert "| Net documents by cluster |" in gains  # and where the gain comes from, cluster by cluster
    invoke("ppl", "--bundle", bundle, "--model", model, "--limit", "2", "--seq-len", "32", "--out",
           tmp_path / "ppl.json")
    heldout = tmp_path / "heldout.jsonl"  # the user's own held-out requests, each scored on its reply
    heldout.write_text(json.dumps({"prompt": "SELECT 1", "response": " -- one row"}) + "\n"
                       + json.dumps({"text": own[0]}) + "\n")
    out = invoke("ppl", "--bundle", tmp_path / "requests", "--texts", heldout, "--seq-len", "64", "--out",
                 tmp_path / "own.json")
    own_ppl = json.loads((tmp_path / "own.json").read_text())
    assert own_ppl["split"] == "given" and own_ppl["requests"] == 1 and own_ppl["passages"] == 2
    assert own_ppl["tokens"] == len(" -- one row") + min(len(own[0]), 64) - 1 and "heldout.jsonl" in out
    speed = tmp_path / "speed.json"
    # without --bundle: canonical masks and the stand-in router (this once crashed)
    invoke("bench-speed", "--model", model, "--blocks", "2", "--kv-policy", "drop", "--prompt-tokens", "8",
           "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", speed)
    report = json.loads(speed.read_text())
    assert [r["label"] for r in report["results"]][0] == "dense"
    invoke("bench-speed", "--model", model, "--bundle", bundle, "--kv-policy", "keep", "--prompt-tokens", "8",
           "--new-tokens", "2", "--repeats", "1", "--warmup", "0")
    for kind, source in (("heatmap", ["--bundle", bundle]), ("curve", ["--bundle", bundle]), ("speed", [speed]),
                         ("accuracy", [scores]), ("clusters", [scores])):
        png = tmp_path / f"{kind}.png"
        invoke("plot", kind, *source, "--out", png)
        assert png.stat().st_size > 0
