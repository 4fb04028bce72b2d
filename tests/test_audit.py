"""`iet-agc audit` as a user runs it: on a model the project's training loop trained, from its
directory, its bare UNet and the registry; copies found among duplicated training images in a
folder; one-line errors for images the model cannot have made and for missing inputs."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands.cli import main  # noqa: E402
from pipeline.compare import model_registry  # noqa: E402
from pipeline.train import rounds
from pipeline.core.config import parse_params  # noqa: E402
from pipeline.core.data import ImageSet  # noqa: E402
from pipeline.core.models import build_scheduler, build_unet, save_pipeline  # noqa: E402
from tiny import arch, random_train, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["--steps", "10", "--feature-epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny run's baseline trained by the project's round loop on 12 images, its training and
    held-out sets as .npz, and the model registered as tiny@candidate in a SQLite store."""
    root = tmp_path_factory.mktemp("audit")
    p = parse_params(tiny())
    train = random_train()
    rounds.run(p, rounds.Plan.baseline(p), train, np.zeros(len(train), dtype=np.int64), root / "run", root / "rounds")
    train.save(root / "train.npz")
    g = np.random.default_rng(1)
    ImageSet(g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), np.arange(12) % 3, np.arange(12)).save(
        root / "heldout.npz")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("t", artifact_location=(root / "artifacts").as_uri()))
    model_registry.claim_names(client, ["tiny"])
    model_registry.register(client, run.info.run_id, root / "run/model", "tiny", "candidate", label="baseline")
    return root, uri


def _audit(*args):
    return CliRunner().invoke(main, ["audit", *STEPS, *map(str, args)])


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_a_trained_model_with_held_out_images_gets_copies_leakage_and_quality(trained, tmp_path):
    root, _ = trained
    result = _audit("--model", root / "run/model", "--train", root / "train.npz", "--heldout", root / "heldout.npz",
                    "--num", 16, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    m = _metrics(tmp_path / "a")
    assert m["num_samples"] == 16 and m["unique_images"] == 12 and m["mia_members"] == 12
    assert 0 <= m["mia_auc_low"] <= m["mia_auc"] <= m["mia_auc_high"] <= 1 and m["fd"] > 0
    assert 0 <= m["mem_ratio"] <= 1 and "heldout_mem_ratio" in m and "heldout_fd" in m
    report = (tmp_path / "a/report.md").read_text()
    assert f"of 16 samples ({m['mem_ratio']:.1%}) copy a training image" in report
    assert "![copies](copies.png)" in report and "Membership leakage" in report and "Held-out reference" in report
    for name in ("copies.png", "most_copied.png", "samples.png", "ratio_hist.png", "copied.csv"):
        assert (tmp_path / "a" / name).is_file(), name
    assert f"{round(16 * m['mem_ratio'])} of 16 samples copy a training image" in result.output


def test_the_bare_unet_and_the_registered_model_audit_as_the_pipeline_directory(trained, tmp_path):
    root, uri = trained
    runs = {}
    for name, model in {"pipeline": root / "run/model", "unet": root / "run/model/unet",
                        "registry": "models:/tiny@candidate"}.items():
        result = _audit("--model", model, "--train", root / "train.npz", "--num", 8, "--tracking-uri", uri,
                        "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs[name] = _metrics(tmp_path / name)
    assert runs["unet"] == runs["pipeline"] == runs["registry"]
    assert "mia_auc" not in runs["unet"] and "heldout_mem_ratio" not in runs["unet"]
    assert "No held-out images given" in (tmp_path / "unet/report.md").read_text()


def test_samples_saved_as_duplicated_training_images_are_each_found_as_copies(trained, tmp_path):
    """The model's own samples (as PNGs, each stored twice) among other images: every audit sample
    copies one, although each is its own second-nearest neighbour until duplicates are collapsed."""
    root, _ = trained
    folder = tmp_path / "train"
    result = CliRunner().invoke(main, ["sample", "--model", str(root / "run/model"), "--steps", "10", "--num", "6",
                                       "--out", str(folder)])
    assert result.exit_code == 0, result.output
    for png in sorted(folder.glob("*.png")):
        shutil.copy(png, folder / f"{png.stem}_again.png")
    g = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"other_{i}.png")
    result = _audit("--model", root / "run/model", "--train", folder, "--num", 6, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    m = _metrics(tmp_path / "a")
    assert m["mem_ratio"] == 1.0 and m["distinct_copied"] == 6 and m["duplicate_groups"] == 6
    assert m["unique_images"] == 12 and m["copies_on_duplicated_share"] == 1.0
    copied = (tmp_path / "a/copied.csv").read_text()
    assert "0000.png,2,1,1," in copied and "other_0.png,1,0," in copied  # image, stored, copies, nearest
    assert "6 of 6 samples copy a training image (6 distinct images)" in result.output


def _bad_inputs(root, tmp):
    np.savez(tmp / "big.npz", images=np.zeros((4, 16, 16), np.uint8))
    np.savez(tmp / "rgb.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp / "empty").mkdir()
    save_pipeline(build_unet(arch(), 4, 1, 0), build_scheduler(arch()), tmp / "small")
    return {
        "size": (["--train", tmp / "big.npz"], ["--train", "1x16x16", "1x8x8", "sample_size 8"]),
        "channels": (["--train", tmp / "rgb.npz"], ["--train", "3x8x8", "in_channels 1"]),
        "held-out size": (["--train", root / "train.npz", "--heldout", tmp / "big.npz"], ["--heldout", "1x16x16"]),
        "missing": (["--train", tmp / "absent.npz"], ["--train", "absent.npz", "no such file or folder"]),
        "empty folder": (["--train", tmp / "empty"], ["--train", "empty", "no .png/.jpg/.jpeg images found"]),
        "missing model": (["--train", root / "train.npz", "--model", tmp / "nomodel"], ["--model", "nomodel"]),
        "4-pixel model": (["--train", root / "train.npz", "--model", tmp / "small"], ["--model", "sample_size 4"]),
    }


@pytest.mark.parametrize("case", ["size", "channels", "held-out size", "missing", "empty folder", "missing model",
                                  "4-pixel model"])
def test_inputs_the_model_cannot_be_audited_on_give_one_line(trained, tmp_path, case):
    root, _ = trained
    args, words = _bad_inputs(root, tmp_path)[case]
    model = [] if "--model" in args else ["--model", root / "run/model"]
    result = _audit(*model, *args, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
    assert not (tmp_path / "out").exists()


def test_with_guidance_the_report_sets_both_samplings_side_by_side(trained, tmp_path):
    root, _ = trained
    result = _audit("--model", root / "run/model", "--train", root / "train.npz", "--num", 8, "--guidance", "amg",
                    "--out", tmp_path / "g")
    assert result.exit_code == 0, result.output
    plain, guided = _metrics(tmp_path / "g"), _metrics(tmp_path / "g/amg")
    report = (tmp_path / "g/report.md").read_text()
    assert "## With anti-memorization guidance (AMG [sampling])" in report
    assert f"| samples copying a training image | {plain['mem_ratio']:.3f} | {guided['mem_ratio']:.3f} |" in report
    assert (tmp_path / "g/amg/copies.png").is_file() and "![copies with AMG](amg/copies.png)" in report
