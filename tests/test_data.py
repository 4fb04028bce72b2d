import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import data
from pipeline.core.config import SOURCE_SIZES, DataConfig
from pipeline.core.data import DataError, ImageSet, load_source, prepare_splits
from pipeline.core.dedup import duplicate_groups


def splits_of(seed=0, **cfg):
    cfg.setdefault("duplicates", {"images": 0})  # the default duplicates 8 images; these tests want none unless said
    return prepare_splits(DataConfig(**cfg), seed)


@pytest.fixture(scope="module")
def mnist():
    return splits_of(seed=3, train_size=50, heldout_size=100)


# ---------------------------------------------------------------- built-in sources

def test_mnist5k_is_5000_labelled_28px_digits():
    images, labels = load_source(DataConfig(source="mnist5k"))
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images[:, :, :4, :4].max() == 0  # dark corners: real digits, not noise


def test_digits_are_scaled_to_the_full_byte_range():
    images, labels = load_source(DataConfig(source="digits"))
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and set(labels.tolist()) == set(range(10))
    s = splits_of(source="digits", train_size=20, heldout_size=30, resolution=8)
    assert s.train.images.shape == (20, 1, 8, 8)


# ---------------------------------------------------------------- splitting

def test_split_sizes_disjointness_and_pool(mnist):
    assert (len(mnist.train), len(mnist.heldout), len(mnist.pool)) == (50, 100, 4900)
    train, heldout, pool = (set(s.ids.tolist()) for s in (mnist.train, mnist.heldout, mnist.pool))
    assert not train & heldout and not pool & heldout and train <= pool
    for s in (mnist.train, mnist.heldout, mnist.pool):
        assert np.all(np.diff(s.ids) > 0)  # sorted, unique
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (1, 16, 16)
        assert s.labels.dtype == np.int64 and s.ids.dtype == np.int64


def test_train_is_class_balanced(mnist):
    assert np.bincount(mnist.train.labels, minlength=10).tolist() == [5] * 10
    counts = np.bincount(splits_of(train_size=53, heldout_size=10).train.labels, minlength=10)
    assert counts.sum() == 53 and counts.max() - counts.min() == 1


def test_labels_and_images_follow_their_ids(mnist):
    images, labels = load_source(DataConfig())
    np.testing.assert_array_equal(mnist.train.labels, labels[mnist.train.ids])
    native = splits_of(train_size=50, heldout_size=100, resolution=28, seed=3)
    np.testing.assert_array_equal(native.train.images, images[native.train.ids])


def test_same_seed_same_split_other_seed_other_split(mnist):
    again = splits_of(seed=3, train_size=50, heldout_size=100)
    for name in ("train", "heldout", "pool"):
        a, b = getattr(mnist, name), getattr(again, name)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.images, b.images)
    other = splits_of(seed=4, train_size=50, heldout_size=100)
    assert not np.array_equal(mnist.train.ids, other.train.ids)
    assert not np.array_equal(mnist.heldout.ids, other.heldout.ids)


def test_resolution_and_channel_conversion():
    s = splits_of(train_size=10, heldout_size=10, resolution=16, channels=3)
    x = s.train.images
    assert x.shape == (10, 3, 16, 16) and x.dtype == np.uint8 and x.max() > 200
    np.testing.assert_array_equal(x[:, 0], x[:, 2])  # grey repeated, not tinted


