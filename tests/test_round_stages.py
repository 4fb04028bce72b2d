"""A round as three stages (train, aggregate, profile) in processes of their own, handing each other
the round's folders, trains the same weights bit for bit as the loop in one process; and the
rounds dvc.yaml lists are the rounds params.yaml asks for."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.train import dag, ensemble, rounds
from pipeline.core.config import ConfigError, parse_params
from pipeline.core.layout import Rounds
from test_pinned import TINY  # AGC skips, TAA strengthens, MSR moves samples: every part of a round acts
from tiny import ROOT, random_train

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = {"baseline": {}, "iet": {}, "authors": {"msr": {"mode": "ring"}, "taa": {"mode": "queue"}}}


def _params(variant):
    raw = json.loads(json.dumps(TINY))
    for group, values in VARIANTS[variant].items():
        raw.setdefault(group, {}).update(values)
    return parse_params(raw)


def _staged(p, plan, train, shard, rounds_dir, out):
    """What `dvc repro` runs: every stage rebuilds the run from scratch and loads its inputs."""
    for rnd in range(plan.rounds):
        r = rounds.start(p, plan, train, shard, rounds_dir)
        rounds.train_round(r, rounds.Progress(shard) if rnd == 0 else rounds.restore_round_end(r, rnd - 1), rnd)
        ensemble.average_round(r.rounds.train(rnd + 1), r.rounds.aggregate(rnd + 1))
        r = rounds.start(p, plan, train, shard, rounds_dir, models=plan.shards > 1)  # as pipeline.train.launch
        progress, counts = rounds.restore_trained(r, rnd)
        rounds.profile_round(r, progress, rnd, counts)
    r = rounds.start(p, plan, train, shard, rounds_dir)
    return rounds.finish(r, rounds.restore_round_end(r, plan.rounds - 1), out)


def _weights(folder):
    found = {}
    for f in sorted(folder.rglob("*.safetensors")):
        found.update({f"{f.relative_to(folder)}/{k}": v for k, v in load_file(str(f)).items()})
    return found


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.slow] if v != "iet" else []) for v in VARIANTS])
def test_stages_in_separate_runs_train_the_weights_of_one_process(variant, tmp_path):
    p = _params(variant)
    train = random_train()
    plan = rounds.Plan.baseline(p) if variant == "baseline" else rounds.Plan.iet(p)
    shard = np.zeros(12, dtype=np.int64) if variant == "baseline" else ensemble.split_shards(train.labels, 3, 0)
    one = rounds.run(p, plan, train, shard, tmp_path / "one", tmp_path / "one_rounds")
    staged = _staged(p, plan, train, shard, tmp_path / "staged_rounds", tmp_path / "staged")
    a = {**_weights(tmp_path / "one"), **_weights(tmp_path / "one_rounds")}
    b = {**_weights(tmp_path / "staged"), **_weights(tmp_path / "staged_rounds")}
    assert a.keys() == b.keys() and len(a) > 100
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert {k: v for k, v in one.items() if k != "train_seconds"} == {k: v for k, v in staged.items() if k != "train_seconds"}
    if variant != "baseline":  # the run exercises what it claims to: MSR moved samples
        moved = [json.loads((tmp_path / "staged_rounds" / f"round_{r}/profile/round.json").read_text())["moved"]
                 for r in (1, 2, 3)]
        assert sum(moved) > 0
    assert (tmp_path / "one/curves.csv").read_text() == (tmp_path / "staged/curves.csv").read_text()


def test_the_profile_stage_of_a_one_shard_run_loads_no_diffusers(tmp_path):
    """A stage process costs mostly its imports, diffusers' seconds the most: the baseline's profile,
    which scores nothing, runs without it (pipeline.train.rounds.start(models=False)) and writes what the
    one-process loop writes."""
    import os
    import subprocess
    import sys

    p, train = _params("baseline"), random_train()
    plan, shard = rounds.Plan.baseline(p), np.zeros(12, dtype=np.int64)
    rounds.run(p, plan, train, shard, tmp_path / "one", tmp_path / "one_rounds")
    r = rounds.start(p, plan, train, shard, tmp_path / "rounds")
    rounds.train_round(r, rounds.Progress(shard), 0)
    (tmp_path / "params.yaml").write_text(json.dumps(p.model_dump()))
    train.save(tmp_path / "train.npz")
    script = ("import runpy, sys\nsys.argv = ['profile', 'baseline', '--round', '1', '--params', 'params.yaml', "
              "'--train', 'train.npz', '--pretrained', 'none', '--rounds', 'rounds']\ntry:\n"
              "    runpy.run_module('stages.profile', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'mlflow')))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"
    for name in ("round.json", "shards.csv"):
        ours, theirs = (folder / "round_1/profile" / name for folder in (tmp_path / "rounds", tmp_path / "one_rounds"))
        drop = ("round_seconds", "round_train_seconds")
        if name == "round.json":
            assert {k: v for k, v in json.loads(ours.read_text()).items() if k not in drop} == \
                {k: v for k, v in json.loads(theirs.read_text()).items() if k not in drop}
        else:
            assert ours.read_text() == theirs.read_text()


def test_a_killed_loop_resumes_after_its_last_complete_round(tmp_path):
    """The loop in one process (the pretrain stage) resumes from the round folders; a half-written
    round is started again, and the weights are those of an uninterrupted run."""
    p, train = _params("iet"), random_train()
    plan, shard = rounds.Plan.iet(p), ensemble.split_shards(train.labels, 3, 0)
    rounds.run(p, plan, train, shard, tmp_path / "full", tmp_path / "full_rounds")

    class KillInRoundTwo(rounds.Hooks):
        def proxy_round(self, rnd, proxy, curve):
            if rnd == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rounds.run(p, plan, train, shard, tmp_path / "cut", tmp_path / "cut_rounds", hooks=KillInRoundTwo())
    assert Rounds(tmp_path / "cut_rounds").complete() == 1
    rounds.run(p, plan, train, shard, tmp_path / "cut", tmp_path / "cut_rounds")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loop_in_one_process_starts_over_on_rounds_of_other_params(tmp_path, capsys):
    """Its rounds folder outlives a run (the pretrain stage's resume folder): rounds trained under
    other params are never resumed from, and are replaced."""
    p, train = _params("iet"), random_train()
    shard = ensemble.split_shards(train.labels, 3, 0)
    r = rounds.start(p, rounds.Plan.iet(p), train, shard, tmp_path / "rounds")
    for rnd in (0,):
        counts = rounds.train_round(r, rounds.Progress(shard), rnd)
        ensemble.average_round(r.rounds.train(1), r.rounds.aggregate(1))
        rounds.profile_round(r, rounds.Progress(shard), rnd, counts)
    other = p.model_copy(update={"agc": p.agc.model_copy(update={"tau": 0.5}),
                                 "iet": p.iet.model_copy(update={"rounds": 1})})
    capsys.readouterr()
    rounds.run(other, rounds.Plan.iet(other), train, shard, tmp_path / "out", tmp_path / "rounds")
    assert "resuming" not in capsys.readouterr().out
    fresh = rounds.run(other, rounds.Plan.iet(other), train, shard, tmp_path / "again", tmp_path / "fresh")
    a, b = _weights(tmp_path / "out"), _weights(tmp_path / "again")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh["rounds"] == 1


def test_readers_take_only_complete_rounds_of_this_run(tmp_path):
    folders = Rounds(tmp_path)
    for r in (1, 2, 4):  # round 3 missing: round 4 is a leftover of an earlier run of more rounds
        for phase, name in (("train", "train.json"), ("aggregate", "aggregated.safetensors"), ("profile", "round.json")):
            (folders.round(r) / phase).mkdir(parents=True)
            (folders.round(r) / phase / name).write_text("{}")
    (folders.round(3) / "train").mkdir(parents=True)  # a round whose stages did not all finish
    assert folders.complete() == 2 and folders.complete(1) == 1
    assert [progress for progress, _ in folders.checkpoints()] == [1.0, 2.0]
    assert [f.name for f in folders.stale(2)] == ["round_3", "round_4"]


def test_rounds_writes_params_and_dvc_yaml_together_and_keeps_every_comment(tmp_path):
    from commands.cli import main

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "runs/iet/rounds/round_6").mkdir(parents=True)
    result = CliRunner().invoke(main, ["rounds", "5", "--pipeline", str(tmp_path / "dvc.yaml"),
                                       "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    dag.check(tmp_path / "dvc.yaml", 5)
    assert parse_params(__import__("yaml").safe_load((tmp_path / "params.yaml").read_text())).iet.rounds == 5
    assert not (tmp_path / "runs/iet/rounds/round_6").exists()
    for name in ("dvc.yaml", "params.yaml"):  # only the rounds' lines changed
        before, after = (ROOT / name).read_text().splitlines(), (tmp_path / name).read_text().splitlines()
        assert [line for line in before if "#" in line and "round" not in line] == \
            [line for line in after if "#" in line and "round" not in line]
    with pytest.raises(ConfigError, match="iet-agc rounds 4"):
        dag.check(tmp_path / "dvc.yaml", 4)


def test_rounds_refuses_zero_and_a_dvc_yaml_without_its_round_stages(tmp_path):
    from commands.cli import main

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text().replace("  iet_train:", "  iet_training:"))
    args = ["--pipeline", str(tmp_path / "dvc.yaml"), "--params", str(tmp_path / "params.yaml")]
    result = CliRunner().invoke(main, ["rounds", "0", *args])
    assert result.exit_code == 2 and "0 is not in the range 1<=x<=1000" in result.output
    with pytest.raises(ConfigError, match="no stage iet_train with a foreach of rounds"):
        dag.set_rounds(5, tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # nothing written
