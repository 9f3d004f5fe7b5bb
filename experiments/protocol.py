"""The Imagenette ablation: every row's runs, skipping those already finished in MLflow, then the
results table and plots written from the MLflow store.

    python experiments/protocol.py run               # everything; re-run the same line to continue
    python experiments/protocol.py run --rows ce,kd  # some rows; --dry-run prints the commands
    python experiments/protocol.py status            # which rows and seeds are done
    python experiments/protocol.py table             # experiments/README.md section + figures

Rows, in order: the ResNet-101 teacher (the teacher preset, ``experiment=teacher``), then ResNet-18
students with the same epochs and schedule: CE only, Hinton KD, LS-KD, LS-KD + alpha SupCon with
AdamW and with Lion (the mission's method), and the mission's method with consistent cutmix /
mixup; a ResNet-18 teacher and the KD, LS-KD and Lion rows again from it (``*_r18t``); a
``hparams_search=conkd_lion`` sweep and its best setting. Each (row, seed) is one
``python train.py`` run in ``<out>/<row>/seed<k>``, tagged ``protocol``/``row`` in MLflow: a
killed run continues exactly where it stopped (``resume=auto``), a finished one is skipped, and the
sweep resumes its Optuna study. The ``notebook`` row (the original notebooks' projection-level
pipeline) runs only when named with ``--rows``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

README = ROOT / "experiments" / "README.md"
FIGURES = ROOT / "experiments" / "figures"


@dataclass(frozen=True)
class Settings:
    """What a protocol is: its name keys the MLflow tags, so change it with any size below."""

    name: str = "imagenette64"
    data: Path = ROOT.parent / "shared" / "data" / "imagenette"
    out: Path = ROOT / "outputs" / "protocol"
    image_size: int = 64
    teacher_epochs: int = 40
    student_epochs: int = 8
    seeds: tuple[int, ...] = (0, 1)
    trials: int = 16
    tracking_uri: str | None = None
    extra: tuple[str, ...] = ()  # appended to every command (tests: tiny batches, few steps)
    suite: str = "ablation"  # which rows: SUITES
    precision: str = "bf16"  # with channels_last; "32": neither (see fast_precision)

    @property
    def rows(self) -> tuple[Row, ...]:
        return SUITES[self.suite].rows

    @property
    def dir(self) -> Path:
        return self.out / self.name

    @property
    def experiment(self) -> str:
        return f"conkd-protocol-{self.name}"

    def teacher_ckpt(self, row: str = "teacher") -> Path:
        """The best checkpoint of teacher row ``row`` (seed 0), which student rows distil from."""
        return self.dir / row / "seed0" / "checkpoints" / "best.pt"

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.dir.resolve() / 'optuna.db'}"

    @property
    def study(self) -> str:
        return f"{self.name}-conkd_lion"


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    overrides: tuple[str, ...]
    teacher: str | None = "teacher"  # the teacher row it distils from; None: no teacher
    trains_teacher: bool = False  # a teacher row: teacher_epochs, seed 0, students wait for it
    optional: bool = False  # runs only when named with --rows
    seeds: tuple[int, ...] | None = None  # None: the protocol's seeds
    sweep: bool = False


ROWS = (
    Row("teacher", "teacher ResNet-101, the teacher preset (experiment=teacher)",
        ("experiment=teacher",), teacher=None, trains_teacher=True, seeds=(0,)),
    # the students' own recipe (AdamW, cosine) with CE alone: KD rows then differ in the loss only
    Row("ce", "ResNet-18, CE only, AdamW",
        ("stage=teacher", "loss=ce", "optimizer=adamw", "teacher_ckpt=null"), teacher=None),
    Row("kd", "ResNet-18, Hinton KD (T 4), AdamW", ("loss=kd", "optimizer=adamw")),
    Row("lsd", "ResNet-18, LS-KD (T 2), AdamW", ("loss=lsd", "optimizer=adamw")),
    Row("lsd_supcon_adamw", "ResNet-18, LS-KD + 0.15 SupCon, AdamW",
        ("loss=lsd+supcon", "optimizer=adamw")),
    Row("conkd_lion", "ResNet-18, LS-KD + 0.15 SupCon, Lion (the mission's method)",
        ("experiment=conkd_lion",)),
    # Function matching (Beyer et al. 2022): both networks see the same mixed batch, the teacher
    # cache replays its outputs on exactly those images.
    Row("conkd_lion_mix", "ResNet-18, the mission's method with consistent cutmix / mixup",
        ("experiment=conkd_lion", "dataset.mix.cutmix_alpha=1.0", "dataset.mix.mixup_alpha=0.2")),
    # A second teacher, in case the ResNet-101 ends too close to the 8-epoch CE student for the
    # KD rows to test anything (at 64 px a ResNet-18 epoch costs about a quarter of a ResNet-101
    # epoch here); its students repeat the KD rows from it.
    Row("teacher_r18", "teacher ResNet-18, CE (label smoothing 0.1)",
        ("experiment=teacher", "loss.label_smoothing=0.1", "model=resnet18",
         "mlflow.register=null"), teacher=None, trains_teacher=True, seeds=(0,)),
    Row("kd_r18t", "ResNet-18 <- ResNet-18 teacher, Hinton KD (T 4), AdamW",
        ("loss=kd", "optimizer=adamw", "model@teacher=resnet18"), teacher="teacher_r18"),
    Row("lsd_r18t", "ResNet-18 <- ResNet-18 teacher, LS-KD (T 2), AdamW",
        ("loss=lsd", "optimizer=adamw", "model@teacher=resnet18"), teacher="teacher_r18"),
    Row("conkd_lion_r18t", "ResNet-18 <- ResNet-18 teacher, LS-KD + 0.15 SupCon, Lion",
        ("experiment=conkd_lion", "model@teacher=resnet18"), teacher="teacher_r18"),
    Row("sweep", "hparams_search=conkd_lion sweep", ("hparams_search=conkd_lion",), sweep=True,
        seeds=(0,)),
    Row("sweep_best", "ResNet-18, conkd_lion with the sweep's best setting",
        ("experiment=conkd_lion",)),
    Row("notebook", "the original notebooks' pipeline (projection-level KD + SupCon)",
        ("experiment=notebook_student",), optional=True),
)  # fmt: skip
BY_NAME = {r.name: r for r in ROWS}

# The teacher recipe, measured one change at a time on the cheapest setting that ranks recipes
# (`--suite recipes`, see experiments/README.md): every row is the row before it plus one change,
# or, naming a base row, that row plus one change (an alternative to what followed it).
# r0 pins the old preset on every switch the rows change, so that each row's command keeps
# composing the config it ran with after experiment=teacher is set from the table.
_OLD_PRESET = (
    "experiment=teacher",
    "mlflow.register=null",
    "model.zero_init_residual=false",
    "optimizer=adamw",
    "scheduler=cosine",
    "loss.label_smoothing=0.0",
    "trainer.ema_decay=null",
    "trainer.decay_norms_and_biases=true",
    "dataset.mix.mixup_alpha=0.0",
    "dataset.mix.cutmix_alpha=0.0",
)
_RECIPE = (
    ("r0_preset", "the old teacher preset (AdamW 1e-3, cosine, 5% warmup)", _OLD_PRESET),
    ("r1_ls", "+ label smoothing 0.1", ("loss.label_smoothing=0.1",)),
    ("r2_zero_init", "+ zero-init residual", ("model.zero_init_residual=true",)),
    ("r3_flat_cos", "+ flat-then-cosine schedule", ("scheduler=flat_cosine",)),
    ("r4_ema", "+ weight EMA (decay 0.99)", ("trainer.ema_decay=0.99",)),
    ("r5_mix", "+ cutmix / mixup", ("dataset.mix.cutmix_alpha=1.0",
                                    "dataset.mix.mixup_alpha=0.2")),
    ("r6_sgd", "r4 with SGD (Nesterov, lr 0.1, no decay on norms and biases)",
     ("optimizer=sgd", "optimizer.lr=0.1", "trainer.decay_norms_and_biases=false"), "r4_ema"),
    ("r7_lion", "r4 with Lion (lr 3e-4, wd 0.5)", ("optimizer=lion",), "r4_ema"),
)  # fmt: skip


def _cumulative(steps: Sequence[tuple]) -> tuple[Row, ...]:
    """Rows that each add one change to the row before, or to the named base row (their
    overrides accumulate); :data:`RECIPE_BASES` remembers which row each one changed."""
    rows: dict[str, Row] = {}
    previous: Row | None = None
    for name, title, change, *base in steps:
        before = rows[base[0]] if base else previous
        overrides = (*(before.overrides if before else ()), *change)
        rows[name] = previous = Row(name, f"ResNet-101: {title}", overrides, teacher=None,
                                    trains_teacher=True, seeds=(0,))  # fmt: skip
        RECIPE_BASES[name] = before.name if before else None
    return tuple(rows.values())


RECIPE_BASES: dict[str, str | None] = {}
RECIPE_ROWS = _cumulative(_RECIPE)


@dataclass(frozen=True)
class Suite:
    """A set of rows run and tabulated together, and the differences its write-up states."""

    rows: tuple[Row, ...]
    pairs: tuple[tuple[str, str, str], ...]


SUITES = {
    "ablation": Suite(ROWS, (
        ("teacher", "ce", "teacher vs CE student (must be clearly positive)"),
        ("teacher_r18", "ce", "ResNet-18 teacher vs CE student"),
        ("kd_r18t", "ce", "KD vs CE, ResNet-18 teacher"),
        ("lsd_r18t", "kd_r18t", "LS-KD vs KD, ResNet-18 teacher"),
        ("conkd_lion_r18t", "lsd_r18t", "adding SupCon with Lion, ResNet-18 teacher"),
        ("kd", "ce", "KD vs CE"),
        ("lsd", "kd", "LS-KD vs KD (LS paper: LS-KD > KD)"),
        ("lsd_supcon_adamw", "lsd", "adding SupCon (AdamW)"),
        ("conkd_lion", "lsd_supcon_adamw", "Lion vs AdamW (LS-KD + SupCon)"),
        ("conkd_lion_mix", "conkd_lion", "consistent mixing (function matching), mission's method"),
        ("sweep_best", "conkd_lion", "the sweep's best setting vs the defaults"),
        ("conkd_lion", "ce", "the mission's method vs CE only"),
    )),
    "recipes": Suite(RECIPE_ROWS, tuple(
        (r.name, base, f"{r.title.removeprefix('ResNet-101: ')} ({r.name} vs {base})")
        for r in RECIPE_ROWS if (base := RECIPE_BASES[r.name])
    )),
}  # fmt: skip


# --- commands ----------------------------------------------------------------------------------


def common(s: Settings, row: Row, seed: int) -> list[str]:
    """Overrides every run of the protocol shares: data, size, speed switches, bookkeeping."""
    epochs = s.teacher_epochs if row.trains_teacher else s.student_epochs
    args = [
        "dataset=imagefolder",
        f"dataset.root={s.data.resolve()}",
        f"dataset.image_size={s.image_size}",
        f"trainer.epochs={epochs}",
        f"trainer.precision={s.precision}",  # bf16 + channels_last: 1.71x (ResNet-101) / 1.48x
        f"trainer.channels_last={str(s.precision == 'bf16').lower()}",  # on an AMX CPU
        "trainer.progress=false",
        f"seed={seed}",
        f"mlflow.experiment_name={s.experiment}",
        f"++mlflow.tags.protocol={s.name}",
        f"++mlflow.tags.row={row.name}",
    ]
    if s.tracking_uri:
        args.append(f"mlflow.tracking_uri={s.tracking_uri}")
    if row.teacher:
        args.append(f"teacher_ckpt={s.teacher_ckpt(row.teacher).resolve()}")
    return args


def fast_precision() -> str:
    """bf16 (with channels_last) where it runs natively, on a GPU or a CPU with AMX or
    AVX512-BF16 (1.5-1.7x a float32 step, ``benchmarks/switches.py``); 32 elsewhere, where bf16
    is emulated (7x slower than float32 for a ResNet-101 at 32 px on a 2-core AVX2 EPYC)."""
    import torch

    if torch.cuda.is_available():
        return "bf16"
    caps = torch.cpu.get_capabilities()
    return "bf16" if caps.get("amx_bf16") or caps.get("avx512_bf16") else "32"


def command(s: Settings, row: Row, seed: int, best: dict[str, Any] | None = None) -> list[str]:
    """The ``train.py`` arguments of one (row, seed); ``best``: the sweep's best parameters."""
    args = [*row.overrides, *common(s, row, seed)]
    if row.sweep:
        args = [
            "-m", *args,
            f"hydra.sweeper.n_trials={s.trials}",
            f"hydra.sweeper.storage={s.storage}",
            f"hydra.sweeper.study_name={s.study}",
            f"hydra.sweep.dir={(s.dir / row.name).resolve()}",
        ]  # fmt: skip
    else:
        args.append(f"hydra.run.dir={(s.dir / row.name / f'seed{seed}').resolve()}")
    if best:
        args += [f"{k}={v}" for k, v in best.items()]
    return [*args, *s.extra]


