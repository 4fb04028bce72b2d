"""The one list of metric keys the project reports: display name, format, direction, which tables
show each, which are also measured per checkpoint (the curve over training), and the names they
have in MLflow. The evaluate stage, the report, the registered models' tags, `iet-agc tradeoff`
and `iet-agc ablation` all read it, so a new metric is its computation plus one entry here
(tests/test_metric_names.py fails while an evaluation reports a key this list lacks).

Not imported by the training code: editing a label must not re-run training."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.metrics import OFFICIAL_THRESHOLDS

# The tables a metric can be shown in; MODEL_TAGS: the tags of the registered model versions.
REPORT, ABLATION, TRADEOFF, MODEL_TAGS = "report", "ablation", "tradeoff", "model_tags"


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    fmt: str
    lower_is_better: bool | None   # None: a reference or a cost, not a score to optimise
    tables: tuple[str, ...] = ()
    curve: bool = False            # also measured at every checkpoint: a rounds.csv column
    vs_baseline: bool = False      # already a difference from the baseline (at matched quality)

    def format(self, value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if self.fmt == "d":  # a count; a mean of counts over seeds keeps one decimal
            return str(int(value)) if float(value).is_integer() else format(value, ".1f")
        return format(value, self.fmt)

    @property
    def axis_label(self) -> str:
        """For a figure's axis: the name and which way is better."""
        if self.lower_is_better is None:
            return self.label
        return f"{self.label} ({'lower' if self.lower_is_better else 'higher'} is better)"


def _held_out(spec: MetricSpec, label: str = "", tables: tuple[str, ...] = ()) -> MetricSpec:
    """The same measure on real images never trained on: the reference a model is read against."""
    return MetricSpec("heldout_" + spec.key, label or f"{spec.label}, held-out images", spec.fmt, None, tables)


def _official(threshold: float) -> MetricSpec:
    shown = (REPORT, ABLATION) if threshold == OFFICIAL_THRESHOLDS[0] else ()
    return MetricSpec(f"official_below_{threshold}", f"official score < {threshold}", ".3f", True, shown,
                      curve=threshold == OFFICIAL_THRESHOLDS[0])


_MEM = MetricSpec("mem_ratio", "memorization ratio", ".3f", True, (REPORT, ABLATION, TRADEOFF, MODEL_TAGS), curve=True)
_NN1 = MetricSpec("mean_nn1", "mean NN1 distance", ".2f", False, (REPORT, ABLATION), curve=True)
_FD = MetricSpec("fd", "feature FD", ".2f", True, (REPORT, ABLATION, TRADEOFF, MODEL_TAGS), curve=True)
_FID = MetricSpec("fid", "Inception FID", ".1f", True, (ABLATION, TRADEOFF))
_INCEPTION_KID = MetricSpec("inception_kid", "Inception KID", ".3f", True)
_NL2_SHARE = MetricSpec("nl2_copy_share", "normalized L2 < 1.4 (Chen et al.)", ".3f", True, (REPORT, ABLATION))
_NL2_P5 = MetricSpec("nl2_p5", "normalized L2, 5th percentile", ".2f", False, (ABLATION,))
_NL2_MIN = MetricSpec("nl2_min", "normalized L2, minimum", ".2f", False)
_SSCD_ABOVE = MetricSpec("sscd_above", "SSCD copies (similarity above the threshold)", ".3f", True)
_SSCD_SIM = MetricSpec("sscd_mean_max_sim", "mean SSCD similarity to the nearest training image", ".3f", True)

def _frontier(key: str, label: str, tables: tuple[str, ...] = ()) -> tuple[MetricSpec, ...]:
    """A comparison at matched quality: its estimate and its 95% interval's ends (over seeds: Welch)."""
    return (MetricSpec(key, label, "+.3f", True, tables, vs_baseline=True),
            MetricSpec(key + "_low", label + ", 95% interval low", "+.3f", None, vs_baseline=True),
            MetricSpec(key + "_high", label + ", 95% interval high", "+.3f", None, vs_baseline=True))


