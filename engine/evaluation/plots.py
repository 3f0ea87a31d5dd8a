"""The report's figures: perplexity against context length, and passkey heatmaps (rows depth, columns length)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(series: dict[str, list[tuple[int, float]]], path: Path, native: int | None = None) -> Path:
    """One line per model, log2 length axis; the native context is marked when known."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
    if native:
        ax.axvline(native, color="grey", linestyle=":", label=f"native context ({native})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (sliding window)")
    ax.set_title("Perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_passkey_heatmaps(
    matrices: dict[str, list[list[float | None]]], depths: list[float], lengths: list[int], path: Path
) -> Path:
    """Side-by-side needle-in-a-haystack heatmaps, red (0) to green (1), each cell annotated with its accuracy."""
    plt = _pyplot()
    import numpy as np

    n = max(len(matrices), 1)
    fig, axes = plt.subplots(
        1, n, figsize=(1.2 + 0.8 * len(lengths) * n + 1.0, 0.45 * len(depths) + 1.8), squeeze=False
    )
    image = None
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        image = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey: {name}")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
