"""report: the baseline vs the IET model (whatever variant it was trained as) in one table
(terminal, markdown, MLflow parent run), then every variant in MLflow."""
from pathlib import Path

import click

from pipeline import tradeoff
from pipeline.config import load_params
from pipeline.io import atomic_path, read_json, write_json
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
    rows = {m: {**read_json(f"runs/eval/{m}/metrics.json"), **read_json(f"runs/{m}/train_info.json")}
            for m in MODELS}
    rows["baseline"]["variant"] = "baseline"
    variant = rows["iet"].get("variant", "IET")
    base, iet = rows["baseline"]["mem_ratio"], rows["iet"]["mem_ratio"]
    change = f"{(iet - base) / base:+.1%}" if base > 0 else "n/a (baseline ratio is 0)"
    text = "\n".join([
        f"# Baseline vs {variant}", "",
        f"Data: {p.data.source}, {p.data.train_size} training images at {p.data.resolution}px; "
        f"{variant}: {rows['iet']['shards']} shards x {rows['iet']['rounds']} rounds "
        f"(the params of its mitigations are in MLflow and params.yaml).", "",
        _table(rows), "",
        f"Relative change of the memorization ratio, {variant} vs baseline: {change}.", "",
        "Memorization ratio: fraction of generated samples whose nearest training image is closer than 1/3 of "
        "the second nearest. Held-out reference: the same for real images never trained on.", ""])
    with atomic_path(Path(out) / "report.md") as tmp:
        tmp.write_text(text)
    write_json(Path(out) / "summary.json", {f"{m}.{k}": v for m, r in rows.items() for k, v in r.items()
                                            if isinstance(v, (int, float))})
    click.echo(text)

    tracker = Tracker(p)
    tracker.log_metrics(tracker.parent_id, {f"{m}.{k}": v for m, r in rows.items() for k, v in r.items()})
    # After logging this run's metrics, so that it is among the points.
    points = tradeoff.main(tracking_uri(p.tracking), p.tracking.experiment, Path(out) / "tradeoff.png",
                           current_run=tracker.parent_id)
    with atomic_path(Path(out) / "report.md") as tmp:
        tmp.write_text(text + "\n".join([
            "", "## Every variant in MLflow", "",
            f"Experiment `{p.tracking.experiment}`, oldest first; a baseline cached across experiments is listed "
            "once. Figure: `tradeoff.png` (memorization ratio vs quality, Pareto front).", "",
            tradeoff.markdown_table(points), ""]))
    tracker.log_artifact(tracker.parent_id, Path(out) / "report.md")
    tracker.log_artifact(tracker.parent_id, Path(out) / "tradeoff.png")
    for m in MODELS:
        tracker.log_artifact(tracker.parent_id, f"runs/eval/{m}/samples.png", f"{m}")
        tracker.log_artifact(tracker.parent_id, f"runs/eval/{m}/copies.png", f"{m}")
    tracker.finish(tracker.parent_id)


if __name__ == "__main__":
    main()
