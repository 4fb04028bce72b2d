"""How much generated images copy the training set, and how good they look.

Memorization is measured in pixel space against the training images (docs/method.md#metrics):
- the NN1/NN2 ratio test (Yoon et al. 2023; Gu et al. 2023): a sample is memorized iff its distance
  to the nearest training image is below 1/3 of its distance to the second nearest;
- the official score of the IET-AGC paper (Liu et al., ECCV 2024): d^2(x, NN1) / mean of
  d^2(x, NN_k) over the 50 nearest, counted below a range of thresholds.
Quality is a Frechet distance and a KID in some feature space (features.py gives a fast one).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MEMORIZED_RATIO = 1.0 / 3.0
OFFICIAL_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GROUP = 16  # block columns per group: one group's values are one 64-byte row of float32


def nearest_neighbors(queries: Tensor, reference: Tensor, k: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of every query in `reference` by squared L2 over flattened vectors.

    Returns (squared distances [M, k] ascending, indices [M, k] int64 into reference), k = min(k, N),
    computed on the device of `queries`.  Memory stays at about chunk x chunk distances whatever M
    and N are: the M x N matrix never exists.  The returned distances are recomputed directly (so
    they are exact and >= 0); the matrix-product form only chooses the neighbours.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q_all, r_all = _flat_pair(queries, reference)
    m_total, n_total = len(q_all), len(r_all)
    k = min(k, n_total)
    # vecdot multiplies into an [N, D] temporary: by blocks it stays in cache (9x faster at N = 50k).
    neg_r_sq = torch.cat([torch.linalg.vecdot(r, r) for r in r_all.split(4096)]).neg_()
    rows, cols = min(chunk, m_total), min(chunk, n_total)
    # One buffer for every block: a fresh 64 MB allocation costs page faults that show up in the
    # throughput.  (Wider blocks when M < chunk, at the same memory, merged less often but gained
    # nothing: above 32 MiB glibc maps every allocation afresh, 27 ms of faults for 64 MB.)
    block_buf = torch.empty(rows * -(-cols // GROUP) * GROUP, device=q_all.device, dtype=q_all.dtype)
    out_i = torch.empty(m_total, k, device=q_all.device, dtype=torch.int64)
    for q0 in range(0, m_total, rows):
        out_i[q0:q0 + rows] = _search_rows(q_all[q0:q0 + rows], r_all, neg_r_sq, k, cols, block_buf)
    # Left at -1 only where a row has fewer than k non-NaN similarities (a NaN query): any
    # image will do there, its distance being NaN too.
    out_i = torch.where(out_i < 0, torch.arange(k, device=out_i.device), out_i)
    out_d = _exact_sq_dists(q_all, r_all, out_i)
    out_d, order = out_d.sort(dim=1)
    return out_d, out_i.gather(1, order)


def _flat_pair(queries: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets flattened, on the queries' device, in float32 at least: distances of uint8 or half
    images would overflow or lose every near-copy."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    q_all = queries.flatten(1).to(dtype)
    r_all = reference.flatten(1).to(device=queries.device, dtype=dtype)
    if q_all.shape[1] != r_all.shape[1]:
        raise ValueError(f"queries have {q_all.shape[1]} values each, reference {r_all.shape[1]}")
    if len(r_all) == 0:
        raise ValueError("reference is empty")
    return q_all, r_all


def _search_rows(q: Tensor, r_all: Tensor, neg_r_sq: Tensor, k: int, cols: int,
                 block_buf: Tensor) -> Tensor:
    """Indices [len(q), k] (unsorted) of the k reference rows of largest 2 q.r - |r|^2, i.e. of
    smallest |q - r|^2, over blocks of `cols` reference rows at a time.

    |q|^2 is the same along a row, so it cannot change the ranking; it is left out (no cancellation
    against it), and the winners' distances are recomputed exactly afterwards.  The sign is flipped
    so that a group's best is its max, which max_pool1d takes in one pass.
    """
    m = len(q)
    best_s = q.new_full((m, k), -torch.inf)
    best_i = torch.full((m, k), -1, device=q.device, dtype=torch.int64)
    for r0 in range(0, len(r_all), cols):
        r = r_all[r0:r0 + cols]
        width = -(-len(r) // GROUP) * GROUP
        block = block_buf[: m * width].view(m, width)
        torch.addmm(neg_r_sq[r0:r0 + cols].unsqueeze(0), q, r.T, alpha=2.0, out=block[:, :len(r)])
        block[:, len(r):] = -torch.inf  # a ragged tail, past a multiple of GROUP: never a candidate
        best_s, best_i = _merge_block(block, r0, best_s, best_i)
    return best_i


def _merge_block(block: Tensor, offset: int, best_s: Tensor, best_i: Tensor) -> tuple[Tensor, Tensor]:
    """The k largest of each row of (running best, block), unsorted; block column j is reference
    index offset + j.

    A plain topk over the block costs nearly as much as the matmul that made it (at D = 256), so
    the block is read once, for the max of each group of GROUP adjacent columns, and only the groups
    whose max reaches the row's threshold are opened: values below the running k-th best cannot
    enter.  Before the running best is full (the first block), the threshold is the k-th largest
    group max instead: the k groups at or above it hold k values at or above it, so the row's k
    best do too.  After the first block few groups per row pass (on average k * block / seen), so
    the survivors are handled as a flat list (nonzero, in row order) and laid out in a rectangle
    only for the final topk.  Testing each blocked distance against the running k-th best before
    it may enter is what FAISS's brute-force search does (HeapBlockResultHandler in
    faiss/impl/ResultHandler.h; Johnson et al. 2019, arXiv:1702.08734); the group max lets the
    test run on whole groups with tensor ops.
    """
    m, width = block.shape
    k = best_s.shape[1]
    groups = width // GROUP
    # Adjacent, not interleaved, columns: a passing group's values are then one 64-byte copy.
    group_max = F.max_pool1d(block, GROUP)
    thr = best_s.amin(1, keepdim=True)
    if offset == 0 and groups >= k:  # a NaN group max (a NaN image) vouches for nothing
        thr = group_max.nan_to_num(-torch.inf).topk(k, 1, sorted=False).values.amin(1, keepdim=True)
    # While thr is -inf (fewer than k values seen), the clamp keeps the -inf tail padding out.
    thr = thr.clamp_(min=torch.finfo(block.dtype).min)
    # "not below" rather than ">=": a group with a NaN is opened, and only its NaN stays out.
    rows, grp = (group_max < thr).logical_not_().nonzero(as_tuple=True)
    values = block.view(m * groups, GROUP).index_select(0, rows * groups + grp)
    hits = (values >= thr[rows]).view(-1).nonzero().squeeze(1)  # flat: a third faster than 2-d
    group = hits // GROUP
    cols = grp[group] * GROUP + hits % GROUP + offset
    cand_s, cand_i = _rows_to_rect(rows[group], values.view(-1)[hits], cols, m)
    if cand_s.shape[1] == 0:
        return best_s, best_i
    best_s, pos = torch.cat([best_s, cand_s], 1).topk(k, 1, sorted=False)
    return best_s, torch.cat([best_i, cand_i], 1).gather(1, pos)


def _rows_to_rect(rows: Tensor, values: Tensor, cols: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """A flat list of (row, value, col) entries, rows ascending, as [m, c] rectangles of values and
    cols, c the longest row's count; the shorter rows are padded with -inf / -1."""
    counts = torch.bincount(rows, minlength=m)
    c = int(counts.max()) if len(rows) else 0
    pos = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    rect_s = values.new_full((m, c), -torch.inf)
    rect_s[rows, pos] = values
    rect_i = cols.new_full((m, c), -1)
    rect_i[rows, pos] = cols
    return rect_s, rect_i