def _seed_test(key: str, measure: str) -> tuple[MetricSpec, ...]:
    """What pipeline/compare/verdict.py reads of a comparison at matched quality besides its interval."""
    return (MetricSpec(key + "_p", f"exact permutation p over seeds, matched {measure}", ".3f", None),
            MetricSpec(key + "_p_min", f"least p the seed counts can reach, matched {measure}", ".3f", None),
            MetricSpec(key + "_equivalence_p", f"equivalence p (two one-sided tests), matched {measure}", ".3f", None),
            MetricSpec(key + "_model_bound", f"model's 95% upper bound where it copies nothing, matched {measure}",
                       ".3f", None),
            MetricSpec(key + "_baseline_bound", f"baseline's 95% upper bound where it copies nothing, matched {measure}",
                       ".3f", None),
            MetricSpec(key + "_model_seeds", f"model seeds compared, matched {measure}", "d", None),
            MetricSpec(key + "_baseline_seeds", f"baseline seeds compared, matched {measure}", "d", None),
            MetricSpec(key + "_model_score", f"model memorization at matched {measure}, mean over seeds", ".3f", None),
            MetricSpec(key + "_baseline_score", f"baseline memorization at matched {measure}, mean over seeds", ".3f",
                       None),
            MetricSpec(key + "_not_comparable", f"why not comparable at matched {measure} (verdict.REASONS; 0: comparable)",
                       "d", None))


# In the order tables show them.
METRICS = (
    # memorization: generated samples against the training set, duplicates collapsed
    _MEM,
    _held_out(_MEM, "held-out reference", (REPORT, ABLATION, TRADEOFF, MODEL_TAGS)),
    *(_official(t) for t in OFFICIAL_THRESHOLDS),
    *(_held_out(_official(t)) for t in OFFICIAL_THRESHOLDS),
    _NN1,
    _held_out(_NN1),
    # the normalized L2 of Chen et al. (CVPR 2024; pipeline/evaluate/guidance.py), so that their figure can be set beside ours
    _NL2_SHARE,
    _held_out(_NL2_SHARE),
    _NL2_P5,
    _held_out(_NL2_P5),
    _NL2_MIN,
    _held_out(_NL2_MIN),
    MetricSpec("distinct_copied", "distinct images copied", "d", True, (REPORT, ABLATION, MODEL_TAGS), curve=True),
    MetricSpec("copies_on_duplicated_share", "copies on duplicated images", ".2f", None, (REPORT, ABLATION),
               curve=True),
    MetricSpec("duplicate_groups", "groups of duplicated training images", "d", None),
    MetricSpec("largest_group", "largest duplicate group", "d", None),
    MetricSpec("duplicated_samples", "training images stored more than once", "d", None),
    MetricSpec("unique_images", "unique training images", "d", None),
    MetricSpec("num_samples", "samples evaluated", "d", None),
    # at matched quality, the frontiers read per seed (pipeline/compare/verdict.py; comparison.frontier_numbers):
    # model - baseline; _fd: quality as FD extrapolated to infinite samples
    *_frontier("mem_matched", "memorization at matched KID (vs baseline)", (REPORT, ABLATION, TRADEOFF)),
    *_seed_test("mem_matched", "KID"),
    *_frontier("mem_matched_relative", "memorization at matched KID, relative to the baseline's there"),
    MetricSpec("frontier_area", "area between frontiers, KID (vs baseline)", "+.3f", True, (REPORT,), vs_baseline=True),
    *_frontier("mem_matched_fd", "memorization at matched FD-infinity (vs baseline)", (ABLATION,)),
    *_seed_test("mem_matched_fd", "FD-infinity"),
    *_frontier("mem_matched_relative_fd", "memorization at matched FD-infinity, relative to the baseline's there"),
    MetricSpec("frontier_area_fd", "area between frontiers, FD-infinity (vs baseline)", "+.3f", True, vs_baseline=True),
    # at matched quality, the first crossing of the last point (pipeline/compare/matched.py): the earlier
    # reading, kept for comparison; it has no interval and reads 0 - 0 where nothing copies
    MetricSpec("mem_at_matched_quality", "memorization at matched FD, first crossing (vs baseline)", "+.3f", True,
               vs_baseline=True),
    MetricSpec("nn1_at_matched_quality", "NN1 at matched FD (vs baseline)", "+.2f", False, vs_baseline=True),
    MetricSpec("baseline_mem_at_matched_quality", "baseline memorization at matched FD", ".3f", None),
    MetricSpec("matched_quality_crossings", "times the baseline's curve passes the matched FD", "d", None),
    # membership inference: training images against held-out ones
    MetricSpec("mia_auc", "membership AUC (loss attack)", ".3f", True, (REPORT, ABLATION, MODEL_TAGS)),
    MetricSpec("mia_auc_low", "membership AUC (loss attack), 95% interval low", ".3f", None),
    MetricSpec("mia_auc_high", "membership AUC (loss attack), 95% interval high", ".3f", None),
    MetricSpec("mia_tpr_at_1fpr", "membership TPR at 1% FPR", ".3f", True, (ABLATION,)),
    MetricSpec("pia_auc", "membership AUC (PIA)", ".3f", True, (ABLATION,)),
    MetricSpec("pia_auc_low", "membership AUC (PIA), 95% interval low", ".3f", None),
    MetricSpec("pia_auc_high", "membership AUC (PIA), 95% interval high", ".3f", None),
    MetricSpec("pia_tpr_at_1fpr", "membership TPR at 1% FPR (PIA)", ".3f", True),
    MetricSpec("mia_members", "images per side of the membership attacks", "d", None),
    # quality
    _FD,
    MetricSpec("heldout_fd", "held-out FD", ".2f", None, (REPORT,)),
    MetricSpec("kid", "feature KID", ".3f", True, (ABLATION, MODEL_TAGS), curve=True),
    _FID,
    _held_out(_FID, "held-out Inception FID"),
    _INCEPTION_KID,
    _held_out(_INCEPTION_KID, "held-out Inception KID"),
    # SSCD copy detection (eval.sscd)
    MetricSpec("sscd_threshold", "SSCD similarity threshold (from held-out images)", ".3f", None),
    _SSCD_ABOVE,
    _held_out(_SSCD_ABOVE),
    _SSCD_SIM,
    _held_out(_SSCD_SIM),
    # which images are at risk (the report: IET's AGC skip rates against the baseline's copies)
    MetricSpec("risk_skip_auc", "AUC of the AGC skip rate for the images the baseline copies", ".3f", False),
    MetricSpec("risk_loss_auc", "AUC of the baseline's low loss for the images it copies", ".3f", None),
    MetricSpec("risk_copied_images", "training images the baseline copies", "d", None),
    MetricSpec("skip_rate_duplicated", "mean AGC skip rate, duplicated images", ".3f", None),
    MetricSpec("skip_rate_unique", "mean AGC skip rate, unique images", ".3f", None),
    # training
    MetricSpec("train_seconds", "train seconds", ".0f", None, (REPORT, ABLATION)),
    MetricSpec("dp_epsilon", "DP epsilon (delta = dp.delta)", ".1f", None, (ABLATION,)),
    MetricSpec("images_seen", "optimizer steps x batch", "d", None, (REPORT,)),
)
BY_KEY = {m.key: m for m in METRICS}

