"""A small extension of hydra-optuna-sweeper 1.3 (select with ``hydra/sweeper=conkd_optuna``).

The released sweeper runs each job blind: the job never sees its Optuna trial, so it cannot
report intermediate values or be pruned. This subclass changes only what that needs:

* each job gets its trial number as the override ``optuna.trial=N``; storage, study name and
  pruner it reads from its own ``hydra.sweeper`` config (see :mod:`conkd.sweep`);
* a job stopped by the pruner returns normally and marks its trial; the storage then records
  the sweeper's COMPLETE as PRUNED (so a prune never counts as a failure);
* re-running a sweep with the same storage and study name runs only the trials still missing
  from ``n_trials``; a trial cut off by the interruption is marked FAIL and re-queued;
* ``max_failure_rate`` is the share of the requested trials that may fail before the sweep
  stops (the released sweeper applies it to each batch, so with ``n_jobs: 1`` one failure
  aborts any sweep).
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import MISSING
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from conkd.sweep import PRUNED_ATTR, TRIAL_KEY

log = logging.getLogger(__name__)
INTERRUPTED_ATTR = "conkd:interrupted"


class PruneAwareStorage(RDBStorage):
    """RDB storage that records a trial its job marked as pruned as PRUNED, not COMPLETE.

    Optuna wraps RDB storages in a cache that finishes trials through ``_update_trial``, and
    uncached callers use ``set_trial_state``: both paths are covered. The mark is read from the
    database, where the job (another process) wrote it.
    """

    def _pruned(self, trial_id: int, state: Any) -> Any:
        if state == TrialState.COMPLETE and self.get_trial_system_attrs(trial_id).get(PRUNED_ATTR):
            return TrialState.PRUNED
        return state

    def set_trial_state(self, trial_id: int, state: TrialState) -> bool:
        return super().set_trial_state(trial_id, self._pruned(trial_id, state))

    def _update_trial(self, trial_id: int, state: Any = None, **kwargs: Any) -> bool:
        return super()._update_trial(trial_id, state=self._pruned(trial_id, state), **kwargs)


class _BudgetLauncher:
    """Wraps the launcher to count failures over the whole sweep, not per batch."""

    def __init__(self, launcher: Any, sweeper: "ConKDOptunaSweeperImpl") -> None:
        self.launcher = launcher
        self.sweeper = sweeper

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        s = self.sweeper
        s.failures += sum(r.status == JobStatus.FAILED for r in returns)
        # The released loop aborts a batch whose failure share exceeds max_failure_rate: keep
        # that at 1.0 (never) until the sweep-wide budget is spent, then let it fire.
        s.max_failure_rate = 0.0 if s.failures > s.failure_budget else 1.0
        if s.max_failure_rate == 0.0:
            log.error(
                "%d trials failed, more than max_failure_rate=%s of %d: stopping",
                s.failures,
                s.requested_rate,
                s.requested,
            )
        return returns


class ConKDOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, pruner: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pruner = pruner  # instantiated by the jobs from their hydra.sweeper config
        self.requested = self.n_trials
        self.requested_rate = self.max_failure_rate
        self.failure_budget = self.max_failure_rate * self.n_trials
        self.failures = 0

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        self.launcher = _BudgetLauncher(self.launcher, self)

    def _configure_trials(self, trials: Any, *args: Any) -> Any:
        overrides = super()._configure_trials(trials, *args)
        return [(*o, f"{TRIAL_KEY}={t.number}") for o, t in zip(overrides, trials)]

    def _resume(self) -> int:
        """Finish the bookkeeping of an interrupted earlier run; returns trials already done."""
        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:
            return 0
        done = 0
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                self.storage.set_trial_system_attr(t._trial_id, INTERRUPTED_ATTR, True)
                self.storage.set_trial_state(t._trial_id, TrialState.FAIL)
                if t.params:
                    study.enqueue_trial(t.params)
                log.info("trial %d was interrupted: marked FAIL and queued again", t.number)
            elif t.state == TrialState.FAIL and not t.system_attrs.get(INTERRUPTED_ATTR):
                done += 1
                self.failures += 1
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                done += 1
        return done

    def sweep(self, arguments: list[str]) -> None:
        if isinstance(self.storage, str):
            self.storage = PruneAwareStorage(self.storage)
        done = self._resume() if self.storage is not None and self.study_name else 0
        self.n_trials = max(self.requested - done, 0)
        if done:
            log.info(
                "study %s has %d of %d trials: running %d more",
                self.study_name,
                done,
                self.requested,
                self.n_trials,
            )
        self.max_failure_rate = 0.0 if self.failures > self.failure_budget else 1.0
        super().sweep(arguments)


class ConKDOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=conkd_optuna``: the Optuna sweeper with a ``pruner`` option."""

    def __init__(self, *args: Any, pruner: Any = None, **kwargs: Any) -> None:
        self.sweeper = ConKDOptunaSweeperImpl(*args, pruner=pruner, **kwargs)


@dataclass
class ConKDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper.ConKDOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    # An optuna.pruners.* config (hydra/sweeper/pruner=median|none|successive_halving|hyperband)
    pruner: Any = MISSING
    # ConKD's default objective is validation top-1; objective_mode=min needs minimize here.
    direction: Any = "maximize"
    max_failure_rate: float = 0.5


ConfigStore.instance().store(
    group="hydra/sweeper", name="conkd_optuna", node=ConKDOptunaSweeperConf, provider="conkd"
)
