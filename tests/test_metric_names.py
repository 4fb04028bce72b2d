"""pipeline/evaluate/metric_names.py is the one list of metric keys: every key a real evaluation reports, every
column of its curve over training and every number the report derives from two evaluations is in
it, so no table, tag or MLflow name can miss one. (Inception's and SSCD's keys are checked where
tests/test_quality.py computes them with the real networks.)"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.evaluate import evaluation, metric_names
from pipeline.compare.comparison import at_matched_quality
from pipeline.core.config import parse_params
from pipeline.core.dedup import duplicate_groups
from pipeline.evaluate.features import FeatureNet
from pipeline.core.layout import Rounds
from pipeline.core.models import build_scheduler, build_unet
from pipeline.compare.risk import risk_summary
from tiny import arch, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

LISTED = metric_names.BY_KEY.keys()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluation.evaluate of an untrained tiny model with two checkpoints, on random images with two
    duplicated training images; Inception off (as its reference stage records it)."""
    root = tmp_path_factory.mktemp("evaluation")
    unet, scheduler = build_unet(arch(), 8, 1, seed=0), build_scheduler(arch())
    folders = Rounds(root / "rounds")
    for rnd in (1, 2):  # complete rounds: each phase's folder holds the file that marks it done
        for folder in (folders.train(rnd), folders.aggregate(rnd), folders.profile(rnd)):
            folder.mkdir(parents=True)
        (folders.train(rnd) / "train.json").write_text("{}")
        save_file(unet.state_dict(), str(folders.aggregate(rnd) / "aggregated.safetensors"))
        (folders.profile(rnd) / "round.json").write_text("{}")
    (root / "reference").mkdir()
    (root / "reference/info.json").write_text(json.dumps({"inception": False}))
    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0)).mul(255).round().div(127.5).sub(1)
    train = torch.cat([images[:8], images[:2]])
    groups = duplicate_groups(((train + 1) * 127.5).round().to(torch.uint8).numpy())
    data = evaluation.EvalData(train, images[8:16], images[16:], groups)
    p = parse_params(tiny(train={"device": "cpu", "threads": 1},
                          eval={"num_samples": 8, "ddim_steps": 2, "batch_size": 8, "curve_samples": 4}))
    return evaluation.evaluate(unet, scheduler, data, FeatureNet(1, 10), root / "reference", root / "rounds", p)


def test_every_key_an_evaluation_reports_is_listed(evaluated):
    assert evaluated.metrics["duplicate_groups"] == 2  # the duplicates were seen: their keys are real
    assert set(evaluated.metrics) - LISTED == set(), "add these to pipeline/evaluate/metric_names.py's METRICS"


def test_the_curve_has_exactly_the_listed_columns(evaluated):
    assert len(evaluated.by_round) == 2
    assert all(tuple(row) == metric_names.CURVE_COLUMNS for row in evaluated.by_round)
    assert set(metric_names.CURVE_KEYS) <= LISTED


def test_what_the_report_derives_from_two_evaluations_is_listed(evaluated):
    matched = at_matched_quality(evaluated.by_round, evaluated.by_round)
    assert {k for k, v in matched.items() if not isinstance(v, str)} - LISTED == set()
    n = 4
    risk = risk_summary(np.linspace(0, 1, n), np.ones(n), [0, 1, 0, 2], [1, 2, 1, 1])
    assert set(risk) - LISTED == set()


def test_keys_are_unique_and_tables_show_listed_ones():
    assert len(metric_names.METRICS) == len(LISTED)
    for table in (metric_names.REPORT, metric_names.ABLATION, metric_names.TRADEOFF, metric_names.MODEL_TAGS):
        assert metric_names.shown_in(table)


def test_mlflow_names_of_the_curve_and_of_a_models_final_metrics():
    assert [metric_names.curve_metric(c) for c in ("round", "fd")] == ["round_progress", "round_fd"]
    assert metric_names.evaluation_run("iet") == "evaluate iet"
    on_parent = {metric_names.parent_metric(m, "mem_ratio"): v for m, v in (("baseline", 0.5), ("iet", 0.1))}
    assert on_parent == {"baseline.mem_ratio": 0.5, "iet.mem_ratio": 0.1}
    assert metric_names.of_model({**on_parent, "risk.risk_skip_auc": 0.7}, "iet") == {"mem_ratio": 0.1}
