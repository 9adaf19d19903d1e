"""PNG figures the stages write: importance heatmaps, the search space, the Pareto front."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def importance_heatmap(heads, neurons, thresholds: list[float], path: Path) -> None:
    """Layers × units (units sorted by importance), shaded by how many thresholds keep them."""
    heads, neurons = np.asarray(heads), np.asarray(neurons)
    kept_heads = sum((np.sort(heads, axis=1)[:, ::-1] > t).astype(int) for t in thresholds)
    kept_neurons = sum((np.sort(neurons, axis=1)[:, ::-1] > t).astype(int) for t in thresholds)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(heads) + 2), gridspec_kw={"width_ratios": [1, 3]})
    for axis, kept, title in ((axes[0], kept_heads, "attention heads"), (axes[1], kept_neurons, "FFN neurons")):
        image = axis.imshow(kept, aspect="auto", cmap="viridis", vmin=0, vmax=len(thresholds), interpolation="nearest")
        axis.set_title(f"{title} (sorted by importance)")
        axis.set_xlabel("unit rank")
        axis.set_ylabel("layer")
    colorbar = fig.colorbar(image, ax=axes, ticks=range(len(thresholds) + 1))
    colorbar.set_label("thresholds keeping the unit (of " + ", ".join(f"{t:.3g}" for t in thresholds) + ")")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def space_heatmap(widths: np.ndarray, full: tuple[int, int], labels: list[str], path: Path) -> None:
    """Kept share of heads and neurons per layer (rows) for every MACs target (columns)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * widths.shape[1] + 2.5))
    for axis, unit, total, title in ((axes[0], 0, full[0], "heads kept"), (axes[1], 1, full[1], "neurons kept")):
        share = widths[:, :, unit].T / total
        axis.imshow(share, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        for (row, col), value in np.ndenumerate(widths[:, :, unit].T):
            axis.text(col, row, str(value), ha="center", va="center", fontsize=7, color="cyan")
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axis.set_ylabel("layer")
        axis.set_title(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def pareto_plot(points: list[dict], front: list[dict], teacher: dict | None, metric: str, path: Path) -> None:
    """Metric vs GMACs of every evaluated subnet, the Pareto front highlighted, the teacher marked."""
    fig, axis = plt.subplots(figsize=(7, 5))
    axis.scatter([p["gmacs"] for p in points], [p["score"] for p in points], s=12, c="lightgray", label="subnets")
    ordered = sorted(front, key=lambda p: p["gmacs"])
    axis.plot([p["gmacs"] for p in ordered], [p["score"] for p in ordered], "o-", c="tab:red", label="Pareto front")
    if teacher is not None:
        axis.scatter([teacher["gmacs"]], [teacher["score"]], marker="*", s=160, c="tab:blue", label="teacher")
    axis.set_xlabel("GMACs per sequence")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
