"""`iet-agc export`: each finished evaluation of an MLflow store as a small CSV kept in git, so that a
benchmark's tables and figures survive a lost store and anyone can derive them again
(docs/scripts/results_table.py reads them; the format: docs/benchmark_data.md).

One file per evaluated model, `<out>/<regime>/<variant slug>/seed<k>.csv`: one row per checkpoint
of its curve (CHECKPOINT_COLUMNS; quality measured here from the curve.npz features exactly as the
verdicts measure it: the unbiased KID, feature FD, FD extrapolated to infinite samples where the
sample count allows), after `#` lines with what made it (the execution, its commit, DVC experiment
and every param) and the model's final numbers (FINAL_METRICS, the held-out floor). A file that
would come out the same is left alone, so exporting again after every finished run only adds.

Heavy libraries are imported inside the functions, so that `iet-agc --help` answers at once.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import math
import re
from pathlib import Path

import click
import numpy as np

FORMAT = "iet-agc results 1"  # the first line of every file: a reader refuses another format
CHECKPOINT_COLUMNS = ("progress", "optimizer_step", "mem_ratio", "samples", "distinct_copied",
                      "copies_on_duplicated_share", "kid", "fd", "fd_infinity")
# per checkpoint, from the evaluation's curve metrics where it logged them (empty otherwise)
LOGGED_PER_CHECKPOINT = ("distinct_copied", "copies_on_duplicated_share")
FINAL_METRICS = ("mem_ratio", "heldout_mem_ratio", "distinct_copied", "copies_on_duplicated_share", "mia_auc",
                 "mia_tpr_at_1fpr", "kid", "fd", "num_samples")
TRAINING_METRICS = ("train_seconds", "dp_epsilon")


def slug(variant: str) -> str:
    """A variant's name as a folder: lower case, '+' spelled out (IET-AGC+ is not IET-AGC), any
    other run of non-alphanumerics one '-': 'IET-AGC+ [pooled, groups]' -> 'iet-agc-plus-pooled-groups'."""
    text = variant.lower().replace("+", "-plus-")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _number(value) -> str:
    """Exact (repr round-trips a float), empty where unknown."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def checkpoint_rows(curve, steps_per_round: float | None, logged: dict[str, dict[int, float]]) -> list[dict]:
    """One row per checkpoint of `curve` (frontier.Curve), in training order: quality measured from
    its features against its reference as comparison.FRONTIER_MEASURES does (the verdicts' KID and
    FD-infinity), FD as the evaluate stage's. `steps_per_round`: optimizer steps of the whole model
    per round (all proxies together; None: unknown); `logged`: column -> {checkpoint index from 1: value}."""
    from threadpoolctl import threadpool_limits

    from pipeline.compare import comparison

    from pipeline.evaluate import frontier

    samples = curve.memorized.shape[1]
    kid = frontier.KID(curve.reference)
    fd, fd_inf = frontier.FD(curve.reference), comparison._fd_infinity(curve.reference, samples)
    everything = np.arange(samples)
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):  # as frontier.resample measures them
        for i, (progress, memorized, features) in enumerate(zip(curve.progress, curve.memorized, curve.features), 1):
            features = np.asarray(features, np.float64)
            rows.append({"progress": float(progress),
                         "optimizer_step": None if steps_per_round is None else round(progress * steps_per_round),
                         "mem_ratio": float(np.asarray(memorized, bool).mean()), "samples": samples,
                         **{k: logged.get(k, {}).get(i) for k in LOGGED_PER_CHECKPOINT},
                         "kid": kid(features)(everything), "fd": fd(features)(everything),
                         "fd_infinity": None if fd_inf is None else fd_inf(features)(everything)})
    return rows


