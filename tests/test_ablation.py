"""`iet-agc ablation`: runs laid out in a real MLflow store as the pipeline lays them out (a parent
per experiment with the flattened params, nested evaluate/training runs), grouped per variant
over seeds, a baseline counted where it was trained only."""
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.stats
import pytest
from click.testing import CliRunner

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands import ablation  # noqa: E402
from commands.cli import main  # noqa: E402
from tiny import synthetic_curve  # noqa: E402

BASE = {"seeds.train": "0", "agc.enabled": "True", "msr.enabled": "True", "taa.enabled": "True",
        "agc.tau": "0.5", "data.train_size": "32", "iet.rounds": "4"}


def _experiment(client, exp_id, name, params, evaluated: dict[str, dict], trained: dict[str, float],
                curves: dict[str, list] | None = None, epsilon: float | None = None, frontiers: dict | None = None):
    parent = client.create_run(exp_id, run_name=name).info.run_id
    for k, v in params.items():
        client.log_param(parent, k, v)
    for model, metrics in evaluated.items():
        child = client.create_run(exp_id, run_name=f"evaluate {model}", tags={"mlflow.parentRunId": parent}).info.run_id
        for k, v in metrics.items():
            client.log_metric(child, k, v)
        for step, (progress, fd, mem, nn1) in enumerate((curves or {}).get(model, []), start=1):
            for k, v in (("progress", progress), ("fd", fd), ("mem_ratio", mem), ("mean_nn1", nn1)):
                client.log_metric(child, f"round_{k}", v, step=step)
        if model in (frontiers or {}):
            with tempfile.TemporaryDirectory() as tmp:
                frontiers[model].save(Path(tmp) / "curve.npz")
                client.log_artifact(child, str(Path(tmp) / "curve.npz"))
        client.set_terminated(child)
    for model, seconds in trained.items():
        child = client.create_run(exp_id, run_name=model, tags={"mlflow.parentRunId": parent}).info.run_id
        for rnd in range(4):  # as the round loop logged them before round_train_seconds: each round's by step
            client.log_metric(child, "train_seconds", seconds / 4, step=rnd, timestamp=1000 + rnd)
        client.log_metric(child, "train_seconds", seconds, step=0, timestamp=2000)
        if epsilon is not None and model == "iet":
            client.log_metric(child, "dp_epsilon", epsilon)
        client.set_terminated(child)
    client.set_terminated(parent)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ablation")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("iet-agc", artifact_location=(tmp_path / "a").as_uri())
    # seed 0: full run; then the IET variant of seed 0, whose baseline DVC restored (no nested runs)
    _experiment(client, exp, "s0", BASE, {"baseline": {"mem_ratio": 0.6, "fd": 1.0}, "iet": {"mem_ratio": 0.0, "fd": 9.0}},
                {"baseline": 300.0, "iet": 310.0})
    _experiment(client, exp, "s0-iet", {**BASE, "agc.enabled": "False"}, {"iet": {"mem_ratio": 0.1, "fd": 7.0}},
                {"iet": 320.0})
    _experiment(client, exp, "s1", {**BASE, "seeds.train": "1"},
                {"baseline": {"mem_ratio": 0.8, "fd": 2.0}, "iet": {"mem_ratio": 0.2, "fd": 11.0}},
                {"baseline": 320.0, "iet": 330.0})
    # seed 1's baseline trained again by another experiment: the same model, counted once
    _experiment(client, exp, "s1-again", {**BASE, "seeds.train": "1", "msr.enabled": "False"},
                {"baseline": {"mem_ratio": 0.8, "fd": 2.0}, "iet": {"mem_ratio": 0.0, "fd": 12.0}},
                {"baseline": 330.0, "iet": 300.0})
    # another setting: a row of its own, with the setting shown
    _experiment(client, exp, "n64", {**BASE, "data.train_size": "64"}, {"baseline": {"mem_ratio": 0.05, "fd": 1.5}},
                {"baseline": 290.0})
    return uri


