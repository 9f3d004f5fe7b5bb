"""The training loop's callbacks: every piece of work :func:`conkd.engine.fit` does around it.

A :class:`Callback` has four hooks, each doing nothing unless overridden, so the loop calls
every hook of every callback: :meth:`~Callback.on_resume` once when training continues from a
checkpoint, :meth:`~Callback.on_step_end` after each optimizer step,
:meth:`~Callback.on_epoch_end` after each epoch's validation (True stops training) and
:meth:`~Callback.on_fit_end` once training has ended, also by an error. The loop's callbacks, in
the order ``conkd.run`` gives them:

* :class:`HeartbeatCallback`: the owner's per-epoch sign of life, to the run and the trial;
* :class:`PruningCallback`: the sweep's pruner (a pruned trial stops);
* :class:`CheckpointCallback`: ``last.pt`` and ``best.pt`` (the writer is
  :class:`conkd.checkpoint.Checkpointer`);
* :class:`TrackingCallback`: each epoch's metrics to the tracker;
* :class:`SharedStop`: under torchrun, rank 0's decision to stop for every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from conkd import distributed
from conkd.checkpoint import Checkpointer
from conkd.owner import RUN_TAGS, TRIAL_ATTRS, Owner
from conkd.state import TrainState
from conkd.sweep import TrialReporter
from conkd.tracking.base import Tracker

#: A metric every epoch logs (:func:`conkd.engine.fit` prints it): its steps are the epochs a
#: run holds.
EPOCH_METRIC = "val/top1"


class Callback:
    """Work around the training loop; every hook does nothing unless a subclass overrides it."""

    def on_resume(self, state: TrainState) -> None:
        """Training continues from a checkpoint's ``state`` (catch up on what it holds)."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step."""

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None:
        """After each epoch's validation (``state.epoch`` is then the next epoch); True stops
        training (a pruned trial)."""
        return None

    def on_fit_end(self, state: TrainState, error: BaseException | None) -> None:
        """Training has ended: finished, stopped early, or by ``error`` (then re-raised)."""


@dataclass
class CheckpointCallback(Callback):
    """``last.pt`` after every epoch (and every ``every_steps`` optimizer steps), ``best.pt``
    (weights and metrics) on a new best; once training ends, the writes in flight are waited
    for (what follows reads ``best.pt``, and a killed or crashed run resumes from ``last.pt``)."""

    writer: Checkpointer
    every_steps: int | None = None

    def on_step_end(self, state: TrainState) -> None:
        if self.every_steps and state.step % self.every_steps == 0:  # the loop's sums are read
            self.writer.save_last(state)

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None:
        info = {"epoch": state.epoch - 1, "metrics": dict(metrics)}
        if is_best:
            self.writer.save_best(**info)
        self.writer.save_last(state, **info)
        return None

    def on_fit_end(self, state: TrainState, error: BaseException | None) -> None:
        self.writer.close(raise_errors=error is None)  # a failed write must not hide ``error``


@dataclass
class TrackingCallback(Callback):
    """Each epoch's metrics to the tracker at ``step=epoch``, once.

    A continued run may hold epochs its checkpoint does not: a kill after an epoch's metrics
    were logged but before its ``last.pt`` landed (written in the background, or lost with a
    corrupt ``last.pt``). Such an epoch is trained again; the metrics logged first stand and are
    not logged twice. On the CPU with a fixed seed resume is exact and they are the retrained
    ones (bar timings); a GPU's kernels are not bit-exact, so there they may differ in the last
    digits from the retrained epoch's, which the state's history and best hold.
    """

    tracker: Tracker
    logged: set[int] = field(default_factory=set)  # the epochs a continued run already holds

    def on_resume(self, state: TrainState) -> None:
        """Log the finished epochs of a resumed state the run does not have yet (all of them in
        a new run; in a continued run, those whose logging a kill cut off)."""
        self.logged = self.tracker.logged_steps(EPOCH_METRIC)
        for epoch, metrics in enumerate(state.history):
            if epoch not in self.logged:
                self.tracker.log_metrics(metrics, step=epoch)

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None:
        if state.epoch - 1 not in self.logged:
            self.tracker.log_metrics(metrics, step=state.epoch - 1)
        return None


@dataclass
class PruningCallback(Callback):
    """The sweep's pruner: each epoch's objective to the job's Optuna trial; a trial the
    pruner stops ends training."""

    reporter: TrialReporter

    def on_resume(self, state: TrainState) -> None:
        """A trial continuing an interrupted one reports the epochs it inherited, so the pruner
        sees the whole curve; a trial the pruner had stopped stays stopped."""
        if self.reporter.report_history(state.history):
            state.stopped_early = True

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None:
        return self.reporter.report(metrics[self.reporter.monitor], state.epoch - 1)


@dataclass
class HeartbeatCallback(Callback):
    """The per-epoch heartbeat of the job's :class:`~conkd.owner.Owner` record, to the run and
    (in a sweep) the trial: maintenance and other workers tell a live job from a dead one by
    it where its pid says nothing (another host)."""

    tracker: Tracker
    reporter: TrialReporter | None = None

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None:
        beat = Owner.here()
        self.tracker.set_tags(beat.marks(RUN_TAGS, "heartbeat"))
        if self.reporter is not None:
            self.reporter.mark(beat.marks(TRIAL_ATTRS, "heartbeat"))
        return None


class SharedStop(Callback):
    """Last, on every rank under torchrun: rank 0's decision to stop (a pruned trial) for all
    ranks."""

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None:
        return bool(distributed.broadcast(state.stopped_early))
