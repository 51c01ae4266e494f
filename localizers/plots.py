"""Pictures of a localizer's output: a video's timeline over its features, and precision-recall curves.

Matplotlib (the optional ``plot`` extra) with the Agg back-end: files only, no display needed; the
format follows the file's suffix (.png, .pdf, .svg). Figures stay bounded (MAX_ROWS class rows, at most
MAX_PANELS PR panels) whatever the number of classes, and library warnings stay off the terminal.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

GT_COLOUR = "#222222"
MAX_ROWS = 20     # class rows of a timeline
MAX_PANELS = 16   # panels of a PR figure


def _quiet(draw):
    """Library warnings (tight_layout, empty legends, fonts) are not the user's business."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return draw(*args, **kwargs)
    return wrapper


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def class_colours(classes: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    return {name: cmap(k % cmap.N) for k, name in enumerate(classes)}


@_quiet
def draw_timeline(path: Path, video_id: str, duration: float, classes: Sequence[str],
                  ground_truth: Sequence[tuple[str, float, float]],
                  predictions: Sequence[tuple[str, float, float, float]],
                  features: np.ndarray, times: np.ndarray) -> None:
    """Ground truth and predicted segments per class (prediction score as opacity) above a heat map
    of the video's features (channels x time, each channel standardised over the video).

    ``ground_truth``: (label, start, end); ``predictions``: (label, score, start, end); ``features``
    (T, C) at the centre times ``times`` (T,) in seconds.
    """
    classes = list(classes)[:MAX_ROWS]
    ground_truth = [g for g in ground_truth if g[0] in classes]
    predictions = [p for p in predictions if p[0] in classes]
    colours = class_colours(classes)
    row = {name: k for k, name in enumerate(classes)}
    fig, (ax_seg, ax_feat) = plt.subplots(
        2, 1, figsize=(11, 1.2 + 0.55 * len(classes) + 2.6), sharex=True,
        gridspec_kw={"height_ratios": [0.55 * len(classes) + 0.4, 2.6]})
    for label, start, end in ground_truth:
        if end == start:  # a point event: a tick, not a bar of no width
            ax_seg.plot([start, start], [row[label] + 0.08, row[label] + 0.46], color=GT_COLOUR, linewidth=2.2)
            ax_seg.plot([start, start], [row[label] + 0.08, row[label] + 0.46], color=colours[label], linewidth=1.2)
            continue
        ax_seg.add_patch(Rectangle((start, row[label] + 0.08), end - start, 0.38, color=colours[label]))
        ax_seg.add_patch(Rectangle((start, row[label] + 0.08), end - start, 0.38, fill=False,
                                   edgecolor=GT_COLOUR, linewidth=0.8))
    # Weakest first, so strong predictions are drawn on top.
    for label, score, start, end in sorted(predictions, key=lambda p: p[1]):
        alpha = float(np.clip(score, 0.1, 1.0))
        if end == start:
            ax_seg.plot([start, start], [row[label] + 0.54, row[label] + 0.92], color=colours[label], alpha=alpha,
                        linewidth=1.6)
        else:
            ax_seg.add_patch(Rectangle((start, row[label] + 0.54), end - start, 0.38,
                                       color=colours[label], alpha=alpha, linewidth=0))
        ax_seg.text(start, row[label] + 0.9, f"{score:.2f}", fontsize=6, va="bottom")
    ax_seg.set_ylim(len(classes), 0)
    ax_seg.set_yticks(np.arange(len(classes)) + 0.5, list(classes))
    for k in range(1, len(classes)):
        ax_seg.axhline(k, color="#dddddd", linewidth=0.6)
    ax_seg.set_xlim(0, duration)
    ax_seg.set_title(f"{video_id}: ground truth (upper bar, outlined) and predictions (lower bar, "
                     f"opacity = score)", fontsize=10)
    ax_seg.legend(handles=[Patch(color=colours[c], label=c) for c in classes], loc="upper left",
                  bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)

    feats = np.asarray(features, dtype=np.float32).T
    feats = (feats - feats.mean(axis=1, keepdims=True)) / (feats.std(axis=1, keepdims=True) + 1e-6)
    half = (times[1] - times[0]) / 2 if len(times) > 1 else 0.5
    ax_feat.imshow(feats, aspect="auto", cmap="magma", interpolation="nearest", vmin=-2.5, vmax=2.5,
                   extent=(times[0] - half, times[-1] + half, feats.shape[0], 0))
    ax_feat.set_ylabel(f"feature channel\n({feats.shape[0]}, standardised)", fontsize=9)
    ax_feat.set_xlabel("time (s)")
    _save(fig, path)


@_quiet
def draw_pr_curves(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   tious: Sequence[float], ap: np.ndarray, tolerances: bool = False) -> None:
    """One panel per class, one precision-recall curve per tIoU threshold (``tolerances``: per time
    tolerance in seconds, point events); ``ap`` (n_threshold, n_class) in the order of ``curves``."""
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(tious)))
    panels = [(name, [(precision[i], recall[i], colours[i], f"{_threshold(t, tolerances)}: AP {100 * ap[i, k]:.1f}")
                      for i, t in enumerate(tious) if precision.size])
              for k, (name, (precision, recall)) in enumerate(curves.items())]
    kind = "time tolerance" if tolerances else "tIoU threshold"
    _pr_panels(path, f"Precision-recall per class at each {kind}", panels)


def _threshold(t: float, tolerances: bool) -> str:
    return f"tolerance {t:g} s" if tolerances else f"tIoU {t:.2f}"


@_quiet
def draw_pr_compare(path: Path, classes: Sequence[str], results: Mapping, tiou_index: int) -> None:
    """One panel per class, one precision-recall curve per run (``results``: label -> MapResult of the
    same ground truth) at the threshold ``tiou_index``."""
    colours = plt.get_cmap("tab10")
    panels = []
    for name in classes:
        lines = []
        for j, (label, r) in enumerate(results.items()):
            if name in r.classes:
                precision, recall = r.pr_curves()[name]
                if precision.size:
                    lines.append((precision[tiou_index], recall[tiou_index], colours(j % 10),
                                  f"{label}: AP {100 * r.ap[tiou_index, r.classes.index(name)]:.1f}"))
        panels.append((name, lines))
    first = next(iter(results.values()))
    points = hasattr(first, "tolerances")  # point events (localizers.point_map.PointMapResult)
    threshold = (first.tolerances if points else first.tious)[tiou_index]
    _pr_panels(path, f"Precision-recall per class at {_threshold(threshold, points)}", panels)


def _pr_panels(path: Path, title: str, panels: Sequence[tuple[str, Sequence[tuple]]]) -> None:
    """A grid of at most MAX_PANELS panels ``(class, [(precision, recall, colour, legend label)])``."""
    panels = list(panels)[:MAX_PANELS]
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for k, (name, lines) in enumerate(panels):
        ax = axes[k // cols, k % cols]
        for precision, recall, colour, label in lines:
            ax.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]),
                    color=colour, linewidth=1.2, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower left")
    for k in range(len(panels), rows * cols):
        axes[k // cols, k % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("recall")
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
