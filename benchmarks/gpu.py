"""Everything the project claims about a GPU, measured in one process, in at most ~8 minutes on one GPU:

- training images/s: a plain diffusers-style loop vs IET-AGC+ (the whole round loop: AGC, TAA, MSR,
  profile, averaging, checkpoints) vs IET-AGC+ with stacked proxies (when this checkout has
  train.stack_proxies), for the default small model (K=4) and the IET-AGC paper's official CIFAR-10 model
  (presets/p1-cifar10.yaml, K=10, bf16 autocast);
- DDIM sampling images/s: pipeline.evaluate.sampling.sample vs diffusers' DDIMPipeline on the same UNet;
- the NN search (pipeline.core.metrics.nearest_neighbors) against the device's matrix-multiply throughput.

It needs torch, diffusers, pydantic, Pillow, PyYAML, numpy, safetensors, tqdm (no MLflow, DVC, scipy
or click). A machine with torch and accelerate alone gets the rest as wheels, made on a machine with
the internet (Python version and platform of the GPU machine):

    pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \\
        -d wheels diffusers pydantic pydantic-core annotated-types typing-inspection pillow regex \\
        importlib-metadata zipp
    # on the GPU machine (wheels/ is git-ignored: carry it)
    pip install --no-index --find-links wheels diffusers pydantic pillow
    python benchmarks/gpu.py --json $OUT/gpu.json

`--smoke` runs every part at toy sizes on the CPU in seconds (tests/test_gpu_benchmark.py), to
check the script, never to report figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.train import rounds  # noqa: E402
from pipeline.core.config import Params, parse_params  # noqa: E402
from pipeline.core.data import ImageSet  # noqa: E402
from pipeline.train.ensemble import split_shards  # noqa: E402
from pipeline.core.models import build_scheduler, build_unet  # noqa: E402
from pipeline.train.training import AUTOCAST  # noqa: E402

# (model name, K, batch, steps per proxy, precision); smoke sizes shrink every number
FULL = {"small": ({}, 4, 64, 100, "fp32"), "official": ("preset", 10, 128, 12, "bf16")}
SMOKE = {"small": ({"block_out_channels": [8, 16], "attention": False}, 2, 4, 2, "fp32"),
         "official": ({"block_out_channels": [32, 32, 32, 32]}, 2, 2, 1, "bf16")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params(model: dict | str, k: int, batch: int, steps: int, precision: str, device: str, smoke: bool) -> Params:
    """params.yaml, or the official preset, at K proxies, batch and steps per proxy per round."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load((ROOT / "presets/p1-cifar10.yaml").read_text())
    if model == "preset" or smoke and "block_out_channels" in model and len(model["block_out_channels"]) == 4:
        for group, values in preset.items():
            raw[group].update(values)
        raw["data"].update(source="mnist5k", path=None, heldout_size=256)  # synthetic images: only their shape counts
    if isinstance(model, dict):
        raw["model"].update(model)
    # a shard of exactly one batch: local_epochs is then the steps per proxy and round
    raw["data"].update(train_size=k * batch, duplicates={"images": 0, "copies": 16})  # no extra samples
    raw["iet"].update(shards=k, rounds=1, local_epochs=steps)
    raw["train"].update(batch_size=batch, mixed_precision=precision, device=device, warmup_share=0.01)
    raw["eval"].update(ddim_steps=min(raw["eval"]["ddim_steps"], raw["model"]["num_train_timesteps"]))
    return parse_params(raw)


def _synthetic(p: Params) -> ImageSet:
    g = np.random.default_rng(0)
    n, c, r = p.data.train_size, p.data.channels, p.data.resolution
    return ImageSet(images=g.integers(0, 256, (n, c, r, r), dtype=np.uint8), labels=np.arange(n) % 10,
                    ids=np.arange(n))


def plain_loop(p: Params, images: torch.Tensor, steps: int, device: torch.device) -> float:
    """What a user writes without this project (sample, noise, MSE, Adam, clip, EMA), on the device,
    with the same autocast; images/s."""
    from diffusers.training_utils import EMAModel

    model = build_unet(p.model, p.data.resolution, p.data.channels, 0).to(device)
    sched = build_scheduler(p.model)
    opt = torch.optim.Adam(model.parameters(), lr=p.train.lr)
    ema = EMAModel(model.parameters(), decay=p.train.ema_decay, foreach=device.type != "cpu")
    g = torch.Generator(device).manual_seed(0)
    b, amp = p.train.batch_size, AUTOCAST.get(p.train.mixed_precision)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (b,), generator=g, device=device)]
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g, device=device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = model(sched.add_noise(x0, noise, t), t).sample
        torch.nn.functional.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    _sync(device)
    return steps * b / (time.perf_counter() - start)


def iet_run(p: Params, device: torch.device) -> float:
    """IET-AGC+, one round of the whole loop (checkpoint and final save included); images/s."""
    train = _synthetic(p)
    plan = rounds.Plan.iet(p)
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        start = time.perf_counter()
        rounds.run(p, plan, train, split_shards(train.labels, plan.shards, 0), f"{tmp}/out", f"{tmp}/state")
        _sync(device)
        seconds = time.perf_counter() - start
    return plan.shards * plan.rounds * plan.steps_per_round * p.train.batch_size / seconds


