"""Distillation losses and the composite objective.

Every loss is a small ``nn.Module`` with hyperparameters in ``__init__`` and tensors in ``forward``;
the math lives in a pure function next to it so it can be tested on hand-computed values.

All modules share one call signature, ``forward(student, teacher, labels)``, where ``student`` and
``teacher`` are the tensors a :class:`Term` picked from each network's outputs (class logits,
embedding or projection). Losses that do not need the teacher ignore it, which lets a composite
objective treat every term alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conkd import distributed
from conkd.views import Mix, partners

#: Network outputs a term may consume (see :class:`conkd.models.Network`).
OUTPUTS = ("logits", "embedding", "projection")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def standardize(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row: ``(z - mean) / (eps + std)``, std unbiased (Bessel), over the last dim."""
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, correction=1)
    return (z - mean) / (eps + std)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T^2 * mean_batch KL(softmax(t/T) || softmax(s/T))``, KL summed over classes."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)
    return kl.mean() * temperature**2


def ls_kd_loss(student: Tensor, teacher: Tensor, temperature: float, eps: float = 1e-7) -> Tensor:
    """Logit-standardized KD: :func:`kd_loss` on per-sample z-scored logits of both networks.

    Invariant to a per-sample shift and positive scale of either logit vector, so the student
    matches the teacher's *relations* between classes, not its logit range (Sun et al., 2024).
    """
    return kd_loss(
        standardize(student.float(), eps), standardize(teacher.float(), eps), temperature
    )


def supcon_loss(
    features: Tensor,
    labels: Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020), "L_out" form.

    ``features``: ``[B, D]`` or ``[B, V, D]`` (V views per sample), L2-normalised here.
    For anchor i the positives P(i) are all *other* samples/views with the same label (never i
    itself) and the denominator sums over every a != i:

        loss_i = -(T / T_base) * mean_{p in P(i)} [ s_ip / T - log sum_{a != i} exp(s_ia / T) ]

    Anchors without a positive are left out of the mean instead of dividing by zero (the
    reference implementation returns NaN there). With no positive pair in the whole batch the loss
    is an exact zero that still carries a graph, so ``backward`` works. The result is >= 0.
    """
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3:
        raise ValueError(f"features must be [B, D] or [B, V, D], got shape {tuple(features.shape)}")
    batch, views, _ = features.shape
    # View-major order: row v * B + b is view v of sample b, so labels simply repeat V times.
    labels = labels.reshape(-1).repeat(views)
    feats = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(batch * views, -1)

    sim = feats @ feats.T / temperature
    n = sim.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=sim.device)
    # Numerical stability: subtracting a per-row constant leaves log-softmax unchanged.
    sim = sim - sim.masked_fill(self_mask, float("-inf")).amax(dim=1, keepdim=True).detach()
    log_denominator = torch.logsumexp(
        sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True
    )
    log_prob = sim - log_denominator

    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    # anchors without a positive are left out of the mean (0 when no anchor has one); by masks,
    # not by boolean indexing or an ``if``, which would wait for the device on every step
    mean_log_prob_pos = (log_prob * positives).sum(dim=1) / n_pos.clamp(min=1)
    mean = (mean_log_prob_pos * has_pos).sum() / has_pos.sum().clamp(min=1)
    return -(temperature / base_temperature) * mean


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class CrossEntropy(nn.Module):
    """Cross-entropy on the student's class logits against the labels (teacher unused)."""

    needs_teacher = False
    uses_labels = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        _check_non_negative("label_smoothing", label_smoothing)
        self.label_smoothing = label_smoothing

    def forward(self, student: Tensor, teacher: Tensor | None, labels: Tensor) -> Tensor:
        return F.cross_entropy(student.float(), labels, label_smoothing=self.label_smoothing)


class TemperatureLoss(nn.Module):
    """A loss with a softmax temperature, which must be positive (KD, LSKD, SupCon)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        _check_positive("temperature", temperature)
        self.temperature = temperature


class KDLoss(TemperatureLoss):
    """Classic KD (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network")."""

    needs_teacher = True

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__(temperature)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor | None = None) -> Tensor:
        return kd_loss(student, teacher, self.temperature)


