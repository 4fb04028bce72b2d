"""Fine-tuning: model.init_from makes the baseline and IET start from a pretrained model on disk or
in MLflow, and a model that does not fit the data stops with a message naming it."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.train import rounds
from pipeline.core.config import ConfigError, parse_params
from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards
from pipeline.core.models import build_scheduler, build_unet, save_pipeline
from pipeline.core.pretrained import initial_unet
from tiny import ARCH as ARCH_KEYS, ROOT, arch, dvc_args, dvc_stage, tiny

ARCH = arch()
TINY = tiny(data={'train_size': 8}, train={'batch_size': 4, 'lr': 0.0001, 'warmup_share': 0}, iet={'shards': 2, 'local_epochs': 2}, msr={'skip_rate': 0.2, 'max_imbalance': 0.5})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny 'pretrained' model, perturbed so that no fresh initialisation is near it, saved as a bare
    UNet2DModel directory and as a DDPMPipeline directory."""
    root = tmp_path_factory.mktemp("pretrained")
    unet = build_unet(ARCH, 8, 1, seed=123)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(str(root / "unet_only"), safe_serialization=True)
    save_pipeline(unet, build_scheduler(ARCH), root / "pipeline")
    return root, {k: v.clone() for k, v in unet.state_dict().items()}


def _params(init_from, **groups):
    raw = {g: dict(v) for g, v in TINY.items()}
    raw["model"]["init_from"] = str(init_from)
    for group, values in groups.items():
        raw.setdefault(group, {}).update(values)
    return parse_params(raw)


def _train(p, plan, out):
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8), labels=np.arange(8) % 2,
                     ids=np.arange(8))
    shard = split_shards(train.labels, p.iet.shards, 0) if plan.shards > 1 else np.zeros(8, dtype=np.int64)
    rounds.run(p, plan, train, shard, out, out.parent / (out.name + ".state"))
    return {m: load_file(str(out / m / "unet/diffusion_pytorch_model.safetensors")) for m in ("model", "model_ema")}


def _distance(a, b):
    return torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b)).item()


@pytest.mark.parametrize("layout", ["unet_only", "pipeline"])
@pytest.mark.parametrize("make_plan", [rounds.Plan.baseline, rounds.Plan.iet], ids=["baseline", "iet"])
def test_fine_tuning_starts_from_the_pretrained_weights(pretrained, tmp_path, layout, make_plan):
    root, weights = pretrained
    p = _params(root / layout)
    final = _train(p, make_plan(p), tmp_path / "out")["model"]
    fresh = build_unet(p.model, 8, 1, p.seeds.train).state_dict()  # what training from scratch starts from
    moved = _distance(final, weights)
    assert moved > 0  # it did train
    assert moved < 0.02 * _distance(fresh, weights)


@pytest.mark.parametrize("make_plan", [rounds.Plan.baseline, rounds.Plan.iet], ids=["baseline", "iet"])
def test_a_negligible_learning_rate_leaves_the_pretrained_weights_bit_for_bit(pretrained, tmp_path, make_plan):
    root, weights = pretrained
    p = _params(root / "pipeline", train={"lr": 1e-30})  # Adam steps of ~1e-30 vanish in float32
    for name, final in _train(p, make_plan(p), tmp_path / "out").items():
        assert final.keys() == weights.keys()
        assert all(torch.equal(final[k], weights[k]) for k in weights), name


def test_architecture_keys_are_ignored_when_fine_tuning(pretrained):
    root, weights = pretrained
    # five levels would need a resolution divisible by 16; the pretrained model decides instead
    p = _params(root / "unet_only", model={"block_out_channels": [32, 64, 64, 64, 64], "attention": True})
    unet = initial_unet(p, seed=0)
    assert tuple(unet.config.block_out_channels) == (8, 16) and unet.training
    assert all(torch.equal(unet.state_dict()[k], weights[k]) for k in weights)


def test_a_model_of_another_resolution_or_channel_count_is_refused(pretrained):
    root, _ = pretrained
    for groups, words in (({"data": {"resolution": 16}}, ["sample_size is 8", "data.resolution is 16"]),
                          ({"data": {"channels": 3}}, ["in_channels is 1", "data.channels is 3"])):
        with pytest.raises(ConfigError) as err:
            initial_unet(_params(root / "pipeline", **groups), seed=0)
        assert "model.init_from" in str(err.value) and str(root / "pipeline") in str(err.value)
        assert all(w in str(err.value) for w in words), str(err.value)


