"""report: the baseline vs the IET model (whatever variant it was trained as) in one table
(terminal, markdown, MLflow parent run), then every variant in MLflow."""
from pathlib import Path

import click

from commands import tradeoff
from pipeline import figures
from pipeline.comparison import RISK_FIELDS, at_matched_quality, read_rows, risk_table, skip_rates
from pipeline.data import ImageSet
from pipeline.duplicates import duplicate_groups
from pipeline.config import load_params
from pipeline.io import atomic_path, read_json, write_csv, write_json
from pipeline.metric_names import REPORT, shown_in
from pipeline.store import tracking_uri
from pipeline.tracking import Tracker
from stages import params_option, stage

MODELS = ("baseline", "iet")


def _table(rows: dict[str, dict]) -> str:
    columns = shown_in(REPORT)
    head = "| model | " + " | ".join(c.label for c in columns) + " |"
    sep = "|---" * (len(columns) + 1) + "|"
    body = ["| " + rows[name].get("variant", name) + " | " + " | ".join(c.format(r.get(c.key)) for c in columns) + " |"
            for name, r in rows.items()]
    return "\n".join([head, sep, *body])


@click.command()
@params_option
@click.option("--out", default="reports", show_default=True)
@stage
def main(params_path, out):
    p = load_params(params_path)
    out = Path(out)
    rows = {m: {**read_json(f"runs/eval/{m}/metrics.json"), **read_json(f"runs/{m}/train_info.json")}
            for m in MODELS}
    rows["baseline"]["variant"] = "baseline"
    curves = {m: read_rows(f"runs/eval/{m}/rounds.csv") for m in MODELS}
    for m in MODELS:
        rows[m].update(at_matched_quality(curves["baseline"], curves[m]))
    train = ImageSet.load("data/prepared/train.npz")
    risk_rows, risk = risk_table(duplicate_groups(train.images), train.ids, read_rows("runs/eval/baseline/copied.csv"),
                                 skip_rates("runs/iet/rounds", train.ids))
    write_csv(out / "risk.csv", risk_rows, RISK_FIELDS)
    figures.save_risk(risk_rows, out / "risk.png")
    text = _text(p, rows, risk)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    numbers = {**{f"{m}.{k}": v for m, r in rows.items() for k, v in r.items() if _number(v)},
               **{f"risk.{k}": v for k, v in risk.items()}}
    write_json(out / "summary.json", numbers)
    click.echo(text)

    tracker = Tracker(p)
    tracker.log_metrics(tracker.parent_id, numbers)
    # After logging this run's metrics, so that it is among the points.
    points = tradeoff.main(tracking_uri(p.tracking), p.tracking.experiment, out / "tradeoff.png",
                           current_run=tracker.parent_id)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text + "\n".join([
            "", "## Every variant in MLflow", "",
            f"Experiment `{p.tracking.experiment}`, oldest first; a baseline cached across experiments is listed "
            "once. Figure: `tradeoff.png` (memorization ratio vs quality, Pareto front).", "",
            tradeoff.markdown_table(points), ""]))
    for name in ("report.md", "tradeoff.png", "risk.csv", "risk.png"):
        tracker.log_artifact(tracker.parent_id, out / name)
    for m in MODELS:
        for name in ("samples.png", "copies.png", "most_copied.png", "rounds.csv"):
            tracker.log_artifact(tracker.parent_id, f"runs/eval/{m}/{name}", f"{m}")
    tracker.finish(tracker.parent_id)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(p, rows: dict[str, dict], risk: dict) -> str:
    variant = rows["iet"]["variant"]
    base, iet = rows["baseline"]["mem_ratio"], rows["iet"]["mem_ratio"]
    change = f"{(iet - base) / base:+.1%}" if base > 0 else "n/a (baseline ratio is 0)"
    matched = rows["iet"]
    return "\n".join([
        f"# Baseline vs {variant}", "",
        f"Data: {p.data.source}, {p.data.train_size} training images at {p.data.resolution}px "
        f"({rows['iet'].get('unique_images', '?')} unique, {rows['iet'].get('duplicate_groups', 0)} duplicated); "
        f"{variant}: {rows['iet']['shards']} shards x {rows['iet']['rounds']} rounds "
        "(the params of its mitigations are in MLflow and params.yaml).", "",
        _table(rows), "",
        f"Relative change of the memorization ratio, {variant} vs baseline: {change}.", "",
        "Memorization ratio: fraction of generated samples whose nearest training image (duplicates collapsed) "
        "is closer than 1/3 of the second nearest. Held-out reference: the same for real images never trained "
        "on. Membership AUC: the loss attack's ROC AUC, training images against held-out ones (0.5: no leak).", "",
        "## At matched quality", "",
        f"{variant}'s last curve point read against the baseline's memorization-vs-FD curve (`rounds.csv`): "
        f"status `{matched['matched_quality_status']}`; memorization ratio {_signed(matched['mem_at_matched_quality'])} "
        f"against the baseline at the same FD ({_fmt(matched['baseline_mem_at_matched_quality'])}), mean NN1 "
        f"{_signed(matched['nn1_at_matched_quality'])}. Negative memorization (positive NN1) means it copies less "
        "than a baseline stopped at the same quality; out of range means no baseline checkpoint has that FD.", "",
        "## Which images are at risk", "",
        f"{risk['risk_copied_images']} training images are copied by the baseline (`risk.csv`, `risk.png`). "
        f"ROC AUC for predicting them: {variant}'s AGC skip rate {_fmt(risk['risk_skip_auc'])}, the baseline's "
        f"low per-image loss {_fmt(risk['risk_loss_auc'])} (0.5: chance). Mean skip rate of duplicated images "
        f"{_fmt(risk['skip_rate_duplicated'])}, of unique ones {_fmt(risk['skip_rate_unique'])}.", ""])


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _signed(v) -> str:
    return "n/a" if v is None or v != v else f"{v:+.3f}"


if __name__ == "__main__":
    main()
