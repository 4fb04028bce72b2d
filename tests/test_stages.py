"""Stage commands as a user runs them: bad input stops with a message naming it, exit 1, no output;
and dvc.yaml, the one place that names each stage's files."""
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner

from stages import evaluate, prepare, split
from test_imports import _stages
from tiny import dvc_args, dvc_paths

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _params(tmp_path, **groups):
    raw = yaml.safe_load(PARAMS.read_text())
    raw["data"]["duplicates"]["images"] = 0  # the data as each test gives it (params.yaml duplicates 8 images)
    for group, values in groups.items():
        raw[group].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_bad_parameter_stops_prepare_before_writing(tmp_path):
    out = tmp_path / "prepared"
    result = CliRunner().invoke(prepare.main, ["--params", _params(tmp_path, agc={"tau": 1.5}), "--out", str(out)])
    assert result.exit_code == 1
    assert "agc.tau" in result.output and "(0, 1]" in result.output
    assert not out.exists()


def test_bad_data_names_the_file_and_writes_nothing(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "prepared"
    params = _params(tmp_path, data={"source": "folder", "path": str(images), "train_size": 2, "heldout_size": 2},
                     iet={"shards": 1})
    result = CliRunner().invoke(prepare.main, ["--params", params, "--out", str(out)])
    assert result.exit_code == 1 and "broken.png" in result.output
    assert not out.exists()


def test_prepare_then_split_on_the_digits_source(tmp_path):
    params = _params(tmp_path, data={"source": "digits", "train_size": 40, "heldout_size": 20, "resolution": 8},
                     iet={"shards": 4})
    out = tmp_path / "prepared"
    assert CliRunner().invoke(prepare.main, ["--params", params, "--out", str(out)]).exit_code == 0
    shards = tmp_path / "shards.csv"
    result = CliRunner().invoke(split.main, ["--params", params, "--train", str(out / "train.npz"), "--out", str(shards),
                                             "--groups", str(tmp_path / "groups.json")])
    assert result.exit_code == 0, result.output
    table = np.genfromtxt(shards, delimiter=",", names=True, dtype=int)
    assert len(table) == 40 and np.bincount(table["shard"]).tolist() == [10, 10, 10, 10]


def test_evaluate_without_a_trained_model_says_what_is_missing(tmp_path, monkeypatch):
    _params(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(evaluate.main, dvc_args("evaluate", "baseline"))
    assert result.exit_code == 1 and "runs/baseline/model" in result.output


def test_prepare_with_duplicates_records_them_and_split_shards_every_sample(tmp_path):
    params = _params(tmp_path, data={"source": "digits", "train_size": 40, "heldout_size": 20, "resolution": 8,
                                     "duplicates": {"images": 2, "copies": 5, "near": False}}, iet={"shards": 4})
    out = tmp_path / "prepared"
    result = CliRunner().invoke(prepare.main, ["--params", params, "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = yaml.safe_load((out / "info.json").read_text())
    assert info["train"] == 48 and info["added_duplicates"] == {"images": 2, "extra_samples": 8}
    assert info["train_duplicates"]["duplicated_samples"] >= 10  # found again from the pixels
    copies = np.genfromtxt(out / "copy_of.csv", delimiter=",", names=True, dtype=int)
    assert len(copies) == 8 and len(set(copies["copy_of"])) == 2
    shards = tmp_path / "shards.csv"
    result = CliRunner().invoke(split.main, ["--params", params, "--train", str(out / "train.npz"), "--out", str(shards),
                                             "--groups", str(tmp_path / "groups.json")])
    assert result.exit_code == 0, result.output
    assert len(np.genfromtxt(shards, delimiter=",", names=True, dtype=int)) == 48
    groups = yaml.safe_load((tmp_path / "groups.json").read_text())  # the 2 planted images, 5 samples each
    assert groups["exact"]["duplicate_groups"] >= 2 and groups["near"]["duplicate_groups"] >= groups["exact"]["duplicate_groups"]
    assert groups["near_duplicate"] == 0.02


VALIDATED = "runs/validate/params_ok"  # a dependency of every stage that none reads: it orders them after validate


def test_every_file_of_a_stage_is_on_its_command_line_in_dvc_yaml():
    """Each input exactly or the folder it is in (a round stage is given its model's rounds folder
    and its round, pipeline/core/layout.py finds the round's folders there), each output or the folder
    it is in; and no path there that dvc.yaml does not declare (but the pretrain stage's resume
    folder, which is no output: DVC would delete it)."""
    for name, spec in _stages().items():
        words = spec["cmd"].split()
        inputs = [d for d in dvc_paths(spec.get("deps")) if d.split("/")[0] not in ("pipeline", "stages")
                  and d != VALIDATED]
        outputs = [o for key in ("outs", "metrics", "plots") for o in dvc_paths(spec.get(key))]
        unpassed = [d for d in inputs if d not in words and not any(d.startswith(w + "/") for w in words)
                     and d != "${item.after}"]  # the previous round's folders, in the rounds folder
        assert not unpassed, f"stage {name}: inputs not on its cmd line: {unpassed}"
        unnamed = [o for o in outputs if not any(o == w or o.startswith(w + "/") for w in words)]
        assert not unnamed, f"stage {name}: outputs not on its cmd line: {unnamed}"
        undeclared = [w for w in words if "/" in w and not w.startswith("runs/.resume/") and w not in inputs
                      and not any(o == w or o.startswith(w + "/") for o in outputs + inputs)]
        assert not undeclared, f"stage {name}: paths on its cmd line that dvc.yaml does not declare: {undeclared}"
