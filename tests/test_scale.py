"""Scale-out: data-parallel fits and searches on 2 gloo processes equal one process; device and dtype resolution;
gradient checkpointing; gates on the layer's device."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from ranks import on_ranks
from test_stage1 import samples, small_config
from tiny_models import TOPICS, tiny_model, tiny_tokenizer

from igprune import distributed
from igprune.choosing import choose_masks
from igprune.finders import find_mask
from igprune.finders.l0 import MaskTrainer
from igprune.finders.search import SearchConfig, search_cluster_masks

# the 1-process and 2-process fits differ only in how the per-sample gradients are summed (two shards, then
# the ranks), so log_alpha agrees to float32 rounding; the masks agree exactly
ATOL = 1e-5
CONFIG = small_config(shared_steps=6, cluster_steps=6, batch_size=5, cluster_batch=3)
TEXTS = [t for texts in TOPICS.values() for t in texts]


def fit(config=CONFIG, checkpoint_dir: Path | None = None) -> dict:
    ids, mask, labels = samples()
    trainer = MaskTrainer(tiny_model("llama", layers=4), 3, config, checkpoint_dir=checkpoint_dir, progress=False)
    trainer.fit(ids, mask, labels)
    written = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir and checkpoint_dir.exists() else []
    return {"log_alpha": trainer.gates.log_alpha.detach().clone(), "masks": trainer.masks(),
            "loss": trainer.log.loss, "rank": distributed.rank(), "world": distributed.world_size(),
            "written": written}


def fit_writing(folder: str) -> dict:
    return fit(checkpoint_dir=Path(folder) / f"written-by-{distributed.rank()}")


def test_two_process_fit_equals_one_process_fit_of_the_same_global_batch():
    one = fit()
    ranks = on_ranks(fit)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    for r in ranks:  # every rank ends with the same state, the single-process one
        assert torch.equal(r["masks"], one["masks"])
        torch.testing.assert_close(r["log_alpha"], one["log_alpha"], atol=ATOL, rtol=0)
        assert r["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert not torch.equal(one["log_alpha"][0], one["log_alpha"][1])  # the clusters did specialise


def test_only_rank_zero_writes_checkpoints(tmp_path):
    ranks = on_ranks(functools.partial(fit_writing, str(tmp_path)))
    assert ranks[0]["written"] == ["state.safetensors", "trainer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["written-by-0"]  # rank 1 wrote nothing


def test_helpers_are_no_ops_in_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.map_sharded(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert distributed.on_main(lambda: 7) == 7
    assert distributed.init_from_env() is False  # WORLD_SIZE unset: no process group


def shard_and_gather() -> dict:
    return {"shard": distributed.shard(list(range(5))), "map": distributed.map_sharded(lambda x: 10 * x, range(5)),
            "main": distributed.on_main(lambda: distributed.rank() + 100)}


def test_sharded_map_gives_every_rank_all_results_in_order():
    ranks = on_ranks(shard_and_gather)
    assert [r["shard"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert all(r["map"] == [0, 10, 20, 30, 40] and r["main"] == 100 for r in ranks)


def search(method: str) -> dict:
    options = {"evopress": {"generations": 2, "offspring": 3, "population": 4, "stages": [[2, 2]]}}.get(method, {})
    bundle = find_mask(method, tiny_model("llama", layers=6), tiny_tokenizer(), TEXTS, 0.25, "block", progress=False,
                       samples=4, seq_len=24, **options)
    return {"masks": bundle.masks, "log": bundle.logs["search"]}


@pytest.mark.parametrize("method", ["sleb", "evopress"])
def test_two_process_search_equals_one_process_search(method):
    one = search(method)
    for r in on_ranks(functools.partial(search, method)):
        assert torch.equal(r["masks"], one["masks"])
        assert r["log"]["order"] == one["log"]["order"]
        assert r["log"].get("steps") == one["log"].get("steps")  # sleb: every step's perplexities, exactly
        assert r["log"]["masks_scored"] < one["log"]["masks_scored"]  # each rank scored only its share


def cluster_search() -> dict:
    groups = [[f"{t} ({i})" for i, t in enumerate(texts * 4)] for texts in TOPICS.values()]
    model, tokenizer = tiny_model("llama", layers=4), tiny_tokenizer()
    found = search_cluster_masks(model, tokenizer, groups, 0.5, config=SearchConfig(samples=2, seq_len=16,
                                 shared_samples=3), progress=False)
    masks, choice = choose_masks(model, tokenizer, groups, torch.cat([found.masks, found.global_mask[None]]), 2, 16,
                                 exclude=found.scored, packing="texts", default=3, margin=0.0)
    return {"masks": masks, "log": {**found.log, "choose": choice}}


def test_two_process_cluster_search_and_choice_equal_one_process():
    one = cluster_search()
    for r in on_ranks(cluster_search):  # the searches and the choice each split their masks over the ranks
        assert torch.equal(r["masks"], one["masks"])
        assert r["log"]["choose"] == one["log"]["choose"]  # every candidate's perplexity, exactly
        assert [c["order"] for c in r["log"]["clusters"]] == [c["order"] for c in one["log"]["clusters"]]


def gradients(checkpointing: bool) -> torch.Tensor:
    ids, mask, labels = samples(n=6)
    config = dataclasses.replace(CONFIG, gradient_checkpointing=checkpointing, shared_steps=0, cluster_steps=1)
    trainer = MaskTrainer(tiny_model("qwen2", layers=3), 3, config, progress=False).fit(ids, mask, labels)
    return trainer.gates.log_alpha.grad.clone()  # the one step's gradient (Adam leaves .grad as it is)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    plain = gradients(False)
    assert not calls
    checkpointed = gradients(True)
    assert len(calls) == 3 * 2  # per decoder layer and forward: 9 samples in forwards of at most 5
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_auto_device_and_dtype_pick_this_ranks_gpu_and_bf16_when_cuda_is_present(monkeypatch):
    from igprune.models import resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 1)  # rank 3 of a machine with 2 GPUs
    assert resolve_dtype(None) == resolve_dtype("auto", "shard") == torch.bfloat16
    assert resolve_dtype("float16", "auto") == torch.float16  # an explicit dtype is kept


def test_gated_forward_runs_on_another_device_with_gates_left_on_the_cpu():
    """Nothing in the gated path assumes the CPU: on the meta device the gates (made on the CPU) follow the
    layer's output, and the trainer's device is the model's input device."""
    from igprune.blocks import control_of, decoder_layers
    from igprune.models import model_device

    model = tiny_model("llama", layers=2).to("meta")
    control = control_of(model)
    gates = torch.rand(3, control.n_blocks)
    x = torch.zeros(3, 5, 32, device="meta")
    rope = model.model.rotary_emb(x, torch.arange(5, device="meta").unsqueeze(0))
    with control.gated(gates):  # one decoder layer: the model's own forward builds masks with .item()
        out = decoder_layers(model)[1](x, attention_mask=None, position_embeddings=rope)
    assert out.device.type == "meta" and out.shape == (3, 5, 32)
    assert model_device(model).type == "meta"


