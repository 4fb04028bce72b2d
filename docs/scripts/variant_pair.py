"""Variants of one benchmark compared with each other instead of with the baseline: the frontier
protocol of `iet-agc ablation` (comparison.frontier_numbers: per-seed scores, Welch interval, exact
permutation p, equivalence test) with the second variant in the baseline's place, in each setting
(regime) where both have curves. It answers "does AGC add anything on top of IET at the same
quality"; "the same" needs the equivalence test (indistinguishable), not an interval holding 0.
These comparisons are exploratory: the p printed is unadjusted.

    python docs/scripts/variant_pair.py --tracking-uri sqlite:///$PWD/mlflow.db --pair IET-AGC+ IET --pair AGC baseline

Variants are named as in the ablation's table.
"""
import os

import click

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402

from commands import ablation  # noqa: E402
from pipeline.compare.comparison import frontier_numbers, frontier_verdict  # noqa: E402
from regime_table import head, interval  # noqa: E402  (docs/scripts, this script's folder)

HEAD = ["variant", "seeds", "against", "seeds", "verdict (KID; FD-infinity)", "p", "equivalence p",
        "memorization difference at matched KID [95%]", "relative [95%]", "area between frontiers, KID"]


def line(row: dict, against: dict) -> str:
    numbers = frontier_numbers({row["variant"]: row["curves"]}, against["curves"])[row["variant"]]
    cells = [row["variant"], ",".join(row["seeds"]), against["variant"], ",".join(against["seeds"]),
             f"{frontier_verdict(numbers)}; {frontier_verdict(numbers, '_fd')}",
             f"{numbers['mem_matched_p']:.3f}", f"{numbers['mem_matched_equivalence_p']:.3f}",
             interval(numbers, "mem_matched"), interval(numbers, "mem_matched_relative", "+.0%"),
             f"{numbers['frontier_area']:+.3f}"]
    return "| " + " | ".join(cells) + " |"


@click.command()
@click.option("--tracking-uri", required=True)
@click.option("--experiment", default="iet-agc", show_default=True)
@click.option("--pair", "pairs", nargs=2, multiple=True, required=True, metavar="VARIANT AGAINST")
def main(tracking_uri, experiment, pairs):
    rows = ablation.group(ablation.collect(MlflowClient(tracking_uri=tracking_uri), experiment))
    for setting in dict.fromkeys(repr(r["setting"]) for r in rows):
        by_variant = {r["variant"]: r for r in rows if repr(r["setting"]) == setting and all(r["curves"])}
        click.echo(head(HEAD))
        for variant, against in pairs:
            if variant in by_variant and against in by_variant:
                click.echo(line(by_variant[variant], by_variant[against]))


if __name__ == "__main__":
    main()
