"""A small extension of hydra-optuna-sweeper 1.3 (select with ``hydra/sweeper=conkd_optuna``).

The released sweeper runs each job blind: the job never sees its Optuna trial, so it cannot
report intermediate values or be pruned. This subclass changes only what that needs:

* each job gets its trial number as the override ``optuna.trial=N``; storage, study name and
  pruner it reads from its own ``hydra.sweeper`` config (see :mod:`conkd.sweep`);
* a job stopped by the pruner returns normally and marks its trial; the storage then records
  the sweeper's COMPLETE as PRUNED (so a prune never counts as a failure);
* trials are pulled, not batched per worker: before each batch the worker counts the study's
  trials (finished, failed, and running in live workers) and asks only for what is missing from
  ``n_trials``. Re-running a sweep with the same storage and study name therefore runs only the
  missing trials, and N workers started with the same command on a shared storage (one machine
  or many) share one study and stop together at ``n_trials``;
* a trial whose worker is gone (its pid is not running on this host, or no heartbeat from
  another host for ``stale_after_s``) is marked FAIL and re-queued with its parameters,
  continuing from its checkpoint (``resume=.../last.pt``) where it wrote one;
* each trial's sampler is seeded by (seed, trial number) (:class:`TrialSeeded`), so a resumed
  sweep does not replay the random sequence of its first run, and workers that start together
  on an empty study do not draw the same parameters (both would, with one shared seed);
* ``max_failure_rate`` is the share of the requested trials that may fail (over the whole
  study, all workers) before the sweep stops (the released sweeper applies it to each batch,
  so with ``n_jobs: 1`` one failure aborts any sweep).

The trial loop is therefore this module's own (:meth:`ConKDOptunaSweeperImpl.sweep`); the search
space parsing, trial configuration and launching are the released sweeper's.
"""

import functools
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import MISSING, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from conkd.runs import STALE_AFTER_S, process_gone
from conkd.sweep import (
    CHECKPOINT_ATTR,
    HEARTBEAT_ATTR,
    HOST_ATTR,
    PID_ATTR,
    PRUNED_ATTR,
    TRIAL_KEY,
)

log = logging.getLogger(__name__)
INTERRUPTED_ATTR = "conkd:interrupted"
#: User attribute of a re-queued trial: the interrupted trial's checkpoint to continue from.
RESUME_ATTR = "conkd:resume"


def count_trials(study: optuna.Study, running: bool = True) -> tuple[int, int]:
    """(trials that count towards n_trials, failures): finished, failed (not interrupted) and,
    with ``running``, running in live workers, over every worker of the study."""
    counted = failed = 0
    states = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and not t.system_attrs.get(INTERRUPTED_ATTR):
            failed += 1
            counted += 1
        elif t.state in states:
            counted += 1
    return counted, failed


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

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        """A new trial, marked with this worker's host and pid as it is created: a worker killed
        between ``ask`` and configuring the trial would otherwise leave a RUNNING trial no
        resumed worker recognises as an orphan (the sweep then ends one trial short). Enqueued
        (WAITING) trials are left unmarked: the worker that runs them marks them."""
        # Optuna's cached storage creates trials through this method, plain callers through
        # create_new_trial, which calls it
        trial = super()._create_new_trial(study_id, template_trial)
        if template_trial is None:
            for key, value in ((HOST_ATTR, socket.gethostname()), (PID_ATTR, os.getpid())):
                self.set_trial_system_attr(trial._trial_id, key, value)
                trial.system_attrs[key] = value  # the cache keeps this copy
        return trial

    def set_trial_state(self, trial_id: int, state: TrialState) -> bool:
        return super().set_trial_state(trial_id, self._pruned(trial_id, state))

    def _update_trial(self, trial_id: int, state: Any = None, **kwargs: Any) -> bool:
        return super()._update_trial(trial_id, state=self._pruned(trial_id, state), **kwargs)


