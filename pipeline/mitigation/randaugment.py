"""RandAugment (Cubuk et al., NeurIPS 2020) on uint8 image tensors [N, C, H, W], as torchvision's
`transforms.RandAugment(num_ops, magnitude)` with its default 31 magnitude bins, nearest
interpolation and black fill: per image, `num_ops` times, one of 14 operations drawn uniformly, at
the magnitude's bin of that operation's range, negated with probability 1/2 where the operation is
signed. The authors' TAA prototype uses it (docs/authors_variant.md).

Written in torch because the only torchvision wheel the package index serves for torch 2.13.0 is
its CUDA build, which does not import beside the CPU torch this project pins. The operations and
magnitude tables follow torchvision's; they were not compared bit for bit with it (its pixel-grid
conventions for shear and rotation may differ by a pixel's rounding). None of them flips an image,
so a digit keeps its label."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 31  # torchvision's num_magnitude_bins default
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def op_magnitude(op: str, magnitude: int, height: int, width: int) -> float:
    """The value bin `magnitude` (0..30) of `op` stands for, before its sign: torchvision's
    augmentation space (shear 0.3, translation 150/331 of the side, rotation 30 degrees, enhancement
    factors 0.9, posterize 8 to 4 bits, solarize threshold 255 to 0)."""
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height,
           "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if op in top:
        return torch.linspace(0.0, top[op], BINS)[magnitude].item()
    if op == "Posterize":
        return float(8 - round(magnitude / ((BINS - 1) / 4)))
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, BINS)[magnitude].item()
    return 0.0  # Identity, AutoContrast, Equalize: no magnitude


def _blend(img: torch.Tensor, other: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * img.float() + (1.0 - ratio) * other.float()).clamp(0, 255).to(torch.uint8)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of [C, H, W] (C 1 or 3) as uint8 [1, H, W]."""
    if img.shape[0] == 1:
        return img
    r, g, b = img.float().unbind(0)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[None].to(torch.uint8)


def _warp(img: torch.Tensor, inverse: torch.Tensor, origin: tuple[float, float]) -> torch.Tensor:
    """Nearest-neighbour resampling of [C, H, W]: output pixel centre p (relative to `origin`, in
    pixels) reads input point inverse @ p; points outside read 0."""
    c, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device) + 0.5 - origin[1],
                            torch.arange(w, device=img.device) + 0.5 - origin[0], indexing="ij")
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2] + origin[0] - 0.5
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2] + origin[1] - 0.5
    col, row = torch.round(src_x).long(), torch.round(src_y).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = img[:, row.clamp(0, h - 1), col.clamp(0, w - 1)]
    return torch.where(inside[None], out, torch.zeros_like(out))


def _affine(img: torch.Tensor, matrix: list[list[float]], origin: tuple[float, float]) -> torch.Tensor:
    forward = torch.tensor(matrix + [[0.0, 0.0, 1.0]], dtype=torch.float64)
    return _warp(img, torch.linalg.inv(forward).to(torch.float32).to(img.device), origin)


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the image smoothed by PIL's SMOOTH kernel (centre 5, neighbours 1, /13), borders kept."""
    kernel = torch.ones(3, 3, device=img.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(img.shape[0], 1, 3, 3)
    smooth = torch.round(F.conv2d(img.float()[None], kernel, groups=img.shape[0])[0])
    degenerate = img.float().clone()
    degenerate[:, 1:-1, 1:-1] = smooth
    return _blend(img, degenerate, factor)


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    lo = img.amin(dim=(1, 2), keepdim=True).float()
    hi = img.amax(dim=(1, 2), keepdim=True).float()
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp(min=1))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((img.float() - lo) * scale).clamp(0, 255).to(torch.uint8)


def _equalize(img: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel: a lookup table from the cumulative histogram."""
    out = torch.empty_like(img)
    for ch in range(img.shape[0]):
        hist = torch.bincount(img[ch].flatten().long(), minlength=256)
        used = hist[hist > 0]
        step = int((used.sum() - used[-1]).item()) // 255 if used.numel() > 1 else 0
        if step == 0:
            out[ch] = img[ch]
            continue
        lut = torch.cat([torch.zeros(1, dtype=torch.long, device=img.device),
                         (torch.cumsum(hist, 0)[:-1] + step // 2) // step]).clamp(max=255)
        out[ch] = lut[img[ch].long()].to(torch.uint8)
    return out


def apply_op(img: torch.Tensor, op: str, value: float) -> torch.Tensor:
    """One operation on one uint8 image [C, H, W] at its signed `value`."""
    c, h, w = img.shape
    # torchvision shears by the angle atan(value): a slope of `value`, about the top-left corner
    if op == "ShearX":
        return _affine(img, [[1.0, value, 0.0], [0.0, 1.0, 0.0]], (0.0, 0.0))
    if op == "ShearY":
        return _affine(img, [[1.0, 0.0, 0.0], [value, 1.0, 0.0]], (0.0, 0.0))
    if op in ("TranslateX", "TranslateY"):
        dx, dy = (int(value), 0) if op == "TranslateX" else (0, int(value))
        return _affine(img, [[1.0, 0.0, float(dx)], [0.0, 1.0, float(dy)]], (0.0, 0.0))
    if op == "Rotate":
        a = math.radians(value)
        return _affine(img, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], (w / 2, h / 2))
    if op == "Brightness":
        return _blend(img, torch.zeros_like(img), 1.0 + value)
    if op == "Color":
        return img if c == 1 else _blend(img, _grey(img).expand_as(img), 1.0 + value)
    if op == "Contrast":
        return _blend(img, _grey(img).float().mean().expand_as(img), 1.0 + value)
    if op == "Sharpness":
        return img if h <= 2 or w <= 2 else _sharpness(img, 1.0 + value)
    if op == "Posterize":
        return img & (0xFF << (8 - int(value)) & 0xFF)
    if op == "Solarize":
        return torch.where(img >= value, 255 - img, img)
    if op == "AutoContrast":
        return _autocontrast(img)
    if op == "Equalize":
        return _equalize(img)
    return img


def rand_augment(images: torch.Tensor, magnitude: int, generator: torch.Generator, num_ops: int = 2) -> torch.Tensor:
    """Each uint8 image [C, H, W] of `images` through `num_ops` operations drawn from `generator`
    (one op index, then one sign, per operation, as torchvision draws them)."""
    if not 0 <= magnitude < BINS:
        raise ValueError(f"RandAugment magnitude must be in 0..{BINS - 1}, got {magnitude}")
    _, _, h, w = images.shape
    out = []
    for img in images:
        for _ in range(num_ops):
            op = OPS[int(torch.randint(len(OPS), (1,), generator=generator, device=generator.device))]
            value = op_magnitude(op, magnitude, h, w)
            if op in SIGNED and int(torch.randint(2, (1,), generator=generator, device=generator.device)):
                value = -value
            img = apply_op(img, op, value)
        out.append(img)
    return torch.stack(out)
