"""Outputs are written atomically and with the permissions the user's umask asks for."""
import os
import stat

import numpy as np
import pytest

from pipeline.evaluate import features
from pipeline.core.data import ImageSet
from pipeline.core.figures import save_grid
from pipeline.core.io import write_json


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_respect_the_umask(umask, tmp_path):
    import torch

    write_json(tmp_path / "a.json", {"x": 1})
    ImageSet(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(2, np.int64), np.arange(2)).save(tmp_path / "d.npz")
    save_grid(torch.zeros(4, 1, 4, 4), tmp_path / "grid.png")
    features.save_feature_net(features.FeatureNet(channels=1, num_classes=2), tmp_path / "net")
    for name in ("a.json", "d.npz", "grid.png", "net/" + features.WEIGHTS):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert _mode(tmp_path / "net") == 0o777 & ~umask


def test_saved_models_respect_the_umask(umask, tmp_path):
    from pipeline.core.config import ModelConfig
    from pipeline.core.models import build_scheduler, build_unet, save_pipeline

    cfg = ModelConfig(block_out_channels=(8, 16), attention=False, num_train_timesteps=10)
    save_pipeline(build_unet(cfg, 8, 1, seed=0), build_scheduler(cfg), tmp_path / "model")
    weights = tmp_path / "model/unet/diffusion_pytorch_model.safetensors"
    assert _mode(weights) == 0o666 & ~umask
    assert _mode(tmp_path / "model/unet") == 0o777 & ~umask


@pytest.mark.parametrize("umask", [0o002], indirect=True)  # 0664: neither safetensors' 0600 nor a default 0644
def test_the_round_folders_and_the_training_outputs_respect_the_umask(umask, tmp_path):
    """The resume state (runs/.resume/<stage>/samples.safetensors, now each round's folders) was
    written 0600 (safetensors' own mode, not through atomic_path) while its neighbours followed the
    umask."""
    from pipeline.train import rounds
    from pipeline.core.config import parse_params
    from pipeline.train.ensemble import split_shards
    from tiny import tiny

    p = parse_params(tiny(iet={"rounds": 2, "local_epochs": 1, "checkpoints_per_round": 2}))
    train = ImageSet(np.random.default_rng(0).integers(0, 256, (12, 1, 8, 8), dtype=np.uint8),
                     np.arange(12) % 3, np.arange(12))
    modes = {}

    def look(root):
        modes.update({str(f.relative_to(tmp_path)): (_mode(f), 0o777 if f.is_dir() else 0o666) for f in root.rglob("*")})

    rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), tmp_path / "out", tmp_path / "rounds")
    look(tmp_path / "rounds")  # kept after the run: it is the record
    look(tmp_path / "out")
    for r in (1, 2):
        assert {f"rounds/round_{r}", *(f"rounds/round_{r}/{phase}" for phase in ("train", "aggregate", "profile")),
                f"rounds/round_{r}/train/samples.safetensors", f"rounds/round_{r}/train/proxy_0.safetensors",
                f"rounds/round_{r}/train/midpoint_01_proxy_0.safetensors", f"rounds/round_{r}/train/train.json",
                f"rounds/round_{r}/aggregate/aggregated.safetensors", f"rounds/round_{r}/aggregate/checkpoint_01.safetensors",
                f"rounds/round_{r}/profile/samples.safetensors", f"rounds/round_{r}/profile/mitigations_0.safetensors",
                f"rounds/round_{r}/profile/loss_table.csv", f"rounds/round_{r}/profile/round.json"} <= modes.keys()
    assert "out/model/unet" in modes and "out/train_info.json" in modes
    wrong = {f: oct(mode) for f, (mode, full) in modes.items() if mode != full & ~umask}
    assert not wrong, wrong


@pytest.mark.parametrize("name", ["metrics.json", "net.safetensors"])
def test_a_truncated_file_the_project_reads_back_is_named_in_one_line(tmp_path, name):
    """Every JSON and safetensors file a stage reads back (metrics, train_info, the feature net, the
    round checkpoints, Inception statistics) goes through read_json / load_tensors: truncated, it is
    an UnreadableFile (a FileNotFoundError, which every stage and command reports in one line)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.core.io import UnreadableFile, load_tensors, read_json

    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text('{"mem_ratio": 0.25, "fd": 3.5}')
    else:
        save_file({"w": torch.ones(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match=f"{path}: cannot be read"):
        (read_json if name.endswith(".json") else load_tensors)(path)


def test_a_stage_says_a_truncated_feature_net_in_one_line(tmp_path):
    import click
    from click.testing import CliRunner

    from pipeline.evaluate.features import FeatureNet, save_feature_net
    from stages import stage

    save_feature_net(FeatureNet(channels=1, num_classes=3), tmp_path / "net")
    weights = next((tmp_path / "net").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:40])

    @click.command()
    @stage
    def fake():
        from pipeline.evaluate.features import load_feature_net

        load_feature_net(tmp_path / "net")

    result = CliRunner().invoke(fake, [])
    assert result.exit_code == 1 and f"{weights}: cannot be read" in result.output and "Traceback" not in result.output
