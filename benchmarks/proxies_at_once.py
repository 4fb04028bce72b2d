"""K proxies one after another in one process against the same round loop spread over several
processes (`accelerate launch`, gloo on a CPU), on the same data and params.

    python benchmarks/proxies_at_once.py [--params params.yaml] [--rounds 1] [--processes 2]
    python benchmarks/proxies_at_once.py --stacked     # train.stack_proxies true, in this process

This process times the sequential loop (train.threads threads), then launches itself under
accelerate with --processes ranks of threads // processes threads each (the same cores, never
oversubscribed) and reads rank 0's timing of the same loop; it also reports the launch's whole
wall time, start-up and imports included, and checks that both runs end with the same weights.
With --stacked the other run is the same process training its proxies stacked (pipeline/train/stacked.py,
one vmapped step for all K) instead, and the weights are compared within float rounding.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from safetensors.torch import load_file

from pipeline.train import rounds
from pipeline.core.config import load_params
from pipeline.core.data import prepare_splits
from pipeline.core.distributed import Ranks
from pipeline.train.ensemble import split_shards


def _params(params_path: str, n_rounds: int, threads: int | None):
    base = load_params(params_path)
    return base.model_copy(update={
        "iet": base.iet.model_copy(update={"rounds": n_rounds}),
        "train": base.train.model_copy(update={"threads": threads or base.train.threads})})


def _timed_run(p, out: Path, ranks: Ranks) -> float:
    train = prepare_splits(p.data, p.seeds.data).train
    shard = split_shards(train.labels, p.iet.shards, p.seeds.split)
    ranks.barrier()
    start = time.perf_counter()
    rounds.run(p, rounds.Plan.iet(p), train, shard, out / "out", out / "state", ranks=ranks)
    return time.perf_counter() - start


@click.command()
@click.option("--params", "params_path", default="params.yaml")
@click.option("--rounds", "n_rounds", default=1, show_default=True)
@click.option("--processes", default=2, show_default=True)
@click.option("--stacked", is_flag=True, help="compare with train.stack_proxies true instead of several processes")
@click.option("--worker", type=click.Path(), default=None, hidden=True)
def main(params_path, n_rounds, processes, stacked, worker):
    if worker:  # one rank of the launched run
        p = _params(params_path, n_rounds, int(os.environ["BENCH_THREADS"]))
        ranks = Ranks.from_environment()
        seconds = _timed_run(p, Path(worker), ranks)
        if ranks.is_main:
            (Path(worker) / "seconds.json").write_text(json.dumps({"seconds": seconds}))
        return

    p = _params(params_path, n_rounds, None)
    if stacked:
        return _stacked(p)
    threads = p.train.threads
    per_rank = max(1, threads // processes)
    plan = rounds.Plan.iet(p)
    images = plan.shards * plan.rounds * plan.steps_per_round * p.train.batch_size
    print(f"{plan}; {images} training images in all; {threads} threads, or {processes} processes x {per_rank}")
    with tempfile.TemporaryDirectory() as tmp:
        seq = _timed_run(p, Path(tmp) / "seq", Ranks())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "BENCH_THREADS": str(per_rank), "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                        __file__, "--params", params_path, "--rounds", str(n_rounds),
                        "--worker", f"{tmp}/par"], env=env, check=True)
        launch = time.perf_counter() - start
        par = json.loads((Path(tmp) / "par/seconds.json").read_text())["seconds"]
        a = load_file(f"{tmp}/seq/out/model/unet/diffusion_pytorch_model.safetensors")
        b = load_file(f"{tmp}/par/out/model/unet/diffusion_pytorch_model.safetensors")
        same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"one after another, 1 process x {threads} threads : {seq:7.1f} s  ({images / seq:6.1f} images/s)")
    print(f"at once, {processes} processes x {per_rank} threads         : {par:7.1f} s  ({images / par:6.1f} images/s)"
          f"; {launch:.1f} s with process start-up")
    print(f"speed-up at once / one after another = {seq / par:.2f} (round loop), {seq / launch:.2f} (with start-up)")
    print(f"same final weights: {same}" + ("" if same else " (thread counts differ: float sums may round differently)"))


def _stacked(p) -> None:
    plan = rounds.Plan.iet(p)
    images = plan.shards * plan.rounds * plan.steps_per_round * p.train.batch_size
    together = p.model_copy(update={"train": p.train.model_copy(update={"stack_proxies": "true"})})
    sequential = p.model_copy(update={"train": p.train.model_copy(update={"stack_proxies": "false"})})
    print(f"{plan}; {images} training images in all; {p.train.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        seq = _timed_run(sequential, Path(tmp) / "seq", Ranks())
        at_once = _timed_run(together, Path(tmp) / "stacked", Ranks())
        a = load_file(f"{tmp}/seq/out/model/unet/diffusion_pytorch_model.safetensors")
        b = load_file(f"{tmp}/stacked/out/model/unet/diffusion_pytorch_model.safetensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"one after another: {seq:7.1f} s  ({images / seq:6.1f} images/s)")
    print(f"stacked (vmap)   : {at_once:7.1f} s  ({images / at_once:6.1f} images/s)")
    print(f"speed-up stacked / one after another = {seq / at_once:.2f}; largest weight difference {diff:.2e}")


if __name__ == "__main__":
    main()
