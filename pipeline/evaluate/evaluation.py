"""Evaluating one trained model: DDIM samples, how many copy a training image and which ones
(against the training set with exact duplicates collapsed; held-out real images give the
reference; SSCD similarity when eval.sscd), how good they are (classifier-feature FD/KID;
Inception FID/KID against the fid_reference stage's cached statistics), how much membership leaks
(loss attack and PIA), and memorization against quality over training. The evaluate stage loads
the inputs, calls `evaluate` and writes the outputs; `iet-agc audit` (commands/audit.py) scores a
model from outside the pipeline with the same `score_samples`. With amg.enabled every sample (the
curve's too) is drawn with anti-memorization guidance (pipeline/evaluate/guidance.py): the same trained
model evaluated as the variant AMG [sampling]."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluate import guidance, inception, privacy

from pipeline.core import metrics
from pipeline.core.config import Params, resolve_device
from pipeline.core.dedup import DuplicateGroups, copy_counts, copy_headline, dedup_memorization_scores, duplicate_groups
from pipeline.evaluate.features import extract_features
from pipeline.evaluate.frontier import Curve
from pipeline.core.io import load_tensors, read_json
from pipeline.core.layout import Rounds
from pipeline.evaluate.metric_names import CURVE_KEYS, CURVE_PROGRESS
from pipeline.evaluate.sampling import sample

LOSS_PAIRS = 8  # (t, noise) draws per image of the loss attack and the per-image loss


@dataclass(frozen=True)
class EvalData:
    """Images in [-1, 1]: what the model trained on, real images it never saw (None: none given, so
    no held-out reference and no membership inference), the feature pool."""
    train: torch.Tensor
    heldout: torch.Tensor | None
    pool: torch.Tensor
    groups: DuplicateGroups  # exact duplicates in train: scores are against one image per group

    @classmethod
    def of(cls, train, heldout, pool) -> EvalData:
        """From the prepared sets (pipeline.core.data.ImageSet), as the evaluate and pretrain_check stages load them."""
        return cls(train.to_tensor(), heldout.to_tensor(), pool.to_tensor(), duplicate_groups(train.images))


@dataclass
class Scored:
    """What one model's samples say, with nothing but the model and the images (no checkpoints, no
    cached Inception statistics): the evaluate stage's and the audit's common part."""
    metrics: dict[str, float]
    scores: dict              # per generated sample (metrics.memorization_scores)
    heldout_scores: dict | None  # the same for held-out real images (None without them)
    copies: list[dict]        # per unique training image: copies, nearest, size, loss


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: torch.Tensor
    scores: dict            # per generated sample (metrics.memorization_scores)
    heldout_scores: dict    # the same for held-out real images
    by_round: list[dict]    # memorization and quality of each checkpoint, in training order (CURVE_COLUMNS)
    copies: list[dict]      # per unique training image: copies, nearest, size, loss
    curve: Curve | None     # every checkpoint's samples as the frontier protocol reads them (None: no curve)


def evaluate(unet, scheduler, data: EvalData, feature_net, reference_dir: Path, rounds_dir: Path,
             p: Params) -> Evaluation:
    """Everything the evaluate stage reports for one model, computed on train.device (the UNet and the
    feature net are moved there; the NN search runs on its queries' device). `unet` ends holding
    a checkpoint's weights (the curve loads each one's into it)."""
    device = resolve_device(p.train.device)
    unet.to(device)
    feature_net.to(device)
    samples = sampler(p, data)(unet, scheduler, p.eval.num_samples, p.eval.ddim_steps, p.seeds.eval,
                               p.eval.batch_size)
    scored = score_samples(unet, scheduler, samples, data, feature_net, p.seeds.eval)
    result = {
        **scored.metrics,
        **inception_scores(samples, reference_dir, p.seeds.eval, device),
        **(sscd_scores(samples, data, p) if p.eval.sscd else {}),
    }
    by_round, curve = curve_over_training(unet, scheduler, rounds_dir, data, feature_net, p,
                                          np.asarray(scored.heldout_scores["ratio"]) < metrics.MEMORIZED_RATIO,
                                          samples if reuses_final_samples(p) else None)
    return Evaluation(result, samples, scored.scores, scored.heldout_scores, by_round, scored.copies, curve)


def score_samples(unet, scheduler, samples: torch.Tensor, data: EvalData, feature_net, seed: int) -> Scored:
    """Memorization of `samples` against the training set (duplicates collapsed) and of the held-out
    images (the reference), which training images are copied and their loss, feature FD/KID, and
    membership inference (members: one image per duplicate group); the held-out parts only when
    data.heldout is given. The NN search runs on the UNet's device."""
    device = next(unet.parameters()).device
    gen_scores = dedup_memorization_scores(samples.to(device), data.train, data.groups)
    held = data.heldout is not None
    ref_scores = dedup_memorization_scores(data.heldout.to(device), data.train, data.groups) if held else None
    copies = copy_table(unet, scheduler, gen_scores, data, seed)
    members = data.train[torch.from_numpy(data.groups.representatives)]
    result = {
        **metrics.summarize(gen_scores),
        **(metrics.summarize(ref_scores, prefix="heldout_") if held else {}),
        **guidance.nl2_summary(guidance.normalized_l2_scores(samples.to(device), members)),
        **(guidance.nl2_summary(guidance.normalized_l2_scores(data.heldout.to(device), members), prefix="heldout_")
           if held else {}),
        **copy_headline(copies),
        **data.groups.summary(),
        **feature_quality(feature_net, samples, data),
        "num_samples": len(samples),
        **(privacy.membership_inference(unet, scheduler, members, data.heldout, seed=seed, pairs=LOSS_PAIRS)
           if held else {}),
    }
    return Scored(result, gen_scores, ref_scores, copies)