# --- what is done -------------------------------------------------------------------------------


def client_for(s: Settings) -> Any:
    from mlflow import MlflowClient

    from conkd.tracking import resolve_store

    uri, _ = resolve_store(ROOT, s.tracking_uri)
    return MlflowClient(uri)


def finished_runs(client: Any, s: Settings) -> dict[str, dict[int, Any]]:
    """``{row: {seed: run}}`` of the protocol's FINISHED runs (the newest per seed)."""
    exp = client.get_experiment_by_name(s.experiment)
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.protocol = '{s.name}' and attributes.status = 'FINISHED'",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )
    out: dict[str, dict[int, Any]] = {}
    for r in runs:
        row, seed = r.data.tags.get("row"), r.data.params.get("seed")
        if row and seed is not None and "mlflow.parentRunId" not in r.data.tags:
            out.setdefault(row, {})[int(seed)] = r
    return out


def sweep_state(s: Settings) -> tuple[Any, int]:
    """The protocol's Optuna study (None before it exists) and its trials that count towards
    ``trials``: finished, pruned or failed (an interrupted one is re-run by the sweeper)."""
    import optuna

    from conkd.sweep import open_storage
    from hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper import count_trials

    if not (s.dir / "optuna.db").is_file():
        return None, 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=s.study, storage=open_storage(s.storage))
    except KeyError:
        return None, 0
    # RUNNING trials are not counted: nothing else runs this protocol's sweep, so they are orphans
    return study, count_trials(study, running=False)[0]


