"""Stage 1: hard-concrete gates, the Lagrangian, and the batched multi-cluster mask trainer."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_model

from igprune.blocks import final_hidden, masked
from igprune.files import IGPruneError
from igprune.finders.gates import HardConcreteGates
from igprune.finders.l0 import MaskTrainer, TrainConfig


def test_hard_concrete_samples_lie_in_unit_interval_with_expected_share_of_exact_zeros():
    gates = HardConcreteGates(3, 1000)
    with torch.no_grad():
        gates.log_alpha[0].fill_(gates.log_alpha_for(0.3))
        gates.log_alpha[1].fill_(-4.0)
        gates.log_alpha[2].fill_(4.0)
    z = torch.cat([gates.sample(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(i)) for i in range(20)])
    assert z.min() >= 0 and z.max() <= 1
    zero_share = (z == 0).float().view(20, 3, 1000).mean(dim=(0, 2))
    assert torch.allclose(zero_share, gates.prob_zero().mean(1), atol=0.01)
    assert abs(zero_share[0].item() - 0.3) < 0.01
    # exact ones happen too (the stretch beyond 1), more often when log_alpha is high
    one_share = (z == 1).float().view(20, 3, 1000).mean(dim=(0, 2))
    assert one_share[2] > 0.5 > one_share[1]


def test_binarize_switches_off_exactly_k_lowest_log_alpha_blocks():
    gates = HardConcreteGates(2, 10)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([[5, 1, 3, -2, 0, 4, 2, 6, -1, 7.0], [0.0] * 10]))
    masks = gates.binarize(3)
    assert (~masks).sum(1).tolist() == [3, 3]
    assert (~masks[0]).nonzero().flatten().tolist() == [3, 4, 8]
    assert (~masks[1]).nonzero().flatten().tolist() == [0, 1, 2]  # ties broken by block index


def samples(n=24, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, length), generator=g)
    return ids, torch.ones_like(ids), torch.arange(n) % 3


def small_config(**overrides):
    base = TrainConfig(sparsity=0.5, shared_steps=15, cluster_steps=25, batch_size=6, seq_len=12,
                       loss_positions=6, warmup_fraction=0.3, seed=3)
    return dataclasses.replace(base, **overrides)


def test_lagrangian_drives_expected_sparsity_to_target_for_every_cluster():
    model = tiny_model("llama", layers=4)
    ids, mask, labels = samples()
    config = small_config(shared_steps=100, cluster_steps=200, warmup_fraction=0.5)
    trainer = MaskTrainer(model, 3, config, progress=False).fit(ids, mask, labels)
    expected = trainer.gates.expected_sparsity()
    assert torch.all((expected - 0.5).abs() < 0.05), expected
    assert trainer.lagrangian.lambda2.min() > 0  # ascent moved the multipliers
    assert all(p.grad is None for p in model.parameters())
    masks = trainer.masks()
    assert masks.shape == (3, 8) and (~masks).sum(1).tolist() == [4, 4, 4]


def test_cluster_updates_take_cluster_batch_samples_of_every_cluster_in_forwards_of_batch_size():
    model = tiny_model()
    ids, mask, labels = samples()
    trainer = MaskTrainer(model, 3, small_config(shared_steps=0, cluster_steps=2, cluster_batch=3, batch_size=4),
                          progress=False)
    rows = trainer._batch_rows(labels, shared=False)
    assert torch.bincount(labels[rows], minlength=3).tolist() == [3, 3, 3]
    forwards = []
    model.model.register_forward_pre_hook(lambda _, args, kwargs: forwards.append(len(kwargs["input_ids"])),
                                          with_kwargs=True)
    trainer.fit(ids, mask, labels)
    assert forwards == [4, 4, 1, 4, 4, 1]  # two updates, each 9 samples accumulated over three forwards
    assert len(trainer.log.loss) == 2


def test_layer_granularity_switches_whole_layers():
    ids, mask, labels = samples()
    trainer = MaskTrainer(tiny_model("llama", layers=4), 3, small_config(granularity="layer"), progress=False)
    masks = trainer.fit(ids, mask, labels).masks()
    assert trainer.gates.log_alpha.shape == (3, 4)
    assert (~masks).sum(1).tolist() == [4, 4, 4]  # 2 layers of 4 = 4 blocks of 8
    assert torch.equal(masks[:, 0::2], masks[:, 1::2])


def test_same_seed_same_masks_and_resume_equals_uninterrupted(tmp_path):
    ids, mask, labels = samples()
    full = MaskTrainer(tiny_model("qwen2"), 3, small_config(), progress=False).fit(ids, mask, labels)
    again = MaskTrainer(tiny_model("qwen2"), 3, small_config(), progress=False).fit(ids, mask, labels)
    assert torch.equal(full.gates.log_alpha, again.gates.log_alpha)

    for stop in (7, 22):  # interrupt once in each phase
        ckpt = tmp_path / f"ckpt{stop}"
        MaskTrainer(tiny_model("qwen2"), 3, small_config(), checkpoint_dir=ckpt, progress=False).fit(
            ids, mask, labels, until=stop)
        resumed = MaskTrainer(tiny_model("qwen2"), 3, small_config(), checkpoint_dir=ckpt, progress=False)
        resumed.fit(ids, mask, labels)
        assert torch.allclose(resumed.gates.log_alpha, full.gates.log_alpha, atol=1e-6)
        assert resumed.log.loss == pytest.approx(full.log.loss, abs=1e-5)


def test_resume_refuses_other_settings_samples_or_clusters(tmp_path):
    ids, mask, labels = samples()
    trainer = MaskTrainer(tiny_model(), 3, small_config(), checkpoint_dir=tmp_path, progress=False)
    trainer.fit(ids, mask, labels, until=20)  # in the cluster phase
    others = [(small_config(sparsity=0.25), ids, labels), (small_config(), samples(seed=1)[0], labels),
              (small_config(), ids, labels.roll(1))]
    for config, other_ids, other_labels in others:
        with pytest.raises(IGPruneError, match="another model, other samples, clusters or settings"):
            MaskTrainer(tiny_model(), 3, config, checkpoint_dir=tmp_path, progress=False).fit(
                other_ids, mask, other_labels)


def test_saved_shared_phase_starts_a_fit_with_any_number_of_clusters(tmp_path):
    """The shared phase does not depend on the clusters: reusing it gives what training from scratch gives."""
    ids, mask, _ = samples()
    config, shared = small_config(), tmp_path / "shared"
    first = MaskTrainer(tiny_model("qwen2"), 2, config, shared_dir=shared, progress=False).fit(ids, mask,
                                                                                               torch.arange(24) % 2)
    labels, config = torch.arange(24) % 4, dataclasses.replace(config, cluster_steps=10, cluster_batch=2)
    scratch = MaskTrainer(tiny_model("qwen2"), 4, config, progress=False).fit(ids, mask, labels)
    reused = MaskTrainer(tiny_model("qwen2"), 4, config, shared_dir=shared, progress=False).fit(ids, mask, labels)
    n = config.shared_steps
    assert reused.log.seconds[:n] == first.log.seconds[:n]  # taken over, not trained again
    assert first.log.loss[:n] == scratch.log.loss[:n]  # bit for bit, whatever the number of clusters
    assert reused.log.loss == scratch.log.loss
    assert torch.equal(reused.gates.log_alpha, scratch.gates.log_alpha)
    with pytest.raises(IGPruneError, match="other samples"):
        MaskTrainer(tiny_model("qwen2"), 4, config, shared_dir=shared, progress=False).fit(
            samples(seed=1)[0], mask, labels)


def test_kl_loss_is_the_masked_models_divergence_from_the_dense_one():
    model = tiny_model()
    ids, mask, _ = samples(n=4)
    trainer = MaskTrainer(model, 1, small_config(loss="kl"), progress=False)
    positions = torch.arange(ids.shape[1] - 1).expand(len(ids), -1)
    skip = torch.ones(8, dtype=torch.bool)
    skip[[1, 4]] = False
    with torch.no_grad():
        dense_logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        with masked(model, skip):
            masked_logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            hidden = final_hidden(model, ids, mask)
        expected = (dense_logp.exp() * (dense_logp - masked_logp)).sum(-1).mean(1)  # mean over positions per sample
        got = trainer._loss(hidden, ids, mask, mask.bool(), positions)
        assert torch.allclose(got, expected, atol=1e-5) and expected.min() > 0.01  # a real divergence, computed right
        assert trainer._loss(final_hidden(model, ids, mask), ids, mask, mask.bool(), positions).abs().max() < 1e-5
    trainer = MaskTrainer(model, 3, small_config(loss="kl", cluster_steps=5), progress=False)
    trainer.fit(*samples())
    assert trainer.log.loss and all(v >= 0 for v in trainer.log.loss)  # the trainer runs on it


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 0.99])
def test_sparsity_out_of_range_is_a_clear_error(sparsity):
    with pytest.raises(IGPruneError, match="sparsity"):
        MaskTrainer(tiny_model(), 1, small_config(sparsity=sparsity), progress=False)
