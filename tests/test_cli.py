"""`iet-agc sample` as a user runs it: from the registry or a local directory, seeded, clear errors."""
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands.cli import main  # noqa: E402
from pipeline.compare import model_registry  # noqa: E402
from pipeline.core.models import build_scheduler, build_unet, save_pipeline  # noqa: E402
from tiny import arch  # noqa: E402

TINY = arch()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model on disk, registered as tiny@candidate in a SQLite store."""
    root = tmp_path_factory.mktemp("cli")
    save_pipeline(build_unet(TINY, 8, 1, 0), build_scheduler(TINY), root / "model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp)
    model_registry.claim_names(client, ["tiny"])
    model_registry.register(client, run.info.run_id, root / "model", "tiny", "candidate", label="iet")
    return root / "model", uri


def _sample(*args):
    return CliRunner().invoke(main, ["sample", "--steps", "3", *args])


def _pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))]


def test_sample_from_the_registry_writes_n_pngs_and_a_grid(model, tmp_path):
    _, uri = model
    result = _sample("--model", "models:/tiny@candidate", "--tracking-uri", uri, "--num", "5",
                     "--out", str(tmp_path / "imgs"), "--grid", str(tmp_path / "grid.png"))
    assert result.exit_code == 0, result.output
    assert "tiny version 1" in result.output
    images = _pngs(tmp_path / "imgs")
    assert len(images) == 5 and images[0].shape == (8, 8) and images[0].dtype == np.uint8
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 8 and grid.height > 2 * 8  # 3 x 2 tiles, upscaled


def test_same_seed_same_images_from_registry_and_local_directory(model, tmp_path):
    local, uri = model
    runs = {}
    for name, args in {"registry": ["--model", "models:/tiny/1", "--tracking-uri", uri, "--seed", "7"],
                       "local": ["--model", str(local), "--seed", "7"],
                       "other seed": ["--model", str(local), "--seed", "8"]}.items():
        result = _sample(*args, "--num", "4", "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        runs[name] = _pngs(tmp_path / name)
    assert all(np.array_equal(a, b) for a, b in zip(runs["registry"], runs["local"]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs["local"], runs["other seed"]))


@pytest.mark.parametrize("args, words", [
    (["--model", "models:/tiny/99"], ["models:/tiny/99", "no version 99", "versions: 1"]),
    (["--model", "models:/absent@candidate"], ["no registered model 'absent'", "tiny"]),
    (["--model", "models:/tiny@candidate", "--tracking-uri", "http://127.0.0.1:9"],
     ["http://127.0.0.1:9 cannot be reached"]),
    (["--model", "no/such/dir"], ["no/such/dir", "no such model directory"]),
    (["--model", "LOCAL", "--steps", "50"], ["--steps", "10 training timesteps"]),
    (["--model", "LOCAL", "--device", "cuda:99"], ["--device", "'cuda:99' is not available here"]),
    (["--model", "LOCAL", "--device", "gpu0"], ["--device", "'gpu0' is not a torch device"]),
])
def test_errors_name_the_problem_and_exit_non_zero(model, tmp_path, args, words):
    local, uri = model
    args = [str(local) if a == "LOCAL" else a for a in args]
    if "--tracking-uri" not in args:
        args += ["--tracking-uri", uri]
    result = CliRunner().invoke(main, ["sample", *args, "--num", "2", "--grid", str(tmp_path / "g.png")])
    assert result.exit_code != 0
    assert all(w in result.output for w in words), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "g.png").exists()


def test_nothing_to_write_is_a_usage_error(model):
    result = _sample("--model", str(model[0]))
    assert result.exit_code == 2 and "--out" in result.output and "--grid" in result.output


def test_the_console_script_is_this_command_line():
    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["iet-agc"].split(":")
    assert getattr(importlib.import_module(module), name) is main


def test_help_is_quick_and_does_not_import_torch():
    code = ("import sys; from commands.cli import main; "
            "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    out = subprocess.run([sys.executable, "-m", "commands.cli", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "sample" in out.stdout


@pytest.mark.parametrize("command", ["tradeoff", "ablation"])
def test_reading_commands_refuse_a_missing_sqlite_store_instead_of_creating_it(tmp_path, command):
    typo = tmp_path / "typo.db"
    extra = ["--out", str(tmp_path / "t.png")] if command == "tradeoff" else []
    result = CliRunner().invoke(main, [command, "--tracking-uri", f"sqlite:///{typo}", *extra])
    assert result.exit_code == 1 and f"no MLflow store at {typo}" in result.output, result.output
    assert not typo.exists() and not (tmp_path / "t.png").exists()
