"""Loss math against hand-computed values and the invariances the papers state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conkd.losses import (
    CrossEntropy,
    KDLoss,
    LogitStandardizedKD,
    Objective,
    SupConLoss,
    Term,
    kd_loss,
    ls_kd_loss,
    standardize,
    supcon_loss,
)


def test_standardize_zero_mean_unit_unbiased_std() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    s = standardize(z)
    assert s.mean().abs() < 1e-6
    # unbiased std of [1,2,3,6]: mean 3, squares 4+1+0+9=14, /3
    expected = (z - 3.0) / (1e-7 + math.sqrt(14 / 3))
    torch.testing.assert_close(s, expected)


def test_ls_kd_hand_computed() -> None:
    # Two classes: standardised logits are always (-1/sqrt(2), +1/sqrt(2)) times sign.
    s = torch.tensor([[0.0, 1.0]])  # std = sqrt(0.5) -> z = [-0.7071, 0.7071]
    t = torch.tensor([[3.0, 1.0]])  # -> z = [0.7071, -0.7071]
    T = 2.0
    a = 1 / math.sqrt(2) / T
    p_t = [math.exp(a) / (math.exp(a) + math.exp(-a)), math.exp(-a) / (math.exp(a) + math.exp(-a))]
    p_s = [p_t[1], p_t[0]]
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    assert ls_kd_loss(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-5)


def test_ls_kd_invariant_to_shift_and_scale_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    shift = torch.randn(6, 1, generator=g) * 5
    scale = torch.rand(6, 1, generator=g) * 4 + 0.1
    base = ls_kd_loss(s, t, 2.0)
    torch.testing.assert_close(ls_kd_loss(s * scale + shift, t, 2.0), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ls_kd_loss(s, t * scale - shift, 2.0), base, rtol=1e-5, atol=1e-6)
    # plain KD is not invariant: the test would catch a missing standardisation
    assert not torch.isclose(kd_loss(s * scale, t, 2.0), kd_loss(s, t, 2.0))


def test_ls_kd_equals_kd_on_standardised_logits() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = standardize(torch.randn(5, 7, generator=g)), standardize(torch.randn(5, 7, generator=g))
    torch.testing.assert_close(ls_kd_loss(s, t, 3.0), kd_loss(s, t, 3.0), rtol=1e-4, atol=1e-6)


def test_kd_matches_torch_kl_div_definition() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    T = 4.0
    ref = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    torch.testing.assert_close(kd_loss(s, t, T), ref)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_supcon_hand_computed() -> None:
    # Unit features: a and b identical (class 0), c orthogonal (class 1).
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    T = 0.5
    # anchor a: positive b (s=1), denominator over b (s=1) and c (s=0)
    la = -(1 / T - math.log(math.exp(1 / T) + math.exp(0)))
    # anchor b: symmetric; anchor c has no positive and is excluded
    expected = la  # mean over anchors a and b, T / T_base = 1
    assert supcon_loss(f, y, T, T).item() == pytest.approx(expected, rel=1e-6)
    # base temperature scales the loss by T / T_base
    assert supcon_loss(f, y, T, 1.0).item() == pytest.approx(expected * T, rel=1e-6)


def test_supcon_excludes_self_similarity() -> None:
    # One positive pair that is orthogonal: if self were counted as positive (s_ii = 1) the loss
    # would drop; with the anchor excluded it equals -(0/T - log(exp(0)+exp(x)))...
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    T = 0.1
    # each anchor: positive is the other (s=0), denominator only the other -> log_prob = 0
    assert supcon_loss(f, y, T, T).item() == pytest.approx(0.0, abs=1e-6)


def test_supcon_never_negative_and_no_nan_with_singletons() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        f = torch.randn(12, 8, generator=g)
        y = torch.randint(0, 6, (12,), generator=g)
        loss = supcon_loss(f, y)
        assert torch.isfinite(loss) and loss.item() >= 0
    # every label distinct: no positives anywhere -> 0, finite, differentiable
    f = torch.randn(5, 4, requires_grad=True)
    loss = supcon_loss(f, torch.arange(5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_supcon_permutation_invariant_and_multiview() -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(10, 16, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    perm = torch.randperm(10, generator=g)
    torch.testing.assert_close(supcon_loss(f[perm], y[perm]), supcon_loss(f, y))
    # two identical views of each sample equal the single-view loss computed on the stacked batch
    two = torch.stack([f, f], dim=1)
    torch.testing.assert_close(
        supcon_loss(two, y), supcon_loss(torch.cat([f, f]), torch.cat([y, y]))
    )


def test_modules_validate_hyperparameters() -> None:
    with pytest.raises(ValueError, match="temperature"):
        LogitStandardizedKD(temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=-0.1)
    with pytest.raises(ValueError, match="weight"):
        Term(CrossEntropy(), weight=-1)
    with pytest.raises(ValueError, match="input"):
        Term(CrossEntropy(), input="pixels")


def test_objective_is_weighted_sum_of_reported_terms() -> None:
    g = torch.Generator().manual_seed(5)
    student = {
        "logits": torch.randn(8, 4, generator=g),
        "projection": torch.randn(8, 16, generator=g),
    }
    teacher = {"logits": torch.randn(8, 4, generator=g)}
    y = torch.randint(0, 4, (8,), generator=g)
    obj = Objective(
        {
            "ce": Term(CrossEntropy(), 0.5, "logits"),
            "kd": Term(LogitStandardizedKD(2.0), 1.0, "logits"),
            "supcon": Term(SupConLoss(0.07), 0.15, "projection"),
        }
    )
    out = obj(student, teacher, y)
    assert set(out) == {"loss", "ce", "kd", "supcon"}
    expected = 0.5 * out["ce"] + 1.0 * out["kd"] + 0.15 * out["supcon"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["ce"], F.cross_entropy(student["logits"], y))
    torch.testing.assert_close(out["kd"], ls_kd_loss(student["logits"], teacher["logits"], 2.0))
    assert obj.needs_teacher and obj.inputs == {"logits", "projection"}
    assert not Objective({"ce": Term(CrossEntropy())}).needs_teacher
    assert isinstance(KDLoss(4.0)(student["logits"], teacher["logits"]), torch.Tensor)
