"""Exact duplicates in the source never straddle the split (docs/data.md): a held-out image that is a
copy of a training one would get a memorization ratio for an image that was trained on, and count
as a non-member in membership inference."""
import hashlib

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.core.config import DataConfig, load_params
from pipeline.core.data import DataError, load_source, prepare_splits, source_groups
from stages import prepare

DISTINCT, SAVED_AGAIN = 40, {3: 4, 11: 2, 17: 5, 25: 1, 31: 3, 38: 2}  # image index: extra copies under other names


def write_folder(root):
    """DISTINCT random 12x12 colour PNGs; some saved again under other names, one copy each as an
    opaque RGBA PNG (the same pixels once the loader has converted it)."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(DISTINCT):
        img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
        img.save(root / f"img_{i:02d}.png")
        for j in range(SAVED_AGAIN.get(i, 0)):
            (img.convert("RGBA") if j == 0 else img).save(root / f"copy_{j}_of_{i:02d}_renamed.png")
    return root


def folder_cfg(root, **changes):
    return DataConfig(**{"source": "folder", "path": str(root), "train_size": 15, "heldout_size": 15,
                         "resolution": 8, "channels": 1, "duplicates": {"images": 0}, **changes})


def pixels(images):
    return [hashlib.sha256(x.tobytes()).hexdigest() for x in images]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.mark.parametrize("seed", range(8))
def test_exact_duplicates_in_a_folder_stay_on_one_side_of_every_split(folder, seed):
    s = prepare_splits(folder_cfg(folder), seed)
    train, heldout, pool = (pixels(x.images) for x in (s.train, s.heldout, s.pool))
    assert not set(heldout) & set(train) and not set(heldout) & set(pool)
    assert len(set(heldout)) == len(heldout) == 15  # one image per held-out group
    assert len(set(train)) == 15  # train_size counts distinct images...
    everything = pixels(load_source(folder_cfg(folder))[0])  # the folder source is read converted
    for image in set(train):  # ...and every copy of a training image is trained on
        assert train.count(image) == everything.count(image)
    assert set(train) <= set(pool)
    report = s.source_duplicates
    assert report["groups"] == len(SAVED_AGAIN) and report["images"] == sum(SAVED_AGAIN.values()) + len(SAVED_AGAIN)
    assert report["train"] + report["heldout"] + report["pool_only"] + report["none"] == len(SAVED_AGAIN)
    assert report["train"] == sum(train.count(x) > 1 for x in set(train))


def test_the_groups_go_to_every_side_over_seeds_and_a_seed_gives_the_same_split_again(folder):
    sides = [prepare_splits(folder_cfg(folder), seed).source_duplicates for seed in range(8)]
    assert all(sum(r[side] for r in sides) > 0 for side in ("train", "heldout", "pool_only"))
    a, b = prepare_splits(folder_cfg(folder), 3), prepare_splits(folder_cfg(folder), 3)
    for name in ("train", "heldout", "pool"):
        np.testing.assert_array_equal(getattr(a, name).ids, getattr(b, name).ids)
        np.testing.assert_array_equal(getattr(a, name).images, getattr(b, name).images)


def test_sizes_count_distinct_images_and_too_few_says_so(folder):
    with pytest.raises(DataError, match=r"= 41 images needed, but data.source 'folder' has only 40 distinct images "
                                        r"\(57 with their exact duplicates\)"):
        prepare_splits(folder_cfg(folder, train_size=26), 0)


def test_images_equal_only_after_the_resize_are_one_group(tmp_path):
    # the rule holds for every source (npz, and the built-in ones, resized here rather than on reading)
    images = np.repeat(np.arange(0, 240, 20, dtype=np.uint8), 256).reshape(12, 16, 16)  # flat greys
    images[1] = images[2] = images[0]
    images[2, 5, 5] = 1  # one grey level in one pixel off: lost at 4 px
    cfg = DataConfig(source="npz", path=str(tmp_path / "d.npz"), resolution=4, train_size=4, heldout_size=4,
                     duplicates={"images": 0})
    np.savez(cfg.path, images=images)
    group, firsts = source_groups(images[:, None], cfg)
    assert group[:4].tolist() == [0, 0, 0, 1] and len(firsts) == 10
    cfg16 = cfg.model_copy(update={"resolution": 16})
    assert source_groups(images[:, None], cfg16)[0][:4].tolist() == [0, 0, 1, 2]
    s = prepare_splits(cfg, 0)
    assert s.source_duplicates["groups"] == 1 and s.source_duplicates["images"] == 3


def test_the_default_source_has_no_exact_duplicates_so_its_split_is_unchanged():
    p = load_params("params.yaml")
    s = prepare_splits(p.data, p.seeds.data)
    assert s.source_duplicates == {"groups": 0, "images": 0, "train": 0, "heldout": 0, "pool_only": 0, "none": 0}
    h = hashlib.sha256()
    for name in ("train", "heldout", "pool"):
        for a in (getattr(s, name).images, getattr(s, name).labels, getattr(s, name).ids):
            h.update(a.tobytes())
    h.update(s.copy_of.tobytes())
    assert h.hexdigest()[:16] == "7368dfbbcb450447"  # the split of the commit before the rule (9e1dd8f)


def test_prepare_reports_the_groups_and_where_they_went(folder, tmp_path):
    raw = yaml.safe_load(open("params.yaml"))
    raw["data"].update(source="folder", path=str(folder), train_size=15, heldout_size=15, resolution=8)
    raw["data"]["duplicates"]["images"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "prepared"
    result = CliRunner().invoke(prepare.main, ["--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = yaml.safe_load((out / "info.json").read_text())["source_duplicates"]
    assert report == prepare_splits(load_params(tmp_path / "params.yaml").data, raw["seeds"]["data"]).source_duplicates
    assert (f"the source holds 6 groups of exact duplicates (23 images), none split: {report['train']} in train "
            f"(every copy), {report['heldout']} held out (one image each)") in result.output