def best_params(study: Any) -> dict[str, Any] | None:
    """The sweep's best finished trial's overrides (pruned trials have no final value)."""
    if study is None or not any(t.state.name == "COMPLETE" for t in study.trials):
        return None
    return dict(study.best_trial.params)


def plan(s: Settings, rows: Sequence[Row], client: Any) -> list[tuple[Row, int, list[str] | str]]:
    """Each selected (row, seed) with its command, or why it does not run now (done, or waiting
    for the teacher or the sweep)."""
    done = finished_runs(client, s)
    study, counted = sweep_state(s)
    best = best_params(study) if counted >= s.trials else None
    steps: list[tuple[Row, int, list[str] | str]] = []
    for row in rows:
        for seed in row.seeds or s.seeds:
            if row.sweep and counted >= s.trials:
                why: str | None = f"done ({counted} of {s.trials} trials)"
            elif not row.sweep and seed in done.get(row.name, {}):
                why = f"done (run {done[row.name][seed].info.run_id})"
            elif row.teacher and 0 not in done.get(row.teacher, {}):
                why = f"waits for {row.teacher}"
            elif row.name == "sweep_best" and best is None:
                why = "waits for the sweep"
            else:
                why = None
            extra = best if row.name == "sweep_best" else None
            steps.append((row, seed, why or command(s, row, seed, extra)))
    return steps


