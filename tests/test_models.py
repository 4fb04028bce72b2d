"""Saved models (diffusers layout): a model folder whose files were truncated or overwritten is
said in one line naming the file, never as diffusers' tracebacks."""
import pytest

from pipeline.core.io import UnreadableFile
from pipeline.core.models import build_scheduler, build_unet, load_pipeline, save_pipeline
from tiny import arch


@pytest.fixture
def saved(tmp_path):
    cfg = arch()
    save_pipeline(build_unet(cfg, 8, 1, 0), build_scheduler(cfg), tmp_path / "model")
    return tmp_path / "model"


def test_a_saved_model_loads_back(saved):
    unet, scheduler = load_pipeline(saved)
    assert unet.config.sample_size == 8 and scheduler.config.num_train_timesteps == 10


@pytest.mark.parametrize("damaged", ["unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                                     "scheduler/scheduler_config.json"])
def test_a_truncated_model_file_is_named_in_one_line(saved, damaged):
    file = saved / damaged
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match=f"{file}: cannot be read"):
        load_pipeline(saved)


def test_iet_agc_sample_says_a_truncated_model_in_one_line(saved, tmp_path):
    from click.testing import CliRunner

    from commands.cli import main

    file = saved / "unet/diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    result = CliRunner().invoke(main, ["sample", "--model", str(saved), "--grid", str(tmp_path / "grid.png")])
    assert result.exit_code == 1 and f"{file}: cannot be read" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "grid.png").exists()