def test_groups_variants_over_seeds_with_mean_and_sd(store):
    rows = ablation.table(ablation.collect(MlflowClient(tracking_uri=store), "iet-agc"))
    by = {(r["variant"], r["setting"]["data.train_size"]): r for r in rows}
    assert set(by) == {("baseline", "32"), ("IET-AGC+", "32"), ("IET", "32"), ("IET-AGC+TAA", "32"), ("baseline", "64")}
    base = by[("baseline", "32")]
    # not s0-iet (restored there), not s1-again (seed 1 again)
    assert base["seeds"] == ["0", "1"] and sorted(base["runs"]) == ["s0", "s1"]
    mean, sd, n, _ = base["stats"]["mem_ratio"]
    assert (mean, n) == (pytest.approx(0.7), 2) and sd == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert base["stats"]["train_seconds"][:2] == (pytest.approx(310.0), pytest.approx(np.std([300, 320], ddof=1)))
    plus = by[("IET-AGC+", "32")]
    assert plus["stats"]["fd"][0] == pytest.approx(10.0) and plus["tau"] == 0.5
    single = by[("IET", "32")]
    assert single["seeds"] == ["0"] and np.isnan(single["stats"]["mem_ratio"][1])


def test_cli_prints_the_table_with_the_varying_setting(store):
    result = CliRunner().invoke(main, ["ablation", "--tracking-uri", store, "--experiment", "iet-agc"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "data.train_size" in lines[0] and "iet.rounds" not in lines[0]
    assert any(line.startswith("| baseline | 1 | - | 32 | 0,1 | 0.700 ± 0.141 |") for line in lines), result.output
    assert any(line.startswith("| IET | 2 | - | 32 | 0 | 0.100 |") for line in lines), result.output


def test_cli_says_when_there_is_nothing_to_tabulate(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # an existing store without that experiment
    result = CliRunner().invoke(main, ["ablation", "--tracking-uri", uri, "--experiment", "nope"])
    assert result.exit_code == 1 and "no finished evaluations" in result.output


BASELINE_CURVE = [(0.25, 20.0, 0.0, 6.0), (0.5, 8.0, 0.0, 5.0), (0.75, 4.0, 0.2, 4.0), (1.0, 2.0, 0.4, 3.0)]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Baselines of two seeds with their curves, and single-model variants trained without their
    own baseline (`evaluate@iet` targets, iet.shards=1), one of them DP-SGD with an epsilon."""
    tmp_path = tmp_path_factory.mktemp("variants")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("iet-agc", artifact_location=(tmp_path / "a").as_uri())
    base = {**BASE, "iet.shards": "4"}
    single = {**base, "iet.shards": "1", "agc.enabled": "False", "dp.enabled": "True", "dp.noise_multiplier": "1.0"}
    shifts = [2.0, 1.0, 0.5, 0.0]
    for seed, mem in (("0", 0.40), ("1", 0.42)):
        _experiment(client, exp, f"def-s{seed}", {**base, "seeds.train": seed},
                    {"baseline": {"mem_ratio": mem, "fd": 2.0}}, {"baseline": 300.0},
                    frontiers={"baseline": synthetic_curve([0.0, 0.1, 0.25, mem], shifts, seed=int(seed))})
        # the same qualities, nothing copied: better at matched quality
        _experiment(client, exp, f"dp-s{seed}", {**single, "seeds.train": seed},
                    {"iet": {"mem_ratio": 0.0, "fd": 6.0}}, {"iet": 800.0}, epsilon=56.5,
                    frontiers={"iet": synthetic_curve([0.0] * 4, shifts, seed=10 + int(seed))})
    return uri


def test_a_variant_without_its_own_baseline_is_matched_against_its_seeds_baseline_curve(variants):
    rows = ablation.table(ablation.collect(MlflowClient(tracking_uri=variants), "iet-agc"))
    # iet.shards is the variant's K, not a setting: the DP rows sit beside the baseline trained with K = 4
    assert [(r["variant"], r["shards"]) for r in rows] == [("baseline", 1), ("DP-SGD (sigma=1.0)", 1)]
    assert rows[0]["setting"] == rows[1]["setting"]
    dp = rows[1]["stats"]
    assert dp["dp_epsilon"][0] == pytest.approx(56.5) and dp["train_seconds"][0] == pytest.approx(800.0)
    frontier = rows[1]["frontier"]
    assert frontier["mem_matched"] < 0 and frontier["frontier_area"] < 0  # copies less at every matched KID
    # it copies nothing: its bound (0 of 2 x 64 samples), never a zero-width interval; 2 seeds against 2
    # can reach p = 1/3 at best, so no verdict
    assert frontier["mem_matched_model_bound"] == pytest.approx(1 - 0.025 ** (1 / 128))
    assert frontier["mem_matched_p_min"] == pytest.approx(1 / 3) and rows[1]["role"] == ablation.EXPLORATORY
    table = ablation.markdown(rows)
    head, _, base_line, dp_line = [line.split(" | ") for line in table.splitlines()[:4]]
    column = head.index("memorization at matched KID (vs baseline)")
    assert dp_line[column].startswith("-0.") and " inconclusive, model <= 0.028 (p " in dp_line[column]
    assert dp_line[column].endswith("exploratory, too few seeds")
    assert "| DP-SGD (sigma=1.0) | 1 | - | 0,1 | 0.000 ± 0.000* |" in table  # 0 against 0.40 and 0.42
    assert base_line[column] == "-"  # the reference itself


def test_differs_is_welchs_t_test_over_seeds():
    a, b = [0.10, 0.12, 0.15], [0.20, 0.19, 0.24]
    p = scipy.stats.ttest_ind(a, b, equal_var=False).pvalue
    assert ablation.differs(a, b) == (p < ablation.SIGNIFICANCE)
    assert ablation.differs([0.10, 0.20, 0.30], [0.12, 0.22, 0.25]) is False  # within the spread
    assert ablation.differs([-0.02, -0.085, 0.0], None) is False  # the duplicated setting's matched quality
    assert ablation.differs([-0.10, -0.11, -0.09], None) is True
    assert ablation.differs([0.0, 0.0, 0.0], [0.2, 0.2, 0.2]) is True  # no spread on either side
    assert ablation.differs([0.1], [0.2]) is False  # one seed each: no spread known


def test_a_mean_count_keeps_a_decimal_and_a_count_none():
    from pipeline.evaluate.metric_names import BY_KEY

    count = BY_KEY["distinct_copied"]
    assert (count.format(14 / 3), count.format(5.0), count.format(float("nan"))) == ("4.7", "5", "-")


def test_the_null_compares_each_baseline_seed_with_the_others(variants):
    rows = ablation.table(ablation.collect(MlflowClient(tracking_uri=variants), "iet-agc"))
    pairs = ablation.null_check(rows)
    assert [(q["model"], q["baseline"]) for q in pairs] == [("0", "1")]  # one partition: its mirror is the same
    assert pairs[0]["verdict"] == "exploratory, one seed", pairs  # one seed a side is never a verdict
    text = ablation.null_markdown(pairs)
    assert "false verdicts under KID: 0 of 1 splits (0%, 95% interval 0%-98%)" in text


def test_the_null_splits_the_seeds_every_way_once():
    halves = ablation._splits(["0", "1", "2", "3", "4", "5"], 3)
    assert len(halves) == 10 and all("0" in model for model, _ in halves)  # C(6,3) / 2: no mirror twice
    assert all(len(a) == len(b) == 3 and not set(a) & set(b) for a, b in halves)
    assert len(ablation._splits(["0", "1", "2", "3", "4", "5"], 2)) == 15  # 2 against the other 4
    assert ablation._splits(["0", "1", "2"], 1) == [(("0",), ("1", "2")), (("1",), ("0", "2")), (("2",), ("0", "1"))]
    assert ablation._splits(["0"], 1) == []


def test_the_figure_draws_every_variant_of_a_setting_in_one_file(variants, tmp_path):
    rows = ablation.table(ablation.collect(MlflowClient(tracking_uri=variants), "iet-agc"))
    path = tmp_path / "frontiers.png"
    assert ablation.save_frontier_figures(rows, path) == [path] and path.stat().st_size > 0
    # two settings: a file each, numbered
    other = [{**rows[1], "setting": {**rows[1]["setting"], "data.train_size": "99"}}]
    written = ablation.save_frontier_figures(rows + other, path)
    assert written == [tmp_path / "frontiers-1.png", tmp_path / "frontiers-2.png"]
    result = CliRunner().invoke(main, ["ablation", "--tracking-uri", variants, "--figure", str(path)])
    assert result.exit_code == 0 and f"wrote {path}" in result.output, result.output
