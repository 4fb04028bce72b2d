"""report: the baseline vs the IET model (whatever variant it was trained as), from their
evaluations alone: one table (terminal, markdown, MLflow parent run), memorization at matched
quality, both models' memorization-vs-quality curves over training and the images at risk.

It reads only the files its options name (the stage's deps in dvc.yaml) and no other run in MLflow,
so the same inputs give the same report whatever else the store holds; the comparison across
experiments is `iet-agc tradeoff` and `iet-agc ablation`. It logs to MLflow, and puts its outputs in
place only once everything, the logging included, has succeeded: a failed report writes none."""
import math
import tempfile
import zipfile
from pathlib import Path

import click
import numpy as np

from pipeline.core import figures

from pipeline import mitigation

from pipeline.compare import verdict
from pipeline.compare.comparison import (RISK_FIELDS, at_matched_quality, frontier_lines, frontier_numbers, frontier_verdict,
                                 read_comparison, read_rows, risk_table, skip_rates)
from pipeline.core.config import load_params
from pipeline.core.data import ImageSet
from pipeline.core.dedup import duplicate_groups
from pipeline.evaluate.frontier import NO_COMPARABLE_QUALITY, Curve
from pipeline.core.io import publish, read_json, unreadable, write_csv, write_json
from pipeline.evaluate.metric_names import BY_KEY, REPORT, shown_in
from pipeline.track.tracking import Tracker
from stages import MODELS, pair_option, params_option, path_option, stage


def _table(rows: dict[str, dict]) -> str:
    columns = shown_in(REPORT)
    head = "| model | " + " | ".join(c.label for c in columns) + " |"
    sep = "|---" * (len(columns) + 1) + "|"
    body = ["| " + rows[name].get("variant", name) + " | " + " | ".join(c.format(r.get(c.key)) for c in columns) + " |"
            for name, r in rows.items()]
    return "\n".join([head, sep, *body])


@click.command()
@params_option
@pair_option("--metrics", "metrics_paths", help="evaluate's metrics.json")
@pair_option("--train-info", "info_paths", help="the training stage's train_info.json")
@pair_option("--curve", "curve_paths", help="evaluate's rounds.csv (memorization and FD at every checkpoint)")
@pair_option("--frontier", "frontier_paths", help="evaluate's curve.npz (every checkpoint's memorized flags and features)")
@pair_option("--samples", "samples_paths", help="evaluate's sample grid, logged to MLflow")
@pair_option("--copies", "copies_paths", help="evaluate's copies beside their nearest training image, logged")
@pair_option("--most-copied", "most_copied_paths", help="evaluate's most-copied training images, logged")
@pair_option("--sample-arrays", "sample_arrays", help="evaluate's samples.npz (the final samples as uint8)")
@path_option("--copied", "copied_path", help="the baseline's copies per training image (evaluate's copied.csv)")
@path_option("--skips", "rounds_dir", help="the IET run's rounds/ (AGC skip rates in each round's loss table)")
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--report", "report_path", help="the report (.md)")
@path_option("--summary", "summary_path", help="every number of the report (.json)")
@path_option("--curves", "curves_path", help="figure: both models' memorization vs quality over training (.png)")
@path_option("--frontier-figure", "frontier_png", help="figure: both models' memorization-quality frontiers (.png)")
@path_option("--side-by-side", "side_png", help="figure: both models' samples, and the images the baseline copies "
             "most beside each model's nearest sample (.png)")
