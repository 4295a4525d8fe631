"""Results a person can look at: metrics.jsonl readers and PNG plots (matplotlib optional)."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence


def read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def matplotlib_or_none():
    """pyplot with a file-only backend, or None (with a one-line note) when not installed."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("note: matplotlib is not installed, so no plot was written "
              "(pip install -e '.[plots]')")
        return None
    return plt


def plot_training(records: Sequence[dict], png_path: str, title: str = "") -> Optional[str]:
    """Loss (train steps, test per epoch) and accuracy curves from metrics.jsonl records."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (batch)",
                 alpha=0.7)
    ax_loss.plot([r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    train = [r for r in train if r.get("accuracy") is not None]      # none for non-class labels
    evals = [r for r in evals if r.get("test_accuracy") is not None]
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train (batch)",
                alpha=0.7)
    ax_acc.plot([r["step"] for r in evals], [r["test_accuracy"] for r in evals], "o-",
                label="test")
    segmented = [r for r in evals if r.get("test_miou") is not None]
    if segmented:                                       # per-pixel labels: the mIoU too
        ax_acc.plot([r["step"] for r in segmented], [r["test_miou"] for r in segmented], "s-",
                    label="test mIoU")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy",
               ylim=(max(0.0, min([r["test_accuracy"] for r in evals]
                                  + [r["test_miou"] for r in segmented] or [0.9]) - 0.05), 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_overlay(series: Dict[str, Sequence[float]], png_path: str, title: str,
                 ylabel: str = "training loss", diff_of: Optional[Sequence[str]] = None):
    """Curves of several runs on one axis, plus |a − b| below when ``diff_of=(a, b)``."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    rows = 2 if diff_of else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.2 * rows), squeeze=False)
    for name, ys in series.items():
        axes[0, 0].plot(range(len(ys)), ys, label=name, alpha=0.8)
    axes[0, 0].set(xlabel="step", ylabel=ylabel, title=title)
    axes[0, 0].legend()
    if diff_of:
        a, b = (series[k] for k in diff_of)
        diff = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
        axes[1, 0].semilogy(range(len(diff)), [max(d, 1e-16) for d in diff])
        axes[1, 0].set(xlabel="step", ylabel=f"|{diff_of[0]} − {diff_of[1]}| / |{diff_of[1]}|")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_gradient_norms(steps: Sequence[int], series: Dict[str, Sequence[float]], png_path: str,
                        title: str) -> Optional[str]:
    """One line per layer: gradient L2 norm against step, log scale."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, ys in series.items():
        ax.plot(steps, [max(y, 1e-30) for y in ys], label=name, alpha=0.85)
    ax.set(xlabel="step", ylabel="‖∂L/∂θ‖₂", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_segmentation(images, truth, predicted, png_path: str, title: str = "",
                      num_classes: int = 11) -> Optional[str]:
    """One row per canvas: the input image, the true classes, the predicted classes (one colour
    per class, background black), for ``images`` (B, H, W, 1), ``truth`` and ``predicted``
    (B, H, W) integer classes."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    import numpy as np  # noqa: PLC0415
    from matplotlib.colors import ListedColormap  # noqa: PLC0415
    colours = ListedColormap(["black"] + [plt.get_cmap("tab10")(i) for i in range(10)]
                             + ["white"] * max(0, num_classes - 11))
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for i in range(rows):
        panels = ((np.asarray(images[i])[..., 0], "gray", "input"),
                  (np.asarray(truth[i]), colours, "truth"),
                  (np.asarray(predicted[i]), colours, "prediction"))
        for ax, (panel, cmap, name) in zip(axes[i], panels):
            kw = {} if cmap == "gray" else {"vmin": 0, "vmax": colours.N - 1,
                                            "interpolation": "nearest"}
            ax.imshow(panel, cmap=cmap, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
    fig.suptitle(title + "\n(classes: 0 background black, digit d in tab10 colour d)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