def run_rows(s: Settings, rows: Sequence[Row], dry_run: bool = False) -> int:
    """Run every (row, seed) not yet finished, in order, each planned when its turn comes (so a
    row sees the teacher or sweep that ran before it); stop at the first failure."""
    client = client_for(s)
    ran = 0
    for row in rows:
        for _, seed, cmd in plan(s, [row], client):
            label = f"{row.name} seed {seed}"
            if isinstance(cmd, str):
                print(f"[protocol] {label}: {cmd}", flush=True)
                continue
            line = " ".join(["python train.py", *cmd])
            if dry_run:
                print(f"[protocol] {label}: {line}", flush=True)
                continue
            log = s.dir / row.name / f"seed{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[protocol] {label}: running (log {log})", flush=True)
            start = time.monotonic()
            with log.open("a") as f:
                f.write(f"\n$ {line}\n")
                f.flush()
                rc = subprocess.call(
                    [sys.executable, str(ROOT / "train.py"), *cmd], cwd=ROOT, stdout=f, stderr=f
                )
            if rc != 0:
                print(f"[protocol] {label}: failed (exit {rc}); see {log}", file=sys.stderr)
                return -1
            minutes = (time.monotonic() - start) / 60
            print(f"[protocol] {label}: done in {minutes:.1f} min", flush=True)
            ran += 1
    return ran