def harness_share() -> dict:
    """What lm-eval's evaluator does with a model whose world_size is 2: a strided share of the requests per rank,
    the results gathered on rank 0."""
    from test_evaluation import requests

    from igprune.evaluation.harness import IGPruneLM

    lm = IGPruneLM(tiny_model(), tiny_tokenizer(), batch_size=2)
    mine = lm.loglikelihood(requests()[lm.rank::lm.world_size])
    lengths = lm.all_gather(torch.tensor([len(mine)]))
    lm.barrier()
    return {"rank": lm.rank, "world": lm.world_size, "lengths": lengths.tolist(), "gathered": lm.gather_object(mine)}


def test_harness_model_takes_part_in_lm_evals_data_parallelism():
    from test_evaluation import requests

    from igprune.evaluation.harness import IGPruneLM

    one = IGPruneLM(tiny_model(), tiny_tokenizer(), batch_size=2).loglikelihood(requests())
    ranks = on_ranks(harness_share)
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    n = len(one)
    assert ranks[0]["lengths"] == ranks[1]["lengths"] == [(n + 1) // 2, n // 2]
    shares = ranks[0]["gathered"]
    merged = [shares[i % 2][i // 2] for i in range(n)]
    assert [g for _, g in merged] == [g for _, g in one]
    assert [v for v, _ in merged] == pytest.approx([v for v, _ in one], abs=1e-5)


def one_and_two_processes(*args: str) -> list[str]:
    """`igprune ARGS --out two` under torchrun with 2 processes, then `igprune ARGS --out one`; their stdout."""
    import os
    import subprocess
    import sys

    from ranks import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    outputs = []
    for launch, out in ((torchrun, args[-1] + "/two"), ([sys.executable], args[-1] + "/one")):
        done = subprocess.run([*launch, "-m", "igprune", *args[:-1], "--out", out], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    return outputs


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scale") / "tiny"
    tiny_model("llama", layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_fit_and_eval_under_torchrun_give_the_one_process_results(tiny_folder, tmp_path, prepared_data):
    import json

    from igprune.bundle import Bundle

    (tmp_path / "fit").mkdir()
    config = tmp_path / "fit.json"
    config.write_text(json.dumps({"recipe": "paper", "data": {"samples": 40},
                                  "l0": {"shared_steps": 3, "cluster_steps": 3, "batch_size": 4, "seq_len": 64}}))
    outputs = one_and_two_processes("fit", "--model", str(tiny_folder), "--clusters", "2", "--config", str(config),
                                    str(tmp_path / "fit"))
    assert outputs[0].count("wrote") == 1  # only rank 0 prints (and writes)
    one, two = Bundle.load(tmp_path / "fit/one"), Bundle.load(tmp_path / "fit/two")
    assert torch.equal(one.masks, two.masks)
    torch.testing.assert_close(two.log_alpha, one.log_alpha, atol=ATOL, rtol=0)
    assert not (tmp_path / "fit/two.checkpoint").exists()  # rank 0 removed it once the bundle was written
    # lm-eval's data parallelism: each rank scores a share of the documents; rank 0 writes the same result
    (tmp_path / "eval").mkdir()
    one_and_two_processes("eval", "--model", str(tiny_folder), "--bundle", str(tmp_path / "fit/one"), "--tasks",
                          "arc_easy,piqa", "--limit", "6", "--no-cache", str(tmp_path / "eval"))
    one, two = (json.loads((tmp_path / "eval" / name).read_text()) for name in ("one", "two"))
    assert two["tasks"].keys() == one["tasks"].keys() and two["routing"] == one["routing"]
    for task, entry in one["tasks"].items():
        assert (two["tasks"][task]["value"], two["tasks"][task]["n"]) == (entry["value"], entry["n"])


def test_gpu_benchmark_stops_at_once_with_one_line_without_cuda():
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in done.stderr


def test_gpu_benchmark_kit_carries_configs_tokenizers_and_calibration_text_but_no_weights(tmp_path):
    """--make-kit is what travels to a GPU machine the weights cannot reach: it must stay small (no weights)
    and hold all that --random-weights builds from."""
    import subprocess
    import sys

    from transformers import AutoConfig

    from igprune.data import FILE_SOURCES, calibration_path

    tiny_model("qwen2", layers=2).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "tiny"), "--make-kit",
                           str(tmp_path / "kit")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kit = tmp_path / "kit"
    assert not [p for p in kit.rglob("*") if p.suffix in (".safetensors", ".bin", ".gguf")]
    assert AutoConfig.from_pretrained(kit / "model").num_hidden_layers == 2
    assert (kit / "model" / "tokenizer_config.json").is_file() and (kit / "encoder" / "modules.json").is_file()
    assert AutoConfig.from_pretrained(kit / "encoder").model_type == "bert"
    shipped = sorted(p.name for p in (kit / "home" / "data" / "calibration").iterdir())
    assert shipped == sorted(calibration_path(s).name for s in FILE_SOURCES if calibration_path(s).is_file())
    assert shipped  # the data is prepared wherever the tests run


def test_masked_forward_of_a_model_dispatched_with_a_device_map_runs_accelerates_hooks(tmp_path):
    """Under a device_map accelerate wraps each layer's forward with a hook that moves the inputs to the layer's
    device (and loads offloaded weights); the gated forward replaces that wrapper, so it must run the hook itself.
    With one CPU the map spreads the layers over cpu and disk; on GPUs the same hook moves them between devices."""
    from transformers import AutoModelForCausalLM

    from igprune.blocks import control_of, decoder_layers

    tiny_model("llama", layers=4).save_pretrained(tmp_path / "tiny")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", attn_implementation="eager").eval()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}}
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", attn_implementation="eager",
                                                   device_map=device_map, offload_folder=tmp_path / "offload").eval()
    calls = []
    for layer in decoder_layers(sharded):
        hook = layer._hf_hook
        hook.pre_forward = functools.partial(lambda f, *a, **k: calls.append(1) or f(*a, **k), hook.pre_forward)
    assert decoder_layers(sharded)[1].mlp.down_proj.weight.device.type == "meta"  # offloaded until it runs
    ids, mask = torch.randint(3, 97, (2, 7)), torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    with torch.no_grad(), control_of(dense).masked(mask):
        expected = dense(ids).logits
    calls.clear()
    with torch.no_grad(), control_of(sharded).masked(mask):
        logits = sharded(ids).logits
    assert len(calls) == 4  # every layer's hook ran, under the gated forward
    torch.testing.assert_close(logits, expected)


def test_progress_bars_are_drawn_on_rank_0_only(monkeypatch, capsys):
    model, tokenizer = tiny_model("llama", layers=2), tiny_tokenizer()
    texts = [t for ts in TOPICS.values() for t in ts]

    def search_output() -> str:
        find_mask("sleb", model, tokenizer, texts, 0.25, "block", progress=True, samples=2, seq_len=16)
        return capsys.readouterr().err

    assert "sleb" in search_output()
    monkeypatch.setattr(distributed, "rank", lambda: 1)  # as another rank of the same run
    assert not distributed.shows_progress(True)
    assert "sleb" not in search_output()
