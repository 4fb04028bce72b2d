"""De-duplication: groups of exact (and near) duplicates in the training set, and memorization
measured against it de-duplicated (data.duplicates, which adds duplicated samples, is pipeline/core/data.py's).

The NN1/NN2 ratio test (Yoon et al. 2023; Gu et al. 2023; metrics.memorization_scores) has a blind
spot: a training image stored twice is its own second nearest neighbour, so a generated copy of it
has NN2 = NN1 (ratio ~1) and is never counted, although duplicated images are the ones most often
copied (Carlini et al. 2023, "Extracting Training Data from Diffusion Models"; Somepalli et al.
2023). docs/method.md#duplicates therefore runs the test against one representative per group of
pixel-identical training images, and counts per training image how many samples copy it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core import metrics
from pipeline.core.data import group_by_key

# metric keys (pipeline/evaluate/metric_names.py lists them with their labels)
DUPLICATE_GROUPS = "duplicate_groups"
LARGEST_GROUP = "largest_group"
DUPLICATED_SAMPLES = "duplicated_samples"
UNIQUE_IMAGES = "unique_images"
DISTINCT_COPIED = "distinct_copied"
COPIES_ON_DUPLICATED_SHARE = "copies_on_duplicated_share"


@dataclass(frozen=True, eq=False)
class DuplicateGroups:
    group: np.ndarray            # int64 [N]: group id of each training position
    representatives: np.ndarray  # int64 [G]: first position of each group; groups numbered in that order
    sizes: np.ndarray            # int64 [G]: images in each group

    def summary(self) -> dict[str, int]:
        dup = self.sizes > 1
        return {
            DUPLICATE_GROUPS: int(dup.sum()),
            LARGEST_GROUP: int(self.sizes.max(initial=0)),
            DUPLICATED_SAMPLES: int(self.sizes[dup].sum()),
            UNIQUE_IMAGES: int(len(self.sizes)),
        }


def duplicate_groups(images: np.ndarray) -> DuplicateGroups:
    """Groups of pixel-identical images (uint8 [N, ...]), numbered in order of first appearance.

    The raw bytes of each image are the dictionary key, so equal keys mean equal images: no hash
    collision can merge two different images.
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    group, representatives = group_by_key(row.tobytes() for row in flat)
    return DuplicateGroups(group, representatives, np.bincount(group, minlength=len(representatives)))


def dedup_memorization_scores(samples: torch.Tensor, train: torch.Tensor, groups: DuplicateGroups,
                              k_official: int = 50) -> dict[str, np.ndarray]:
    """metrics.memorization_scores against train[groups.representatives] (docs/method.md#duplicates).

    Returns the same keys, with 'nn1_index' a position in `train` (the representative of the
    nearest group, so without duplicates every key equals the plain scores) and 'nn1_group' the
    group id. The official score's 50 nearest are then 50 distinct images.
    """
    reps = torch.from_numpy(groups.representatives)
    scores = metrics.memorization_scores(samples, train[reps], k_official=k_official)
    # position i of the reduced reference is group i (groups are numbered by first appearance)
    scores["nn1_group"] = scores["nn1_index"].astype(np.int64)
    scores["nn1_index"] = groups.representatives[scores["nn1_group"]]
    return scores


def copy_counts(scores: dict, groups: DuplicateGroups) -> list[dict]:
    """One row per unique training image: 'group', 'position' (representative), 'size',
    'copies' (samples with ratio < MEMORIZED_RATIO whose NN1 is this image) and 'nearest'
    (samples whose NN1 is this image). `scores` from dedup_memorization_scores (or plain
    memorization_scores: its nn1_index is mapped to groups the same way)."""
    nn1_group = groups.group[np.asarray(scores["nn1_index"], dtype=np.int64)]
    copied = np.asarray(scores["ratio"]) < metrics.MEMORIZED_RATIO
    g = len(groups.sizes)
    nearest = np.bincount(nn1_group, minlength=g)
    copies = np.bincount(nn1_group[copied], minlength=g)
    return [{"group": i, "position": int(groups.representatives[i]), "size": int(groups.sizes[i]),
             "copies": int(copies[i]), "nearest": int(nearest[i])} for i in range(g)]


def copy_headline(table: list[dict]) -> dict[str, float]:
    """'distinct_copied': training images copied at least once; 'copies_on_duplicated_share':
    the share of all copies that fall on images stored more than once (NaN when there are no
    copies or no duplicated images: the share says nothing then)."""
    copies = np.array([row["copies"] for row in table], dtype=np.int64)
    dup = np.array([row["size"] > 1 for row in table], dtype=bool)
    total = int(copies.sum())
    share = copies[dup].sum() / total if total and dup.any() else math.nan
    return {DISTINCT_COPIED: int((copies > 0).sum()), COPIES_ON_DUPLICATED_SHARE: float(share)}