# The curve over training: rounds.csv's columns, its progress in rounds first.
CURVE_PROGRESS = "round"
CURVE_KEYS = tuple(m.key for m in METRICS if m.curve)
CURVE_COLUMNS = (CURVE_PROGRESS, *CURVE_KEYS)


def shown_in(table: str) -> list[MetricSpec]:
    return [m for m in METRICS if table in m.tables]


# ---- names in MLflow

def curve_metric(column: str) -> str:
    """The MLflow name of a rounds.csv column on the evaluation's run, logged once per checkpoint
    (the step: its index in training order)."""
    return "round_progress" if column == CURVE_PROGRESS else f"round_{column}"


def evaluation_run(model: str) -> str:
    """The name of a model's evaluation run, nested under the execution's parent run; it holds the
    final metrics by key and the curve (a model's training run is named after the model)."""
    return f"evaluate {model}"


def parent_metric(model: str, key: str) -> str:
    """The name of a model's final metric on the pipeline's parent run (the report logs them)."""
    return f"{model}.{key}"


def of_model(parent_metrics: dict[str, float], model: str) -> dict[str, float]:
    """A model's final metrics among a parent run's, by key (parent_metric undone)."""
    prefix = parent_metric(model, "")
    return {k[len(prefix):]: v for k, v in parent_metrics.items() if k.startswith(prefix)}
