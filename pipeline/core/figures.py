"""Pictures people look at: sample grids, copies beside their nearest training image, histograms.

Figures are drawn on matplotlib's Agg canvas directly rather than through pyplot, so importing this
module changes no global backend and keeps no figures alive between calls.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from PIL import Image

from pipeline.core.data import to_uint8
from pipeline.core.io import atomic_path
from pipeline.core.metrics import MEMORIZED_RATIO

MIN_SHOWN_PIXELS = 64  # small images are upscaled (nearest) to at least this size in grids


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def _tile(arr: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] image on white."""
    n, h, w, c = arr.shape
    nrow = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(arr):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_grid(images: torch.Tensor, path, nrow: int = 16) -> None:
    """A plain grid of images [N, C, H, W] in [-1, 1], upscaled so that 16x16 images are visible."""
    arr = _to_uint8(images)
    scale = max(1, math.ceil(MIN_SHOWN_PIXELS / arr.shape[1]))
    pil = _pil(_tile(arr, nrow))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def _save_figure(fig: Figure, path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def save_copies_figure(samples: torch.Tensor, train: torch.Tensor, scores: dict, path, top: int = 16) -> None:
    """The `top` generated samples with the lowest NN1/NN2 ratio (most copy-like), each beside its
    nearest training image, with the ratio under the pair (red when it counts as memorized)."""
    ratio = np.asarray(scores["ratio"])
    order = np.argsort(ratio, kind="stable")[:top]
    nn1 = np.asarray(scores["nn1_index"])[order]
    gen = _to_uint8(samples[torch.as_tensor(order, dtype=torch.long)])
    near = _to_uint8(train[torch.as_tensor(nn1, dtype=torch.long)])
    gap = np.full((gen.shape[1], 1, gen.shape[3]), 255, np.uint8)  # white line between the two
    gray = gen.shape[-1] == 1

    cols = min(8, max(1, len(order)))
    rows = max(1, math.ceil(len(order) / cols))
    fig = Figure(figsize=(1.6 * cols, 1.15 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, i in enumerate(order):
        ax = axes.flat[j]
        pair = np.concatenate([gen[j], gap, near[j]], axis=1)
        ax.imshow(pair[..., 0] if gray else pair, cmap="gray" if gray else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        copied = ratio[i] < MEMORIZED_RATIO
        ax.set_xlabel(f"{ratio[i]:.3f}", fontsize=8, color="red" if copied else "black")
    fig.suptitle("generated (left) beside its nearest training image (right); NN1/NN2 ratio below,\n"
                 "red: < 1/3, counted as memorized", fontsize=8)
    _save_figure(fig, path)


def save_most_copied(train: torch.Tensor, table: list[dict], path, top: int = 16) -> None:
    """The training images the samples copy most, each with its copy count and how often it is
    stored in the training set (dedup.copy_counts rows); a note when nothing is copied."""
    rows = sorted((r for r in table if r["copies"] > 0), key=lambda r: (-r["copies"], r["group"]))[:top]
    cols = min(8, max(1, len(rows)))
    fig = Figure(figsize=(1.3 * cols, 1.35 * max(1, math.ceil(len(rows) / cols)) + 0.5))
    axes = fig.subplots(max(1, math.ceil(len(rows) / cols)), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not rows:
        axes.flat[0].text(0.5, 0.5, "no sample copies a training image", ha="center", va="center", fontsize=8)
    images = _to_uint8(train[torch.as_tensor([r["position"] for r in rows], dtype=torch.long)]) if rows else []
    for ax, row, img in zip(axes.flat, rows, images):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{row['copies']} copies" + (f"\n(x{row['size']} in train)" if row["size"] > 1 else ""),
                     fontsize=7)
    fig.suptitle("most-copied training images (NN1/NN2 < 1/3 against the de-duplicated set)", fontsize=8)
    _save_figure(fig, path)


def save_risk(rows: list[dict], path) -> None:
    """Per unique training image: IET's mean AGC skip rate against how often the baseline copies it,
    duplicated images marked apart (comparison.risk_table rows)."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    for dup, marker, label in ((False, "o", "stored once"), (True, "s", "duplicated in train")):
        pts = [r for r in rows if (r["size"] > 1) == dup]
        if pts:
            ax.scatter([r["iet_skip_rate"] for r in pts], [r["baseline_copies"] for r in pts], marker=marker,
                       s=18, alpha=0.6, label=f"{label} ({len(pts)})")
    ax.set_xlabel("IET AGC skip rate (mean over rounds)")
    ax.set_ylabel("baseline samples copying it")
    ax.legend(fontsize=7)
    _save_figure(fig, path)


def save_curves(curves: dict[str, list[dict]], path, x_label: str, y_label: str,
                reference: float | None = None) -> None:
    """Memorization against quality over training: per model (label -> its rounds.csv rows) a line
    through its checkpoints' (`fd`, `mem_ratio`) in training order, a larger marker at the last;
    `reference`, the held-out images' ratio, as a dotted line."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = False
    for i, (label, rows) in enumerate(curves.items()):
        points = [(r["fd"], r["mem_ratio"]) for r in rows if math.isfinite(r["fd"]) and math.isfinite(r["mem_ratio"])]
        if points:
            fd, mem = zip(*points)
            ax.plot(fd, mem, color=f"C{i}", linewidth=1, marker=".", markersize=4, label=label)
            ax.plot(fd[-1:], mem[-1:], color=f"C{i}", marker="o", markersize=6)
            drawn = True
    if drawn:
        _log_x(ax)  # FD spans decades over training
    _finish_curve_axes(ax, drawn, reference, x_label, y_label,
                       "Memorization vs quality over training: a point per checkpoint, large the last")
    _save_figure(fig, path)


def save_frontiers(frontiers: dict[str, dict], path, x_label: str, y_label: str, reference: float | None = None,
                   title: str = "Memorization-quality frontiers: checkpoints, frontier, 95% bootstrap band") -> None:
    """Each model's memorization-quality frontier (label -> comparison.frontier_lines' dict): its
    checkpoints as points, the frontier (the least memorization at that quality or better) as a
    line, its 95% bootstrap band shaded (none where low/high are NaN); `reference`, the held-out
    images' ratio, dotted."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (label, f) in enumerate(frontiers.items()):
        ax.plot(f["quality"], f["memorization"], color=f"C{i}", linestyle="none", marker=".", markersize=4)
        ax.plot(f["levels"], f["frontier"], color=f"C{i}", linewidth=1.5, label=label)
        ax.fill_between(f["levels"], f["low"], f["high"], color=f"C{i}", alpha=0.2, linewidth=0)
    if frontiers and all(np.min(f["levels"]) > 0 and np.min(f["quality"]) > 0 for f in frontiers.values()):
        _log_x(ax)  # KID spans decades over training (unbiased, it can fall below 0 near real images' own)
    _finish_curve_axes(ax, bool(frontiers), reference, x_label, y_label, title)
    _save_figure(fig, path)


def _finish_curve_axes(ax, drawn: bool, reference: float | None, x_label: str, y_label: str, title: str) -> None:
    """The held-out reference line, a note where there is no curve, labels, legend and title."""
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="k", linestyle=":", linewidth=1, label="held-out real images")
    if not drawn:
        ax.text(0.5, 0.5, "no checkpoint curve (eval.curve_samples is 0)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)


def _log_x(ax) -> None:
    """A log x axis labelled with plain numbers at 1, 2, 5 x 10^k (not 10^k only, in math text)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def save_ratio_histogram(gen_scores: dict, heldout_scores: dict, path) -> None:
    """NN1/NN2 ratio of generated vs held-out real images; left of the line at 1/3 is memorized."""
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    bins = np.linspace(0, 1, 51)  # ratio = nn1 / nn2 lies in [0, 1]
    for scores, label in ((gen_scores, "generated"), (heldout_scores, "held-out real")):
        r = np.asarray(scores["ratio"])
        share = float(np.mean(r < MEMORIZED_RATIO)) if len(r) else float("nan")
        ax.hist(r, bins=bins, alpha=0.55, density=True, label=f"{label} (n={len(r)}, {share:.1%} < 1/3)")
    ax.axvline(MEMORIZED_RATIO, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("NN1 / NN2 distance ratio to the training set")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def save_skip_histogram(skip_rate: np.ndarray, path) -> None:
    """How often AGC skipped each sample in a round."""
    fig = Figure(figsize=(4, 2.5))
    ax = fig.subplots()
    ax.hist(np.asarray(skip_rate), bins=np.linspace(0, 1, 21))
    ax.set_xlabel("AGC skip rate in the round")
    ax.set_ylabel("samples")
    _save_figure(fig, path)


def save_side_by_side(train: np.ndarray, copied: list[dict], samples: dict[str, np.ndarray], path,
                      shown: int = 32, top: int = 8) -> None:
    """What a person reads at a glance: each model's first `shown` samples side by side, then the
    `top` training images the first model (the baseline) copies most, each beside every model's
    nearest sample to it and its L2 distance (the same images: a model that copies them less shows
    its nearest attempt). Images uint8 [N, H, W, C]; `copied`: the baseline's copied.csv rows with
    each image's index in `train` as 'position'."""
    from pipeline.core.metrics import nearest_neighbors

    ranked = sorted(copied, key=lambda r: (-r["copies"], -r["nearest"]))[:top]
    targets = train[[int(r["position"]) for r in ranked]]
    names = list(samples)
    found = [_nearest(samples[name], targets, nearest_neighbors) for name in names]
    fig = Figure(figsize=(3.2 * len(names), 3.0 + 0.62 * len(ranked)))
    grid = fig.add_gridspec(2, len(names), height_ratios=[2.6, 0.62 * max(len(ranked), 1)])
    for col, name in enumerate(names):
        _show(fig.add_subplot(grid[0, col]), _tile(samples[name][:shown], 8), f"{name}: samples")
    if not ranked:
        return _save_figure(fig, path)
    cells = np.stack([img for i in range(len(ranked)) for img in (targets[i], *(f[0][i] for f in found))])
    ax = fig.add_subplot(grid[1, :])
    _show(ax, _tile(cells, 1 + len(names)), "the images the baseline copies most,\nbeside each model's nearest sample")
    step = targets.shape[1] + 1  # a tile and its white line
    ax.set_xticks([(j + 0.5) * step for j in range(1 + len(names))],
                  ["training image", *names], fontsize=7, rotation=30, ha="right")
    ax.set_yticks([(i + 0.5) * step for i in range(len(ranked))],
                  [f"copied {int(r['copies'])}x; L2 " + " / ".join(f"{f[1][i]:.2f}" for f in found)
                   for i, r in enumerate(ranked)], fontsize=7)
    _save_figure(fig, path)


def _nearest(samples: np.ndarray, targets: np.ndarray, search) -> tuple[np.ndarray, np.ndarray]:
    """Each target's nearest sample and its L2 distance in [0, 1] pixel units."""
    if not len(targets):
        return samples[:0], np.zeros(0)
    dist, index = search(_unit(targets), _unit(samples), 1)
    return samples[index[:, 0].numpy()], dist[:, 0].sqrt().numpy()


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).flatten(1)


def _show(ax, image: np.ndarray, title: str) -> None:
    gray = image.shape[-1] == 1
    ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
