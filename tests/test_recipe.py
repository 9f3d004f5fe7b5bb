"""The teacher recipe's parts, each one switch: the weights' EMA, mixup / cutmix, no decay on
norms and biases, flat-then-cosine; hand-computed values, and whole tiny runs that keep their
guarantees (exact resume, the EMA is what is validated and kept)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.fault_resume import compare_runs
from conkd import checkpoint as ckpt_io
from conkd.averaging import ema_decay, weight_average
from conkd.builders import build_data, param_groups
from conkd.engine import evaluate
from conkd.errors import ConKDError
from conkd.losses import CrossEntropy, KDLoss, Objective, SupConLoss, Term, supcon_loss
from conkd.run import run
from conkd.schedule import cosine_with_warmup
from conkd.views import Mix, Mixer, MixParams, MixSpec, mix, partners
from tests.conftest import compose_train, tiny_overrides
from tests.test_resume import Crash, crash_after_step

# --- the weights' EMA --------------------------------------------------------------------------


def test_ema_decay_warms_up_then_holds() -> None:
    # (1 + n) / (10 + n): 0.1 at n = 0, 0.5 at n = 8, 0.91 at n = 90; capped at the decay
    assert [round(ema_decay(0.99, n), 6) for n in (0, 8, 90, 10_000)] == [0.1, 0.5, 0.91, 0.99]
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\)"):
        weight_average(nn.Linear(1, 1), 1.0)


def test_weight_average_follows_parameters_and_batchnorm_statistics() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    avg = weight_average(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    avg.update_parameters(net)  # the first update copies
    assert torch.equal(avg.module[0].weight, torch.ones(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(3.0)
        net[1].running_mean.fill_(4.0)
        net[1].num_batches_tracked.fill_(7)
    avg.update_parameters(net)  # n = 1: decay min(0.5, 2/11) = 2/11
    expected = 1.0 + (1 - 2 / 11) * 2.0
    torch.testing.assert_close(avg.module[0].weight, torch.full((2, 2), expected))
    torch.testing.assert_close(avg.module[1].running_mean, torch.full((2,), (1 - 2 / 11) * 4.0))
    assert avg.module[1].num_batches_tracked.item() == 7  # integer buffers are copied
    assert avg.n_averaged.item() == 2


def test_a_restored_average_continues_from_its_update_count() -> None:
    """The host mirrors the counter; a restore must re-read it (else the warm-up restarts)."""
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    a = weight_average(net, decay=0.99)
    for _ in range(90):
        a.update_parameters(net)
    b = weight_average(nn.Linear(1, 1, bias=False), decay=0.99)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        net.weight.fill_(1.0)
    a.update_parameters(net), b.update_parameters(net)  # n = 90: decay 0.91, not the first copy
    assert a.module.weight.item() == b.module.weight.item() == pytest.approx(0.09)


# --- mixing ------------------------------------------------------------------------------------


def test_mixing_is_a_pure_function_of_seed_epoch_and_batch() -> None:
    spec = MixSpec(mixup_alpha=0.4, cutmix_alpha=1.0)
    a = [spec.draw(0, e, b) for e in range(3) for b in range(20)]
    assert a == [spec.draw(0, e, b) for e in range(3) for b in range(20)]
    assert a != [spec.draw(1, e, b) for e in range(3) for b in range(20)]
    kinds = [p.kind for p in a]
    assert 15 < kinds.count("cutmix") < 45 and kinds.count("mixup") == 60 - kinds.count("cutmix")
    assert len({p.lam for p in a}) == 60  # every batch its own draw
    # prob: the share of batches mixed; off: never
    some = [MixSpec(mixup_alpha=0.4, prob=0.25).draw(0, 0, b).kind for b in range(400)]
    assert 70 < some.count("mixup") < 130
    assert MixSpec().draw(0, 0, 0) == MixParams() and not MixSpec().enabled


def test_mixup_blends_each_image_with_the_one_before_it() -> None:
    x = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    out, how = mix(x, MixParams("mixup", 0.75))
    # image k = 0.75 x_k + 0.25 x_{k-1}; the first pairs with the last
    assert out[:, 0, 0, 0].tolist() == [0.75 * 0 + 0.25 * 2, 0.75 * 1, 0.75 * 2 + 0.25 * 1]
    assert how == Mix(0.75, "mixup")
    assert partners(torch.tensor([5, 6, 7])).tolist() == [7, 5, 6]


def test_cutmix_pastes_the_partners_window_and_weighs_by_the_area_kept() -> None:
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    out, how = mix(x, MixParams("cutmix", 0.7, (0.0, 0.0, 0.5, 0.75)))
    # a 2 x 3 pixel window (of 16) from the partner: lam = 1 - 6/16
    assert how == Mix(1 - 6 / 16, "cutmix")
    assert out[0, 0, :3, :2].eq(1).all() and out[0].sum() == 6
    assert out[1, 0, :3, :2].eq(0).all() and out[1].sum() == 16 - 6
    assert torch.equal(x[0], torch.zeros(1, 4, 4))  # the input is left as it was


def test_mixer_draws_per_batch_position() -> None:
    mixer = Mixer(MixSpec(mixup_alpha=1.0), seed=3)
    x = torch.randn(4, 3, 8, 8)
    a, ma = mixer(x, 2, 5)
    b, mb = mixer(x, 2, 5)
    c, mc = mixer(x, 2, 6)
    assert torch.equal(a, b) and ma == mb and ma.lam != mc.lam and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mixup_alpha": -1.0}, r"dataset.mix.mixup_alpha must be >= 0"),
        ({"prob": 1.5}, r"dataset.mix.prob must be in \[0, 1\]"),
    ],
)
def test_bad_mixing_is_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ConKDError, match=match):
        MixSpec(**kwargs)


def test_unknown_mix_key_is_named(compose_cfg, image_folder: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([
        "stage=teacher", "loss=ce", "teacher_ckpt=null", "+dataset.mix.beta=1",
        *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns"),
    ])  # fmt: skip
    with pytest.raises(ConKDError, match=r"unknown dataset.mix keys \['beta'\]"):
        run(cfg)


def test_label_terms_mix_like_the_images_and_teacher_terms_do_not() -> None:
    """CE on a mixed batch equals cross-entropy against the mixed one-hot targets (label
    smoothing included); SupCon is the same mix of its two label sets; KD is untouched."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    how = Mix(0.7, "mixup")
    ce = Term(CrossEntropy(label_smoothing=0.1))
    onehot = F.one_hot(labels, 3).float()
    target = 0.7 * onehot + 0.3 * onehot.roll(1, 0)
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(ce({"logits": logits}, None, labels, how), expected)
    feats = torch.randn(4, 5)
    sc = Term(SupConLoss(0.5), input="embedding")
    a, b = (supcon_loss(feats, y, 0.5, 0.5) for y in (labels, labels.roll(1, 0)))
    mixed = 0.7 * a + 0.3 * b
    torch.testing.assert_close(sc({"embedding": feats}, None, labels, how), mixed)
    kd = Objective({"kd": Term(KDLoss(4.0))})
    s, t = {"logits": logits}, {"logits": teacher}
    assert torch.equal(kd(s, t, labels, how)["kd"], kd(s, t, labels)["kd"])


