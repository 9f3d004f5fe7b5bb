"""A small extension of hydra-optuna-sweeper 1.4 (select with ``hydra/sweeper=conkd_optuna``).

The released sweeper runs each job blind: the job never sees its Optuna trial, so it cannot
report intermediate values or be pruned. This subclass changes only what that needs, through
Optuna's public API (``ask``/``tell``, user attributes, ``enqueue_trial``, the storage's public
methods):

* each job gets its trial number as the override ``optuna.trial=N``; storage, study name and
  pruner it reads from its own ``hydra.sweeper`` config (see :mod:`conkd.sweep`);
* a job stopped by the pruner returns normally and marks its trial; the sweeper then tells the
  trial PRUNED (so a prune never counts as a failure);
* trials are pulled, not batched per worker: before each batch the worker counts the study's
  trials (finished, failed, and running in live workers) and asks only for what is missing from
  ``n_trials``. Re-running a sweep with the same storage and study name therefore runs only the
  missing trials, and N workers started with the same command on a shared storage (a database,
  or one journal file: ``hydra/sweeper/storage=journal``) share one study and stop together at
  ``n_trials``;
* a trial whose worker is gone (its pid is not running on this host, or no heartbeat from
  another host for ``stale_after_s``) is marked FAIL and re-queued with its parameters,
  continuing from its checkpoint (``resume=.../last.pt``) where it wrote one. Optuna's own
  heartbeat (``RDBStorage(heartbeat_interval=...)`` + ``fail_stale_trials``) is not used: it
  exists only for database storages (not the journal file), with ask/tell its beats would still
  be the job's own per-epoch writes, and it can only wait out a grace period, where a pid on
  this host tells at once (a killed sweep re-run on the same machine re-queues immediately);
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import MISSING, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from conkd.cli import exit_with
from conkd.errors import ConKDError
from conkd.owner import STALE_AFTER_S, TRIAL_ATTRS, Owner
from conkd.sweep import (
    CHECKPOINT_ATTR,
    INTERRUPTED_ATTR,
    PRUNED_ATTR,
    RESUME_ATTR,
    TRIAL_KEY,
    StudyTrials,
    describe_storage,
    open_storage,
)
from conkd.targets import build

log = logging.getLogger(__name__)
#: A running trial with no worker mark is an orphan after this long: a live worker marks the
#: trial it asked for within milliseconds (:func:`claim`), a killed one never does. A restarted
#: sweep can be faster than this (seen: 1.97 s from the kill to its check), so it waits until
#: such a trial is this old before it judges it (:func:`unclaimed_wait`).
UNCLAIMED_AFTER_S = 2.0


def count_trials(study: optuna.Study, running: bool = True) -> tuple[int, int]:
    """(trials that count towards n_trials, failures): finished, failed (not interrupted) and,
    with ``running``, running in live workers, over every worker of the study."""
    counted = failed = 0
    states = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR):
            failed += 1
            counted += 1
        elif t.state in states:
            counted += 1
    return counted, failed


def claim(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``: a new trial, or a queued one, marked at once with this worker's owner
    record (host, pid, heartbeat), so that other workers can tell a live trial from an orphan
    (:func:`orphan_reason`)."""
    trial = study.ask()
    for key, value in Owner.here().marks(TRIAL_ATTRS).items():
        trial.set_user_attr(key, value)
    return trial


def orphan_reason(t: FrozenTrial, stale_after_s: float, now: float | None = None) -> str | None:
    """Why RUNNING trial ``t`` has no live worker, or None: its pid is not running on this host,
    or its host sent no heartbeat for ``stale_after_s``, or its worker never marked it."""
    attrs, now = t.user_attrs, time.time() if now is None else now
    started = t.datetime_start.timestamp() if t.datetime_start else now
    if TRIAL_ATTRS.pid not in attrs:
        return "its worker stopped before marking it" if not unclaimed_wait(t, now) else None
    return Owner.read(attrs, TRIAL_ATTRS).gone(started, now, stale_after_s)