@path_option("--risk-table", "risk_csv", help="per unique training image: copies, loss, skip rate (.csv)")
@path_option("--risk-figure", "risk_png", help="figure: IET's skip rate vs the baseline's copies (.png)")
@stage
def main(params_path, metrics_paths, info_paths, curve_paths, frontier_paths, samples_paths, copies_paths,
         most_copied_paths, sample_arrays, copied_path, rounds_dir, train_path, report_path, summary_path, curves_path,
         frontier_png, side_png, risk_csv, risk_png):
    p = load_params(params_path)
    # everything is read and computed before anything is written
    rows, curves = _rows(metrics_paths, info_paths, curve_paths)
    for row in rows.values():  # evaluated with a sampling-time remedy (amg): a variant of its own
        row["variant"] = mitigation.with_sampling(row.get("variant", "iet"), mitigation.sampling_settings(p))
    frontiers = {m: Curve.load(frontier_paths[m]) for m in MODELS}
    rows["iet"].update(_frontier_numbers(frontiers))
    train = ImageSet.load(train_path)
    risk_rows, risk = risk_table(duplicate_groups(train.images), train.ids, read_rows(copied_path),
                                 skip_rates(rounds_dir, train.ids))
    names = {"curve": curve_paths["baseline"].name, "curves": curves_path.name, "risk_csv": risk_csv.name,
             "risk_png": risk_png.name, "frontier": frontier_png.name, "side": side_png.name}
    text = _text(p, rows, risk, names)
    numbers = {**{f"{m}.{k}": v for m, r in rows.items() for k, v in r.items() if _number(v)},
               **{f"risk.{k}": v for k, v in risk.items()}}
    writers = {report_path: lambda path: path.write_text(text),
               summary_path: lambda path: write_json(path, numbers),
               curves_path: lambda path: _save_curves(rows, curves, path),
               frontier_png: lambda path: _save_frontiers(rows, frontiers, path),
               side_png: lambda path: _save_side_by_side(rows, train, copied_path, sample_arrays, path),
               risk_csv: lambda path: write_csv(path, risk_rows, RISK_FIELDS),
               risk_png: lambda path: figures.save_risk(risk_rows, path)}
    evaluation_files = {m: [curve_paths[m], samples_paths[m], copies_paths[m], most_copied_paths[m]] for m in MODELS}
    _log_then_publish(p, writers, numbers, evaluation_files)
    click.echo(text)


def _log_then_publish(p, writers: dict, numbers: dict, evaluation_files: dict[str, list[Path]]) -> None:
    """Write each output (path -> its writer) into a staging folder, log them to MLflow, and only
    then copy each into place, so that an error anywhere leaves none of them behind."""
    with tempfile.TemporaryDirectory() as tmp:
        # each under its own name, in a folder of its own: the name MLflow gives the artifact
        staged = {dest: Path(tmp) / str(i) / dest.name for i, dest in enumerate(writers)}
        for dest, write in writers.items():
            staged[dest].parent.mkdir()
            write(staged[dest])
        tracker = _log(p, numbers, list(staged.values()), evaluation_files)
        for dest, path in staged.items():
            publish(path, dest)
    tracker.finish(tracker.parent_id)


def _rows(metrics_paths: dict, info_paths: dict, curve_paths: dict) -> tuple[dict[str, dict], dict[str, list]]:
    """Per model: its final metrics, its training summary and its memorization at matched quality;
    and its curve over training."""
    rows = {m: {**read_json(metrics_paths[m]), **read_json(info_paths[m])} for m in MODELS}
    rows["baseline"]["variant"] = "baseline"
    curves = {m: read_rows(curve_paths[m]) for m in MODELS}
    for m in MODELS:
        rows[m].update(at_matched_quality(curves["baseline"], curves[m]))
    return rows, curves


def _frontier_numbers(frontiers: dict[str, Curve]) -> dict[str, float]:
    """The IET model's frontier against the baseline's (nothing without a curve: eval.curve_samples 0)."""
    if not all(len(c.progress) for c in frontiers.values()):
        return {}
    return frontier_numbers({"iet": [frontiers["iet"]]}, [frontiers["baseline"]])["iet"]


def _save_frontiers(rows: dict[str, dict], frontiers: dict[str, Curve], path: Path) -> None:
    figures.save_frontiers(frontier_lines({rows[m]["variant"]: [frontiers[m]] for m in MODELS}), path,
                           BY_KEY["kid"].axis_label + ", curve samples", BY_KEY["mem_ratio"].axis_label,
                           reference=rows["baseline"].get("heldout_mem_ratio"))


