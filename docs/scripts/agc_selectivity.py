"""AGC's selectivity (docs/method.md#small-scale): for every model trained by the DVC experiments whose names start
with --prefix, the mean skip rate of duplicated and of unique samples in each round (the training
run's `skip_rate_duplicated` / `skip_rate_unique`), the ROC AUC of the skip rate for the images the
baseline copies (`risk.risk_skip_auc`, logged by the report where the experiment ran it: K > 1),
and the final memorization ratio and FD. Reads the MLflow store through commands.mlflow_results.

    python docs/scripts/agc_selectivity.py --prefix sel- > table.md
"""
from __future__ import annotations

import click
from mlflow import MlflowClient

from commands.mlflow_results import read_results
from pipeline.core.store import tracking_uri
from pipeline.core.config import load_params


def _by_round(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _cells(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) or "-"


@click.command()
@click.option("--prefix", default="sel-", show_default=True, help="DVC experiment names to read")
@click.option("--params", "params_path", default="params.yaml", show_default=True)
def main(prefix, params_path):
    p = load_params(params_path)
    client = MlflowClient(tracking_uri(p.tracking))
    print("| experiment | variant | skip rate, duplicated (rounds 1-4) | skip rate, unique | "
          "skip AUC for the baseline's copies | memorization ratio | FD |")
    print("|---|---|---|---|---|---|---|")
    for r in read_results(client, p.tracking.experiment):
        if not r.run_name.startswith(prefix) or r.training_id is None:
            continue  # (a baseline DVC restored from its cache has no training run here: listed once)
        auc = client.get_run(r.run_id).data.metrics.get("risk.risk_skip_auc") if r.model == "iet" else None
        print(f"| {r.run_name} | {r.variant} | {_cells(_by_round(client, r.training_id, 'skip_rate_duplicated'))} | "
              f"{_cells(_by_round(client, r.training_id, 'skip_rate_unique'))} | "
              f"{'-' if auc is None else format(auc, '.3f')} | {r.metrics.get('mem_ratio', float('nan')):.3f} | "
              f"{r.metrics.get('fd', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
