"""The report stage reads only the files dvc.yaml gives it: the same inputs give the same report
whatever else the MLflow store holds (DVC tracks no store), and a failed report writes none of its
outputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from safetensors.torch import save_file

from pipeline.core.config import Params, TrackingConfig
from pipeline.core.data import ImageSet
from pipeline.track.tracking import PARENT_KEY, Tracker
from stages import report
from tiny import dvc_args, dvc_paths, dvc_stage, synthetic_curve

OUTPUTS = [o for key in ("outs", "metrics", "plots") for o in dvc_paths(dvc_stage("report")[key])]
METRICS = {"mem_ratio": 0.6, "heldout_mem_ratio": 0.01, "fd": 1.5, "official_below_0.15": 0.5, "mean_nn1": 2.0,
           "heldout_fd": 0.2}
CURVE = "round,mem_ratio,mean_nn1,official_below_0.15,fd,kid\n1,0.1,3.0,0.2,4.0,0.1\n2,0.5,2.0,0.6,2.0,0.05\n"


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A project folder holding every file the report stage reads, at dvc.yaml's paths."""
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # dvc.yaml's paths are relative
    for m in ("baseline", "iet"):
        for folder in (f"runs/eval/{m}", f"runs/{m}"):
            Path(folder).mkdir(parents=True, exist_ok=True)
        Path(f"runs/eval/{m}/metrics.json").write_text(json.dumps(METRICS))
        Path(f"runs/{m}/train_info.json").write_text(json.dumps(
            {"train_seconds": 1.0, "images_seen": 64, "shards": 4, "rounds": 2, "variant": "IET-AGC+"}))
        for name in ("samples.png", "copies.png", "most_copied.png"):
            Image.new("L", (8, 8)).save(f"runs/eval/{m}/{name}")
        Path(f"runs/eval/{m}/rounds.csv").write_text(CURVE)
        np.savez_compressed(f"runs/eval/{m}/samples.npz", images=np.random.default_rng(0).integers(0, 2, (6, 1, 4, 4), np.uint8))
        synthetic_curve([0.0, 0.1, 0.3] if m == "baseline" else [0.0, 0.0, 0.1], [2.0, 1.0, 0.0]).save(
            f"runs/eval/{m}/curve.npz")
    Path("runs/eval/baseline/copied.csv").write_text("sample_id,group,size,copies,nearest,loss\n0,0,1,3,5,0.1\n1,1,1,0,1,0.4\n")
    for phase in ("train", "aggregate", "profile"):  # a complete round 1: each phase's folder holds its last file
        Path(f"runs/iet/rounds/round_1/{phase}").mkdir(parents=True)
    Path("runs/iet/rounds/round_1/train/train.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, "runs/iet/rounds/round_1/aggregate/aggregated.safetensors")
    Path("runs/iet/rounds/round_1/profile/round.json").write_text("{}")
    Path("runs/iet/rounds/round_1/profile/loss_table.csv").write_text("sample_id,drawn,skip_rate\n0,4,0.75\n1,4,0.0\n")
    ImageSet(images=np.stack([np.zeros((1, 4, 4), np.uint8), np.ones((1, 4, 4), np.uint8)]), labels=np.zeros(2),
             ids=np.arange(2)).save("data/prepared/train.npz")
    return tmp_path


def _params(root: Path, store: str) -> str:
    path = root / f"params_{Path(store).stem}.yaml"
    path.write_text(yaml.safe_dump(Params(tracking=TrackingConfig(uri=store)).model_dump(mode="json")))
    return str(path)


def _other_experiments(store: str) -> None:
    """Two pipeline runs of other params in the same MLflow experiment, as `dvc exp run` logs them."""
    for tau in (0.7, 0.9):
        tracker = Tracker(Params(tracking=TrackingConfig(uri=store), agc=Params().model_dump()["agc"] | {"tau": tau}))
        tracker.log_metrics(tracker.parent_id, {"baseline.mem_ratio": 0.3, "baseline.fd": 3.0,
                                                "iet.mem_ratio": tau / 10, "iet.fd": 2.0 + tau})
        child = tracker.child("evaluate iet")
        tracker.log_metrics(child, {"round_fd": 5.0, "round_mem_ratio": 0.1}, step=1)
        tracker.finish(child)
        tracker.finish(tracker.parent_id)


def _report(root: Path, store: str) -> dict[str, bytes]:
    result = CliRunner().invoke(report.main, ["--params", _params(root, store), *dvc_args("report")])
    assert result.exit_code == 0, result.output
    written = {o: (root / o).read_bytes() for o in OUTPUTS}
    for o in OUTPUTS:
        (root / o).unlink()  # as DVC deletes a stage's outputs before running it
    return written


def test_the_same_inputs_give_the_same_report_whatever_the_store_holds(inputs):
    empty, busy = (f"sqlite:///{inputs / name}.db" for name in ("empty", "busy"))
    _other_experiments(busy)
    first, second = _report(inputs, empty), _report(inputs, busy)
    for name in ("reports/report.md", "reports/summary.json"):
        assert first[name] == second[name], name
    text, summary = first["reports/report.md"].decode(), json.loads(first["reports/summary.json"])
    assert "| model | memorization ratio" in text and "iet-agc tradeoff" in text
    # the answer first, in words, never a relative change of the final ratios
    assert " vs baseline at matched quality: " in text.splitlines()[2] and "Relative change" not in text
    # matched at FD 2.0, the baseline's own last point: no difference
    assert summary["iet.mem_at_matched_quality"] == pytest.approx(0.0)
    assert summary["risk.risk_copied_images"] == 1
    assert summary["risk.risk_skip_auc"] == 1.0  # the IET round's loss table was read: the copied image skipped most
    assert first["reports/curves.png"].startswith(b"\x89PNG") and first["reports/side_by_side.png"].startswith(b"\x89PNG")
    assert "![both models side by side](side_by_side.png)" in text
    # it still logs: this run's numbers and files on its own parent run
    client = MlflowClient(busy)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("iet-agc").experiment_id])
                 if PARENT_KEY in r.data.tags and "iet.mem_at_matched_quality" in r.data.metrics]
    assert parent.info.status == "FINISHED" and parent.data.metrics["iet.mem_ratio"] == METRICS["mem_ratio"]
    assert {"report.md", "curves.png", "baseline"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.parametrize("failure", ["missing input", "mlflow fails"])
def test_a_failed_report_writes_none_of_its_outputs(inputs, monkeypatch, failure):
    if failure == "missing input":
        Path("runs/iet/train_info.json").unlink()
    else:  # the last step before the outputs are put in place
        def refuse(*args, **kwargs):
            raise MlflowException("artifact store full")
        monkeypatch.setattr(Tracker, "log_artifact", refuse)
    store = f"sqlite:///{inputs / 'mlflow.db'}"
    result = CliRunner().invoke(report.main, ["--params", _params(inputs, store), *dvc_args("report")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not [o for o in OUTPUTS if (inputs / o).exists()]
