"""report: baseline vs IET-AGC+ in one table (terminal, markdown, MLflow parent run)."""
from pathlib import Path

import click

from pipeline import tradeoff
from pipeline.config import load_params
from pipeline.io import atomic_path, read_json, write_json
from pipeline.tracking import Tracker, tracking_uri
from stages import params_option, stage

MODELS = ("baseline", "iet")
COLUMNS = [("memorization ratio", "mem_ratio", "{:.3f}"), ("held-out reference", "heldout_mem_ratio", "{:.3f}"),
           ("official score < 0.15", "official_below_0.15", "{:.3f}"), ("mean NN1 distance", "mean_nn1", "{:.2f}"),
           ("feature FD", "fd", "{:.2f}"), ("held-out FD", "heldout_fd", "{:.2f}"),
           ("train seconds", "train_seconds", "{:.0f}"), ("optimizer steps x batch", "images_seen", "{:d}")]


def _table(rows: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    body = ["| " + name + " | " + " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |"
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
    base, iet = rows["baseline"]["mem_ratio"], rows["iet"]["mem_ratio"]
    change = f"{(iet - base) / base:+.1%}" if base > 0 else "n/a (baseline ratio is 0)"
    text = "\n".join([
        "# Baseline vs IET-AGC+", "",
        f"Data: {p.data.source}, {p.data.train_size} training images at {p.data.resolution}px; "
        f"IET: {p.iet.shards} shards x {p.iet.rounds} rounds; AGC {'on, tau=' + str(p.agc.tau) if p.agc.enabled else 'off'}; "
        f"MSR {'on' if p.msr.enabled else 'off'}; TAA {'on' if p.taa.enabled else 'off'}.", "",
        _table(rows), "",
        f"Relative change of the memorization ratio, IET vs baseline: {change}.", "",
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