def unclaimed_wait(t: FrozenTrial, now: float | None = None) -> float:
    """Seconds until RUNNING trial ``t``, if nobody has marked it, is old enough for
    :func:`orphan_reason` to judge (0 when it is marked or old enough)."""
    if TRIAL_ATTRS.pid in t.user_attrs:
        return 0.0
    now = time.time() if now is None else now
    started = t.datetime_start.timestamp() if t.datetime_start else now
    return max(0.0, started + UNCLAIMED_AFTER_S - now)


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

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

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
        self.trials: StudyTrials | None = None  # the study's trials by number, set in sweep

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        self.sampler_config = kwargs["config"].hydra.sweeper.sampler

    def _configure_trials(self, trials: Any, *args: Any) -> Any:
        overrides = super()._configure_trials(trials, *args)
        out = []
        for o, t in zip(overrides, trials):
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
        self.sampler = TrialSeeded(
            lambda s: build(cfg, "hydra.sweeper.sampler config", seed=s), int(seed)
        )
        log.info("sampler seeded per trial number from seed %s", seed)

    def _requeue_orphans(self, study: optuna.Study) -> None:
        """Trials whose worker died: FAIL (marked interrupted) and queued again with their
        parameters and checkpoint. Of workers that find one orphan together, the one whose
        FAIL lands queues it."""
        assert self.trials is not None
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        wait = max((unclaimed_wait(t) for t in running), default=0.0)
        if wait > 0:  # asked for an instant ago: its worker marks it now, or it was killed
            time.sleep(wait + 0.05)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in running:
            why = orphan_reason(t, self.stale_after_s)
            if why is None:
                continue
            self.trials.mark(t.number, INTERRUPTED_ATTR, True)
            if not self.trials.fail(t.number):
                continue
            if t.params:
                ckpt = t.user_attrs.get(CHECKPOINT_ATTR)
                study.enqueue_trial(t.params, user_attrs={RESUME_ATTR: ckpt} if ckpt else None)
            log.info("trial %d was interrupted (%s): marked FAIL and queued again", t.number, why)

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any], list]:
        """The swept distributions, the fixed parameters and the fixed overrides (``~key``
        deletions), as the released sweeper builds them."""
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        space, fixed, fixed_overrides = create_params_from_overrides(params_conf)
        if isinstance(self.sampler, functools.partial):  # GridSampler: built from the space
            choices = {k: self._to_grid_sampler_choices(d) for k, d in space.items()}
            self.sampler = self.sampler(choices)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in choices.values()))
        for name in fixed:
            space.pop(name, None)
        return space, fixed, fixed_overrides

    def _tell(self, study: optuna.Study, trials: list, returns: list) -> None:
        """Record each job's outcome: PRUNED when its pruner stopped it (the job marked it),
        else COMPLETE with its value, FAIL when it raised or returned no number."""
        assert self.trials is not None
        for trial, ret in zip(trials, returns):
            if ret.status == JobStatus.COMPLETED:
                if self.trials.get(trial.number).user_attrs.get(PRUNED_ATTR):
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                try:
                    study.tell(trial, state=TrialState.COMPLETE, values=[float(ret.return_value)])
                    continue
                except (TypeError, ValueError) as err:
                    log.warning("trial %d returned %r: %s", trial.number, ret._return_value, err)
            else:
                log.warning("trial %d failed: %s", trial.number, ret._return_value)
            study.tell(trial, state=TrialState.FAIL)

    def sweep(self, arguments: list[str]) -> None:
        storage = open_storage(self.storage)
        space, fixed, fixed_overrides = self._search_space(arguments)
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, sampler=self.sampler,
            directions=self._get_directions(), load_if_exists=True,
        )  # fmt: skip
        log.info("study %s on %s, sampler %s", study.study_name, describe_storage(self.storage),
                 type(self.sampler).__name__)  # fmt: skip
        self.trials = StudyTrials(storage, study.study_name)
        self._requeue_orphans(study)
        self._seed_per_trial()
        study.sampler = self.sampler
        budget = self.max_failure_rate * self.n_trials
        counted, failed = count_trials(study)
        if counted:
            log.info("study %s has %d of %d trials", self.study_name, counted, self.n_trials)
        last: list = []
        while counted < self.n_trials and failed <= budget:
            trials = [claim(study) for _ in range(min(self.n_jobs, self.n_trials - counted))]
            overrides = self._configure_trials(trials, space, fixed, fixed_overrides)
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
    """``hydra/sweeper=conkd_optuna``: the Optuna sweeper with a ``pruner`` option.

    Hydra 1.4 builds plugins non-recursively: the sampler arrives as its config and is built
    here (as the released sweeper does, within ConKD's execution whitelist); the pruner is built
    by each job from its own ``hydra.sweeper`` config.
    """

    def __init__(
        self,
        sampler: Any,
        *args: Any,
        pruner: Any = None,
        stale_after_s: float = STALE_AFTER_S,
        **kwargs: Any,
    ) -> None:
        self.sweeper = ConKDOptunaSweeperImpl(
            build(sampler, "hydra.sweeper.sampler config"),
            *args,
            pruner=pruner,
            stale_after_s=stale_after_s,
            **kwargs,
        )

    def sweep(self, arguments: list[str]) -> None:
        """The sweep; bad input found by the sweeper itself (an old study database, a storage
        that cannot be opened) ends in one ``error:`` line, as a run's does."""
        try:
            self.sweeper.sweep(arguments)
        except ConKDError as err:
            exit_with(err)


@dataclass
class ConKDOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper.ConKDOptunaSweeper"
    # _self_ first, so that hydra/sweeper/storage=journal replaces the default storage below
    defaults: list[Any] = field(
        default_factory=lambda: [
            "_self_",
            {"sampler": "tpe"},
            {"pruner": "median"},
            {"storage": None},
        ]
    )
    # An RDB URL (sqlite:///ABS/PATH, postgresql+psycopg2://...) or a storage config with a
    # _target_ (hydra/sweeper/storage=journal). Absolute: the sweeper opens it before Hydra's
    # runtime config exists, so ${hydra:runtime.cwd} cannot be used here.
    storage: Any = "sqlite:///${oc.env:CONKD_ROOT,${oc.env:PWD}}/mlruns/optuna.db"
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