def test_rgb_to_grey_uses_luminance(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    green = 200 + 10 * np.arange(4)  # pure green, one level per image (equal images would count once)
    images[..., 1] = green[:, None, None]
    np.savez(tmp_path / "g.npz", images=images)
    s = splits_of(source="npz", path=str(tmp_path / "g.npz"), train_size=2, heldout_size=2, resolution=8)
    assert s.train.images.shape == (2, 1, 8, 8)
    assert np.all(s.train.images == np.rint(0.587 * green[s.train.ids])[:, None, None, None])


def test_downsampling_averages_instead_of_skipping_thin_lines(tmp_path):
    images = np.zeros((4, 16, 16), np.uint8)
    images[:, :, ::4] = 255  # one-pixel lines that a plain bilinear or nearest resize would miss
    images[:, 0, 1] = [0, 60, 120, 180]  # four distinct images
    np.savez(tmp_path / "lines.npz", images=images)
    s = splits_of(source="npz", path=str(tmp_path / "lines.npz"), train_size=2, heldout_size=2, resolution=4)
    assert 30 < s.train.images.min() and s.train.images.max() < 100  # about 255 / 4 everywhere


# ---------------------------------------------------------------- data.duplicates

def _digest(splits) -> str:
    h = hashlib.sha256()
    for name in ("train", "heldout", "pool"):
        x = getattr(splits, name)
        for a in (x.images, x.labels, x.ids):
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def test_no_duplicates_leaves_the_prepared_arrays_as_they_were(mnist):
    # the digest of these splits before data.duplicates existed (commit 39c4b73)
    assert _digest(mnist) == "e781fc37c90fae3d"
    np.testing.assert_array_equal(mnist.copy_of, mnist.train.ids)


def test_duplicates_are_extra_samples_with_new_ids_and_the_same_pixels(mnist):
    dup = splits_of(seed=3, train_size=50, heldout_size=100, duplicates={"images": 4, "copies": 3})
    t = dup.train
    assert len(t) == 50 + 4 * 2
    np.testing.assert_array_equal(t.ids[:50], mnist.train.ids)  # the originals first, unchanged
    np.testing.assert_array_equal(t.images[:50], mnist.train.images)
    new = t.ids[50:]
    assert len(set(t.ids.tolist())) == len(t) and new.min() >= 5000  # past every id of the source
    originals, counts = np.unique(dup.copy_of, return_counts=True)
    assert sorted(counts.tolist()) == [1] * 46 + [3] * 4
    for i, source_id in zip(range(50, len(t)), dup.copy_of[50:]):
        j = int(np.flatnonzero(t.ids == source_id)[0])
        assert j < 50 and np.array_equal(t.images[i], t.images[j]) and t.labels[i] == t.labels[j]
    assert duplicate_groups(t.images).summary()["duplicated_samples"] >= 12
    for name in ("heldout", "pool"):  # never in the held-out set or the pool
        a, b = getattr(dup, name), getattr(mnist, name)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.images, b.images)


def test_the_duplicated_images_are_a_seeded_choice():
    def chosen(seed):
        s = splits_of(seed=seed, train_size=50, heldout_size=100, duplicates={"images": 5, "copies": 2})
        return s.train.ids[np.isin(s.train.ids, s.copy_of[50:])].tolist()
    assert chosen(3) == chosen(3) and len(chosen(3)) == 5
    assert chosen(3) != chosen(4)


