"""evaluate: sample a trained model with DDIM and measure how many samples copy a training image
(held-out real images give the reference; SSCD similarity when eval.sscd) and how good they are
(classifier-feature FD/KID; Inception FID/KID against the fid_reference stage's cached statistics)."""
import csv
from pathlib import Path

import click
import numpy as np
import torch
from safetensors.torch import load_file

from pipeline import figures, inception, metrics
from pipeline.config import load_params
from pipeline.data import ImageSet
from pipeline.features import extract_features, load_feature_net
from pipeline.io import atomic_path, read_json, write_json
from pipeline.models import load_pipeline, sample
from pipeline.tracking import Tracker
from stages import params_option, stage


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
    out = out or f"runs/eval/{model_name}"
    torch.set_num_threads(p.train.threads)
    weights = "model" if p.eval.weights == "raw" else "model_ema"
    unet, scheduler = load_pipeline(f"runs/{model_name}/{weights}")
    train = ImageSet.load(f"{data_dir}/train.npz").to_tensor()
    heldout = ImageSet.load(f"{data_dir}/heldout.npz").to_tensor()
    pool = ImageSet.load(f"{data_dir}/pool.npz").to_tensor()

    samples = sample(unet, scheduler, p.eval.num_samples, p.eval.ddim_steps, p.seeds.eval, p.eval.batch_size)
    gen_scores = metrics.memorization_scores(samples, train)
    ref_scores = metrics.memorization_scores(heldout, train)
    net = load_feature_net(features_dir)
    f_pool, f_gen, f_held = (extract_features(net, x) for x in (pool, samples, heldout))
    result = {
        **metrics.summarize(gen_scores),
        **metrics.summarize(ref_scores, prefix="heldout_"),
        "fd": metrics.frechet_distance(f_gen, f_pool),
        "heldout_fd": metrics.frechet_distance(f_held, f_pool),
        "kid": metrics.kernel_inception_distance(f_gen, f_pool),
        "num_samples": p.eval.num_samples,
        **_inception_scores(samples, Path(reference_dir), p.seeds.eval),
        **(_sscd_scores(samples, train, heldout, p) if p.eval.sscd else {}),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(f"{out}/samples.npz", images=((samples + 1) * 127.5).round().to(torch.uint8).numpy())
    figures.save_grid(samples[:256], f"{out}/samples.png")
    figures.save_copies_figure(samples, train, gen_scores, f"{out}/copies.png")
    figures.save_ratio_histogram(gen_scores, ref_scores, f"{out}/ratio_hist.png")
    by_round = _memorization_by_round(unet, scheduler, Path(f"runs/{model_name}/rounds"), train, p)
    with atomic_path(f"{out}/rounds.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "mem_ratio", "mean_nn1", "official_below_0.15"])
        w.writeheader()
        w.writerows(by_round)
    write_json(f"{out}/metrics.json", result)

    tracker = Tracker(p)
    run_id = tracker.child(f"evaluate {model_name}")
    tracker.log_data(run_id, {k: f"{data_dir}/{k}.npz" for k in ("train", "heldout", "pool")})
    tracker.log_metrics(run_id, result)
    for row in by_round:
        tracker.log_metrics(run_id, {f"round_{k}": v for k, v in row.items() if k != "round"}, step=row["round"])
    for name in ("samples.png", "copies.png", "ratio_hist.png", "metrics.json", "rounds.csv"):
        tracker.log_artifact(run_id, f"{out}/{name}")
    tracker.finish(run_id)
    click.echo(f"{model_name}: memorization ratio {result['mem_ratio']:.3f} "
               f"(held-out reference {result['heldout_mem_ratio']:.3f}), FD {result['fd']:.2f}"
               + (f", FID {result['fid']:.2f}" if "fid" in result else ""))


def _memorization_by_round(unet, scheduler, rounds_dir: Path, train, p) -> list[dict]:
    """Memorization of each round's averaged weights (raw, whatever eval.weights says: EMA is not
    kept per round) on eval.curve_samples samples: how copying grows or fades over training. The
    same seed every round, so rounds differ only by their weights."""
    if p.eval.curve_samples == 0:
        return []
    files = sorted(rounds_dir.glob("round_*/aggregated.safetensors"))
    if not files:
        raise FileNotFoundError(f"{rounds_dir}: no round_*/aggregated.safetensors (re-run the training stage)")
    rows = []
    for rnd, path in enumerate(files, start=1):
        unet.load_state_dict(load_file(str(path)))
        x = sample(unet, scheduler, p.eval.curve_samples, p.eval.ddim_steps, p.seeds.eval, p.eval.batch_size,
                   desc=f"round {rnd}/{len(files)}")
        s = metrics.summarize(metrics.memorization_scores(x, train))
        rows.append({"round": rnd, **{k: s[k] for k in ("mem_ratio", "mean_nn1", "official_below_0.15")}})
    return rows


def _inception_scores(samples, reference_dir: Path, seed: int) -> dict:
    """FID/KID against the cached training-set statistics; nothing when the reference stage ran
    with Inception off (its info.json decides, so both models are always scored alike)."""
    if not (reference_dir / "info.json").is_file():
        raise FileNotFoundError(f"{reference_dir}/info.json: no Inception reference (run the fid_reference stage)")
    info = read_json(reference_dir / "info.json")
    if not info["inception"]:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quality = inception.InceptionQuality(inception.InceptionFeatures().to(device))
    quality.load_real(reference_dir / "reference.safetensors")
    quality.update(samples, real=False)
    scores = quality.compute(seed=seed)
    return {"fid": scores["fid"], "inception_kid": scores["kid"], "heldout_fid": info["heldout_fid"],
            "heldout_inception_kid": info["heldout_kid"]}


def _sscd_scores(samples, train, heldout, p) -> dict:
    from pipeline import sscd

    model = sscd.SSCD(threads=p.train.threads)
    train_desc = model.descriptors(train)
    gen_sim, _ = sscd.max_similarity(model.descriptors(samples), train_desc)
    held_sim, _ = sscd.max_similarity(model.descriptors(heldout), train_desc)
    return sscd.calibrated_scores(gen_sim, held_sim, p.eval.sscd_quantile, p.seeds.eval)


if __name__ == "__main__":
    main()
