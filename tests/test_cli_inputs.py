"""`iet-agc` on bad input: `preset --write` leaves its target alone unless the merged file is
valid, files that are not parameter mappings are one line, and `sample` checks its destinations,
its seed and the model's config before any sampling."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from commands.cli import main as cli
from tiny import arch

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "params.yaml")


def _preset(tmp_path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_a_refused_preset_leaves_the_write_target_untouched(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text("# the user's file, comments and all\n")
    result = CliRunner().invoke(cli, ["preset", str(_preset(tmp_path, "agc:\n  tau: 1.5\n")), "--base", BASE,
                                      "--write", str(target)])
    assert "agc.tau: must be in (0, 1]" in _one_line_error(result)
    assert target.read_text() == "# the user's file, comments and all\n"
    result = CliRunner().invoke(cli, ["preset", str(_preset(tmp_path, "agc:\n  tau: 0.8\n")), "--base", BASE,
                                      "--write", str(target)])
    assert result.exit_code == 0, result.output
    assert "tau: 0.8" in target.read_text() and "comments are not kept" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "preset.yaml"]  # no temporary left


@pytest.mark.parametrize("text, message", [
    ("agc: [1,\n", "not valid YAML"),
    ("- agc\n- tau\n", "must be a mapping of parameter groups, with names as keys"),
    ("agc:\n  1: 0.5\n", "must be a mapping of parameter groups, with names as keys"),
    ("seeds:\n  data:\n    deep: 1\n", "seeds.data"),
])
def test_a_preset_that_is_not_a_parameter_mapping_is_one_line(tmp_path, text, message):
    result = CliRunner().invoke(cli, ["preset", str(_preset(tmp_path, text)), "--base", BASE])
    assert message in _one_line_error(result)


def test_a_preset_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_bytes(b"agc:\n  tau: 0.5 # \xff\n")
    assert f"{path}: not UTF-8 text (byte 0xff" in _one_line_error(CliRunner().invoke(cli, ["preset", str(path), "--base", BASE]))


def test_write_into_a_missing_folder_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["preset", str(_preset(tmp_path, "agc:\n  tau: 0.8\n")), "--base", BASE,
                                      "--write", str(tmp_path / "missing/params.yaml")])
    assert "--write" in result.output and "does not exist" in result.output and result.exit_code == 2
    assert not (tmp_path / "missing").exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from pipeline.core.models import build_scheduler, build_unet, save_pipeline

    path = tmp_path_factory.mktemp("model") / "model"
    cfg = arch()
    save_pipeline(build_unet(cfg, 8, 1, seed=0), build_scheduler(cfg), path)
    return path


def _sample(model, *args):
    return CliRunner().invoke(cli, ["sample", "--model", str(model), "--num", "2", "--device", "cpu", *args])


def test_a_grid_or_folder_that_cannot_be_written_is_refused_before_sampling(tmp_path, model):
    (tmp_path / "afile").write_text("x")
    for option, dest in [("--grid", "afile/g.png"), ("--out", "afile/pngs"), ("--out", "afile"), ("--grid", ".")]:
        result = _sample(model, option, str(tmp_path / dest))
        assert result.exit_code == 2 and option in result.output, result.output
        assert "sampling" not in result.output
    assert _sample(model, "--grid", str(tmp_path / "new/folder/g.png")).exit_code == 0  # made as before
    assert (tmp_path / "new/folder/g.png").is_file()


def test_a_seed_out_of_range_is_a_usage_error(model, tmp_path):
    result = _sample(model, "--seed", str(10**23), "--grid", str(tmp_path / "g.png"))
    assert result.exit_code == 2 and "--seed" in result.output and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("file, key, value, message", [
    ("unet/config.json", "sample_size", 200000, "sample_size 200000 needs at least"),
    ("unet/config.json", "sample_size", 0, "sample_size must be a positive image size (got 0)"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 0, "num_train_timesteps must be at least 1 (got 0)"),
])
def test_a_model_config_with_absurd_values_is_refused_before_allocating(tmp_path, model, file, key, value, message):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model, bad)
    config = json.loads((bad / file).read_text())
    config[key] = value
    (bad / file).write_text(json.dumps(config))
    result = _sample(bad, "--grid", str(tmp_path / "g.png"))
    assert message in _one_line_error(result) and f"{bad}/{file}" in result.output


@pytest.mark.parametrize("command", [["tradeoff", "--out", "{tmp}/afile/t.png"],
                                     ["ablation", "--figure", "{tmp}/afile/f.png"]])
def test_the_reading_commands_check_their_destination_before_reading_mlflow(tmp_path, command):
    (tmp_path / "afile").write_text("x")
    args = [a.format(tmp=tmp_path) for a in command] + ["--tracking-uri", f"sqlite:///{tmp_path}/absent.db"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