def _exact_sq_dists(q_all: Tensor, r_all: Tensor, idx: Tensor) -> Tensor:
    """d^2 of each query to its k found neighbours by direct subtraction.

    The expansion |q|^2 + |r|^2 - 2 q.r loses about 1e-7 * |q|^2 in float32, which is all of the
    distance of a near-copy: exactly the case the memorization scores exist for.  This is M * k * D
    work against the search's M * N * D; small row blocks keep the gathered rows in cache.
    """
    k, dim = idx.shape[1], q_all.shape[1]
    rows = max(1, (1 << 20) // (k * dim))
    out = torch.empty(idx.shape, device=q_all.device, dtype=q_all.dtype)
    for s in range(0, len(q_all), rows):
        diff = r_all.index_select(0, idx[s:s + rows].reshape(-1)).view(-1, k, dim)
        diff.sub_(q_all[s:s + rows].unsqueeze(1))
        out[s:s + rows] = torch.linalg.vecdot(diff, diff)
    return out


def memorization_scores(samples: Tensor, train: Tensor, k_official: int = 50) -> dict[str, np.ndarray]:
    """Per sample: 'nn1', 'nn2' (L2 distances), 'ratio' = nn1/nn2, 'official', 'nn1_index'.

    samples [M, C, H, W] and train [N, C, H, W] must be on the same scale (e.g. [-1, 1]).
    """
    if len(train) < 2:
        raise ValueError("the NN1/NN2 test needs at least two training images")
    k_eff = min(k_official, len(train))
    sq, idx = nearest_neighbors(samples, train, max(k_eff, 2))
    sq = sq.double().cpu().numpy()
    nn1, nn2 = np.sqrt(sq[:, 0]), np.sqrt(sq[:, 1])
    # nn2 == 0 means nn1 == 0 too (a duplicated training image, copied exactly): both tests must call
    # that a copy, so 0/0 is scored 0 rather than NaN.
    ratio = np.divide(nn1, nn2, out=np.zeros_like(nn1), where=nn2 > 0)
    mean_k = sq[:, :k_eff].mean(1)
    official = np.divide(sq[:, 0], mean_k, out=np.zeros_like(mean_k), where=mean_k > 0)
    return {
        "nn1": nn1,
        "nn2": nn2,
        "ratio": ratio,
        "official": official,
        "nn1_index": idx[:, 0].cpu().numpy(),
    }


def summarize(scores: dict, prefix: str = "") -> dict[str, float]:
    """'mem_ratio' (fraction memorized by the NN1/NN2 test: the headline), 'mean_nn1', and
    'official_below_<t>' for each threshold, all as fractions, keys prefixed with `prefix`."""
    ratio, official = np.asarray(scores["ratio"]), np.asarray(scores["official"])
    out = {
        "mem_ratio": float(np.mean(ratio < MEMORIZED_RATIO)),
        "mean_nn1": float(np.mean(scores["nn1"])),
    }
    for t in OFFICIAL_THRESHOLDS:
        out[f"official_below_{t}"] = float(np.mean(official < t))
    return {prefix + key: value for key, value in out.items()}


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of feature rows, as frechet_distance fits them."""
    x = np.asarray(feats, np.float64)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as in the FID papers and pytorch-fid."""
    return gaussian_frechet_distance(gaussian(feats_a), gaussian(feats_b), eps)


def gaussian_frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                              eps: float = 1e-6) -> float:
    """frechet_distance between two fitted gaussians (`gaussian`): a fixed reference is fitted once."""
    (mu_a, cov_a), (mu_b, cov_b) = a, b
    import scipy.linalg  # here, not at the top: the NN search must import without scipy (benchmarks/gpu.py)

    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Fewer samples than dimensions, or dead features, make the product singular; the usual
        # fix (pytorch-fid) is a small diagonal offset.
        offset = np.eye(len(cov_a)) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # Round-off gives the square root of a PSD product tiny imaginary parts; they mean nothing.
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 10,
                              subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al.
    2018), averaged over `subsets` random subsets of min(subset_size, len(a), len(b)) each."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    dim = a.shape[1]
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two samples in each set")
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        # Unbiased: the within-set means leave out the diagonal (a point's kernel with itself).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within - 2.0 * k_xy.mean())
    return float(np.mean(estimates))
