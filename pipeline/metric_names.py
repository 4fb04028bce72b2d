"""The one list of metric keys the project reports: display name, format, direction, and which
tables show each. The report, the ablation table, the registered models' tags and the tradeoff
figure all read it, so a new metric is one line here (plus the code that computes it)."""
from __future__ import annotations

from dataclasses import dataclass

REPORT, ABLATION, MODEL_TAGS = "report", "ablation", "model_tags"  # MODEL_TAGS: on registered versions


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    fmt: str
    lower_is_better: bool | None   # None: a reference or a cost, not a score to optimise
    tables: tuple[str, ...] = ()

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


METRICS = (
    MetricSpec("mem_ratio", "memorization ratio", ".3f", True, (REPORT, ABLATION, MODEL_TAGS)),
    MetricSpec("heldout_mem_ratio", "held-out reference", ".3f", None, (REPORT, ABLATION, MODEL_TAGS)),
    MetricSpec("official_below_0.15", "official score < 0.15", ".3f", True, (REPORT, ABLATION)),
    MetricSpec("mean_nn1", "mean NN1 distance", ".2f", False, (REPORT, ABLATION)),
    MetricSpec("distinct_copied", "distinct images copied", "d", True, (REPORT, ABLATION, MODEL_TAGS)),
    MetricSpec("copies_on_duplicated_share", "copies on duplicated images", ".2f", None, (REPORT, ABLATION)),
    MetricSpec("mem_at_matched_quality", "memorization at matched FD (vs baseline)", "+.3f", True, (REPORT, ABLATION)),
    MetricSpec("nn1_at_matched_quality", "NN1 at matched FD (vs baseline)", "+.2f", False, (ABLATION,)),
    MetricSpec("mia_auc", "membership AUC (loss attack)", ".3f", True, (REPORT, ABLATION, MODEL_TAGS)),
    MetricSpec("mia_tpr_at_1fpr", "membership TPR at 1% FPR", ".3f", True, (ABLATION,)),
    MetricSpec("pia_auc", "membership AUC (PIA)", ".3f", True, (ABLATION,)),
    MetricSpec("fd", "feature FD", ".2f", True, (REPORT, ABLATION, MODEL_TAGS)),
    MetricSpec("heldout_fd", "held-out FD", ".2f", None, (REPORT,)),
    MetricSpec("kid", "feature KID", ".3f", True, (ABLATION, MODEL_TAGS)),
    MetricSpec("fid", "Inception FID", ".1f", True, (ABLATION,)),
    MetricSpec("train_seconds", "train seconds", ".0f", None, (REPORT, ABLATION)),
    MetricSpec("dp_epsilon", "DP epsilon (delta = dp.delta)", ".1f", None, (ABLATION,)),
    MetricSpec("images_seen", "optimizer steps x batch", "d", None, (REPORT,)),
)
BY_KEY = {m.key: m for m in METRICS}


def shown_in(table: str) -> list[MetricSpec]:
    return [m for m in METRICS if table in m.tables]
