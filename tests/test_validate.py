"""The validate stage under a real `dvc repro`: a bad value stops the run before DVC deletes any
stage's outputs, and a valid change re-runs only the stages that read it."""
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages import validate
from tiny import project_copy, run, tiny

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny(data={'train_size': 8, 'heldout_size': 4}, train={'warmup_share': 0}, iet={'shards': 2, 'rounds': 1, 'local_epochs': 1}, msr={'enabled': False}, eval={'ddim_steps': 4})


def _run(args, cwd, env, ok=True):
    return run(args, cwd, env, ok)


def _set(repo, group, key, value):
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw[group][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def repo(tmp_path):
    return project_copy(tmp_path / "repo", {**TINY, "tracking": {"uri": f"sqlite:///{tmp_path / 'repo/mlflow.db'}"}})


@pytest.mark.slow  # a dvc repro of the IET model's every round stage: CI runs it (make test-slow)
def test_a_bad_value_under_dvc_repro_keeps_the_trained_model(repo):
    repo, env = repo
    _run(["dvc", "repro", "iet_finish"], repo, env)
    kept = ["runs/iet/model/unet/diffusion_pytorch_model.safetensors", "runs/iet/model_ema/model_index.json",
            "runs/iet/train_info.json", "runs/iet/curves.csv"]
    before = {f: (repo / f).read_bytes() for f in kept}

    _set(repo, "agc", "tau", 1.5)
    log = _run(["dvc", "repro", "iet_finish"], repo, env, ok=False)
    assert "agc.tau: must be in (0, 1] (got 1.5)" in log
    assert {f: (repo / f).read_bytes() for f in kept if (repo / f).is_file()} == before

    _set(repo, "agc", "tau", 0.5)  # back to valid: nothing to redo but the check itself
    log = _run(["dvc", "repro", "iet_finish"], repo, env)
    assert set(re.findall(r"Running stage '([^']+)'", log)) <= {"validate"}
    _set(repo, "eval", "num_samples", 8)  # a key no training stage reads: they stay cached
    log = _run(["dvc", "repro", "iet_finish"], repo, env)
    assert set(re.findall(r"Running stage '([^']+)'", log)) == {"validate"}

    # a stage that fails after DVC deleted its outputs: every output that took training is cached,
    # and `dvc checkout` brings it back without training again
    for name in ("model", "model_ema", "train_info.json", "curves.csv"):
        _run(["rm", "-rf", f"runs/iet/{name}"], repo, env)
    _run(["dvc", "checkout", "iet_finish"], repo, env)
    assert {f: (repo / f).read_bytes() for f in kept} == before
    assert "up to date" in _run(["dvc", "status", "iet_finish"], repo, env)
    assert "runs/iet" not in _run(["git", "status", "--porcelain"], repo, env)  # ignored, not left for git


def test_the_marker_is_the_same_for_all_valid_params(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    outputs = []
    for tau in (0.5, 0.8):
        raw["agc"]["tau"] = tau
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        out = tmp_path / f"ok{tau}"
        result = CliRunner().invoke(validate.main, ["--pipeline", str(ROOT / "dvc.yaml"), "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_validate_stage_writes_nothing_for_bad_params(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["seeds"]["train"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "ok"
    result = CliRunner().invoke(validate.main, ["--pipeline", str(ROOT / "dvc.yaml"), "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 1 and "seeds.train" in result.output and not out.exists()


def test_rounds_that_dvc_yaml_does_not_list_are_refused_naming_the_command(tmp_path):
    """`dvc exp run -S iet.rounds=6` alone would run the 4 rounds dvc.yaml lists and say nothing."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["iet"]["rounds"] = 6
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(validate.main, ["--pipeline", str(ROOT / "dvc.yaml"), "--params", str(tmp_path / "params.yaml"),
                                                "--out", str(tmp_path / "ok")])
    assert result.exit_code == 1 and "run `iet-agc rounds 6`" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ok").exists()
