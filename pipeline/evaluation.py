"""Evaluating one trained model: DDIM samples, how many copy a training image (held-out real
images give the reference; SSCD similarity when eval.sscd), how good they are (classifier-feature
FD/KID; Inception FID/KID against the fid_reference stage's cached statistics), and memorization
over the rounds. The evaluate stage loads the inputs, calls `evaluate` and writes the outputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import inception, metrics
from pipeline.config import Params, resolve_device
from pipeline.features import extract_features
from pipeline.io import read_json
from pipeline.sampling import sample

ROUND_KEYS = ("mem_ratio", "mean_nn1", "official_below_0.15")  # per point of the memorization curve


@dataclass(frozen=True)
class EvalData:
    """Images in [-1, 1]: what the model trained on, real images it never saw, the feature pool."""
    train: torch.Tensor
    heldout: torch.Tensor
    pool: torch.Tensor


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: torch.Tensor
    scores: dict            # per generated sample (metrics.memorization_scores)
    heldout_scores: dict    # the same for held-out real images
    by_round: list[dict]    # memorization of each round's averaged weights


def evaluate(unet, scheduler, data: EvalData, feature_net, reference_dir: Path, rounds_dir: Path,
             p: Params) -> Evaluation:
    """Everything the evaluate stage reports for one model, computed on train.device (the UNet and the
    feature net are moved there; the NN search runs on its queries' device). `unet` ends holding
    the last round's weights (the curve loads each round's into it)."""
    device = resolve_device(p.train.device)
    unet.to(device)
    feature_net.to(device)
    samples = sample(unet, scheduler, p.eval.num_samples, p.eval.ddim_steps, p.seeds.eval, p.eval.batch_size)
    gen_scores = metrics.memorization_scores(samples.to(device), data.train)
    ref_scores = metrics.memorization_scores(data.heldout.to(device), data.train)
    result = {
        **metrics.summarize(gen_scores),
        **metrics.summarize(ref_scores, prefix="heldout_"),
        **feature_quality(feature_net, samples, data),
        "num_samples": p.eval.num_samples,
        **inception_scores(samples, reference_dir, p.seeds.eval, device),
        **(sscd_scores(samples, data, p) if p.eval.sscd else {}),
    }
    by_round = memorization_by_round(unet, scheduler, rounds_dir, data.train, p)
    return Evaluation(result, samples, gen_scores, ref_scores, by_round)


def feature_quality(feature_net, samples: torch.Tensor, data: EvalData) -> dict:
    """Frechet distance and KID in the feature classifier's space, against the real image pool;
    `heldout_fd` is what real images never trained on get."""
    f_pool, f_gen, f_held = (extract_features(feature_net, x) for x in (data.pool, samples, data.heldout))
    return {"fd": metrics.frechet_distance(f_gen, f_pool), "heldout_fd": metrics.frechet_distance(f_held, f_pool),
            "kid": metrics.kernel_inception_distance(f_gen, f_pool)}


def memorization_by_round(unet, scheduler, rounds_dir: Path, train: torch.Tensor, p: Params) -> list[dict]:
    """Memorization of each round's averaged weights (raw, whatever eval.weights says: EMA is not
    kept per round) on eval.curve_samples samples: how copying grows or fades over training. The
    same seed every round, so rounds differ only by their weights."""
    if p.eval.curve_samples == 0:
        return []
    files = sorted(Path(rounds_dir).glob("round_*/aggregated.safetensors"))
    if not files:
        raise FileNotFoundError(f"{rounds_dir}: no round_*/aggregated.safetensors (re-run the training stage)")
    rows = []
    for rnd, path in enumerate(files, start=1):
        unet.load_state_dict(load_file(str(path)))
        x = sample(unet, scheduler, p.eval.curve_samples, p.eval.ddim_steps, p.seeds.eval, p.eval.batch_size,
                   desc=f"round {rnd}/{len(files)}")
        s = metrics.summarize(metrics.memorization_scores(x.to(next(unet.parameters()).device), train))
        rows.append({"round": rnd, **{k: s[k] for k in ROUND_KEYS}})
    return rows


def inception_scores(samples: torch.Tensor, reference_dir: Path, seed: int, device: torch.device | str = "cpu") -> dict:
    """FID/KID against the cached training-set statistics; nothing when the reference stage ran
    with Inception off (its info.json decides, so both models are always scored alike)."""
    reference_dir = Path(reference_dir)
    if not (reference_dir / "info.json").is_file():
        raise FileNotFoundError(f"{reference_dir}/info.json: no Inception reference (run the fid_reference stage)")
    info = read_json(reference_dir / "info.json")
    if not info["inception"]:
        return {}
    quality = inception.InceptionQuality(inception.InceptionFeatures().to(device))
    quality.load_real(reference_dir / "reference.safetensors")
    quality.update(samples, real=False)
    scores = quality.compute(seed=seed)
    return {"fid": scores["fid"], "inception_kid": scores["kid"], "heldout_fid": info["heldout_fid"],
            "heldout_inception_kid": info["heldout_kid"]}


def sscd_scores(samples: torch.Tensor, data: EvalData, p: Params) -> dict:
    from pipeline import sscd

    model = sscd.SSCD(threads=p.train.threads)
    train_desc = model.descriptors(data.train)
    gen_sim, _ = sscd.max_similarity(model.descriptors(samples), train_desc)
    held_sim, _ = sscd.max_similarity(model.descriptors(data.heldout), train_desc)
    return sscd.calibrated_scores(gen_sim, held_sim, p.eval.sscd_quantile, p.seeds.eval)
