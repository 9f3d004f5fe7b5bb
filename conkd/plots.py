"""Figures logged with each run: learning curves and the test confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training loss terms (left) and validation top-1/top-5 (right) against epoch."""
    epochs = np.arange(1, len(history) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted(
        {k for h in history for k in h if k.startswith("train/")}
        - {"train/lr", "train/epoch_time_s", "train/throughput_img_s"}
    )
    for k in keys:
        ax_loss.plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=k[6:])
    if any("val/loss" in h for h in history):
        ax_loss.plot(epochs, [h.get("val/loss", np.nan) for h in history], "k--", label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss terms")
    ax_loss.legend(fontsize=8)
    for k in ("val/top1", "val/top5"):
        ax_acc.plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=k)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true class in rows), with counts annotated."""
    n = len(classes)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=color,
                    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_table(confusion: np.ndarray, classes: Sequence[str]) -> str:
    """Markdown-ish table of per-class accuracy (also printed by the evaluation command)."""
    support = confusion.sum(axis=1)
    acc = 100.0 * confusion.diagonal() / np.maximum(support, 1)
    width = max(len(c) for c in classes)
    lines = [f"{'class':<{width}}  support  top1", f"{'-' * width}  -------  ------"]
    lines += [f"{c:<{width}}  {s:7d}  {a:6.2f}" for c, s, a in zip(classes, support, acc)]
    return "\n".join(lines)


def save_axes(ax: Any, path: Path) -> Path:
    """Save the figure of a matplotlib Axes (e.g. one of Optuna's plots)."""
    fig = ax.get_figure()
    fig.set_size_inches(9, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parallel_coordinates(
    params: Sequence[Mapping[str, Any]],
    values: Sequence[float],
    path: Path,
    higher_is_better: bool = True,
) -> Path:
    """One line per trial across the swept parameters (log axis where a range spans >= 20x),
    coloured by the objective; categorical values are spread evenly on their axis."""
    if len(values) < 2:
        raise ValueError("need at least two finished trials")
    keys = sorted({k for p in params for k in p})
    columns = []
    labels = []
    for k in keys:
        col = [p.get(k) for p in params]
        if all(isinstance(v, (int, float)) for v in col):
            arr = np.asarray(col, dtype=float)
            log_scale = arr.min() > 0 and arr.max() / arr.min() >= 20
            arr = np.log10(arr) if log_scale else arr
            lo, hi = arr.min(), arr.max()
            columns.append((arr - lo) / (hi - lo) if hi > lo else np.full_like(arr, 0.5))
            labels.append(f"{k}{' (log)' if log_scale else ''}\n{min(col):.3g}..{max(col):.3g}")
        else:
            cats = sorted({str(v) for v in col})
            pos = {c: i / max(len(cats) - 1, 1) for i, c in enumerate(cats)}
            columns.append(np.array([pos[str(v)] for v in col]))
            labels.append(f"{k}\n{' | '.join(cats)}")
    vals = np.asarray(values, dtype=float)
    columns.append((vals - vals.min()) / max(vals.max() - vals.min(), 1e-12))
    labels.append(f"objective\n{vals.min():.3g}..{vals.max():.3g}")
    data = np.stack(columns, axis=1)
    order = np.argsort(vals if higher_is_better else -vals)  # best drawn last, on top
    cmap = plt.get_cmap("viridis" if higher_is_better else "viridis_r")
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4.5))
    norm = matplotlib.colors.Normalize(vals.min(), vals.max())
    for i in order:
        ax.plot(range(len(labels)), data[i], color=cmap(norm(vals[i])), alpha=0.8, lw=1.5)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks([])
    for x in range(len(labels)):
        ax.axvline(x, color="0.7", lw=0.8)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="objective")
    ax.set_title("sweep: parallel coordinates")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def importances(scores: Mapping[str, float], path: Path) -> Path:
    """Horizontal bars of parameter importances (largest on top)."""
    items = sorted(scores.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set(xlabel="importance (mean decrease in impurity)", title="sweep: parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
