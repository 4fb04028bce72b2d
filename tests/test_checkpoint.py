"""The resume state (pipeline/checkpoint.py): a state whose files were truncated or overwritten
after it was written is detected by its manifest, set aside with one line, and the run starts
from the last good state or from scratch, ending with the weights of an uninterrupted run."""
import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline import rounds
from pipeline.config import parse_params
from pipeline.ensemble import split_shards
from test_pinned import TINY
from tiny import Stop, random_train, stop_after_round

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, state, hooks=None):
    p = parse_params(copy.deepcopy(TINY))
    train = random_train()
    rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), out, state, hooks=hooks)
    return load_file(str(out / "model/unet/diffusion_pytorch_model.safetensors"))


def _killed_after_round(tmp_path, rnd: int):
    """A run stopped after round `rnd` finished, before its state was saved: the state on disk is
    the one after round rnd - 1."""
    with pytest.raises(Stop):
        _run(tmp_path / "out", tmp_path / "state", stop_after_round(rnd))
    assert (tmp_path / "state/state.json").is_file()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    return _run(work / "out", work / "state")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["proxy_1.safetensors", "samples.safetensors", "state.json"])
def test_a_corrupt_resume_state_is_set_aside_and_the_run_starts_over(tmp_path, capsys, uninterrupted, damage):
    _killed_after_round(tmp_path, 1)
    _truncate(tmp_path / "state" / damage)
    weights = _run(tmp_path / "out", tmp_path / "state")
    said = capsys.readouterr().out
    assert f"resume state unreadable ({damage}" in said and "starting from scratch" in said
    assert (tmp_path / "state.corrupt" / damage).is_file()  # kept for a look, out of the way
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)


def test_a_corrupt_state_falls_back_to_the_previous_complete_one(tmp_path, capsys, uninterrupted):
    """A kill between the swap's two renames leaves the new state and the previous one (.old): with
    the new one damaged, the run resumes from the previous one."""
    _killed_after_round(tmp_path, 1)                      # state: after round 1 of 3
    shutil.copytree(tmp_path / "state", tmp_path / "previous")
    with pytest.raises(Stop):
        _run(tmp_path / "out", tmp_path / "state", stop_after_round(2))  # state: after round 2
    (tmp_path / "previous").rename(tmp_path / "state.old")
    _truncate(tmp_path / "state/proxy_1.safetensors")
    capsys.readouterr()
    weights = _run(tmp_path / "out", tmp_path / "state")
    said = capsys.readouterr().out
    assert "resuming from the previous one" in said and "after round 1 of 3" in said
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)
