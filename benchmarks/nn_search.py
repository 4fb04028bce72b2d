"""Exact nearest-neighbour search (pipeline.core.metrics.nearest_neighbors) against the machine's own
float32 matrix-multiply throughput, both measured in this process.

The search is a chunked |r|^2 - 2 q r^T with a running top-k; its useful work is the 2*M*N*D
flops of the product, so the ratio of the two rates says how much the chunking, top-k and merging
cost on top of the unavoidable matmul (goal: >= 0.7).  With several threads, run it on
an otherwise idle machine: the search's many small tensor ops wait on a thread that another
process has taken far more than the one large matmul does.

    python benchmarks/nn_search.py [--train 50000 --queries 2000 --dim 256 --k 50]
"""
import argparse
import os
import statistics
import time

import torch

from pipeline.core.metrics import nearest_neighbors


def all_times(fns, repeats: int) -> list[list[float]]:
    """Wall times of each function, the functions taking turns so that a change in load from
    other processes hits all of them alike; the minimum is the least disturbed run."""
    for fn in fns:
        fn()  # warm-up: first-call allocations, thread pool start
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=50000, help="reference set size N")
    ap.add_argument("--queries", type=int, default=2000, help="query count M")
    ap.add_argument("--dim", type=int, default=256, help="values per image D (16x16x1 = 256)")
    ap.add_argument("--k", type=int, default=50, help="neighbours (50: the IET-AGC paper's official score)")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    reference = torch.rand(args.train, args.dim, generator=g) * 2 - 1
    queries = torch.rand(args.queries, args.dim, generator=g) * 2 - 1
    flops = 2.0 * args.queries * args.train * args.dim
    print(f"M={args.queries} queries, N={args.train} reference, D={args.dim}, k={args.k}, "
          f"chunk={args.chunk}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    # (a) the bare product the search cannot avoid, in the same chunk shape it uses, written into
    # a reused buffer: the best a matmul-based search could do on this machine.
    cq, cr = min(args.chunk, args.queries), min(args.chunk, args.train)
    buf = torch.empty(cq * cr)

    def matmul_only():
        for q0 in range(0, args.queries, args.chunk):
            q = queries[q0:q0 + args.chunk]
            for r0 in range(0, args.train, args.chunk):
                r = reference[r0:r0 + args.chunk]
                torch.mm(q, r.T, out=buf[: len(q) * len(r)].view(len(q), len(r)))

    def search():
        nearest_neighbors(queries, reference, args.k, chunk=args.chunk)

    times_mm, times_nn = all_times([matmul_only, search], args.repeats)
    t_mm, t_nn = min(times_mm), min(times_nn)
    mm_rate, nn_rate = flops / t_mm / 1e9, flops / t_nn / 1e9
    print(f"(a) float32 matmul             {mm_rate:8.1f} GFLOP/s  ({t_mm:.3f} s)")
    print(f"(b) nearest_neighbors          {nn_rate:8.1f} GFLOP/s  ({t_nn:.3f} s, 2*M*N*D flops counted)")
    print(f"ratio (b)/(a)                  {nn_rate / mm_rate:8.2f}  (goal >= 0.7; of the medians "
          f"{statistics.median(times_mm) / statistics.median(times_nn):.2f}, load average now "
          f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