def _save_side_by_side(rows: dict[str, dict], train: ImageSet, copied_path: Path, arrays: dict[str, Path],
                       path: Path) -> None:
    position = {int(i): p for p, i in enumerate(train.ids)}
    copied = [{**r, "position": position[int(r["sample_id"])]} for r in read_rows(copied_path)]
    samples = {rows[m]["variant"]: _channels_last(_sample_array(arrays[m])) for m in MODELS}
    figures.save_side_by_side(_channels_last(train.images), copied, samples, path)


def _sample_array(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # truncated, or not this format
        raise unreadable(path, err) from None


def _channels_last(images: np.ndarray) -> np.ndarray:
    return np.moveaxis(images, 1, -1) if images.ndim == 4 and images.shape[1] in (1, 3) else images


def _save_curves(rows: dict[str, dict], curves: dict[str, list], path: Path) -> None:
    figures.save_curves({rows[m]["variant"]: curves[m] for m in MODELS}, path,
                        BY_KEY["fd"].axis_label + ", curve samples", BY_KEY["mem_ratio"].axis_label,
                        reference=rows["baseline"].get("heldout_mem_ratio"))


def _log(p, numbers: dict, outputs: list[Path], evaluation_files: dict[str, list[Path]]) -> Tracker:
    """The report's numbers and files on the pipeline's MLflow parent run, and each model's
    evaluation figures under <model>/: a parent whose baseline evaluation DVC kept cached (an
    experiment that re-trains only the IET model) gets the baseline's too."""
    tracker = Tracker(p)
    tracker.log_metrics(tracker.parent_id, numbers)
    for path in outputs:
        tracker.log_artifact(tracker.parent_id, path)
    for m, paths in evaluation_files.items():
        for path in paths:
            tracker.log_artifact(tracker.parent_id, path, m)
    return tracker


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(p, rows: dict[str, dict], risk: dict, names: dict[str, str]) -> str:
    """The markdown report; `names`: the file names it mentions (curve, curves, risk_csv, risk_png)."""
    variant = rows["iet"]["variant"]
    return "\n".join([
        f"# Baseline vs {variant}", "",
        _lead(variant, rows["iet"]) + " " + _finals(variant, rows), "",
        f"![both models side by side]({names['side']})", "",
        f"Data: {p.data.source}, {p.data.train_size} training images at {p.data.resolution}px "
        f"({rows['iet'].get('unique_images', '?')} unique, {rows['iet'].get('duplicate_groups', 0)} duplicated); "
        f"{variant}: {rows['iet']['shards']} shards x {rows['iet']['rounds']} rounds "
        "(the params of its mitigations are in MLflow and params.yaml).", "",
        _table(rows), "",
        "Memorization ratio: fraction of generated samples whose nearest training image (duplicates collapsed) "
        "is closer than 1/3 of the second nearest. Held-out reference: the same for real images never trained "
        "on. Membership AUC: the loss attack's ROC AUC, training images against held-out ones (0.5: no leak).", "",
        "## At matched quality", "",
        *_matched_text(variant, rows["iet"], names), "",
        "## Which images are at risk", "",
        f"{risk['risk_copied_images']} training images are copied by the baseline (`{names['risk_csv']}`, `{names['risk_png']}`). "
        f"ROC AUC for predicting them: {variant}'s AGC skip rate {_fmt(risk['risk_skip_auc'])}, the baseline's "
        f"low per-image loss {_fmt(risk['risk_loss_auc'])} (0.5: chance). Mean skip rate of duplicated images "
        f"{_fmt(risk['skip_rate_duplicated'])}, of unique ones {_fmt(risk['skip_rate_unique'])}.", "",
        "## Across experiments", "",
        "This report reads this run's files only. Every variant and experiment logged to MLflow, side by side: "
        "`iet-agc tradeoff` (memorization vs quality, Pareto front) and `iet-agc ablation` (the table, and "
        "verdicts over seeds).", ""])


def _lead(variant: str, m: dict) -> str:
    """The answer first: the verdict in words at matched KID, with what it rests on."""
    if "mem_matched" not in m:
        return "**No comparison at matched quality** (eval.curve_samples is 0: no checkpoint was measured)."
    c = read_comparison(m)
    words = verdict.word(c)
    if c.reason is not None:
        why = ("neither copies more than held-out real images at any quality both reach"
               if c.reason == NO_COMPARABLE_QUALITY else f"{c.reason}: the two never reach a common quality")
        return f"**{variant} vs baseline at matched quality: {words}** ({why})."
    sides = f"{variant} {_side(c.model_scores, c.model_bound)}, baseline {_side(c.baseline_scores, c.baseline_bound)}"
    if min(c.seeds) < 2:
        return (f"**{variant} vs baseline at matched quality: {words}, no verdict.** Memorization at matched KID: "
                f"{sides}; difference {_signed(c.estimate)}. One training seed a side measures one run of each, not "
                f"the method: train {verdict.seeds_for_power(verdict.POWER_EFFECT_SD)} or more seeds a side "
                "and compare them with `iet-agc ablation` for a verdict.")
    return (f"**{variant} vs baseline at matched quality: {words}.** Memorization at matched KID: {sides}; difference "
            f"{_signed(c.estimate)} [{_signed(c.low)}, {_signed(c.high)}] (Welch 95% over seeds), exact permutation "
            f"p = {c.p:.3f} ({c.seeds[0]} vs {c.seeds[1]} seeds).")


def _finals(variant: str, rows: dict[str, dict]) -> str:
    """What the final models did, beside the verdict: a model that copies nothing because it has not
    learned the data shows it in its FD (and in the side-by-side figure)."""
    b, m = rows["baseline"], rows["iet"]
    return (f"Final models: the baseline copies {_fmt(b.get('mem_ratio'))} of its samples at feature FD "
            f"{_fmt(b.get('fd'))}, {variant} {_fmt(m.get('mem_ratio'))} at FD {_fmt(m.get('fd'))} (lower FD is better).")


def _side(scores, bound: float) -> str:
    return f"copies nothing there (at most {bound:.3f}, 95%)" if math.isfinite(bound) else _fmt(sum(scores) / len(scores))


def _matched_text(variant: str, m: dict, names: dict[str, str]) -> list[str]:
    """How the verdict is read, its check under FD, and the earlier first-crossing reading."""
    return [
        "A frontier is the least memorization a user gets at a quality or better by stopping training early "
        "(memorization fitted non-decreasing over checkpoints, quality improving then possibly degrading). "
        "Each run is scored at the baseline's checkpoint qualities inside the range both reach; the verdict "
        "reads those per-seed scores (docs/method.md, Verdicts): better/worse need the Welch interval to "
        "exclude 0 and p < 0.05, indistinguishable an equivalence test within "
        f"{verdict.EQUIVALENCE_MARGIN:g}, otherwise inconclusive. Checked under FD extrapolated to infinite "
        f"samples: **{frontier_verdict(m, '_fd')}**. Mean difference between the frontiers over the common "
        f"KID range: {_signed(m.get('frontier_area'))}. `{names['frontier']}`: both frontiers, with bands of "
        "each run's sampling noise.", "",
        f"The earlier reading, {variant}'s last checkpoint on the baseline's curve at its FD (first crossing, no "
        f"interval; `{names['curve']}`): status `{m['matched_quality_status']}`, memorization "
        f"{_signed(m['mem_at_matched_quality'])} against the baseline's {_fmt(m['baseline_mem_at_matched_quality'])}. "
        f"`{names['curves']}`: both models' memorization against FD at every checkpoint."]


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _signed(v) -> str:
    return "n/a" if v is None or v != v else f"{v:+.3f}"


if __name__ == "__main__":
    main()
