"""The one checkpoint format: what a round's stages hand each other (pipeline/core/layout.py says where).

A proxy's file (`save_proxy`) holds every tensor of it (weights, EMA, Adam moments, random generator,
its mitigations' own state) and, as JSON metadata, its step, LR schedule, loss scaler and optimizer
settings. A round's train folder holds every proxy's file after training, with the samples' file
(the shards trained on, the draw and skip counts and the per-sample mitigation state); its profile
folder holds what the round's end changed (the samples' file with the next round's shards, each
proxy's mitigation state). Safetensors and JSON only, no pickle. Every folder is written to a
staging folder and renamed into place, so a kill leaves the whole folder or none."""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.core.io import apply_umask, atomic_path, read_json, write_json
from pipeline.core.layout import SAMPLES, TRAIN_INFO, midpoint_file, mitigation_file, proxy_file


# ---- one proxy ----

def proxy_tensors(proxy, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in proxy.model.state_dict().items()}
    out.update({f"ema.{i}": p for i, p in enumerate(proxy.ema.shadow_params)})
    for i, state in proxy.optimizer.state_dict()["state"].items():
        for k, v in state.items():
            out[f"optim.{i}.{k}"] = torch.as_tensor(v)
    out["generator"] = proxy.generator.get_state()
    out.update({f"extra.{k}": v for k, v in extra.items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_proxy(proxy, path: str | Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """`extra`: tensors that belong with this proxy (its mitigations' state); load_proxy returns them."""
    meta = {"step": proxy.step, "ema_step": proxy.ema.optimization_step, "scaler": proxy.scaler.state_dict(),
            "lr_schedule": proxy.lr_schedule.state_dict(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in proxy.optimizer.state_dict()["param_groups"]]}
    with atomic_path(path) as tmp:
        save_file(proxy_tensors(proxy, extra or {}), str(tmp), metadata={"meta": json.dumps(meta, default=str)})


def load_proxy(proxy, path: str | Path) -> dict[str, torch.Tensor]:
    """Load what save_proxy wrote into `proxy`; returns its `extra` tensors (only them for a proxy
    of None: a stage that needs no model, pipeline.train.rounds.start)."""
    tensors = load_file(str(path))
    if proxy is None:
        return {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    proxy.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(proxy.ema.shadow_params):
        p.data.copy_(tensors[f"ema.{i}"])
    opt = proxy.optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt["state"] = state
    opt["param_groups"] = [{**g, **saved} for g, saved in zip(opt["param_groups"], meta["param_groups"])]
    proxy.optimizer.load_state_dict(opt)
    sched = {k: v for k, v in meta["lr_schedule"].items() if k != "lr_lambdas"}
    proxy.lr_schedule.load_state_dict({**proxy.lr_schedule.state_dict(), **sched})
    proxy.generator.set_state(tensors["generator"])
    proxy.step = meta["step"]
    if meta.get("scaler"):
        proxy.scaler.load_state_dict(meta["scaler"])
    proxy.ema.optimization_step = meta["ema_step"]
    return {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}




# ---- a round's folders ----

def fingerprint(p, plan, images: np.ndarray, shard: np.ndarray, init, device: torch.device) -> str:
    """What a saved state must match to be resumed: params, plan, data, shards, the initial weights
    (model.init_from names them, but the files behind the name can change) and the device type."""
    h = hashlib.sha256()
    # not train.launcher: the weights do not depend on the process count, so a run may resume under another.
    # The device type, not train.device: `auto` means another device on another machine, and a CPU
    # generator's state cannot be loaded into a CUDA one (nor would the draws be the same).
    h.update(json.dumps(p.model_dump(exclude={"eval": True, "tracking": True, "train": {"launcher", "device"}}),
                        sort_keys=True).encode())
    h.update(device.type.encode())
    h.update(repr(plan).encode())
    h.update(images.tobytes())
    h.update(shard.tobytes())
    for key, tensor in init.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def shared_folder(path: Path, ranks):
    """A staging folder every rank writes into; renamed onto `path` (replacing it) once all are done."""
    tmp = path.with_name(f".{path.name}.staged")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    yield tmp
    ranks.barrier()
    if ranks.is_main:
        apply_umask(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    ranks.barrier()


def save_trained(folder: Path, proxies: dict, mitigations, counts, shard: np.ndarray, midpoints: dict,
                 info: dict, ranks) -> None:
    """A round's train folder: every proxy's state, its mid-round weights, the samples' file; the
    info (JSON: seconds, aggregation weights, curves) last. Each rank writes its own proxies."""
    with shared_folder(folder, ranks) as tmp:
        for k, proxy in proxies.items():
            save_proxy(proxy, tmp / proxy_file(k), mitigations.state(k))
        for j, states in midpoints.items():
            for k, state in states.items():
                save_file({key: v.detach().cpu().contiguous() for key, v in state.items()}, str(tmp / midpoint_file(j, k)))
        ranks.barrier()
        if ranks.is_main:
            save_file({"shard": torch.from_numpy(shard), "drawn": counts.drawn.cpu(), "skipped": counts.skipped.cpu(),
                       **{k: v.cpu() for k, v in mitigations.state(None).items()}}, str(tmp / SAMPLES))
            write_json(tmp / TRAIN_INFO, info)


def load_trained(folder: Path, proxies: dict, mitigations) -> tuple[np.ndarray, dict[str, torch.Tensor], dict]:
    """Load a train folder into the proxies and mitigations; returns the shards trained on, the draw
    and skip counts (CPU) and the info."""
    for k, proxy in proxies.items():
        mitigations.load_state(load_proxy(proxy, folder / proxy_file(k)), k)
    samples = load_file(str(folder / SAMPLES))
    mitigations.load_state(samples, None)
    return samples["shard"].numpy().copy(), {k: samples[k] for k in ("drawn", "skipped")}, read_json(folder / TRAIN_INFO)


def save_profiled(folder: Path, proxies: dict, mitigations, shard: np.ndarray, ranks) -> None:
    """Into a profile folder being written: what the round's end changed (the next round's shards,
    the per-sample and every proxy's mitigation state)."""
    for k in proxies:
        save_file({key: v.cpu().contiguous() for key, v in mitigations.state(k).items()}, str(folder / mitigation_file(k)))
    if ranks.is_main:
        save_file({"shard": torch.from_numpy(shard), **{k: v.cpu() for k, v in mitigations.state(None).items()}},
                  str(folder / SAMPLES))


def load_profiled(folder: Path, proxies: dict, mitigations) -> np.ndarray:
    """Load what save_profiled wrote; returns the next round's shards."""
    for k in proxies:
        mitigations.load_state(load_file(str(folder / mitigation_file(k))), k)
    samples = load_file(str(folder / SAMPLES))
    mitigations.load_state(samples, None)
    return samples["shard"].numpy().copy()


def load_average(folder: Path, proxies: dict) -> None:
    """Every proxy takes the round's averaged weights and averaged EMA (an aggregate folder)."""
    weights = load_file(str(folder / "aggregated.safetensors"))
    ema = load_file(str(folder / "aggregated_ema.safetensors"))
    for proxy in proxies.values():
        proxy.model.load_state_dict(weights)
        for i, shadow in enumerate(proxy.ema.shadow_params):
            shadow.data.copy_(ema[str(i)])