def test_a_pipeline_with_another_number_of_timesteps_is_refused(pretrained):
    root, _ = pretrained
    with pytest.raises(ConfigError, match="num_train_timesteps 10.*model.num_train_timesteps is 50"):
        initial_unet(_params(root / "pipeline", model={"num_train_timesteps": 50}), seed=0)
    # a bare UNet has no scheduler to disagree with: the project's own schedule is used
    assert initial_unet(_params(root / "unet_only", model={"num_train_timesteps": 50}), seed=0) is not None


def test_missing_or_foreign_directories_name_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"model.init_from: {missing}: no such file"):
        initial_unet(_params(missing), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}: not a diffusers model"):
        initial_unet(_params(tmp_path / "empty"), seed=0)
    (tmp_path / "conditional").mkdir()
    (tmp_path / "conditional/config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ConfigError, match=f"{tmp_path / 'conditional'}: holds a UNet2DConditionModel"):
        initial_unet(_params(tmp_path / "conditional"), seed=0)


def test_an_mlflow_model_of_this_project_is_fetched_and_loaded(pretrained, tmp_path):
    from mlflow import MlflowClient

    from pipeline.compare import model_registry

    root, weights = pretrained
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    model_registry.claim_names(client, ["tiny"])
    uris = model_registry.register(client, run_id, root / "pipeline", "tiny", "champion", "tiny")  # as the register stage
    client.log_artifacts(run_id, str(root / "pipeline"), "files/pipeline")  # a plain run artifact too
    for uri in (uris["alias_uri"], uris["model_uri"], f"runs:/{run_id}/files"):
        unet = initial_unet(_params(uri, tracking={"uri": store}), seed=0)
        assert all(torch.equal(unet.state_dict()[k], weights[k]) for k in weights), uri
    with pytest.raises(ConfigError, match="model.init_from: models:/absent/1: no registered model 'absent'"):
        initial_unet(_params("models:/absent/1", tracking={"uri": store}), seed=0)


def _broken_copy(pretrained, tmp_path, layout):
    import shutil

    dest = tmp_path / layout
    shutil.copytree(pretrained[0] / layout, dest)
    return dest, (dest / "config.json" if layout == "unet_only" else dest / "unet/config.json")


@pytest.mark.parametrize("layout", ["unet_only", "pipeline"])
@pytest.mark.parametrize("breakage, words", [
    ("malformed_config", "is not readable JSON"),
    ("no_class_name", "names no model class (_class_name)"),
    ("missing_weights", "cannot be loaded"),
])
def test_a_broken_init_from_model_is_one_config_error_naming_it(pretrained, tmp_path, layout, breakage, words):
    root, config = _broken_copy(pretrained, tmp_path, layout)
    if breakage == "malformed_config":
        config.write_text('{"_class_name": "UNet2DModel", ')
    elif breakage == "no_class_name":
        config.write_text(config.read_text().replace('"_class_name"', '"_other"'))
    else:
        (config.parent / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        initial_unet(_params(root), seed=0)
    message = str(err.value)
    assert message.startswith(f"model.init_from: {root}") and words in message and "\n" not in message
    assert "None" not in message


def test_the_pretrain_stage_trains_on_unseen_pool_images_and_a_run_fine_tunes_from_it(tmp_path, monkeypatch):
    """stages/pretrain.py: off, only its info.json; on, a model trained on pool images that are no
    training or held-out image, which model.init_from: <out>/model then starts a run from."""
    import yaml
    from click.testing import CliRunner

    from pipeline.core.data import unseen_images
    from stages import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    g = np.random.default_rng(0)
    pool = ImageSet(images=g.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8), labels=np.arange(20) % 2,
                    ids=np.arange(20))
    train, heldout = (ImageSet(images=pool.images[idx], labels=pool.labels[idx], ids=pool.ids[idx])
                      for idx in (np.arange(8), np.arange(8, 11)))
    paths = {name: tmp_path / f"{name}.npz" for name in ("pool", "train", "heldout")}
    for name, images in zip(paths, (pool, train, heldout)):
        images.save(paths[name])
    assert unseen_images(pool, [train, heldout], 100, 0).ids.tolist() == list(range(11, 20))
    assert len(unseen_images(pool, [train, heldout], 4, 0)) == 4

    def stage(enabled: bool):
        raw = {g: dict(v) for g, v in TINY.items()} | {"pretrain": {"enabled": enabled, "steps": 4, "rounds": 2}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).model_dump(mode="json")))
        args = ["--params", str(tmp_path / "params.yaml"), *(f"--{n}={p}" for n, p in paths.items()),
                f"--out={tmp_path / 'pre'}", f"--resume={tmp_path / 'state'}"]
        result = CliRunner().invoke(pretrain.main, args)
        assert result.exit_code == 0, result.output
    stage(False)
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["info.json"]
    stage(True)
    assert (tmp_path / "pre/model/unet/config.json").is_file()
    p = _params(tmp_path / "pre/model")
    start = initial_unet(p, 0).state_dict()
    saved = load_file(str(tmp_path / "pre/model/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(start[k], saved[k]) for k in saved)



def _run_stages(root, monkeypatch, names, **groups) -> None:
    """The stages `names`, in-process as `dvc repro` runs them, in `root` with the tiny params,
    pretrain.enabled and `groups`' keys."""
    import importlib

    from click.testing import CliRunner

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    groups = {"pretrain": {"enabled": True, "images": 32, "steps": 8, "rounds": 2}, **groups}
    for group, values in tiny(**groups).items():
        raw[group].update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)
    for name in names:
        result = CliRunner().invoke(importlib.import_module(f"stages.{name}").main, dvc_args(name))
        assert result.exit_code == 0, (name, result.output)


def test_every_training_seed_fine_tunes_one_pretrained_model(tmp_path, monkeypatch):
    """pretrain.seed, not seeds.train, seeds the pretrained model: seeds of the fine-tuning are
    replicates of it, not of the pretraining (and DVC does not pretrain again for each)."""
    weights = {}
    for seeds_train, seed in ((0, 0), (1, 0), (0, 1)):
        root = tmp_path / f"train{seeds_train}-pretrain{seed}"
        _run_stages(root, monkeypatch, ("prepare", "pretrain"), seeds={"train": seeds_train},
                    pretrain={"enabled": True, "images": 32, "steps": 4, "rounds": 1, "seed": seed})
        weights[seeds_train, seed] = load_file(str(root / "runs/pretrain/model/unet/diffusion_pytorch_model.safetensors"))
    assert _distance(weights[1, 0], weights[0, 0]) == 0.0 and _distance(weights[0, 1], weights[0, 0]) > 0
    params = dvc_stage("pretrain")["params"]
    assert "seeds.train" not in params and "pretrain" in params


def test_the_pretrained_model_is_checked_in_its_own_stage(tmp_path, monkeypatch):
    """pretrain.enabled: the pretrain stage trains on pool images only, pretrain_check samples the model
    and writes its copy rate and quality. The check is its own stage so that an evaluation parameter
    re-runs it, never the pretraining (nor the fine-tuning that depends on it)."""
    _run_stages(tmp_path, monkeypatch, ("prepare", "features", "pretrain", "pretrain_check"),
                model={**ARCH_KEYS, "init_from": "runs/pretrain/model"},
                tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                eval={"num_samples": 8, "ddim_steps": 2, "batch_size": 8, "classifier_epochs": 1},
                data={"duplicates": {"images": 2, "copies": 3, "near": False}})
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    check = json.loads((tmp_path / "runs/pretrain_check/metrics.json").read_text())
    assert check["pretrained"] is True and check["images"] == 32 and check["num_samples"] == 8
    assert 0.0 <= check["mem_ratio"] <= 1.0 and np.isfinite(check["kid"]) and check["fd"] >= 0
    assert check["distinct_copied"] <= round(check["mem_ratio"] * 8) and check["unique_images"] == 12
    # the pretraining belongs to the user's pipeline run, whose params say what the user set
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["model.init_from"] == "runs/pretrain/model"
    assert [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id] == ["pretrain"]
    training, checking = dvc_stage("pretrain"), dvc_stage("pretrain_check")
    assert not [k for k in training["params"] if str(k).startswith("eval")] and "runs/features/net" not in training["deps"]
    assert {"eval.num_samples", "eval.ddim_steps", "seeds.eval"} <= set(checking["params"])
