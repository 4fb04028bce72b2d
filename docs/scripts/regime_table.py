"""The table of one benchmark, read from its MLflow store: per setting (a regime), each variant's
seeds, verdict (with its role: primary or exploratory, and its adjusted p) and memorization at
matched KID against the baseline [Welch 95% over seeds] (also relative to the baseline's
memorization there, the papers' "% less memorization", where the baseline copies above the floor),
the area between the frontiers, the best feature FD and KID any of its checkpoints reached (mean over seeds), its
final memorization ratio, membership AUC (loss attack) and training seconds. The frontier numbers
are `iet-agc ablation`'s (commands/ablation.py); this adds only the best quality reached.

    python docs/scripts/regime_table.py --tracking-uri sqlite:///$PWD/mlflow.db
"""
import math
import os

import click
import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands import ablation  # noqa: E402
from commands.mlflow_results import curve, read_results  # noqa: E402
from pipeline.compare.comparison import frontier_verdict  # noqa: E402

HEAD = ["variant", "seeds", "verdict (KID; FD-infinity)", "p (adjusted)", "memorization at matched KID [95%]",
        "relative to the baseline's there [95%]", "area between frontiers, KID",
        "best FD reached", "best KID reached", "memorization ratio (final)", "membership AUC", "train seconds"]


def best_quality(client: MlflowClient, experiment: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(execution's run name, model) -> the least FD and KID over its checkpoints."""
    out = {}
    for result in read_results(client, experiment):
        points = curve(client, result, ("fd", "kid"))
        if points:
            out[result.run_name, result.model] = (min(p["fd"] for p in points), min(p["kid"] for p in points))
    return out


def _mean(row: dict, key: str, fmt: str) -> str:
    if key not in row["stats"]:
        return "-"
    mean, sd, _, _ = row["stats"][key]
    return format(mean, fmt) + ("" if math.isnan(sd) else " ± " + format(sd, fmt))


def head(columns: list[str]) -> str:
    """A markdown table's header, after a blank line."""
    return "\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def interval(f: dict, key: str, fmt: str = "+.3f") -> str:
    if key not in f or not math.isfinite(f[key]):
        return "-"
    return f"{f[key]:{fmt}} [{f[key + '_low']:{fmt}}, {f[key + '_high']:{fmt}}]"


def line(row: dict, best: dict) -> str:
    model = "baseline" if row["variant"] == "baseline" else "iet"
    reached = [best[run, model] for run in row["runs"] if (run, model) in best]
    fd, kid = (np.mean([r[i] for r in reached]) if reached else math.nan for i in (0, 1))
    f = row["frontier"]
    adjusted = f.get("mem_matched_p_adjusted", math.nan)
    verdict = "reference" if row["variant"] == "baseline" else (
        f"{frontier_verdict(f, '', adjusted if math.isfinite(adjusted) else None)} ({row.get('role', 'exploratory')}); "
        f"{frontier_verdict(f, '_fd')}" if f else "no curve")
    p = f"{f.get('mem_matched_p', math.nan):.3f} ({adjusted:.3f})" if f else "-"
    cells = [row["variant"], ",".join(row["seeds"]), verdict, p, interval(f, "mem_matched"),
             interval(f, "mem_matched_relative", "+.0%"), f"{f.get('frontier_area', math.nan):+.3f}" if f else "-",
             f"{fd:.2f}", f"{kid:.3f}", _mean(row, "mem_ratio", ".3f"), _mean(row, "mia_auc", ".3f"),
             _mean(row, "train_seconds", ".0f")]
    return "| " + " | ".join(cells) + " |"


@click.command()
@click.option("--tracking-uri", required=True)
@click.option("--experiment", default="iet-agc", show_default=True)
def main(tracking_uri, experiment):
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = ablation.table(ablation.collect(client, experiment))
    best = best_quality(client, experiment)
    for setting in dict.fromkeys(repr(r["setting"]) for r in rows):
        click.echo(head(HEAD))
        for row in (r for r in rows if repr(r["setting"]) == setting):
            click.echo(line(row, best))


if __name__ == "__main__":
    main()
