"""Faults from outside: SIGTERM (what `timeout`, systemd, Slurm and Kubernetes send) is handled
as Ctrl-C; a full disk leaves a stage's previous outputs or none and says so in one line; a shard
table that does not fit the params is refused before any training."""
import os
import signal
import subprocess
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.core.config import parse_params
from pipeline.core.io import DiskFull, staged_folder
from pipeline.train.launch import read_shards
from pipeline.track.tracking import Tracker
from stages import prepare, stage
from tiny import random_train, tiny

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_marks_the_stages_runs_killed_and_exits_143(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params({**tiny(), "tracking": {"uri": uri, "experiment": "sigterm"}})

    @click.command()
    @stage
    def trains():
        Tracker(params).child("iet")
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` sends it, mid-stage
        time.sleep(30)

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(trains, [])
    assert result.exit_code == 128 + signal.SIGTERM and "stopped by SIGTERM" in result.output, result.output
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}  # the stage's run and the parent
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the stage's only


def _shards_csv(tmp_path, rows) -> Path:
    path = tmp_path / "shards.csv"
    path.write_text("sample_id,shard\n" + "".join(f"{i},{s}\n" for i, s in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ("3", "line 5: shard 3 is outside 0..2 (iet.shards is 3)"),
    ("-1", "line 5: shard -1 is outside 0..2"),
    ("1.5", "line 5: sample_id and shard must be integers (got '103', '1.5')"),
    ("", "line 5: sample_id and shard must be integers (got '103', '')"),
])
def test_a_shard_table_that_does_not_fit_is_refused_before_training(tmp_path, bad, message):
    train = random_train()
    rows = [(i, i % 3) for i in train.ids.tolist()]
    rows[3] = (rows[3][0], bad)
    with pytest.raises(click.ClickException, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_shards(_shards_csv(tmp_path, rows), train, 3)
    assert read_shards(_shards_csv(tmp_path, [(i, i % 3) for i in train.ids.tolist()]), train, 3).tolist() \
        == [i % 3 for i in train.ids.tolist()]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a full disk, where this machine lets the tests mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): no full disk to test on")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_leaves_the_previous_files_and_names_the_folder(small_disk):
    out = small_disk / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(DiskFull, match=f"^{out}: no space left on device$"):
        with staged_folder(out) as staged:
            (staged / "a.txt").write_text("new")
            (staged / "big.bin").write_bytes(b"x" * 200_000)
    assert sorted(p.name for p in small_disk.iterdir()) == ["out"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # none of the new files


def test_prepare_on_a_full_disk_is_one_line_and_writes_none_of_its_files(tmp_path, small_disk):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in tiny().items():
        raw[group].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = small_disk / "prepared"
    result = CliRunner().invoke(prepare.main, ["--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {out}: no space left on device", result.output
    assert not out.exists() or not any(out.iterdir())
    assert [p.name for p in small_disk.iterdir()] in ([], ["prepared"])


def test_a_staged_folder_left_by_a_killed_attempt_is_removed_by_the_next(tmp_path):
    (tmp_path / ".out.staged-abc").mkdir()
    with staged_folder(tmp_path / "out") as staged:
        (staged / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out/f").read_text() == "1"


def test_an_error_without_a_message_is_never_an_empty_line():
    @click.command()
    @stage
    def runs_out():
        raise MemoryError()  # what a failed allocation in Python raises: no text

    result = CliRunner().invoke(runs_out, [])
    assert result.exit_code == 1 and result.output.strip() == "Error: out of memory (MemoryError)"
