"""How much generated images copy the training set, and how good they look.

Memorization is measured in pixel space against the training images (method.md, "Metrics"):
- the NN1/NN2 ratio test (Yoon et al. 2023; Gu et al. 2023): a sample is memorized iff its distance
  to the nearest training image is below 1/3 of its distance to the second nearest;
- the official P1 score: d^2(x, NN1) / mean of d^2(x, NN_k) over the 50 nearest, counted below a
  range of thresholds.
Quality is a Frechet distance and a KID in some feature space (features.py gives a fast one).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MEMORIZED_RATIO = 1.0 / 3.0
OFFICIAL_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GROUP = 16  # distance-block columns per group when nearest_neighbors prunes a chunk


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
    device, dtype = q_all.device, q_all.dtype
    m_total, n_total = len(q_all), len(r_all)
    k = min(k, n_total)
    r_sq = torch.linalg.vecdot(r_all, r_all)  # no [N, D] temporary

    # One buffer for every distance block: a fresh 64 MB allocation per block costs page faults
    # that show up in the throughput.
    block_buf = torch.empty(min(chunk, m_total) * min(chunk, n_total), device=device, dtype=dtype)
    out_i = torch.empty(m_total, k, device=device, dtype=torch.int64)

    for q0 in range(0, m_total, chunk):
        q = q_all[q0:q0 + chunk]
        best_d = best_i = None
        for r0 in range(0, n_total, chunk):
            r = r_all[r0:r0 + chunk]
            # |r|^2 - 2 q.r in one addmm.  |q|^2 is the same along a row, so it cannot change the
            # ranking; it is left out (no cancellation against it), and the winners' distances are
            # recomputed exactly below.
            block = block_buf[: len(q) * len(r)].view(len(q), len(r))
            torch.addmm(r_sq[r0:r0 + chunk].unsqueeze(0), q, r.T, beta=1.0, alpha=-2.0, out=block)
            best_d, best_i = _merge_top_k(block, r0, best_d, best_i, k)
        out_i[q0:q0 + chunk] = best_i

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


def _merge_top_k(block: Tensor, offset: int, best_d: Tensor | None, best_i: Tensor | None,
                 k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of each row of (running best, block), unsorted; block column j is reference
    index offset + j.

    A plain topk over the block costs nearly as much as the matmul that made it (at D = 256), so
    most of the block is ruled out first.  The columns are split into interleaved groups of GROUP
    and each group's min taken (one cheap pass).  The k smallest values of a row lie in its k groups
    with the smallest mins (a group outside them has its min, and so all its values, no smaller than
    k values in other groups), and only values below the row's current k-th best can enter at all,
    which after the first chunk few groups hold.  So look inside the c groups with the smallest
    mins, c the most groups that any row needs (at most k): exact, with rectangular shapes.
    """
    m, n = block.shape
    stride = n // GROUP  # number of groups; group g holds columns g, g + stride, g + 2 * stride, ...
    if n % GROUP or stride <= k:
        cand_d, cand_i = block.topk(min(k, n), dim=1, largest=False, sorted=False)
        cand_i += offset
    else:
        group_min = block.view(m, GROUP, stride).amin(1)
        if best_d is None or best_d.shape[1] < k:
            c = k
        else:
            kth_best = best_d.amax(1, keepdim=True)
            c = min(k, int((group_min < kth_best).sum(1).max()))
            if c == 0:
                return best_d, best_i
        _, groups = group_min.topk(c, dim=1, largest=False, sorted=False)
        cols = (groups.unsqueeze(2) + stride * torch.arange(GROUP, device=block.device)).view(m, -1)
        cand_d, cand_i = block.gather(1, cols), cols.add_(offset)
    if best_d is None and cand_d.shape[1] <= k:
        return cand_d, cand_i
    if best_d is None:  # the first block's c groups hold c * GROUP candidates: keep the k best
        best_d, pos = cand_d.topk(k, dim=1, largest=False, sorted=False)
        return best_d, cand_i.gather(1, pos)
    d = torch.cat([best_d, cand_d], 1)
    i = torch.cat([best_i, cand_i], 1)
    best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=False)
    return best_d, i.gather(1, pos)


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


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as in the FID papers and pytorch-fid."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
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
