"""evaluate: sample a trained model and measure how much it copies and how good its samples are
(pipeline/evaluation.py); write the metrics, figures and the memorization-over-rounds curve."""
from pathlib import Path

import click
import numpy as np
import torch

from pipeline import figures
from pipeline.config import load_params, resolve_device
from pipeline.data import ImageSet, to_uint8
from pipeline.duplicates import duplicate_groups
from pipeline.evaluation import EvalData, evaluate
from pipeline.features import load_feature_net
from pipeline.io import weights_dir, write_csv, write_json
from pipeline.metric_names import CURVE_COLUMNS, curve_metric, evaluation_run
from pipeline.models import load_pipeline
from pipeline.tracking import Tracker
from stages import params_option, stage

FILES = ("samples.png", "copies.png", "most_copied.png", "ratio_hist.png", "metrics.json", "rounds.csv", "copied.csv")
COPIED_FIELDS = ["sample_id", "group", "size", "copies", "nearest", "loss"]


@click.command()
@params_option
@click.argument("model_name")
@click.option("--data", "data_dir", default="data/prepared", show_default=True)
@click.option("--features", "features_dir", default="runs/features/net", show_default=True)
@click.option("--reference", "reference_dir", default="runs/fid_reference", show_default=True,
              help="Inception statistics of the training set (fid_reference stage)")
@click.option("--out", default=None, help="default: runs/eval/MODEL_NAME")
@stage
def main(params_path, model_name, data_dir, features_dir, reference_dir, out):
    p = load_params(params_path)
    resolve_device(p.train.device)  # an absent device fails here, before the model is loaded
    out = Path(out or f"runs/eval/{model_name}")
    torch.set_num_threads(p.train.threads)
    unet, scheduler = load_pipeline(weights_dir(f"runs/{model_name}", p.eval.weights))
    train, heldout, pool = (ImageSet.load(f"{data_dir}/{name}.npz") for name in ("train", "heldout", "pool"))
    data = EvalData(train.to_tensor(), heldout.to_tensor(), pool.to_tensor(), duplicate_groups(train.images))
    result = evaluate(unet, scheduler, data, load_feature_net(features_dir), Path(reference_dir),
                      Path(f"runs/{model_name}/rounds"), p)
    _write(result, data, train.ids, out)

    tracker = Tracker(p)
    run_id = tracker.child(evaluation_run(model_name))
    tracker.log_data(run_id, {k: f"{data_dir}/{k}.npz" for k in ("train", "heldout", "pool")})
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
    write_json(out / "metrics.json", result.metrics)


if __name__ == "__main__":
    main()
