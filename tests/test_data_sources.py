"""Data sources that were read wrong in silence: a symlinked class folder skipped (its images gone,
every label 0), images of no pixels, class ids that are not 0..C-1 (a classifier of 2e9 outputs;
uint64 ids above 2**63 read as unlabelled)."""
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import DataConfig
from pipeline.core.data import DataError, load_source


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


def test_a_symlinked_class_folder_is_followed_and_a_link_loop_read_once(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _image(root / "ants" / "a.png", 10)
    _image(elsewhere / "bees" / "b.png", 200)
    _image(elsewhere / "bees" / "c.png", 220)
    os.symlink(elsewhere / "bees", root / "bees")
    os.symlink(root, root / "ants" / "loop")  # a loop back to the root
    images, labels = load_source(DataConfig(source="folder", path=str(root), resolution=8))
    assert len(images) == 3 and labels.tolist() == [0, 1, 1]
    assert images[:, 0, 0, 0].tolist() == [10, 200, 220]


def test_npz_images_of_no_pixels_are_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((30, 0, 0), np.uint8))
    with pytest.raises(DataError, match=r"d\.npz: images has shape \(30, 1, 0, 0\): images of no pixels"):
        load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))


@pytest.mark.parametrize("labels", [np.array([0, 10**9, 2 * 10**9, 0]),
                                    np.array([2**63, 2**63 + 5, 2**64 - 1, 2**63], dtype=np.uint64)])
def test_npz_class_ids_become_0_to_c_minus_1_in_their_order(tmp_path, labels):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=labels)
    _, read = load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    assert read.tolist() == [0, 1, 2, 0] and read.dtype == np.int64


def test_npz_class_ids_already_0_to_c_minus_1_are_kept(tmp_path):
    labels = np.array([3, 0, 2, 1, 3])
    np.savez(tmp_path / "d.npz", images=np.zeros((5, 8, 8), np.uint8), labels=labels)
    assert load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))[1].tolist() == labels.tolist()
