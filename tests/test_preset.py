"""presets/p1-cifar10.yaml, the official CIFAR-10 setting of the IET-AGC paper
(docs/method.md#iet): valid on top of params.yaml, the
DDPM CIFAR-10 UNet (35.7M parameters, attention at 16x16), and a CPU smoke run of its whole
structure (K=10, folder source of 32x32 RGB images, dropout, attention) on tiny data."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from pipeline.train import rounds
from commands.cli import main as cli
from pipeline.core.config import load_params
from pipeline.core.data import prepare_splits
from pipeline.train.ensemble import split_shards
from pipeline.core.models import build_unet

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets/p1-cifar10.yaml"
# google/ddpm-cifar10-32, the official DDPM CIFAR-10 model converted to diffusers, has exactly this many
OFFICIAL_PARAMETERS = 35_746_307


def _merged(tmp_path) -> Path:
    out = tmp_path / "params.yaml"
    result = CliRunner().invoke(cli, ["preset", str(PRESET), "--base", str(ROOT / "params.yaml"), "--write", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_preset_is_the_official_model_and_setting(tmp_path):
    p = load_params(_merged(tmp_path))
    assert (p.iet.shards, p.train.batch_size, p.train.lr, p.train.ema_decay) == (10, 128, 2e-4, 0.9999)
    unet = build_unet(p.model, p.data.resolution, p.data.channels, 0)
    assert sum(q.numel() for q in unet.parameters()) == OFFICIAL_PARAMETERS
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"  # level 1 of a 32x32 model: 16x16


def test_the_preset_prints_one_dvc_argument_per_key():
    result = CliRunner().invoke(cli, ["preset", str(PRESET), "--base", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.split()
    assert lines[0::2] == ["-S"] * (len(lines) // 2)
    assert "model.block_out_channels=[128,256,256,256]" in lines and "model.attention_head_dim=null" in lines


def test_the_32_image_preset_is_the_first_default_nested_keys_included(tmp_path):
    out = tmp_path / "small32.yaml"
    result = CliRunner().invoke(cli, ["preset", str(ROOT / "presets/small32.yaml"), "--base", str(ROOT / "params.yaml"),
                                      "--write", str(out)])
    assert result.exit_code == 0, result.output
    p = load_params(out)
    assert (p.data.train_size, p.data.duplicates.images, p.data.train_samples) == (32, 0, 32)
    assert p.data.duplicates.copies == 16 and p.iet.local_epochs == 450  # the rest of data.duplicates kept
    assert CliRunner().invoke(cli, ["preset", str(ROOT / "presets/small32.yaml"), "--base", str(ROOT / "params.yaml")]
                              ).output.split() == ["-S", "data.train_size=32", "-S", "data.duplicates.images=0",
                                                   "-S", "iet.local_epochs=450"]


def test_a_preset_that_breaks_the_params_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"attention_resolutions": [12]}}))
    result = CliRunner().invoke(cli, ["preset", str(bad), "--base", str(ROOT / "params.yaml")])
    assert result.exit_code == 1 and "model.attention_resolutions" in result.output


def test_cpu_smoke_run_of_the_preset_on_tiny_data(tmp_path):
    """The preset's structure end to end on 24 tiny RGB images in two class folders; only sizes
    shrink (widths, images, batch, epochs) so that it runs in seconds."""
    g = np.random.default_rng(0)
    for i in range(24):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    raw = yaml.safe_load(_merged(tmp_path).read_text())
    raw["data"].update(path=str(tmp_path / "images"), train_size=20, heldout_size=4)
    raw["model"]["block_out_channels"] = [32, 64, 64, 64]
    raw["train"].update(batch_size=4, warmup_share=0.05, threads=1, device="cpu")
    raw["iet"].update(rounds=1, local_epochs=0.5)
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "smoke.yaml")
    train = prepare_splits(p.data, p.seeds.data).train
    assert train.images.shape[1:] == (3, 32, 32)
    summary = rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 10, 0), tmp_path / "out",
                         tmp_path / "rounds")
    assert summary["shards"] == 10 and summary["optimizer_steps"] == 10
    assert len(list((tmp_path / "rounds/round_1/train").glob("proxy_*.safetensors"))) == 10
    config = yaml.safe_load((tmp_path / "out/model/unet/config.json").read_text())
    assert config["dropout"] == 0.1 and config["norm_num_groups"] == 32 and config["layers_per_block"] == 2
    weights = load_file(str(tmp_path / "out/model/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
