"""The round folders (pipeline/core/checkpoint.py, pipeline/core/layout.py): a folder is written whole or not
at all, so a kill while a round's state is written leaves the rounds before it, and the run resumes
after them, ending with the weights of an uninterrupted run."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core import checkpoint

from pipeline.train import rounds
from pipeline.core.config import parse_params
from pipeline.train.ensemble import split_shards
from pipeline.core.layout import Rounds
from test_pinned import TINY
from tiny import Stop, random_train

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, state, hooks=None):
    p = parse_params(copy.deepcopy(TINY))
    train = random_train()
    rounds.run(p, rounds.Plan.iet(p), train, split_shards(train.labels, 3, 0), out, state, hooks=hooks)
    return load_file(str(out / "model/unet/diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    return _run(work / "out", work / "state")


def test_a_kill_while_a_round_is_written_leaves_the_rounds_before_it(tmp_path, monkeypatch, capsys, uninterrupted):
    save, calls = checkpoint.save_proxy, []

    def dies_in_round_two(proxy, path, extra=None):
        calls.append(path)
        if len(calls) == 5:  # round 2's second proxy: its folder half written
            raise Stop
        save(proxy, path, extra)

    monkeypatch.setattr(checkpoint, "save_proxy", dies_in_round_two)
    with pytest.raises(Stop):
        _run(tmp_path / "out", tmp_path / "state")
    folders = Rounds(tmp_path / "state")
    assert folders.complete() == 1 and not folders.train(2).exists()
    assert len(list(folders.round(2).glob(".train.staged/proxy_*"))) == 1  # the staged folder, never read
    monkeypatch.setattr(checkpoint, "save_proxy", save)
    capsys.readouterr()
    weights = _run(tmp_path / "out", tmp_path / "state")
    assert "after round 1 of 3" in capsys.readouterr().out
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)