def sampler(p: Params, data: EvalData):
    """The sampler every evaluation draws with (pipeline.evaluate.sampling.sample's signature): plain DDIM,
    or with amg.enabled DDIM with anti-memorization guidance away from the de-duplicated training set."""
    if not p.amg.enabled:
        return sample
    members = data.train[torch.from_numpy(data.groups.representatives)]
    return partial(guidance.sample, reference=members, amg=p.amg, desc="sampling (AMG)")


def glance(unet, scheduler, data: EvalData, feature_net, p: Params) -> dict[str, float]:
    """The short check of a model that no stage trains on `data.train` (the fine-tuning regime's
    pretrained model): of eval.num_samples samples, the share copying a training image and how many
    distinct ones (it should be the held-out floor: it never saw them), and the feature FD/KID that
    the fine-tuned models' curves start from."""
    device = resolve_device(p.train.device)
    unet.to(device)
    feature_net.to(device)
    samples = sample(unet, scheduler, p.eval.num_samples, p.eval.ddim_steps, p.seeds.eval, p.eval.batch_size,
                     desc="pretrained model")
    scores = dedup_memorization_scores(samples.to(device), data.train, data.groups)
    held = dedup_memorization_scores(data.heldout.to(device), data.train, data.groups)
    return {**metrics.summarize(scores), **metrics.summarize(held, prefix="heldout_"),
            **copy_headline(copy_counts(scores, data.groups)), **data.groups.summary(),
            **feature_quality(feature_net, samples, data), "num_samples": p.eval.num_samples}


def copy_table(unet, scheduler, scores: dict, data: EvalData, seed: int) -> list[dict]:
    """dedup.copy_counts, each unique image also with its denoising loss under this model
    (the loss attack's score, negated): which images are copied, and whether low loss predicts it."""
    table = copy_counts(scores, data.groups)
    members = data.train[torch.from_numpy(data.groups.representatives)]
    losses = -privacy.loss_scores(unet, scheduler, members, pairs=LOSS_PAIRS, seed=seed)
    return [{**row, "loss": float(loss)} for row, loss in zip(table, losses)]


def feature_quality(feature_net, samples: torch.Tensor, data: EvalData) -> dict:
    """Frechet distance and KID in the feature classifier's space, against the real image pool;
    `heldout_fd` is what real images never trained on get."""
    f_pool, f_gen = (extract_features(feature_net, x) for x in (data.pool, samples))
    held = {} if data.heldout is None else {
        "heldout_fd": metrics.frechet_distance(extract_features(feature_net, data.heldout), f_pool)}
    return {"fd": metrics.frechet_distance(f_gen, f_pool), **held,
            "kid": metrics.kernel_inception_distance(f_gen, f_pool)}


def curve_over_training(unet, scheduler, rounds_dir: Path, data: EvalData, feature_net, p: Params,
                        heldout_memorized: np.ndarray, last: torch.Tensor | None = None) -> tuple[list[dict], Curve | None]:
    """Memorization and quality of every checkpoint (raw weights, whatever eval.weights says: EMA is
    not kept per round) on eval.curve_samples samples, the same seed for every point, so points
    differ only by their weights: the rows of rounds.csv and the Curve the frontier protocol reads
    (pipeline/evaluate/frontier.py). `last`: samples already drawn from the last checkpoint's weights with
    that seed and count (the final raw model's), reused instead of drawn again."""
    if p.eval.curve_samples == 0:
        return [], None
    f_pool = extract_features(feature_net, data.pool)
    rows, flags, feats, points = [], [], [], Rounds(rounds_dir).checkpoints(p.iet.rounds)
    device = next(unet.parameters()).device
    for i, (progress, path) in enumerate(points, start=1):
        x = last if i == len(points) and last is not None else _checkpoint_samples(
            unet, scheduler, path, p, data, f"checkpoint {i}/{len(points)}")
        scores = dedup_memorization_scores(x.to(device), data.train, data.groups)
        s, f_gen = metrics.summarize(scores), extract_features(feature_net, x)
        s.update(fd=metrics.frechet_distance(f_gen, f_pool), kid=metrics.kernel_inception_distance(f_gen, f_pool),
                 **copy_headline(copy_counts(scores, data.groups)))
        rows.append({CURVE_PROGRESS: round(progress, 4), **{k: s[k] for k in CURVE_KEYS}})
        flags.append(np.asarray(scores["ratio"]) < metrics.MEMORIZED_RATIO)
        feats.append(f_gen)
    curve = Curve(np.array([row[CURVE_PROGRESS] for row in rows]), np.stack(flags), np.stack(feats), f_pool,
                  heldout_memorized)
    return rows, curve


def _checkpoint_samples(unet, scheduler, path: Path, p: Params, data: EvalData, desc: str) -> torch.Tensor:
    unet.load_state_dict(load_tensors(path))
    return sampler(p, data)(unet, scheduler, p.eval.curve_samples, p.eval.ddim_steps, p.seeds.eval, p.eval.batch_size, desc=desc)


def reuses_final_samples(p: Params) -> bool:
    """Whether the last curve point is the final evaluation's samples: the final raw model is the
    last round's aggregate, sampled with the same seed and count."""
    return p.eval.weights == "raw" and p.eval.curve_samples == p.eval.num_samples


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
    from pipeline.evaluate import sscd

    model = sscd.SSCD(threads=p.train.threads)
    train_desc = model.descriptors(data.train)
    gen_sim, _ = sscd.max_similarity(model.descriptors(samples), train_desc)
    held_sim, _ = sscd.max_similarity(model.descriptors(data.heldout), train_desc)
    return sscd.calibrated_scores(gen_sim, held_sim, p.eval.sscd_quantile, p.seeds.eval)