def test_too_few_images_names_the_sizes(tmp_path):
    # a source of any size (folder, npz) is counted here; the built-in ones already by the config
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).integers(0, 256, (30, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"data\.train_size \(20\).*data\.heldout_size \(20\).*has only 30"):
        splits_of(source="npz", path=str(tmp_path / "d.npz"), train_size=20, heldout_size=20, resolution=4)


@pytest.mark.parametrize("source", sorted(SOURCE_SIZES))
def test_the_config_knows_the_size_of_each_built_in_source(source):
    if source == "fashion-mnist" and not Path(data.FASHION_DIR).is_dir():
        pytest.skip(f"{data.FASHION_DIR}: Fashion-MNIST is not installed")
    assert len(load_source(DataConfig(source=source))[0]) == SOURCE_SIZES[source]


def distinct_images(n: int, size: int = 4) -> np.ndarray:
    """n different grey images (random ones could repeat; the split would count those once)."""
    images = np.zeros((n, size * size), np.uint8)
    images[:, :2] = np.stack([np.arange(n) // 256, np.arange(n) % 256], axis=1)
    return images.reshape(n, size, size)


def test_small_class_is_topped_up_from_the_others(tmp_path):
    labels = np.array([0] * 3 + [1] * 40 + [2] * 40)
    np.savez(tmp_path / "d.npz", images=distinct_images(len(labels)), labels=labels)
    s = splits_of(source="npz", path=str(tmp_path / "d.npz"), train_size=30, heldout_size=2, resolution=4)
    counts = np.bincount(s.train.labels, minlength=3)
    assert counts.sum() == 30 and counts[0] <= 3 and abs(counts[1] - counts[2]) <= 1


def test_pool_is_capped_but_keeps_train(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "POOL_CAP", 40)
    np.savez(tmp_path / "d.npz", images=distinct_images(200))
    s = splits_of(source="npz", path=str(tmp_path / "d.npz"), train_size=30, heldout_size=20, resolution=4)
    assert len(s.pool) == 40 and set(s.train.ids) <= set(s.pool.ids)
    assert not set(s.pool.ids) & set(s.heldout.ids)
    assert np.all(s.train.labels == -1)


# ---------------------------------------------------------------- fashion-mnist (IDX)

def write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def fake_fashion(root, gz):
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 4)):
        suffix = ".gz" if gz else ""
        write_idx(root / f"{part}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{part}-labels-idx1-ubyte{suffix}", np.arange(n) % 3, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    fake_fashion(tmp_path, gz)
    images, labels = load_source(DataConfig(source="fashion-mnist", path=str(tmp_path)))
    assert images.shape == (10, 1, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # train first, then t10k
    s = prepare_splits(DataConfig(duplicates={"images": 0}, source="fashion-mnist", path=str(tmp_path), train_size=3, heldout_size=2), 0)
    assert len(s.train) == 3 and np.bincount(s.train.labels).tolist() == [1, 1, 1]


def test_fashion_mnist_missing_file_names_it_and_points_at_data_path_when_set(tmp_path):
    fake_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as err:
        load_source(DataConfig(source="fashion-mnist", path=str(tmp_path)))
    assert "check data.path" in str(err.value) and "apt-get" not in str(err.value)


def test_fashion_mnist_missing_at_the_default_place_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_source(DataConfig(source="fashion-mnist"))
    assert "or set data.path" in str(err.value)


def test_truncated_idx_file_is_an_error(tmp_path):
    fake_fashion(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_source(DataConfig(source="fashion-mnist", path=str(tmp_path)))


# ---------------------------------------------------------------- folder

def _folder_image(tmp_path, img):
    img.save(tmp_path / "x.png")
    cfg = DataConfig(source="folder", path=str(tmp_path), resolution=img.width)
    return load_source(cfg.model_copy(update={"channels": 1}))[0][0, 0], \
        load_source(cfg.model_copy(update={"channels": 3}))[0][0]


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    grey, rgb = _folder_image(tmp_path, Image.fromarray(ramp))
    expected = np.rint(ramp / 257).astype(np.uint8)
    assert np.abs(grey.astype(int) - expected).max() <= 1
    assert np.abs(rgb.astype(int) - expected).max() <= 1  # same grey in every channel


def test_rgba_transparent_pixels_become_black_and_opaque_ones_keep_their_colour(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (200, 100, 50, 255)   # opaque left half
    rgba[:, 4:] = (255, 255, 255, 0)    # fully transparent right half, white underneath
    grey, rgb = _folder_image(tmp_path, Image.fromarray(rgba, "RGBA"))
    assert (rgb[:, :, :4] == np.array([200, 100, 50])[:, None, None]).all()
    assert (rgb[:, :, 4:] == 0).all() and (grey[:, 4:] == 0).all()


def test_palette_images_use_their_colours_and_transparency(tmp_path):
    pal = Image.fromarray(np.repeat(np.arange(8, dtype=np.uint8)[None], 8, axis=0), "P")
    pal.putpalette([v for i in range(256) for v in (i * 30 % 256, 0, 255 - i * 30 % 256)])
    _, rgb = _folder_image(tmp_path, pal)
    assert (rgb[:, 0, 3] == [90, 0, 165]).all()  # palette entry 3
    pal.info["transparency"] = 3
    _, rgb = _folder_image(tmp_path, pal)
    assert (rgb[:, :, 3] == 0).all() and (rgb[:, 0, 2] == [60, 0, 195]).all()


def save_image(path, size=(20, 12), color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def test_folder_with_class_subfolders_and_nested_dirs(tmp_path):
    save_image(tmp_path / "cats" / "a.png")
    save_image(tmp_path / "cats" / "deep" / "er" / "b.JPG")
    save_image(tmp_path / "ants" / "c.jpeg", mode="L")
    (tmp_path / "ants" / "notes.txt").write_text("not an image")
    images, labels = load_source(DataConfig(source="folder", path=str(tmp_path), resolution=8, channels=3))
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 1]  # sorted paths; ants=0, cats=1
    assert images[1, 0].min() > 200 and images[1, 1].max() < 50  # red stayed red


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    for i in range(4):
        save_image(tmp_path / f"{i}.png", size=(30, 10), color=(255, 40 * i, 0))
    s = prepare_splits(DataConfig(duplicates={"images": 0}, source="folder", path=str(tmp_path), train_size=2, heldout_size=2,
                                  resolution=4), 0)
    assert s.train.images.shape == (2, 1, 4, 4) and np.all(s.train.labels == -1)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_source(DataConfig(source="folder", path=str(tmp_path)))
    with pytest.raises(DataError, match="nowhere"):
        load_source(DataConfig(source="folder", path=str(tmp_path / "nowhere")))


def test_corrupt_image_names_the_file(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="bad.png"):
        load_source(DataConfig(source="folder", path=str(tmp_path)))


# ---------------------------------------------------------------- npz

@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "float"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)  # NCHW, non-square
    stored = {"NHW": base[:, 0], "NHWC": base.transpose(0, 2, 3, 1), "NCHW": base,
              "float": base.transpose(0, 2, 3, 1) / 255.0}[layout]
    np.savez(tmp_path / "d.npz", images=stored, labels=np.arange(5))
    images, labels = load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    expected = base[:, :1] if layout == "NHW" else base
    np.testing.assert_array_equal(images, expected)
    assert labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.zeros((5, 8, 8), np.uint8), "labels": np.arange(4)}, r"\(4,\).*\(5, 1, 8, 8\)"),
    ({"images": np.zeros((5, 8), np.uint8)}, r"\(5, 8\)"),
    ({"images": np.zeros((5, 8, 8, 4), np.uint8)}, r"\(5, 8, 8, 4\)"),
    ({"images": np.zeros((5, 8, 8), np.int32)}, "int32"),
    ({"images": np.full((5, 8, 8), 2.0)}, r"\[0, 1\]"),
    ({"pixels": np.zeros((5, 8, 8), np.uint8)}, "'images'"),
])
def test_bad_npz_names_file_and_shapes(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match) as err:
        load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    assert "d.npz" in str(err.value)


# ---------------------------------------------------------------- ImageSet

def test_imageset_roundtrip_subset_and_tensor_range(tmp_path, mnist):
    path = tmp_path / "sub" / "train.npz"
    mnist.train.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.npz"]  # no temp files, no .npz.npz
    back = ImageSet.load(path)
    for field in ("images", "labels", "ids"):
        np.testing.assert_array_equal(getattr(back, field), getattr(mnist.train, field))
        assert getattr(back, field).dtype == getattr(mnist.train, field).dtype
    sub = back.subset(np.array([0, 2]))
    assert len(sub) == 2 and sub.ids.tolist() == back.ids[[0, 2]].tolist()
    t = back.to_tensor()
    assert t.dtype.is_floating_point and t.shape == (50, 1, 16, 16)
    assert t.min().item() == -1.0 and t.max().item() == 1.0


def test_loading_a_missing_or_corrupt_imageset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="missing.npz"):
        ImageSet.load(tmp_path / "missing.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match="corrupt.npz"):
        ImageSet.load(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"keys.npz.*labels"):
        ImageSet.load(tmp_path / "keys.npz")