# --- optimizer groups and schedule -------------------------------------------------------------


def test_norms_and_biases_can_be_left_undecayed() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    (one,) = param_groups(net)
    assert len(one["params"]) == 6
    weights, flat = param_groups(net, decay_norms_and_biases=False)
    assert [p.shape for p in weights["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert len(flat["params"]) == 4 and flat["weight_decay"] == 0.0
    opt = torch.optim.SGD([weights, flat], lr=1.0, weight_decay=0.5)
    norm, conv = net[1].weight.detach().clone(), net[0].weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves anything
    assert torch.equal(net[1].weight, norm)
    torch.testing.assert_close(net[0].weight, conv * (1 - 1.0 * 0.5))


def test_flat_then_cosine_holds_the_peak_lr_then_decays() -> None:
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    sched = cosine_with_warmup(opt, 10, warmup_fraction=0.2, flat_fraction=0.6, min_lr_ratio=0.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    # 2 warmup steps (1/3, 2/3), flat at 1.0 until step 6, cosine over the last 4
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, *cos])


# --- whole runs --------------------------------------------------------------------------------


def recipe(image_folder: Path, out: Path, store: Path, *extra: str) -> list[str]:
    return [
        "experiment=teacher", "model=resnet18", "mlflow.register=null",
        *tiny_overrides(image_folder, out, store), "trainer.epochs=3",
        "trainer.checkpoint_every_steps=1", "trainer.ema_decay=0.9",
        "dataset.mix.mixup_alpha=0.4", "dataset.mix.cutmix_alpha=1.0",
        "trainer.decay_norms_and_biases=false", "scheduler=flat_cosine", *extra,
    ]  # fmt: skip


def test_recipe_run_resumes_bit_identical(
    compose_cfg, image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """EMA, mixing, undecayed norms and flat-cosine together: a run crashed mid-epoch and
    resumed ends bit-identical to an uninterrupted one, weight average included."""
    store = tmp_path / "mlruns"
    run(compose_cfg(recipe(image_folder, tmp_path / "reference", store)))
    out = tmp_path / "crashed"
    with monkeypatch.context() as m:
        crash_after_step(m, 5)
        with pytest.raises(Crash):
            run(compose_cfg(recipe(image_folder, out, store)))
    run(compose_cfg(recipe(image_folder, out, store)))
    assert compare_runs(tmp_path / "reference", out) == []
    last = ckpt_io.load_checkpoint(out / "checkpoints" / "last.pt")
    assert int(last["average"]["n_averaged"]) == last["train_state"]["step"] == 9


def test_the_average_is_validated_and_kept_in_best(
    compose_cfg, image_folder: Path, tmp_path: Path
) -> None:
    """With an EMA the best epoch's validation top-1 is the average's, and ``best.pt`` holds
    the average's weights (what students and the teacher cache then load), not the raw ones.
    One epoch: its average is both the best and the last."""
    out = tmp_path / "run"
    args = [*recipe(image_folder, out, tmp_path / "mlruns"), "mlflow.enabled=false",
            "trainer.ema_decay=0.5", "trainer.epochs=1"]  # fmt: skip
    run(compose_cfg(args))
    best = ckpt_io.load_checkpoint(out / "checkpoints" / "best.pt")
    last = ckpt_io.load_checkpoint(out / "checkpoints" / "last.pt")
    averaged = {k.removeprefix("module."): v for k, v in last["average"].items()}
    for key, value in best["state_dict"].items():
        assert torch.equal(value, averaged[key]), key
    raw = last["state_dict"]
    assert any(not torch.equal(best["state_dict"][k], raw[k]) for k in raw)
    net = ckpt_io.build_from_checkpoint(best)
    data = build_data(compose_train(args))
    metrics, _ = evaluate(net, data.loaders().eval("val"), torch.device("cpu"), data.num_classes)
    record = json.loads((out / "metrics.json").read_text())
    assert metrics["val/top1"] == record["best/val/top1"]
