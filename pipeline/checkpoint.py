"""The one resumable checkpoint format: what a training run saves after every complete round, and
how it is found and read back (pipeline/rounds.py calls `save` and `restore`).

A state folder holds
  proxy_<k>.safetensors  every tensor of proxy k (weights, EMA, Adam moments, random generator, its
                         mitigations' own state) and, as JSON metadata, its step, LR schedule, loss
                         scaler and optimizer settings;
  samples.safetensors    the shard of every training-set position and the per-sample mitigation state;
  state.json             written last: the run's fingerprint, the round, the progress, and the SHA-256
                         of every other file.
Safetensors and JSON only, no pickle. A state is written to a fresh folder and swapped in, so a kill
at any moment leaves one complete state (the new one, or the previous one as <folder>.old). A state
whose files do not match its state.json (truncated, overwritten, unreadable) is set aside as
<folder>.corrupt with one line saying so, and the run resumes from the other one or starts over."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.io import apply_umask, atomic_path, write_json

MANIFEST = "state.json"
SAMPLES = "samples.safetensors"


def proxy_file(k: int) -> str:
    return f"proxy_{k}.safetensors"


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
    """Load what save_proxy wrote into `proxy`; returns its `extra` tensors."""
    tensors = load_file(str(path))
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


# ---- the whole run ----

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


def save(state_dir: Path, proxies: dict, mitigations, info: dict, shard: np.ndarray, ranks) -> None:
    """Write the state to a fresh folder, then swap it in. Each rank writes its own proxies (several
    machines need the run folder on shared storage); rank 0 writes the rest and the manifest last."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    for k, proxy in proxies.items():
        save_proxy(proxy, tmp / proxy_file(k), mitigations.state(k))
    ranks.barrier()
    if ranks.is_main:
        save_file({"shard": torch.from_numpy(shard), **{k: v.cpu() for k, v in mitigations.state(None).items()}},
                  str(tmp / SAMPLES))
        apply_umask(tmp / SAMPLES)  # safetensors writes 0600 whatever the umask
        files = sorted(f.name for f in tmp.iterdir())
        write_json(tmp / MANIFEST, {**info, "files": {name: _sha256(tmp / name) for name in files}})
        old = state_dir.with_name(state_dir.name + ".old")
        if state_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()


def find(state_dir: Path, run_fingerprint: str, ranks) -> tuple[Path | None, dict | None]:
    """The newest complete state of this very run (the folder and its manifest), else (None, None).
    A state of another run is ignored; an unreadable one is set aside (by rank 0, once every rank
    has looked: they all read the same files and so agree)."""
    found, broken = (None, None), []
    for folder in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        info, problem = _read_manifest(folder)
        if problem:
            broken.append((folder, problem))
        elif info is not None and info.get("fingerprint") == run_fingerprint:
            found = (folder, info)
            break
    ranks.barrier()
    if ranks.is_main:
        for folder, problem in broken:
            aside = folder.with_name(folder.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            print(f"{folder}: resume state unreadable ({problem}); set aside as {aside.name}, "
                  + ("resuming from the previous one" if found[0] else "starting from scratch"))
    ranks.barrier()
    return found


def restore(folder: Path, proxies: dict, mitigations) -> np.ndarray:
    """Load a state `find` returned into the proxies and mitigations; returns the shards."""
    for k, proxy in proxies.items():
        mitigations.load_state(load_proxy(proxy, folder / proxy_file(k)), k)
    saved = load_file(str(folder / SAMPLES))
    mitigations.load_state(saved, None)
    return saved["shard"].numpy().copy()


def _read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a complete state, (None, None) where there is none, (None, why) for one
    that cannot be used: a manifest that does not parse, or a file that does not match its checksum."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, None
    try:
        info = json.loads(path.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST}: {type(err).__name__}"
    for name, digest in files.items():
        try:
            if _sha256(folder / name) != digest:
                return None, f"{name}: checksum mismatch"
        except OSError as err:
            return None, f"{name}: {err.strerror or type(err).__name__}"
    return info, None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