# --- the table ----------------------------------------------------------------------------------


@dataclass
class Result:
    row: Row
    seeds: list[int]
    test_top1: list[float]
    test_top5: list[float]
    best_val: list[float]
    epochs: int
    image_size: int
    train_min: float  # mean over seeds of the summed per-epoch training time
    device: str
    curves: list[list[float]]  # val/top1 per epoch, per seed
    command: str


def _history(client: Any, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def collect(client: Any, s: Settings) -> list[Result]:
    """One Result per row with finished runs, in protocol order."""
    done = finished_runs(client, s)
    study, _ = sweep_state(s)
    out = []
    for row in s.rows:
        runs = done.get(row.name, {})
        if row.sweep or not runs:
            continue
        seeds = sorted(runs)
        rs = [runs[k] for k in seeds]
        epoch_times = [sum(_history(client, r.info.run_id, "train/epoch_time_s")) for r in rs]
        params = rs[0].data.params
        extra = best_params(study) if row.name == "sweep_best" else None
        cmd = [*row.overrides, *(f"{k}={_fmt_param(v)}" for k, v in (extra or {}).items())]
        out.append(
            Result(
                row=row,
                seeds=seeds,
                test_top1=[r.data.metrics["test/top1"] for r in rs],
                test_top5=[r.data.metrics["test/top5"] for r in rs],
                best_val=[r.data.metrics.get("best/val/top1", math.nan) for r in rs],
                epochs=int(params.get("trainer.epochs", 0)),
                image_size=int(params.get("dataset.image_size", 0)),
                train_min=statistics.fmean(epoch_times) / 60,
                device=rs[0].data.tags.get("conkd.device", "-"),
                curves=[_history(client, r.info.run_id, "val/top1") for r in rs],
                command=" ".join(cmd),
            )
        )
    return out


def _fmt_param(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_acc(values: Sequence[float]) -> str:
    m, sd = mean_spread(values)
    if len(values) == 1:
        return f"{m:.2f}"
    return f"{m:.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def comparisons(results: Sequence[Result], suite: str = "ablation") -> list[str]:
    """The differences the papers make claims about, each marked against the seed spread."""
    by = {r.row.name: r for r in results}
    lines = []
    for a, b, what in SUITES[suite].pairs:
        if a not in by or b not in by:
            continue
        (ma, sa), (mb, sb) = mean_spread(by[a].test_top1), mean_spread(by[b].test_top1)
        diff = ma - mb
        if max(len(by[a].test_top1), len(by[b].test_top1)) < 2:
            # one seed has no spread: say so rather than call any difference significant
            lines.append(f"- {what}: {diff:+.2f} points (one seed: no spread to judge it by)")
            continue
        noise = max(sa, sb)
        verdict = "within the seed spread" if abs(diff) <= noise else "larger than the seed spread"
        lines.append(f"- {what}: {diff:+.2f} points ({verdict}, spread {noise:.2f})")
    return lines


def sweep_lines(s: Settings) -> list[str]:
    """Trial counts, pruning savings (epochs run against every trial run to the end) and the
    best setting of the protocol's study."""
    study, counted = sweep_state(s)
    if study is None:
        return []
    states = [t.state.name for t in study.trials]
    # only ended trials: a running one has not yet been pruned or run to the end
    ended = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    run = sum(len(t.intermediate_values) for t in ended)
    full = len(ended) * s.student_epochs
    best = best_params(study)
    lines = [
        f"- trials: {counted} counted of {s.trials} ("
        + ", ".join(f"{states.count(k)} {k.lower()}" for k in sorted(set(states)))
        + ")",
        f"- epochs run: {run} of {full} ({1 - run / full:.0%} saved by pruning)" if full else "",
    ]
    if best:
        lines.append(f"- best val top-1 {study.best_value:.2f} (trial {study.best_trial.number}): "
                     + ", ".join(f"`{k}={_fmt_param(v)}`" for k, v in best.items()))  # fmt: skip
    return [x for x in lines if x]


def plot_curves(results: Sequence[Result], path: Path) -> Path:
    """Validation top-1 per epoch, mean over seeds, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        n = min(len(c) for c in r.curves)
        mean = [statistics.fmean(c[i] for c in r.curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", ms=3, label=r.row.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _portable(arg: str) -> str:
    """``key=/abs/path`` shown relative to the project root: the README holds on any machine."""
    key, _, value = arg.partition("=")
    return f"{key}={os.path.relpath(value, ROOT)}" if os.path.isabs(value) else arg


def section(s: Settings, results: Sequence[Result], figures: dict[str, Path], rel: Path) -> str:
    """The README section: settings, table, comparisons, sweep, figures."""
    shown = BY_NAME["kd"] if s.suite == "ablation" else s.rows[0]
    shared_args = [*common(s, shown, 0), *s.extra]  # --set values reach every run
    shared = " ".join(_portable(a) for a in shared_args if "=" in a)
    what = (
        f"teacher {s.teacher_epochs} epochs, students {s.student_epochs} epochs, seeds "
        f"{', '.join(map(str, s.seeds))}"
        if s.suite == "ablation"
        else f"suite `{s.suite}`, every row a teacher of {s.teacher_epochs} epochs, seed 0"
    )
    lines = [
        f"Protocol `{s.name}`: {s.image_size} px, {what}. Every row is "
        f"`python train.py <row overrides> <shared overrides>` with the shared overrides (seed 0; "
        f"`seed=`, `hydra.run.dir` and `++mlflow.tags.row=` change per run):",
        "",
        f"    {shared}",
        "",
        "| row | test top-1 (mean ± sd, per seed) | test top-5 | best val top-1 | epochs | px "
        "| train time / run | device | row overrides |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        top5 = statistics.fmean(r.test_top5)
        val = statistics.fmean(r.best_val)
        lines.append(
            f"| {r.row.title} | {fmt_acc(r.test_top1)} | {top5:.2f} | {val:.2f} | {r.epochs} "
            f"| {r.image_size} | {r.train_min:.1f} min | {r.device} | `{r.command}` |"
        )
    lines += ["", *short_of_seeds(s, results), *comparisons(results, s.suite)]
    sweep = sweep_lines(s)
    if sweep:
        lines += ["", "Sweep (`hparams_search=conkd_lion`, pruning on, cache shared by trials):",
                  "", *sweep]  # fmt: skip
    for title, path in figures.items():
        lines += ["", f"![{title}]({os.path.relpath(path, rel)})"]
    return "\n".join(lines)


def short_of_seeds(s: Settings, results: Sequence[Result]) -> list[str]:
    """A line naming the rows whose seeds did not all finish (a run cut by a time limit, or one
    that failed): the header gives the planned seeds, and a one-seed mean looks like any other."""
    short = [
        f"{r.row.title} ({', '.join(map(str, r.seeds))} of {', '.join(map(str, planned))})"
        for r in results
        if set(planned := r.row.seeds or s.seeds) - set(r.seeds)
    ]
    return [f"- seeds that finished, where not all did: {'; '.join(short)}"] if short else []


def write_section(readme: Path, name: str, body: str) -> str:
    """Replace the text between the protocol's markers in ``readme`` (appended when absent);
    returns the block written, markers included."""
    start, end = f"<!-- protocol:{name}:start -->", f"<!-- protocol:{name}:end -->"
    text = readme.read_text() if readme.is_file() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Imagenette ablation ({name})\n\n{block}\n"
    readme.write_text(text)
    return block


def tabulate(
    s: Settings, readme: Path, figures_dir: Path, section_out: Path | None = None
) -> list[Result]:
    """Write the section into ``readme`` (and, as it stands there, into ``section_out``)."""
    results = collect(client_for(s), s)
    if not results:
        raise SystemExit(f"no finished runs of protocol {s.name} in {s.experiment}")
    figures = {"validation top-1 per epoch": plot_curves(
        results, figures_dir / f"{s.name}_val_curves.png")}  # fmt: skip
    for src, title in (
        ("sweep_param_importances.png", "sweep: parameter importances"),
        ("sweep_objective_per_trial.png", "sweep: objective per trial"),
    ):
        if (s.dir / "sweep" / src).is_file():
            dest = figures_dir / f"{s.name}_{src}"
            shutil.copyfile(s.dir / "sweep" / src, dest)
            figures[title] = dest
    block = write_section(readme, s.name, section(s, results, figures, readme.parent))
    if section_out is not None:
        section_out.write_text(block + "\n")
    return results


# --- command line -------------------------------------------------------------------------------


def select(names: str | None, suite: str = "ablation") -> list[Row]:
    rows = SUITES[suite].rows
    if not names:
        return [r for r in rows if not r.optional]
    by = {r.name: r for r in rows}
    unknown = [n for n in names.split(",") if n not in by]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(by)}")
    return [by[n] for n in names.split(",")]


def settings(args: argparse.Namespace) -> Settings:
    return Settings(
        name=args.name,
        data=Path(args.data),
        out=Path(args.out),
        image_size=args.image_size,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        seeds=tuple(int(x) for x in args.seeds.split(",")),
        trials=args.trials,
        tracking_uri=args.tracking_uri,
        extra=tuple(args.set or ()),
        suite=args.suite,
        precision=fast_precision() if args.precision == "auto" else args.precision,
    )


def parse(argv: Iterable[str] | None = None) -> argparse.Namespace:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("action", choices=("run", "status", "table"))
    ap.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default=d.suite,
        help="ablation: the KD rows; recipes: the teacher recipe, one change a row",
    )
    ap.add_argument(
        "--precision",
        choices=("auto", "bf16", "32"),
        default="auto",
        help="auto: bf16 + channels_last where bf16 is native (GPU, AMX or "
        "AVX512-BF16 CPU), else 32; a protocol keeps one value for all its runs",
    )
    ap.add_argument("--rows", help="comma-separated, of: "
                    + "; ".join(f"{k}: {', '.join(r.name for r in v.rows)}"
                                for k, v in SUITES.items()))  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--name", default=d.name)
    ap.add_argument("--data", default=str(d.data))
    ap.add_argument("--out", default=str(d.out))
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs)
    ap.add_argument("--student-epochs", type=int, default=d.student_epochs)
    ap.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    ap.add_argument("--trials", type=int, default=d.trials)
    ap.add_argument("--tracking-uri", default=None, help="default: the project's mlruns/ store")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="an override appended to every command (repeatable)")  # fmt: skip
    ap.add_argument("--readme", default=str(README))
    ap.add_argument("--figures", default=str(FIGURES))
    ap.add_argument(
        "--section-out",
        type=Path,
        default=None,
        help="table: also write the section, markers included, to this file",
    )
    return ap.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse(argv)
    s = settings(args)
    if args.action == "table":
        results = tabulate(s, Path(args.readme), Path(args.figures), args.section_out)
        print(f"wrote {len(results)} rows into {args.readme}")
        return 0
    if not (s.data / "train").is_dir():
        raise SystemExit(f"no class-folder dataset at {s.data} (expected train/ and val/)")
    if args.action == "status":
        for row, seed, cmd in plan(s, select(args.rows, s.suite), client_for(s)):
            print(f"{row.name:<18} seed {seed}  {cmd if isinstance(cmd, str) else 'to run'}")
        return 0
    return 1 if run_rows(s, select(args.rows, s.suite), args.dry_run) < 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