def training(name: str, spec: tuple, device: torch.device, smoke: bool) -> dict:
    model, k, batch, steps, precision = spec
    p = _params(model, k, batch, steps, precision, str(device), smoke)
    images = _synthetic(p).to_tensor().to(device)
    plain_loop(p, images, 2, device)  # warm-up: kernels chosen, memory allocated
    out = {"K": k, "batch": batch, "steps_per_proxy": steps, "precision": precision,
           "parameters": sum(q.numel() for q in build_unet(p.model, p.data.resolution, p.data.channels, 0).parameters())}
    plain = [plain_loop(p, images, k * steps, device)]
    out["iet_agc_plus"] = iet_run(p, device)
    plain.append(plain_loop(p, images, k * steps, device))
    out["plain"] = float(np.median(plain))
    out["ratio_iet_vs_plain"] = out["iet_agc_plus"] / out["plain"]
    if "stack_proxies" in type(p.train).model_fields:
        stacked = p.model_copy(update={"train": p.train.model_copy(update={"stack_proxies": "true"})})
        out["iet_stacked"] = iet_run(stacked, device)
        out["ratio_stacked_vs_sequential"] = out["iet_stacked"] / out["iet_agc_plus"]
    else:
        out["iet_stacked"] = "not in this checkout (train.stack_proxies)"
    print(f"[train {name}] {json.dumps(out)}", flush=True)
    return out


def sampling(name: str, spec: tuple, device: torch.device, smoke: bool) -> dict:
    """DDIM, eta 0, the same UNet and step count: ours vs diffusers' DDIMPipeline (its output
    moved to the host as numpy, as ours returns host tensors); images/s."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from pipeline.evaluate.sampling import sample

    model, _, _, _, precision = spec
    p = _params(model, 2, 1, 1, precision, str(device), smoke)
    unet = build_unet(p.model, p.data.resolution, p.data.channels, 0).to(device)
    sched = build_scheduler(p.model)
    n, steps = (4, 2) if smoke else (1024 if name == "small" else 256, 50)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    pipe.set_progress_bar_config(disable=True)
    sample(unet, sched, min(n, 8), 2, 0, batch_size=n, progress=False)  # warm-up
    timings = {}
    for name, fn in (("ours", lambda: sample(unet, sched, n, steps, 0, batch_size=n, progress=False)),
                     ("diffusers", lambda: pipe(batch_size=n, num_inference_steps=steps, eta=0.0, output_type="np",
                                                generator=torch.Generator(device).manual_seed(0)))):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        _sync(device)
        timings[name] = n / (time.perf_counter() - start)
    out = {"images": n, "ddim_steps": steps, "ours": timings["ours"], "diffusers": timings["diffusers"],
           "ratio_ours_vs_diffusers": timings["ours"] / timings["diffusers"]}
    print(f"[sampling {name}] {json.dumps(out)}", flush=True)
    return out


def nn_search(device: torch.device, smoke: bool) -> dict:
    """NN search (k=50, the official score's) of M samples in N training images of D values, against
    the same-size matrix product alone (fp32, as the search computes): the share of the device's
    matmul throughput the search reaches."""
    from pipeline.core.metrics import nearest_neighbors

    m, n, d = (64, 256, 64) if smoke else (10_000, 50_000, 3072)
    g = torch.Generator(device).manual_seed(0)
    q = torch.rand(m, d, generator=g, device=device)
    r = torch.rand(n, d, generator=g, device=device)
    nearest_neighbors(q[:8], r[:64], 50)  # warm-up
    timings = {}
    for name, fn in (("nn_search", lambda: nearest_neighbors(q, r, 50)),
                     ("matmul", lambda: [q[i:i + 4096] @ r.T for i in range(0, m, 4096)])):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        timings[name] = time.perf_counter() - start
    flops = 2.0 * m * n * d
    out = {"M": m, "N": n, "D": d, "nn_search_tflops": flops / timings["nn_search"] / 1e12,
           "matmul_tflops": flops / timings["matmul"] / 1e12,
           "ratio_nn_vs_matmul": timings["matmul"] / timings["nn_search"]}
    print(f"[nn search] {json.dumps(out)}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script, no figures")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--budget", type=float, default=420, help="seconds; parts not started by then are skipped")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here (use --smoke to check the script on a CPU)")
    sizes, start = (SMOKE if args.smoke else FULL), time.perf_counter()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = {"machine": machine, "torch": torch.__version__, "smoke": args.smoke, "skipped": []}
    print(f"device: {machine}, torch {torch.__version__}", flush=True)
    parts = [(f"train_{name}", lambda name=name: training(name, sizes[name], device, args.smoke)) for name in sizes]
    parts += [(f"sampling_{name}", lambda name=name: sampling(name, sizes[name], device, args.smoke)) for name in sizes]
    parts += [("nn_search", lambda: nn_search(device, args.smoke))]
    for key, run in parts:
        if time.perf_counter() - start > args.budget:
            results["skipped"].append(key)
            continue
        results[key] = run()
    results["seconds"] = time.perf_counter() - start
    _summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _summary(res: dict) -> None:
    goals = [("train_small", "ratio_iet_vs_plain", 0.95), ("train_official", "ratio_iet_vs_plain", 0.95),
             ("train_small", "ratio_stacked_vs_sequential", 3.0), ("sampling_small", "ratio_ours_vs_diffusers", 0.9),
             ("sampling_official", "ratio_ours_vs_diffusers", 0.9)]
    for part, key, goal in goals:
        value = res.get(part, {}).get(key)
        shown = f"{value:.3f}" if isinstance(value, float) else "not measured"
        print(f"{part}.{key} = {shown}  (goal >= {goal})")
    if "nn_search" in res:
        print(f"nn_search.ratio_nn_vs_matmul = {res['nn_search']['ratio_nn_vs_matmul']:.3f}")
    print(f"total {res['seconds']:.0f} s; skipped: {res['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
