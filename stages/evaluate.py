"""evaluate: sample a trained model and measure how much it copies and how good its samples are
(pipeline/evaluate/evaluation.py); write the metrics, figures and the memorization-over-rounds curve."""
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.core import figures
from pipeline.core.config import load_params, resolve_device
from pipeline.core.data import ImageSet, to_uint8
from pipeline.evaluate.evaluation import EvalData, evaluate
from pipeline.evaluate.features import load_feature_net
from pipeline.evaluate.frontier import Curve
from pipeline.core.io import chosen_weights, staged_folder, write_csv, write_json
from pipeline.evaluate.metric_names import CURVE_COLUMNS, curve_metric, evaluation_run
from pipeline.core.models import load_pipeline
from pipeline.track.tracking import Tracker
from stages import params_option, path_option, stage

FILES = ("samples.png", "copies.png", "most_copied.png", "ratio_hist.png", "metrics.json", "rounds.csv", "copied.csv",
         "curve.npz")
COPIED_FIELDS = ["sample_id", "group", "size", "copies", "nearest", "loss"]


@click.command()
@params_option
@click.argument("model_name")
@path_option("--model", "model_dir", help="the trained model's raw averaged weights")
@path_option("--model-ema", "model_ema_dir", help="its EMA weights (evaluated with eval.weights=ema)")
@path_option("--rounds", "rounds_dir", help="its per-round checkpoints: the curve over training")
@path_option("--train", "train_path", help="prepared training set (.npz)")
@path_option("--heldout", "heldout_path", help="prepared held-out set (.npz)")
@path_option("--pool", "pool_path", help="prepared image pool (.npz)")
@path_option("--features", "features_dir", help="feature classifier (features stage)")
@path_option("--reference", "reference_dir", help="Inception statistics of the training set (fid_reference stage)")
@path_option("--out", help="folder of " + ", ".join(FILES) + " and samples.npz (curve.npz: every checkpoint's "
             "memorized flags and features, what the frontier comparison reads)")
@stage
def main(params_path, model_name, model_dir, model_ema_dir, rounds_dir, train_path, heldout_path, pool_path,
         features_dir, reference_dir, out):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before the model is loaded
    torch.set_num_threads(p.train.threads)
    unet, scheduler = load_pipeline(chosen_weights(model_dir, model_ema_dir, p.eval.weights))
    arrays = {"train": train_path, "heldout": heldout_path, "pool": pool_path}
    train, heldout, pool = (ImageSet.load(path) for path in arrays.values())
    data = EvalData.of(train, heldout, pool)
    result = evaluate(unet, scheduler, data, load_feature_net(features_dir), reference_dir, rounds_dir, p)
    with staged_folder(out) as staged:  # all of the files or none (a full disk left figures without metrics.json)
        _write(result, data, train.ids, staged)

    tracker = Tracker(p)
    run_id = tracker.child(evaluation_run(model_name))
    tracker.log_data(run_id, arrays)
    tracker.log_metrics(run_id, result.metrics)
    for i, row in enumerate(result.by_round, start=1):  # MLflow steps are integers: the checkpoint's index
        tracker.log_metrics(run_id, {curve_metric(k): v for k, v in row.items()}, step=i)
    for name in FILES:
        tracker.log_artifact(run_id, out / name)
    tracker.finish(run_id)
    m = result.metrics
    click.echo(f"{model_name}: memorization ratio {m['mem_ratio']:.3f} (held-out reference "
               f"{m['heldout_mem_ratio']:.3f}), FD {m['fd']:.2f}" + (f", FID {m['fid']:.2f}" if "fid" in m else ""))


def _write(result, data: EvalData, ids: np.ndarray, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    copied = [{"sample_id": int(ids[row["position"]]), **{k: row[k] for k in COPIED_FIELDS[1:]}}
              for row in result.copies]
    write_csv(out / "copied.csv", copied, COPIED_FIELDS)
    figures.save_most_copied(data.train, result.copies, out / "most_copied.png")
    np.savez_compressed(out / "samples.npz", images=to_uint8(result.samples).numpy())
    figures.save_grid(result.samples[:256], out / "samples.png")
    figures.save_copies_figure(result.samples, data.train, result.scores, out / "copies.png")
    figures.save_ratio_histogram(result.scores, result.heldout_scores, out / "ratio_hist.png")
    write_csv(out / "rounds.csv", result.by_round, list(CURVE_COLUMNS))
    # eval.curve_samples 0: an empty curve, so that the stage always writes the same files
    (result.curve or Curve.empty()).save(out / "curve.npz")
    write_json(out / "metrics.json", result.metrics)


if __name__ == "__main__":
    main()
