"""train.device: every computing stage resolves it before its work, an absent or misspelt device is
one line naming the key, and the training step keeps its whole state on the chosen device.
On a machine without CUDA the device cases run on the CPU only; `cuda:<count>` is always absent."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.train import rounds
from pipeline.core.config import ConfigError, parse_params, resolve_device
from pipeline.core.data import ImageSet
from pipeline.train.ensemble import split_shards
from stages import evaluate, features, fid_reference, finish, profile, train
from tiny import dvc_args, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
ABSENT = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU", "cuda:"])
def test_a_misspelt_device_names_the_key_and_the_choices(bad):
    with pytest.raises(ConfigError, match=r"train\.device: must be auto, cpu, cuda or cuda:N"):
        parse_params({"train": {"device": bad}})


def test_auto_is_cuda_when_present_and_an_absent_gpu_is_a_config_error():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=rf"train\.device: '{ABSENT}' is not available here"):
        resolve_device(ABSENT)


@pytest.mark.parametrize("command, args", [
    (features.main, dvc_args("features")), (fid_reference.main, dvc_args("fid_reference")),
    (train.main, dvc_args("baseline_train", "1")), (train.main, dvc_args("iet_train", "1")),
    (profile.main, dvc_args("iet_profile", "1")), (finish.main, dvc_args("iet_finish")),
    (evaluate.main, dvc_args("evaluate", "iet")),
], ids=["features", "fid_reference", "baseline train", "iet train", "iet profile", "iet finish", "evaluate"])
def test_every_computing_stage_refuses_an_absent_device_before_any_work(command, args, tmp_path, monkeypatch):
    """Each stage resolves train.device first: it stops in one line naming the key, before reading
    its inputs (none exist here) or writing anything."""
    raw = yaml.safe_load(PARAMS.read_text())
    raw["train"]["device"] = ABSENT
    raw["eval"]["inception"] = True
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 1, result.output
    assert f"train.device: '{ABSENT}' is not available here" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


TINY = tiny(train={'batch_size': 4}, iet={'shards': 2, 'rounds': 1, 'local_epochs': 12}, taa={'rise': 0.5}, agc={'tau': 0.9}, msr={'skip_rate': 0.2, 'max_imbalance': 0.5})


@pytest.mark.parametrize("device", DEVICES)
def test_the_training_state_lives_on_the_chosen_device(device, tmp_path):
    """Images, shards' counts, generators, AGC banks and TAA strengths all on train.device, and a
    round trains there to finite weights."""
    p = parse_params({**TINY, "train": {**TINY["train"], "device": device}})
    g = np.random.default_rng(0)
    train = ImageSet(images=g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), labels=np.arange(12) % 3,
                     ids=np.arange(12))
    plan = rounds.Plan.iet(p)
    shard = split_shards(train.labels, 2, 0)
    r = rounds.start(p, plan, train, shard, tmp_path / "rounds", rounds.Hooks(), rounds.Ranks(device=resolve_device(device)))
    want = resolve_device(device).type
    agc, taa = r.mitigations.built["agc"], r.mitigations.built["taa"]
    assert r.images.device.type == want
    assert {proxy.generator.device.type for proxy in r.proxies.values()} == {want}
    assert {r.bank.device.type for r in agc.refs.values()} == {want} and taa.strength.device.type == want
    counts = rounds.train_proxies(r, rounds.Progress(shard), 0)
    assert counts.drawn.device.type == want and int(counts.drawn.sum()) == 2 * plan.steps_per_round * 4
    assert all(torch.isfinite(q).all() for q in r.proxies[0].model.parameters())
    assert float(taa.strength.max()) > 0, "TAA raised strengths on the device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_non_finite_loss_on_a_gpu_is_caught_at_the_next_curve_point():
    from pipeline.mitigation import Mitigations
    from pipeline.core.models import build_scheduler, build_unet
    from pipeline.train.training import OneProxy, RoundCounts, new_proxy, train_steps

    p = parse_params({**TINY, "train": {**TINY["train"], "device": "cuda"}})
    proxy = new_proxy(build_unet(p.model, 8, 1, 0), p, 1, "cuda")
    images = torch.full((12, 1, 8, 8), float("nan"), device="cuda")
    with pytest.raises(FloatingPointError, match="loss is not finite at step 1"):
        train_steps(OneProxy(0, proxy, p), images, {0: torch.arange(12, device="cuda")}, 3, build_scheduler(p.model), p,
                    Mitigations((), p, 12, (0,), "cuda"), RoundCounts.zeros(12, "cuda"))