def render(meta: dict[str, object], rows: list[dict]) -> str:
    """The file: FORMAT, `# key: value` lines, then the CSV of rows."""
    out = io.StringIO()
    out.write(f"# {FORMAT}\n")
    for key, value in meta.items():
        out.write(f"# {key}: {value}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CHECKPOINT_COLUMNS)
    for row in rows:
        writer.writerow([_number(row.get(c)) for c in CHECKPOINT_COLUMNS])
    return out.getvalue()


def read(path: str | Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """A file `render` wrote: its `#` lines (key -> text) and its columns as float arrays (NaN where
    empty). One line naming the file where it is not one."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != f"# {FORMAT}":
        raise click.ClickException(f"{path}: not an exported results file (first line is not '# {FORMAT}')")
    meta = dict(line[2:].split(": ", 1) for line in lines[1:] if line.startswith("# ") and ": " in line)
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    columns = {c: np.array([float(r[c]) if r[c] != "" else math.nan for r in table]) for c in CHECKPOINT_COLUMNS}
    return meta, columns


def _meta(regime: str, result, tags: dict[str, str], final: dict[str, float], floor: float) -> dict[str, object]:
    meta = {"regime": regime, "variant": result.variant, "seed": result.params.get("seeds.train", ""),
            "tau": "" if result.tau is None else result.tau, "execution": result.run_name,
            "dvc_experiment": tags.get("dvc_exp_name", ""), "commit": tags.get("git_commit", "unknown"),
            "mlflow_run": result.run_id, "mlflow_evaluation": result.evaluation_id, "heldout_floor": _number(floor)}
    meta.update({f"final.{k}": _number(final.get(k)) for k in (*FINAL_METRICS, *TRAINING_METRICS)})
    meta.update({f"param.{k}": v for k, v in sorted(result.params.items())})
    return meta


def _steps_per_round(client, result) -> float | None:
    """Optimizer steps of the whole model per round, from its training run's params (the round loop
    logs shards and each proxy's steps a round); None without a training run under this execution."""
    if result.training_id is None:
        return None
    params = client.get_run(result.training_id).data.params
    if "shards" not in params or "steps_per_round" not in params:
        return None
    return int(params["shards"]) * int(params["steps_per_round"])


def _logged(client, result) -> dict[str, dict[int, float]]:
    from pipeline.evaluate.metric_names import curve_metric

    return {k: {m.step: m.value for m in client.get_metric_history(result.evaluation_id, curve_metric(k))}
            for k in LOGGED_PER_CHECKPOINT}


def export(client, experiment: str, regime: str, out: Path, match: str = "*") -> list[tuple[Path | None, str]]:
    """Every finished evaluation with a curve of `experiment` whose execution's name matches `match`
    written under out/regime; (path, what happened) for each model seen: written, unchanged, or why
    not. A model evaluated again under the same variant and seed (a queued experiment that trained
    the baseline again) is the same model: the first stands, as in `iet-agc ablation`."""
    from commands.mlflow_results import frontier_curve, read_results, training_metrics

    done: dict[Path, tuple] = {}
    report = []
    for result in read_results(client, experiment):
        if not fnmatch.fnmatchcase(result.run_name, match) or result.evaluation_id is None:
            continue
        path = out / regime / slug(result.variant) / f"seed{result.params.get('seeds.train', 'unknown')}.csv"
        identity = (result.variant, result.tau, result.params.get("iet.shards"))
        if path in done:
            if done[path] != identity:
                raise click.ClickException(f"{path}: two variants {done[path]} and {identity} share it; export "
                                           "them as separate regimes (--match)")
            report.append((path, f"skipped {result.run_name} {result.model}: the same variant and seed again"))
            continue
        curve = frontier_curve(client, result)
        if curve is None:
            report.append((None, f"skipped {result.run_name} {result.model}: no curve.npz"))
            continue
        done[path] = identity
        final = {**result.metrics, **training_metrics(client, result, TRAINING_METRICS)}
        tags = client.get_run(result.run_id).data.tags
        text = render(_meta(regime, result, tags, final, curve.floor),
                      checkpoint_rows(curve, _steps_per_round(client, result), _logged(client, result)))
        report.append((path, _write_if_changed(path, text)))
    return report


def _write_if_changed(path: Path, text: str) -> str:
    from pipeline.core.io import atomic_path

    if path.is_file() and path.read_text() == text:
        return "unchanged"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return "written"


@click.command("export")
@click.option("--tracking-uri", required=True, help="the MLflow store, e.g. sqlite:///$PWD/mlflow.db")
@click.option("--experiment", default="iet-agc", show_default=True, help="MLflow experiment (tracking.experiment)")
@click.option("--regime", required=True, help="the folder under --out these runs go to (e.g. N, U)")
@click.option("--match", default="*", show_default=True,
              help="only executions (DVC experiments) whose name matches this glob, e.g. 'finetune-*'")
@click.option("--out", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def export_command(tracking_uri, experiment, regime, match, out):
    """Each finished evaluation as <out>/<regime>/<variant>/seed<k>.csv: per checkpoint memorization,
    samples, KID, FD, FD-infinity; the final numbers, commit and params as # lines. Unchanged files
    are not rewritten. Tables from them: docs/scripts/results_table.py <out>/<regime>.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.core.store import StoreError, check_store, fail_fast_http

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", regime):
        raise click.BadParameter("letters, digits, '.', '_' and '-' only (a folder name)", param_hint="--regime")
    fail_fast_http()
    try:
        check_store(tracking_uri, must_exist=True)  # a SQLite file that is not there is a typo, not a new store
        report = export(MlflowClient(tracking_uri=tracking_uri), experiment, regime, out, match)
    except StoreError as err:
        raise click.ClickException(str(err)) from None
    except MlflowException as err:
        raise click.ClickException(f"MLflow failed ({err.message}); check --tracking-uri") from None
    if not report:
        raise click.ClickException(f"no finished evaluations in MLflow experiment '{experiment}' matching '{match}'")
    for path, what in report:
        click.echo(f"{what}: {path}" if path else what)