def near_duplicate_groups(images: np.ndarray, threshold: float, chunk: int = 1024) -> DuplicateGroups:
    """Groups of exact and near duplicates: pixel-identical images, joined (transitively) with any
    image whose RMS pixel distance to one of them, in [0, 1] units, is below `threshold`. Near
    copies are what a user's folder holds when an image was saved again resized or recompressed.
    Measured on MNIST at 16 px through the folder loader (iet.near_duplicate): copies resized to
    40 px and saved as JPEG at quality 75 lie 0.014 (median) to 0.017 from their originals, while
    the closest two distinct images of 2,000 lie 0.0225 apart; threshold 0 gives the exact groups."""
    exact = duplicate_groups(images)
    reps = _unit_pixels(images[exact.representatives])
    parent = np.arange(len(reps))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if threshold > 0:
        for start in range(0, len(reps), chunk):  # chunks bound the distance matrix
            d = rms_distances(reps[start:start + chunk], reps)
            for i, j in zip(*np.nonzero((d < threshold).numpy())):
                a, b = root(start + int(i)), root(int(j))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    merged = np.array([root(i) for i in range(len(reps))])
    group, representatives = group_by_key(int(m).to_bytes(8, "little") for m in merged[exact.group])
    return DuplicateGroups(group, representatives, np.bincount(group, minlength=len(representatives)))


def _unit_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, ...] as float64 rows [N, pixels] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1)).double() / 255


def rms_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMS pixel distance between every row of `a` and of `b` (_unit_pixels): what near_duplicate_groups
    compares with its threshold."""
    return torch.cdist(a, b) / a.shape[1] ** 0.5


def near_copy_report(images: np.ndarray, original: np.ndarray, chunk: int = 1024) -> dict:
    """How far data.duplicates' near copies lie from their originals beside how far distinct images lie
    from each other, and which near_duplicate thresholds (dedup.near_duplicate, iet.near_duplicate)
    join every copy with its original and no two distinct images. `original`: each position's
    original's position (its own for an image that is not an added copy); distinct: different
    originals that are not pixel-identical.

    near_duplicate_groups joins images closer than t (single linkage), so a threshold t does both
    exactly when catch_above < t <= merges_at: catch_above, the largest link a group of copies needs
    (the longest edge of each group's minimum spanning tree), merges_at, the least distance between
    two images of different groups (copies included)."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    exact = duplicate_groups(images)
    truth = exact.group[original]  # a copy belongs where its original does
    pixels = _unit_pixels(images)
    copies = np.flatnonzero(original != np.arange(len(images)))
    to_original = ((pixels[copies] - pixels[original[copies]]).pow(2).mean(1).sqrt()).numpy()
    catch = 0.0
    for g in np.unique(truth[copies]):
        members = exact.representatives[np.unique(exact.group[truth == g])]  # pixel-identical ones once
        tree = minimum_spanning_tree(rms_distances(pixels[members], pixels[members]).numpy())
        catch = max(catch, float(tree.max()) if tree.nnz else 0.0)
    originals = np.unique(exact.group[np.unique(original)])
    distinct = pixels[exact.representatives[originals]]
    between, merges = [], math.inf
    for start in range(0, len(images), chunk):  # chunks bound the distance matrices
        d = rms_distances(pixels[start:start + chunk], pixels).numpy()
        other = truth[start:start + chunk, None] != truth[None, :]
        merges = min(merges, float(d[other].min(initial=math.inf)))
    for start in range(0, len(distinct), chunk):
        d = rms_distances(distinct[start:start + chunk], distinct).numpy()
        rows = np.arange(start, start + len(d))[:, None]
        between.append(d[rows < np.arange(len(distinct))[None, :]])  # each pair once
    between = np.concatenate(between) if between else np.zeros(0)
    works = catch < merges
    return {"copies": [{"position": int(c), "original": int(original[c]), "rms": float(r)}
                       for c, r in zip(copies, to_original)],
            "rms_to_original": _spread(to_original),
            "distinct_images": {"pairs": int(len(between)), **_spread(between, (0.0, 0.01, 0.5))},
            "thresholds": {"catch_above": catch, "merges_at": merges if math.isfinite(merges) else None,
                           "any_works": bool(works),
                           "suggested": (catch + merges) / 2 if works else None}}


def _spread(values: np.ndarray, quantiles=(0.0, 0.5, 1.0)) -> dict[str, float]:
    names = {0.0: "min", 0.01: "p1", 0.5: "median", 1.0: "max"}
    if not len(values):
        return {names[q]: math.nan for q in quantiles}
    return {names[q]: float(np.quantile(values, q)) for q in quantiles}