class LogitStandardizedKD(TemperatureLoss):
    """Logit-standardized KD (Sun et al., "Logit Standardization in Knowledge Distillation",
    CVPR 2024): KD on z-scored logits, so a small student need not match a large teacher's
    logit magnitude. ``T = 2`` is the paper's base temperature."""

    needs_teacher = True

    def __init__(self, temperature: float = 2.0, eps: float = 1e-7) -> None:
        super().__init__(temperature)
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor | None = None) -> Tensor:
        return ls_kd_loss(student, teacher, self.temperature, self.eps)


class SupConLoss(TemperatureLoss):
    """Supervised contrastive loss on the student's features (Khosla et al., "Supervised
    Contrastive Learning", NeurIPS 2020); see :func:`supcon_loss` for the exact form."""

    needs_teacher = False
    uses_labels = True

    def __init__(self, temperature: float = 0.07, base_temperature: float | None = None) -> None:
        super().__init__(temperature)
        base_temperature = temperature if base_temperature is None else base_temperature
        _check_positive("base_temperature", base_temperature)
        self.base_temperature = base_temperature

    def forward(self, student: Tensor, teacher: Tensor | None, labels: Tensor) -> Tensor:
        # Under torchrun, training contrasts the global batch (every rank's features, with
        # gradients back to each rank's own); evaluation (no grad) stays on the local batch.
        if torch.is_grad_enabled():
            student, labels = distributed.gather_with_grad(student), distributed.gather(labels)
        return supcon_loss(student, labels, self.temperature, self.base_temperature)


class Term(nn.Module):
    """One weighted term of an :class:`Objective`: which loss, its weight, which output it reads."""

    def __init__(self, loss: nn.Module, weight: float = 1.0, input: str = "logits") -> None:
        super().__init__()
        _check_non_negative("weight", weight)
        if input not in OUTPUTS:
            raise ValueError(f"term input must be one of {OUTPUTS}, got {input!r}")
        self.loss = loss
        self.weight = float(weight)
        self.input = input

    @property
    def needs_teacher(self) -> bool:
        return bool(getattr(self.loss, "needs_teacher", False))

    @property
    def uses_labels(self) -> bool:
        return bool(getattr(self.loss, "uses_labels", False))

    def forward(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        labels: Tensor,
        mix: Mix | None = None,
    ) -> Tensor:
        """The term's loss; on a mixed batch a loss of the labels is mixed as the images were:
        ``lam * L(labels) + (1 - lam) * L(partners' labels)`` (Zhang et al. 2018), which for
        cross-entropy equals CE against the mixed one-hot targets. A teacher term needs no
        such step: the teacher saw the same mixed images ("function matching", Beyer et al.
        2022)."""
        if student.get(self.input) is None:
            raise ValueError(
                f"loss term reads the student's {self.input!r}, which this model does not produce "
                "(set model.projection_dim to add a projection head)"
            )
        t = None
        if self.needs_teacher:
            if teacher is None or teacher.get(self.input) is None:
                raise ValueError(f"loss term needs the teacher's {self.input!r}")
            t = teacher[self.input]
        value = self.loss(student[self.input], t, labels)
        if mix is not None and self.uses_labels:
            other = self.loss(student[self.input], t, partners(labels))
            value = torch.lerp(other, value, mix.lam)
        return value


class Objective(nn.Module):
    """Weighted sum of named terms; returns ``{"loss": total, name: value, ...}``.

    The training loop backpropagates ``loss`` and logs the rest (timm's distillation task uses
    the same dict-of-terms shape). Terms with weight 0 are still computed and reported, so e.g.
    the CE of a pure-KD student stays visible.
    """

    def __init__(self, terms: Mapping[str, Term]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one term")
        if "loss" in terms:
            raise ValueError("'loss' is reserved for the total and cannot name a term")
        self.terms = nn.ModuleDict(dict(terms))

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values())

    @property
    def inputs(self) -> set[str]:
        return {t.input for t in self.terms.values()}

    @property
    def teacher_inputs(self) -> list[str]:
        """The teacher outputs the terms read (what a teacher cache must hold)."""
        return sorted({t.input for t in self.terms.values() if t.needs_teacher})

    def forward(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        labels: Tensor,
        mix: Mix | None = None,
    ) -> dict[str, Tensor]:
        """The weighted total and each term; ``mix``: the batch's mixing (see :class:`Term`)."""
        out: dict[str, Tensor] = {}
        total = None
        for name, term in self.terms.items():
            value = term(student, teacher, labels, mix)
            out[name] = value.detach()
            weighted = value * term.weight
            total = weighted if total is None else total + weighted
        return {"loss": total, **out}
