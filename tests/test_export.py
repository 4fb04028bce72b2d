"""`iet-agc export` and docs/scripts/results_table.py: a real MLflow store with synthetic
evaluations (curve.npz artifacts as the evaluate stage logs them) -> one small file per model ->
the same verdict numbers as the comparison read from the curves themselves."""
import dataclasses
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands import export  # noqa: E402
from commands.cli import main  # noqa: E402
from pipeline.compare.comparison import frontier_numbers  # noqa: E402
from test_ablation import BASE, _experiment  # noqa: E402
from tiny import synthetic_curve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "scripts"))
results_table = importlib.import_module("results_table")

SHIFTS = [2.0, 1.0, 0.5, 0.0]
REFERENCE = np.random.default_rng(99).normal(size=(256, 4))  # one real pool: every run's quality reference
VARIANT_PARAMS = {"IET-AGC+": {}, "IET": {"agc.enabled": "False", "msr.enabled": "False", "taa.enabled": "False"}}


def _curve(memorization, seed):
    return dataclasses.replace(synthetic_curve(memorization, SHIFTS, seed=seed), reference=REFERENCE,
                               heldout_memorized=np.arange(8) == 3)


CURVES = {"baseline": {s: _curve([0.0, 0.1, 0.25, 0.4 + 0.02 * s], s) for s in range(3)},
          "IET-AGC+": {s: _curve([0.0, 0.03, 0.1, 0.15 + 0.02 * s], 10 + s) for s in range(3)},
          "IET": {s: _curve([0.0, 0.1, 0.2, 0.35 + 0.03 * s], 20 + s) for s in range(2)}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Baseline (3 seeds, with IET-AGC+ in the same executions), IET (2 seeds, trained without its
    own baseline), and the baseline of seed 0 trained again by another experiment."""
    tmp_path = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("iet-agc", artifact_location=(tmp_path / "a").as_uri())
    final = {"mem_ratio": 0.4, "fd": 2.0, "mia_auc": 0.55, "mia_tpr_at_1fpr": 0.02}
    for s in range(3):
        _experiment(client, exp, f"N-agcplus-s{s}", {**BASE, "seeds.train": str(s), "iet.shards": "4"},
                    {"baseline": {**final, "mem_ratio": (0.4, 0.41, 0.42)[s]}, "iet": {**final, "mem_ratio": 0.1}},
                    {"baseline": 300.0 + s, "iet": 310.0},
                    frontiers={"baseline": CURVES["baseline"][s], "iet": CURVES["IET-AGC+"][s]})
    for s in range(2):
        _experiment(client, exp, f"N-iet-s{s}", {**BASE, "seeds.train": str(s), "iet.shards": "4", **VARIANT_PARAMS["IET"]},
                    {"iet": final}, {"iet": 320.0}, frontiers={"iet": CURVES["IET"][s]})
    _experiment(client, exp, "N-again-s0", {**BASE, "seeds.train": "0", "iet.shards": "4"},
                {"baseline": {**final, "fd": 2.5}}, {"baseline": 300.0}, frontiers={"baseline": CURVES["baseline"][0]})
    for run in client.search_runs([exp], "attributes.run_name = 'evaluate iet'"):  # as evaluate logs them
        for step, copied in enumerate((0, 1, 2, 3), start=1):
            client.log_metric(run.info.run_id, "round_distinct_copied", copied, step=step)
    for run in client.search_runs([exp], "attributes.run_name = 'baseline'"):  # the round loop's params
        client.log_param(run.info.run_id, "shards", "1")
        client.log_param(run.info.run_id, "steps_per_round", "96")
    return uri


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = CliRunner().invoke(main, ["export", "--tracking-uri", store, "--regime", "N", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_writes_one_small_file_per_model_and_seed(exported):
    out, output = exported
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.csv"))
    assert files == ["N/baseline/seed0.csv", "N/baseline/seed1.csv", "N/baseline/seed2.csv",
                     "N/iet-agc-plus/seed0.csv", "N/iet-agc-plus/seed1.csv", "N/iet-agc-plus/seed2.csv",
                     "N/iet/seed0.csv", "N/iet/seed1.csv"]
    assert "skipped N-again-s0 baseline: the same variant and seed again" in output
    assert max(p.stat().st_size for p in out.rglob("*.csv")) < 4096
    meta, columns = export.read(out / "N/baseline/seed1.csv")
    assert (meta["variant"], meta["seed"], meta["execution"], meta["param.iet.shards"]) == ("baseline", "1", "N-agcplus-s1", "4")
    assert (meta["final.mia_auc"], meta["final.mia_tpr_at_1fpr"], meta["final.mem_ratio"]) == ("0.55", "0.02", "0.41")
    assert meta["final.train_seconds"] == "301" and meta["heldout_floor"] == "0.125" and meta["commit"] == "unknown"
    curve = CURVES["baseline"][1]
    np.testing.assert_array_equal(columns["progress"], curve.progress)
    np.testing.assert_array_equal(columns["mem_ratio"], curve.memorized.mean(1))
    np.testing.assert_array_equal(columns["optimizer_step"], [24, 48, 72, 96])  # progress x 1 shard x 96 steps a round
    assert (columns["samples"] == 64).all() and np.isnan(columns["distinct_copied"]).all()  # not logged per checkpoint
    plus = export.read(out / "N/iet-agc-plus/seed0.csv")[1]
    np.testing.assert_array_equal(plus["distinct_copied"], [0, 1, 2, 3])  # logged per checkpoint
    assert np.isnan(plus["copies_on_duplicated_share"]).all()
    assert np.isfinite(columns["fd_infinity"]).all() and columns["kid"][0] > columns["kid"][-1]
    assert np.isnan(export.read(out / "N/iet/seed0.csv")[1]["optimizer_step"]).all()  # no shards/steps logged


def test_results_table_gives_the_verdict_numbers_of_the_curves(exported):
    out, _ = exported
    rows = {r["variant"]: r for r in results_table.rows_of([out / "N"])}
    assert list(rows) == ["baseline", "IET", "IET-AGC+"]
    for name in ("IET-AGC+", "IET"):
        seeds = sorted(CURVES[name])
        expected = frontier_numbers({name: [CURVES[name][s] for s in seeds]},
                                    [CURVES["baseline"][s] for s in range(3)])[name]
        got = rows[name]["frontier"]
        assert "mem_matched_fd" in expected and set(expected) <= set(got)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, nan_ok=True), key
    plus = rows["IET-AGC+"]
    assert plus["frontier"]["mem_matched"] < 0 and plus["role"] == "primary"
    assert plus["frontier"]["mem_matched_p_adjusted"] == plus["frontier"]["mem_matched_p"]  # Holm over one regime
    assert rows["IET"]["role"] == "exploratory"


def test_results_table_prints_the_table_and_draws_the_figure(exported, tmp_path):
    out, _ = exported
    result = CliRunner().invoke(results_table.main, [str(out / "N"), "--figures", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == "Regime N" and lines[3].startswith("| variant | seeds | verdict (KID; FD-infinity) |")
    assert lines[5].startswith("| baseline | 0,1,2 | reference | - |")
    plus = next(line for line in lines if line.startswith("| IET-AGC+ |")).split(" | ")
    assert plus[1] == "0,1,2" and "(primary)" in plus[2] and plus[3].startswith("-0.") and plus[4].startswith("-")
    assert plus[-3:] == ["0.550 ± 0.000", "0.020 ± 0.000", "310 ± 0 |"]
    assert (tmp_path / "frontier_N.png").stat().st_size > 0


def test_a_second_export_writes_nothing_new(store, exported):
    out, _ = exported
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.csv")}
    report = export.export(MlflowClient(tracking_uri=store), "iet-agc", "N", out)
    assert {what for path, what in report if path in before and not what.startswith("skipped")} == {"unchanged"}
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*.csv")} == before


def test_a_changed_file_is_written_again_and_another_format_refused(store, tmp_path):
    client = MlflowClient(tracking_uri=store)
    export.export(client, "iet-agc", "N", tmp_path, match="N-iet-*")
    assert sorted(p.parent.name for p in (tmp_path / "N").rglob("*.csv")) == ["iet", "iet"]
    path = tmp_path / "N/iet/seed0.csv"
    path.write_text(path.read_text().replace("# final.mia_auc: 0.55", "# final.mia_auc: 0.9"))
    assert dict(export.export(client, "iet-agc", "N", tmp_path, match="N-iet-*"))[path] == "written"
    assert "# final.mia_auc: 0.55" in path.read_text()
    path.write_text("progress,mem_ratio\n")
    with pytest.raises(Exception, match="not an exported results file"):
        export.read(path)


def test_the_slug_keeps_variants_apart():
    assert export.slug("IET-AGC+") == "iet-agc-plus" != export.slug("IET-AGC")
    assert export.slug("IET-AGC+ [pooled, groups]") == "iet-agc-plus-pooled-groups"
    assert export.slug("DP-SGD (sigma=1.0)") == "dp-sgd-sigma-1-0"
