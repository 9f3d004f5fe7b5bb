"""Sweeps: study storage and trial marks, the job side of Optuna pruning, the sweep summary.

* :class:`TrialReporter` runs inside a job launched by the ``conkd_optuna`` sweeper: it reports
  the validation objective to the job's Optuna trial (for
  :class:`conkd.callbacks.PruningCallback`, after every epoch) and asks the study's pruner
  whether to stop.
* :func:`summarize_sweep` runs in the sweep's parent process at the end: it finds the best trial
  among the MLflow child runs, logs it on the parent run (:class:`conkd.tracking.SweepParent`)
  with Optuna's plots of the sweep, and writes a ready-to-run override line and experiment file
  for it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from conkd.tracking import SweepParent

log = logging.getLogger("conkd")

#: Optuna user attributes ConKD keeps on a trial (public API; optuna-dashboard shows them):
#: the job's pruner stopped it; its resumable checkpoint (``last.pt``); a trial whose worker
#: died (FAIL, re-queued); on the re-queued trial, the checkpoint it continues from. The worker
#: that runs it and the job's heartbeat are its owner record (:data:`conkd.owner.TRIAL_ATTRS`).
PRUNED_ATTR = "conkd:pruned"
CHECKPOINT_ATTR = "conkd:checkpoint"
INTERRUPTED_ATTR = "conkd:interrupted"
RESUME_ATTR = "conkd:resume"
#: Override the sweeper adds to each job to hand it its trial number.
TRIAL_KEY = "optuna.trial"


def open_storage(spec: Any, attempts: int = 6) -> Any:
    """The Optuna storage ``hydra.sweeper.storage`` names, as a public storage object.

    ``spec`` is an RDB URL (``sqlite:///ABS/PATH``, ``postgresql+psycopg2://...``) or a config
    node with a ``_target_`` (``hydra/sweeper/storage=journal``: a
    ``JournalStorage(JournalFileBackend(path))``, one file shared over a network file system).
    A database an older Optuna wrote is refused with the one command that upgrades it. Workers
    started together race to create Optuna's tables (one gets "duplicate key" or "already
    exists"): the losers retry, and then find them made.
    """
    if not isinstance(spec, str):
        from conkd.targets import build

        return build(spec, "hydra.sweeper.storage config")
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(spec)
        except RuntimeError as err:
            if "optuna storage upgrade" not in str(err):
                raise
            from conkd.errors import ConKDError

            found = str(err).split("(set up by ")[-1].split(")")[0]
            raise ConKDError(
                f"the Optuna storage {spec} was written by an older Optuna ({found}); upgrade it "
                f"once (then only Optuna >= 3 reads it) with: optuna storage upgrade --storage "
                f"{spec}"
            ) from err
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def describe_storage(spec: Any) -> str:
    """A one-line name for a storage spec (tags, logs): the URL, or ``journal:<file>``."""
    if isinstance(spec, str):
        return spec
    path = (spec.get("log_storage") or {}).get("file_path") if hasattr(spec, "get") else None
    return f"journal:{path}" if path else str(spec.get("_target_", spec))


class StudyTrials:
    """A study's trials by number, read and marked through the public storage API.

    Optuna's ``Trial`` objects cache what they read; marks written by another process (a
    job's pruned mark, its heartbeat) are read here from the storage itself.
    """

    def __init__(self, storage: Any, study_name: str) -> None:
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study_name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def get(self, number: int) -> Any:
        """The trial as the storage holds it now (a ``FrozenTrial``)."""
        return self.storage.get_trial(self.trial_id(number))

    def mark(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial_id(number), key, value)

    def fail(self, number: int) -> bool:
        """FAIL a running trial; False when another worker finished it first."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            return self.storage.set_trial_state_values(self.trial_id(number), TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False


class TrialReporter:
    """Reports one job's per-epoch objective to its Optuna trial and applies the pruner."""

    def __init__(
        self,
        study_name: str,
        storage: Any,
        trial_number: int,
        pruner: Any,
        monitor: str = "val/top1",
    ) -> None:
        import optuna

        self.monitor = monitor
        self.storage = open_storage(storage)
        self.trials = StudyTrials(self.storage, study_name)
        self.number = trial_number
        study = optuna.load_study(study_name=study_name, storage=self.storage, pruner=pruner)
        self.trial = optuna.Trial(study, self.trials.trial_id(trial_number))
        self.pruned = False

    def _prune(self) -> None:
        self.pruned = True
        self.trial.set_user_attr(PRUNED_ATTR, True)

    def report(self, value: float, epoch: int) -> bool:
        """Record ``value`` at ``epoch``; True when the pruner says to stop this trial."""
        if not math.isfinite(value):
            return False
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self._prune()
        return self.pruned

    def report_history(self, history: Sequence[Mapping[str, float]]) -> bool:
        """Report the epochs of ``history`` (inherited from an interrupted trial) the trial
        does not have yet, so the pruner sees the whole curve; True when it stops the trial."""
        reported = self.trials.get(self.number).intermediate_values
        for epoch, metrics in enumerate(history):
            if epoch not in reported and math.isfinite(metrics[self.monitor]):
                self.trial.report(metrics[self.monitor], epoch)
        if history and self.trial.should_prune():
            self._prune()
        return self.pruned

    def mark(self, marks: Mapping[str, Any]) -> None:
        """Set user attributes on the trial (the job's heartbeat)."""
        for key, value in marks.items():
            self.trial.set_user_attr(key, value)

    def record_checkpoint(self, path: Path) -> None:
        """Tell the sweeper where this trial's resumable checkpoint will be: an interrupted
        trial is re-queued with its parameters and continues from there."""
        self.trial.set_user_attr(CHECKPOINT_ATTR, str(path))


def reporter_from_hydra(cfg: DictConfig, hydra_sweeper: Any) -> TrialReporter | None:
    """A reporter when this job is an Optuna trial with shared storage and a pruner, else None."""
    trial = cfg.get("optuna", {}).get("trial")
    if trial is None or hydra_sweeper is None:
        return None
    storage, study = hydra_sweeper.get("storage"), hydra_sweeper.get("study_name")
    if not storage or not study:
        return None
    from conkd.targets import build

    direction = str(hydra_sweeper.get("direction", "")).lower()
    wanted = "maximize" if cfg.objective_mode == "max" else "minimize"
    if direction and direction != wanted:
        from conkd.errors import ConKDError

        raise ConKDError(
            f"hydra.sweeper.direction={direction} but objective_mode={cfg.objective_mode}; "
            f"set hydra.sweeper.direction={wanted}"
        )
    pruner_cfg = hydra_sweeper.get("pruner")
    pruner = build(pruner_cfg, "hydra.sweeper.pruner config") if pruner_cfg else None
    if pruner is None:
        import optuna

        pruner = optuna.pruners.NopPruner()
    return TrialReporter(study, storage, int(trial), pruner, monitor=cfg.objective)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _overrides(text: str) -> dict[str, str]:
    return dict(o.split("=", 1) for o in text.split() if "=" in o)


def _is_sweep_syntax(value: str) -> bool:
    return "," in value or value.startswith(("choice(", "range(", "interval(", "tag(", "glob("))


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def collect_trials(parent: SweepParent) -> list[dict[str, Any]]:
    """One row per child run: its trial number, status, objective value and swept values."""
    rows = []
    for r in parent.children():
        params = _overrides(r.data.tags.get("overrides", ""))
        params.pop(TRIAL_KEY, None)
        trial = r.data.tags.get("sweep.trial", "")
        rows.append(
            {
                "run_id": r.info.run_id,
                "trial": int(trial) if trial.isdigit() else None,
                "status": r.info.status,
                "pruned": r.data.tags.get("pruned") == "true",
                "error": r.data.tags.get("error"),
                "value": r.data.metrics.get("objective"),
                "params": params,
            }
        )
    return sorted(rows, key=lambda row: (row["trial"] is None, row["trial"], row["run_id"]))


def _study_from_rows(rows: list[dict[str, Any]], keys: list[str], direction: str) -> Any:
    """An in-memory Optuna study of finished child runs, so the basic sweeper's grids get the
    same plots as Optuna sweeps."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    done = [r for r in rows if r["value"] is not None and r["status"] == "FINISHED"]
    dists: dict[str, Any] = {}
    for k in keys:
        values = [r["params"].get(k) for r in done]
        nums = [_number(v) for v in values if v is not None]
        if nums and len(nums) == len(values) and None not in nums:
            lo, hi = min(nums), max(nums)
            dists[k] = FloatDistribution(lo, hi if hi > lo else lo + 1e-12)
        else:
            dists[k] = CategoricalDistribution(sorted({str(v) for v in values}))
    study = optuna.create_study(direction=direction)
    for r in done:
        params = {}
        for k, d in dists.items():
            v = r["params"].get(k)
            params[k] = float(v) if isinstance(d, FloatDistribution) else str(v)
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=r["value"])
        )
    return study


def _save_plots(study: Any, out_dir: Path) -> list[Path]:
    """Objective per trial (Optuna's history plot), parallel coordinates and parameter
    importances (Optuna's numbers). Each needs enough finished trials: best effort."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as ovm

    from conkd import plots

    done = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    sign = 1.0 if study.direction.name == "MAXIMIZE" else -1.0
    made = []
    steps = {
        "sweep_objective_per_trial.png": lambda p: plots.save_axes(
            ovm.plot_optimization_history(study), p
        ),
        "sweep_parallel_coordinates.png": lambda p: plots.parallel_coordinates(
            [t.params for t in done], [t.value for t in done], p, higher_is_better=sign > 0
        ),
        # Optuna's default evaluator (fANOVA), seeded so the figure is reproducible.
        "sweep_param_importances.png": lambda p: plots.importances(
            optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            ),
            p,
        ),
    }
    for name, make in steps.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make(out_dir / name)
            made.append(out_dir / name)
        except Exception as err:  # too few trials, a parameter that never varied, ...
            log.info("sweep plot %s skipped: %s", name, err)
    return made


def best_command(config: DictConfig, best: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """A ``python train.py ...`` line and an experiment file that re-run the best trial.

    Config-group choices (including those an ``hparams_search`` preset made) are spelled out, so
    the line reproduces the trial without the search preset.
    """
    choices = {
        k: v
        for k, v in OmegaConf.to_container(config.hydra.runtime.choices).items()
        if v is not None and not k.startswith("hydra") and k not in ("hparams_search", "paths")
    }
    fixed = {
        k: v
        for k, v in _overrides(" ".join(config.hydra.overrides.task)).items()
        if not _is_sweep_syntax(v) and k not in choices and k != "hparams_search"
    }
    groups = {k: v for k, v in choices.items() if k != "experiment"}
    groups.update({k: v for k, v in best.items() if k in choices})
    values = {**fixed, **{k: v for k, v in best.items() if k not in choices}}
    head = [f"experiment={choices['experiment']}"] if "experiment" in choices else []
    line = " ".join(
        [
            "python train.py",
            *head,
            *(f"{k}={v}" for k, v in groups.items()),
            *(f"{k}={v}" for k, v in values.items()),
        ]
    )
    defaults: list[Any] = [f"/experiment/{choices['experiment']}"] if head else []
    defaults += [{f"override /{k}": v} for k, v in groups.items()]
    defaults.append("_self_")
    experiment: dict[str, Any] = {"defaults": defaults}
    for k, v in values.items():
        node = experiment
        *parents, leaf = k.lstrip("+").split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(v)
    return line, experiment


def _record_best(
    config: DictConfig,
    finished: list[dict[str, Any]],
    keys: list[str],
    direction: str,
    summary: dict[str, Any],
    sweep_dir: Path,
) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """The best finished trial into ``summary``, a re-run line and experiment file in
    ``sweep_dir``; returns the parent run's best_* metrics, params and tags."""
    pick = max if direction == "maximize" else min
    best = pick(finished, key=lambda r: r["value"])
    best_params = {k: best["params"][k] for k in keys if k in best["params"]}
    line, experiment = best_command(config, best_params)
    summary.update(
        best_value=best["value"],
        best_params=best_params,
        best_run_id=best["run_id"],
        best_trial=best["trial"],
        best_command=line,
    )
    (sweep_dir / "best_overrides.txt").write_text(line + "\n")
    (sweep_dir / "best_experiment.yaml").write_text(
        "# @package _global_\n# Best trial of the sweep; copy to conf/experiment/ to reuse.\n"
        + yaml.safe_dump(experiment, sort_keys=False)
    )
    params = {f"best.{k}": v for k, v in best_params.items()}
    tags = {"best_run_id": best["run_id"], "best_command": line, **params}
    log.info("sweep best %s = %.4f (trial %s): %s", config.objective, best["value"], best["trial"],
             line)  # fmt: skip
    return {"best_value": best["value"]}, params, tags


def _sweep_study(
    sweeper: Any, rows: list[dict[str, Any]], keys: list[str], direction: str, finished: bool
) -> tuple[Any, dict[str, int] | None]:
    """The sweep's Optuna study and its trial counts by state: the sweeper's own study (from its
    storage), or for a plain multirun one built from the finished child runs (no counts)."""
    if sweeper.get("storage") and sweeper.get("study_name"):
        import optuna

        storage = open_storage(sweeper.storage)
        study = optuna.load_study(study_name=sweeper.study_name, storage=storage)
        states = [t.state.name for t in study.trials]
        return study, {s: states.count(s) for s in sorted(set(states))}
    return (_study_from_rows(rows, keys, direction) if finished else None), None


def summarize_sweep(parent: SweepParent, config: DictConfig, sweep_dir: Path) -> dict:
    """Best trial, failure list, plots and a re-run command, logged on the parent run."""
    sweeper = config.hydra.sweeper
    direction = str(
        sweeper.get("direction", "maximize" if config.objective_mode == "max" else "minimize")
    ).lower()
    rows = collect_trials(parent)
    finished = [r for r in rows if r["value"] is not None and r["status"] == "FINISHED"]
    varying = sorted(
        {k for r in rows for k in r["params"] if len({str(x["params"].get(k)) for x in rows}) > 1}
    )
    keys = sorted(set(varying) | set((sweeper.get("params") or {}).keys()))
    summary: dict[str, Any] = {
        "objective": config.objective,
        "direction": direction,
        "n_runs": len(rows),
        "n_finished": len(finished),
        "n_pruned": sum(r["pruned"] for r in rows),
        "failures": [
            {"trial": r["trial"], "run_id": r["run_id"], "error": r["error"]}
            for r in rows
            if r["status"] == "FAILED"
        ],
    }
    study, states = _sweep_study(sweeper, rows, keys, direction, bool(finished))
    if states is not None:
        summary["optuna_states"] = states
    metrics = {
        "sweep/n_runs": len(rows),
        "sweep/n_failed": len(summary["failures"]),
        "sweep/n_pruned": summary["n_pruned"],
    }
    params: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    if finished:
        best_metrics, params, tags = _record_best(
            config, finished, keys, direction, summary, sweep_dir
        )
        metrics.update(best_metrics)
    for f in summary["failures"]:
        log.warning("sweep trial %s failed: %s", f["trial"], f["error"])
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    files = [
        sweep_dir / n for n in ("sweep_summary.json", "best_overrides.txt", "best_experiment.yaml")
    ]
    if study is not None and any(t.state.name == "COMPLETE" for t in study.trials):
        files += _save_plots(study, sweep_dir)
    parent.record_summary(metrics, params, tags, files)
    return summary
