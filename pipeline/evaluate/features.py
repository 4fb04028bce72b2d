"""A small classifier whose penultimate features give a Frechet distance that is fast on a CPU.

The standard Inception FID takes about half a second an image on a CPU; a few-layer CNN trained on the
dataset's own labels is thousands of times faster and, being trained on these images, sensitive to
what matters in them.  Its numbers are comparable only with each other, not with published FIDs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.core.io import apply_umask, load_tensors, read_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: features must not depend on batch composition or train/eval mode.
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU()]


class FeatureNet(nn.Module):
    """Conv blocks (two stride-2 downsamplings, so any H = W >= 8 works), global average pool to
    `feature_dim` features, then a linear classifier."""

    def __init__(self, channels: int, num_classes: int, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "width": width,
                       "feature_dim": feature_dim}
        self.body = nn.Sequential(
            *_block(channels, width, 1),
            *_block(width, 2 * width, 2),
            *_block(2 * width, 2 * width, 2),
            *_block(2 * width, feature_dim, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_feature_net(images: Tensor, labels: Tensor, channels: int, epochs: int, seed: int,
                      batch_size: int = 128, progress: bool = True) -> tuple[FeatureNet, dict]:
    """Train on the labelled images (label -1 = unlabelled), holding out 10% to report accuracy.

    With no labels at all the seeded, randomly initialised network is returned untrained: random
    conv features still give a usable (if weaker) distance, and the dict says which it is.
    """
    labels = labels.to(device=images.device, dtype=torch.int64)
    labelled = labels >= 0
    num_classes = int(labels.max()) + 1 if labelled.any() else 1
    torch.manual_seed(seed)
    net = FeatureNet(channels, num_classes).to(images.device)
    if not labelled.any():
        return net.eval(), {"trained": False, "accuracy": None,
                            "note": "no labels: randomly initialised network, not trained"}

    images, labels = images[labelled], labels[labelled]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g).to(images.device)
    n_val = max(1, len(labels) // 10)
    val, fit = order[:n_val], order[n_val:]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    bar = tqdm(range(epochs), desc="feature classifier", unit="epoch", disable=not progress)
    for _ in bar:
        perm = fit[torch.randperm(len(fit), generator=g).to(images.device)]
        for batch in perm.split(batch_size):
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        correct = sum((net(images[b]).argmax(1) == labels[b]).sum().item() for b in val.split(512))
    return net, {"trained": True, "accuracy": correct / n_val, "epochs": epochs,
                 "train_images": len(fit), "val_images": n_val}


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    """A directory with safetensors weights and the constructor args as JSON (no pickle), written
    beside the target and swapped in whole, so a crash never leaves half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(net.config, indent=2, sort_keys=True) + "\n")
        apply_umask(tmp)
        if path.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "net")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_feature_net(path: str | Path) -> FeatureNet:
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no feature classifier here (run the features stage)")
    net = FeatureNet(**read_json(path / CONFIG))
    net.load_state_dict(load_tensors(path / WEIGHTS))
    return net.eval()


@torch.no_grad()
def extract_features(net: FeatureNet, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """Features [N, feature_dim] as float32 numpy, computed on the network's device."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = [net.features(b.to(device)).float().cpu() for b in images.split(batch_size)]
    net.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, net.config["feature_dim"]), np.float32)
