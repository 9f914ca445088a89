"""Report plots (matplotlib, Agg backend: no display on cluster nodes)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tunesmith import fileio


def _plt():
    return fileio.pyplot()


def token_histogram(counts: dict[str, np.ndarray], path: str | Path, title: str = "Token counts") -> None:
    """One panel per field (instruction, output, combined) with median and p95 marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 3.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], counts.items()):
        values = np.asarray(values)
        if len(values):
            ax.hist(values, bins=min(60, max(5, len(np.unique(values)))), color="#4C72B0", edgecolor="white")
            med, p95 = np.median(values), np.percentile(values, 95)
            if values.max() > 4 * max(p95, 1):
                ax.set_yscale("log")  # a few very long rows would flatten the bulk to one bar
            ax.axvline(med, color="#DD8452", linestyle="--", label=f"median {med:.0f}")
            ax.axvline(p95, color="#C44E52", linestyle=":", label=f"p95 {p95:.0f}")
            ax.legend(fontsize=8)
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("tokens")
        ax.set_ylabel("rows")
    fig.suptitle(title)
    fig.tight_layout()
    fileio.save_figure(fig, path)
    plt.close(fig)


def similarity_histogram(sims: Sequence[float], threshold: float | None, path: str | Path,
                         title: str = "Nearest-neighbour cosine similarity") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sims = np.asarray(sims, dtype=float)
    if len(sims):
        ax.hist(sims, bins=50, range=(np.floor(float(sims.min()) * 10) / 10, 1.0), color="#4C72B0", edgecolor="white")
    if threshold is not None:
        above = int((sims >= threshold).sum()) if len(sims) else 0
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold} ({above} rows at or above)")
        ax.legend(fontsize=8)
    ax.set_xlabel("cosine similarity to the nearest other row")
    ax.set_ylabel("rows")
    ax.set_title(f"{title} (n={len(sims)})")
    fig.tight_layout()
    fileio.save_figure(fig, path)
    plt.close(fig)