def open_storage(url: str, attempts: int = 6) -> PruneAwareStorage:
    """The study's storage. Workers started together race to create Optuna's tables (one gets
    "duplicate key" or "already exists"): the losers retry, and then find them made."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return PruneAwareStorage(url)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


class TrialSeeded(BaseSampler):
    """A sampler seeded afresh for every trial by (seed, trial number).

    One seeded sampler per worker draws the same sequence in every worker: N workers started
    together on an empty study evaluate the same first parameters N times, and a resumed sweep
    replays its first run's draws. Keyed by the trial number, which the storage hands out once,
    the draws differ between trials and are the same on every re-run of the same trial (one
    worker's sweep is reproducible). Samplers such as TPE keep no state but their random
    generator (the history is read from the storage), so a fresh one per trial loses nothing.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._trial: int | None = None
        self._inner = make(seed)

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if trial.number != self._trial:  # the first call of each trial comes from its creation
            state = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
            self._inner, self._trial = self._make(int(state)), trial.number
        return self._inner

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, dist: BaseDistribution
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, name, dist)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class ConKDOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(
        self, *args: Any, pruner: Any = None, stale_after_s: float = STALE_AFTER_S, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pruner = pruner  # instantiated by the jobs from their hydra.sweeper config
        self.stale_after_s = stale_after_s
        self.sampler_config: Any = None  # hydra.sweeper.sampler, read in setup

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        self.sampler_config = kwargs["config"].hydra.sweeper.sampler

    def _configure_trials(self, trials: Any, *args: Any) -> Any:
        overrides = super()._configure_trials(trials, *args)
        out = []
        for o, t in zip(overrides, trials):
            # whose trial this is, so another worker can tell a live one from an orphan
            storage = t.study._storage
            storage.set_trial_system_attr(t._trial_id, HOST_ATTR, socket.gethostname())
            storage.set_trial_system_attr(t._trial_id, PID_ATTR, os.getpid())
            extra = [f"{TRIAL_KEY}={t.number}"]
            resume = t.user_attrs.get(RESUME_ATTR)
            if resume and Path(resume).exists():
                extra.append(f"resume={resume}")
                log.info("trial %d continues from %s", t.number, resume)
            out.append((*o, *extra))
        return out

    def _seed_per_trial(self) -> None:
        """Give every trial a sampler seeded by (seed, trial number), see :class:`TrialSeeded`."""
        cfg = self.sampler_config
        seed = cfg.get("seed") if cfg is not None else None
        if seed is None or isinstance(self.sampler, optuna.samplers.GridSampler):
            return
        self.sampler = TrialSeeded(lambda s: instantiate(cfg, seed=s), int(seed))
        log.info("sampler seeded per trial number from seed %s", seed)

    def _orphan(self, t: Any) -> str | None:
        """Why RUNNING trial ``t`` has no live worker, or None."""
        attrs = t.system_attrs
        started = t.datetime_start.timestamp() if t.datetime_start else time.time()
        beat = float(attrs.get(HEARTBEAT_ATTR) or started)
        return process_gone(attrs.get(HOST_ATTR), attrs.get(PID_ATTR), beat, time.time(),
                            self.stale_after_s)  # fmt: skip

    def _requeue_orphans(self, study: optuna.Study) -> None:
        """Trials whose worker died: FAIL (marked interrupted) and queued again with their
        parameters and checkpoint."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            why = self._orphan(t)
            if why is None:
                continue
            study._storage.set_trial_system_attr(t._trial_id, INTERRUPTED_ATTR, True)
            study._storage.set_trial_state(t._trial_id, TrialState.FAIL)
            if t.params:
                study.enqueue_trial(t.params)  # optuna 2.10: no user_attrs argument yet
                ckpt = t.system_attrs.get(CHECKPOINT_ATTR)
                if ckpt:
                    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1]
                    study._storage.set_trial_user_attr(queued._trial_id, RESUME_ATTR, ckpt)
            log.info("trial %d was interrupted (%s): marked FAIL and queued again", t.number, why)

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The swept distributions and the fixed parameters, as the released sweeper builds them."""
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        space = dict(self.search_space_distributions or {})
        space.update(distributions)
        if isinstance(self.sampler, functools.partial):  # GridSampler: built from the space
            choices = {k: self._to_grid_sampler_choices(d) for k, d in space.items()}
            self.sampler = self.sampler(choices)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in choices.values()))
        for name in fixed:
            space.pop(name, None)
        return space, fixed

    def _tell(self, study: optuna.Study, trials: list, returns: list) -> None:
        for trial, ret in zip(trials, returns):
            if ret.status == JobStatus.COMPLETED:
                try:
                    study.tell(trial, state=TrialState.COMPLETE, values=[float(ret.return_value)])
                    continue
                except (TypeError, ValueError) as err:
                    log.warning("trial %d returned %r: %s", trial.number, ret._return_value, err)
            else:
                log.warning("trial %d failed: %s", trial.number, ret._return_value)
            study.tell(trial, state=TrialState.FAIL)

    def sweep(self, arguments: list[str]) -> None:
        if isinstance(self.storage, str):
            self.storage = open_storage(self.storage)
        space, fixed = self._search_space(arguments)
        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, sampler=self.sampler,
            directions=self._get_directions(), load_if_exists=True,
        )  # fmt: skip
        self._requeue_orphans(study)
        self._seed_per_trial()
        study.sampler = self.sampler
        budget = self.max_failure_rate * self.n_trials
        counted, failed = count_trials(study)
        if counted:
            log.info("study %s has %d of %d trials", self.study_name, counted, self.n_trials)
        last: list = []
        while counted < self.n_trials and failed <= budget:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - counted))]
            overrides = self._configure_trials(trials, space, fixed)
            last = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(last)
            self._tell(study, trials, last)
            counted, failed = count_trials(study)
        if failed > budget:
            log.error(
                "%d trials failed, more than max_failure_rate=%s of %d: stopping",
                failed, self.max_failure_rate, self.n_trials,
            )  # fmt: skip
            for ret in last:
                ret.return_value  # noqa: B018  raises the failed job's error, with its traceback
            raise RuntimeError(f"{failed} trials of study {self.study_name} failed")
        self._save_results(study)

    def _save_results(self, study: optuna.Study) -> None:
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not done:
            log.warning("study %s has no completed trial", self.study_name)
            return
        best = study.best_trial
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s", best.value)
        OmegaConf.save(
            OmegaConf.create(
                {"name": "optuna", "best_params": best.params, "best_value": best.value}
            ),
            f"{self.config.hydra.sweep.dir}/optimization_results.yaml",
        )


class ConKDOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper=conkd_optuna``: the Optuna sweeper with a ``pruner`` option."""

    def __init__(
        self, *args: Any, pruner: Any = None, stale_after_s: float = STALE_AFTER_S, **kwargs: Any
    ) -> None:
        self.sweeper = ConKDOptunaSweeperImpl(
            *args, pruner=pruner, stale_after_s=stale_after_s, **kwargs
        )


@dataclass
class ConKDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper.ConKDOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    # An optuna.pruners.* config (hydra/sweeper/pruner=median|none|successive_halving|hyperband)
    pruner: Any = MISSING
    # ConKD's default objective is validation top-1; objective_mode=min needs minimize here.
    direction: Any = "maximize"
    max_failure_rate: float = 0.5
    # A running trial of a worker on another host is an orphan after this long without a
    # heartbeat (workers on this host are checked by pid).
    stale_after_s: float = STALE_AFTER_S


ConfigStore.instance().store(
    group="hydra/sweeper", name="conkd_optuna", node=ConKDOptunaSweeperConf, provider="conkd"
)
