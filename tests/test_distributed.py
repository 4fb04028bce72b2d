"""The iet stage under `accelerate launch` with 2 CPU processes (gloo) gives the same weights, loss
tables, moves and curves, bit for bit, as one plain process: every rank averages the same K states
in proxy order, so nothing is summed in a different order. K=3 puts two proxies on rank 0 and one
on rank 1; tau 0.9 makes AGC skip, TAA raise strengths and MSR move samples, all of which cross
ranks. The authors' prototype (ring MSR, queue TAA: each proxy's queue on its rank, skip counts
summed over ranks) is held to the same."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards
from tiny import tiny

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny(agc={'tau': 0.9}, msr={'fraction': 0.25, 'max_imbalance': 0.5})
AUTHORS = tiny(agc={'tau': 0.8}, msr={'mode': 'ring'}, taa={'mode': 'queue'})


def _workdir(path: Path, raw: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in raw.items():
        params[group].update(values)
    params["tracking"]["uri"] = f"sqlite:///{path / 'mlflow.db'}"
    path.mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), labels=np.arange(12) % 3,
                     ids=np.arange(100, 112))
    train.save(path / "train.npz")
    shard = split_shards(train.labels, 3, 0)
    (path / "shards.csv").write_text("sample_id,shard\n" + "".join(f"{i},{s}\n" for i, s in zip(train.ids, shard)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stages(cwd: Path, launcher: list[str], rounds: int):
    """The IET model's stages as dvc.yaml runs them: train and profile under `launcher`, aggregate
    and finish in one process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    common = ["iet", "--train", "train.npz", "--shards", "shards.csv", "--pretrained", "pretrain", "--rounds", "rounds"]
    commands = []
    for r in range(1, rounds + 1):
        commands += [[*launcher, "-m", "stages.train", *common, "--round", str(r)],
                     [sys.executable, "-m", "stages.aggregate", "--trained", f"rounds/round_{r}/train",
                      "--out", f"rounds/round_{r}/aggregate"],
                     [*launcher, "-m", "stages.profile", *common, "--round", str(r)]]
    for command in commands + [[sys.executable, "-m", "stages.finish", *common, "--out", "out"]]:
        out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{command} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"


# each case runs every round's stages as processes under accelerate (about 150 s here): the slow
# suite, which CI runs (make test-slow)
@pytest.mark.slow
@pytest.mark.parametrize("raw", [TINY, AUTHORS], ids=["default", "authors"])
def test_two_processes_give_the_same_run_as_one(tmp_path, raw):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    one, two = _workdir(tmp_path / "one", raw), _workdir(tmp_path / "two", raw)
    _stages(one, [sys.executable], raw["iet"]["rounds"])
    # accelerate's multi-CPU mode wants MPI; its multi-GPU launcher with Accelerator(cpu=True) semantics
    # (PartialState(cpu=True) in pipeline/core/distributed.py) runs torch.distributed over gloo instead.
    _stages(two, [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                  "--main_process_port", str(_free_port())], raw["iet"]["rounds"])

    info = [json.loads((d / "out/train_info.json").read_text()) for d in (one, two)]
    assert [i.pop("processes") for i in info] == [1, 2]
    assert [i.pop("train_seconds") > 0 for i in info] == [True, True]
    assert info[0] == info[1]
    for model in ("model", "model_ema"):
        a = load_file(str(one / f"out/{model}/unet/diffusion_pytorch_model.safetensors"))
        b = load_file(str(two / f"out/{model}/unet/diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{model}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert (one / "out/curves.csv").read_text() == (two / "out/curves.csv").read_text()
    moved = 0
    for r in range(1, raw["iet"]["rounds"] + 1):
        rd = f"rounds/round_{r}"
        for f in ("loss_table.csv", "moves.csv", "shards.csv"):
            assert (one / rd / "profile" / f).read_text() == (two / rd / "profile" / f).read_text(), f"round {r}: {f}"
        for f in ("aggregated", "aggregated_ema"):
            a, b = (load_file(str(d / rd / "aggregate" / f"{f}.safetensors")) for d in (one, two))
            assert all(torch.equal(a[k], b[k]) for k in a), f"round {r}: {f} weights differ"
        moved += (one / rd / "profile/moves.csv").read_text().count("\n") - 1
    assert moved > 0, "no sample moved: the test would not see MSR state cross ranks"

    # rank 0 alone logs: one iet run with one nested run per proxy and round
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{two / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("iet-agc").experiment_id])
    names = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert names.count("iet") == 1
    assert len([n for n in names if n.startswith("round ")]) == 3 * raw["iet"]["rounds"], names
