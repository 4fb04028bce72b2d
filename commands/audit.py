"""`iet-agc audit`: does a trained unconditional diffusion model copy its training images?

For any diffusers UNet2DModel (a bare UNet directory, a DDPMPipeline directory or an MLflow model
URI), given its training images and optionally real images it never saw: samples it (DDIM, eta 0),
then scores the samples with the evaluate stage's own code (pipeline/evaluation.score_samples, so
that the pipeline's models and an outside model are measured alike): copies against the training
set with exact duplicates collapsed, membership inference, feature FD/KID. Writes report.md (the
copies beside their training images), metrics.json, copied.csv and the figures. How each measure
is defined: docs/method.md#metrics; the command's page: docs/audit.md.

Heavy libraries are imported inside the command, so that `iet-agc --help` answers at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

DEFAULT_STEPS = 50  # DDIM steps of the official evaluation (docs/method.md#metrics)
FILES = ("report.md", "metrics.json", "copied.csv", "samples.png", "copies.png", "most_copied.png")


@dataclass(frozen=True)
class Images:
    """One --train or --heldout input, as the model sees it."""
    source: Path
    images: object       # pipeline.core.data.ImageSet: uint8 [N, C, H, W], labels (-1: none), ids 0..N-1
    names: list[str]     # per image: its file (a folder) or its index (an .npz)


@click.command()
@click.option("--model", "model_uri", required=True,
              help="a UNet2DModel or DDPMPipeline directory, or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH")
@click.option("--train", "train_path", required=True, type=click.Path(path_type=Path),
              help="the images it trained on: a folder of PNG/JPEG files (class subfolders give labels; each "
                   "image is cropped and resized to the model's size, as data.source folder does) or an .npz "
                   "whose 'images' have the model's size and channels (and optional 'labels')")
@click.option("--heldout", "heldout_path", type=click.Path(path_type=Path), default=None,
              help="real images it never trained on, read as --train: the held-out reference and membership inference")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for " + ", ".join(FILES))
@click.option("--num", "-n", default=256, show_default=True, type=click.IntRange(min=2), help="images to sample")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help=f"DDIM steps  [default: {DEFAULT_STEPS}, or the model's training timesteps if fewer]")
@click.option("--seed", default=0, show_default=True, type=int, help="sampling noise, feature classifier, attacks")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--feature-epochs", default=3, show_default=True, type=click.IntRange(min=1),
              help="epochs of the small feature classifier FD/KID are measured with (eval.classifier_epochs)")
@click.option("--guidance", type=click.Choice(["none", "amg"]), default="none", show_default=True,
              help="amg: also sample with anti-memorization guidance (settings: amg of ./params.yaml, else the "
                   "defaults) and set both side by side; the guided audit's files go to OUT/amg/")
@click.option("--device", default=None, help="torch device  [default: cuda when available, else cpu]")
@click.option("--tracking-uri", default=None,
              help="MLflow store for models:/ and runs:/ URIs  [default: as for `sample`]")
def audit(model_uri, train_path, heldout_path, out, num, steps, seed, batch_size, feature_epochs, guidance, device,
          tracking_uri):
    """Does a diffusion model copy its training images? Samples it, finds the copies (duplicate-aware),
    measures membership leakage (with --heldout) and quality, and writes OUT/report.md.

    \b
    iet-agc audit --model runs/baseline/model --train data/prepared/train.npz \\
                  --heldout data/prepared/heldout.npz --out audit/
    iet-agc audit --model models:/iet-agc@candidate --train my_images/ --out audit/
    """
    from mlflow.exceptions import MlflowException

    from pipeline.core.config import ConfigError
    from pipeline.core.data import DataError
    from pipeline.core.store import StoreError

    try:
        device = _device(device)
        unet, scheduler, label = load_model(model_uri, tracking_uri)
        train = read_images(train_path, unet, "--train")
        heldout = read_images(heldout_path, unet, "--heldout") if heldout_path else None
        steps = _steps(steps, scheduler.config.num_train_timesteps)
    except (StoreError, ConfigError, DataError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    except MlflowException as err:
        raise click.ClickException(f"MLflow failed ({err.message}); check --tracking-uri") from None

    click.echo(f"auditing {label}: {num} samples, {steps} DDIM steps, seed {seed}", err=True)
    settings = {"model": label, "train": str(train.source), "heldout": str(heldout.source) if heldout else None,
                "num_samples": num, "ddim_steps": steps, "seed": seed}
    samples, scored, features = run_audit(unet.to(device), scheduler, train, heldout, settings, batch_size,
                                          feature_epochs)
    write_outputs(out, samples, scored, train, {**settings, "features": features})
    if guidance == "amg":
        guided = run_audit(unet, scheduler, train, heldout, settings, batch_size, feature_epochs, amg_sampler(train))
        write_outputs(out / "amg", guided[0], guided[1], train, {**settings, "features": features, "guidance": "amg"})
        with open(out / "report.md", "a") as f:
            f.write(guidance_comparison(scored.metrics, guided[1].metrics, num))
    m = scored.metrics
    click.echo(f"{round(m['mem_ratio'] * num)} of {num} samples copy a training image "
               f"({m['distinct_copied']} distinct images); wrote {out / 'report.md'}")


def _device(name: str | None):
    from pipeline.core.config import resolve_device

    return resolve_device(name, key="--device")


def _steps(steps: int | None, trained: int) -> int:
    """--steps, by default DEFAULT_STEPS or the model's training timesteps if fewer."""
    if steps is None:
        return min(DEFAULT_STEPS, trained)
    if steps > trained:
        raise click.BadParameter(f"{steps} is more than the model's {trained} training timesteps", param_hint="--steps")
    return steps


def load_model(source: str, tracking_uri: str | None):
    """(UNet, scheduler, label) of a local UNet2DModel or DDPMPipeline directory or an MLflow model
    URI. A bare UNet gets the DDPM schedule it was most likely trained with (Ho et al. 2020: 1000
    linear steps), a sibling scheduler/ folder when there is one."""
    from diffusers import DDPMScheduler

    from pipeline.core.io import local_path
    from pipeline.core.pretrained import load_model_dir

    path = local_path(source)
    if path is None:
        from pipeline.core.fetch import fetched

        with fetched(source, _tracking_uri(tracking_uri)) as (found, label):
            unet, scheduler = load_model_dir(found, source, key="--model")
    else:
        label = str(path)
        unet, scheduler = load_model_dir(path, source, key="--model")
        sibling = path.parent / "scheduler"
        if scheduler is None and (path / "config.json").is_file() and (sibling / "scheduler_config.json").is_file():
            scheduler = DDPMScheduler.from_pretrained(str(sibling))
    if scheduler is None:
        scheduler, label = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"), label + \
            " (no scheduler saved: DDPM's 1000 linear steps assumed)"
    _check_model(unet, scheduler, source)
    return unet.eval(), scheduler, label


def _check_model(unet, scheduler, source: str) -> None:
    from pipeline.core.config import ConfigError

    cfg = unet.config
    if cfg.in_channels not in (1, 3) or cfg.out_channels != cfg.in_channels:
        raise ConfigError(f"--model: {source}: in_channels {cfg.in_channels}, out_channels {cfg.out_channels}: "
                          "the audit takes image models of 1 or 3 channels (not latent models)")
    size = cfg.sample_size
    if not isinstance(size, int) and len(set(size)) != 1:
        raise ConfigError(f"--model: {source}: sample_size {tuple(size)} is not square")
    side = size if isinstance(size, int) else size[0]
    if not 8 <= side <= 512:  # the feature classifier's two downsamplings; data.resolution's upper bound
        raise ConfigError(f"--model: {source}: sample_size {side}: the audit takes models of 8 to 512 pixels")
    if scheduler.config.prediction_type != "epsilon":
        raise ConfigError(f"--model: {source}: prediction_type '{scheduler.config.prediction_type}': the "
                          "membership attacks read the model's output as the noise (epsilon prediction)")


def _tracking_uri(given: str | None) -> str:
    """--tracking-uri, else tracking.uri of ./params.yaml when there is one, else the pipeline's default."""
    if given:
        return given
    from pipeline.core.config import TrackingConfig, load_params
    from pipeline.core.store import tracking_uri

    return tracking_uri(load_params("params.yaml").tracking if Path("params.yaml").is_file() else TrackingConfig())


def model_shape(unet) -> tuple[int, int, int]:
    """(channels, height, width) of the model's samples."""
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return unet.config.in_channels, size, size


def read_images(path: Path, unet, option: str) -> Images:
    """A folder (each image fitted to the model's size and channels) or an .npz (which must already
    have them), as the pipeline's data sources read them; one-line errors naming `option`."""
    import numpy as np

    from pipeline.core.config import DataConfig
    from pipeline.core.data import DataError, ImageSet, image_files, load_source

    channels, size, _ = model_shape(unet)
    if not path.exists():
        raise DataError(f"{option}: {path}: no such file or folder")
    kind = "folder" if path.is_dir() else "npz"
    try:
        images, labels = load_source(DataConfig(source=kind, path=str(path), resolution=size, channels=channels))
    except DataError as err:
        raise DataError(f"{option}: " + str(err).replace(" (data.path)", "")) from None
    if images.shape[1:] != (channels, size, size):
        raise DataError(f"{option}: {path} holds {'x'.join(map(str, images.shape[1:]))} images (CxHxW); the model "
                        f"makes {channels}x{size}x{size} (in_channels {channels}, sample_size {size})")
    if len(images) < 2:
        raise DataError(f"{option}: {path} holds {len(images)} image; the nearest-neighbour test needs two at least")
    names = ([str(p.relative_to(path)) for p in image_files(path)] if kind == "folder"
             else [str(i) for i in range(len(images))])
    return Images(path, ImageSet(images, labels, np.arange(len(images), dtype=np.int64)), names)


def run_audit(unet, scheduler, train: Images, heldout: Images | None, settings: dict, batch_size: int,
              feature_epochs: int, sampler=None):
    """(samples, evaluation.Scored, what the FD/KID features are): the evaluate stage's measures of
    the model's samples (drawn by `sampler`, default plain DDIM), against the training images as the
    feature pool."""
    import torch

    from pipeline.core.dedup import duplicate_groups
    from pipeline.evaluate.evaluation import EvalData, score_samples
    from pipeline.evaluate.features import train_feature_net
    from pipeline.evaluate.sampling import sample

    device = next(unet.parameters()).device
    samples = (sampler or sample)(unet, scheduler, settings["num_samples"], settings["ddim_steps"], settings["seed"],
                                  batch_size)
    x = train.images.to_tensor()
    # the evaluate stage's classifier trains on the pipeline's pool; here the only real images at hand
    net, info = train_feature_net(x.to(device), torch.from_numpy(train.images.labels), x.shape[1],
                                  epochs=feature_epochs, seed=settings["seed"])
    data = EvalData(x, heldout.images.to_tensor() if heldout else None, x, duplicate_groups(train.images.images))
    return samples, score_samples(unet, scheduler, samples, data, net, settings["seed"]), _feature_words(info)


def amg_sampler(train: Images):
    """guidance.sample away from the training images (exact duplicates collapsed), with ./params.yaml's
    amg settings when there is one, else the defaults (docs/guidance.md)."""
    from functools import partial

    import torch

    from pipeline.evaluate import guidance
    from pipeline.core.config import AMGConfig, load_params
    from pipeline.core.dedup import duplicate_groups

    amg = load_params("params.yaml").amg if Path("params.yaml").is_file() else AMGConfig()
    reference = train.images.to_tensor()[torch.from_numpy(duplicate_groups(train.images.images).representatives)]
    return partial(guidance.sample, reference=reference, amg=amg, desc="sampling (AMG)")


def guidance_comparison(plain: dict, guided: dict, num: int) -> str:
    """The report's section on the same model sampled with and without AMG [sampling], same noise."""
    rows = [("samples copying a training image", "mem_ratio", ".3f"), ("distinct images copied", "distinct_copied", "d"),
            ("normalized L2 below 1.4 (the paper's share)", "nl2_copy_share", ".3f"),
            ("normalized L2, 5th percentile", "nl2_p5", ".2f"), ("normalized L2, least", "nl2_min", ".2f"),
            ("feature FD (lower is better)", "fd", ".2f"), ("feature KID", "kid", ".3f")]
    lines = ["", "## With anti-memorization guidance (AMG [sampling])", "",
             f"The same model and noise, {num} samples each, without and with guidance away from the training "
             "images (docs/guidance.md in the IET-AGC+ repository); the guided audit's files are in `amg/`.", "",
             "| | without | with AMG |", "|---|---|---|"]
    for label, key, fmt in rows:
        if key in plain and key in guided:
            lines.append(f"| {label} | {plain[key]:{fmt}} | {guided[key]:{fmt}} |")
    return "\n".join(lines + ["", "![copies with AMG](amg/copies.png)", ""])


def _feature_words(info: dict) -> str:
    if not info["trained"]:
        return ("a randomly initialised small CNN (the training images have no labels to train it on): "
                "FD/KID are comparable only between audits with the same images and seed")
    return (f"a small CNN trained for {info['epochs']} epoch(s) on the training images' labels (validation accuracy "
            f"{info['accuracy']:.2f}): FD/KID are comparable only between audits with the same images and seed")


def write_outputs(out: Path, samples, scored, train: Images, settings: dict) -> None:
    """report.md, metrics.json, copied.csv (one row per unique training image) and the figures."""
    from pipeline.core import figures
    from pipeline.core.io import write_csv, write_json

    out.mkdir(parents=True, exist_ok=True)
    x = train.images.to_tensor()
    figures.save_grid(samples[:256], out / "samples.png")
    figures.save_copies_figure(samples, x, scored.scores, out / "copies.png")
    figures.save_most_copied(x, scored.copies, out / "most_copied.png")
    rows = [{"image": train.names[r["position"]], **{k: r[k] for k in ("size", "copies", "nearest", "loss")}}
            for r in scored.copies]
    write_csv(out / "copied.csv", rows, ["image", "size", "copies", "nearest", "loss"])
    if scored.heldout_scores is not None:
        figures.save_ratio_histogram(scored.scores, scored.heldout_scores, out / "ratio_hist.png")
    write_json(out / "metrics.json", scored.metrics)
    write_text(out / "report.md", report(scored.metrics, rows, settings))


def write_text(path: Path, text: str) -> None:
    from pipeline.core.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def report(m: dict, rows: list[dict], s: dict) -> str:
    """The audit's report.md: the answer first, then the pictures, then the numbers."""
    n = s["num_samples"]
    copied = round(m["mem_ratio"] * n)
    lines = [f"# Audit of {s['model']}", "",
             f"**{copied} of {n} samples ({m['mem_ratio']:.1%}) copy a training image**, "
             f"{m['distinct_copied']} distinct ones "
             f"(NN1/NN2 distance ratio below 1/3 against the {m['unique_images']} unique training images; "
             "docs/method.md#memorization-ratio in the IET-AGC+ repository).", ""]
    lines += _reference_lines(m) + ["", "![copies](copies.png)", "",
                                    "The most copy-like samples, each beside its nearest training image "
                                    "(ratio below; red: counted as a copy).", "",
                                    "![most copied](most_copied.png)", ""]
    lines += _copied_table(rows) + _leakage_lines(m) + _quality_lines(m, s) + [
        "## Settings", "", "```", json.dumps(s, indent=2), "```", "",
        "![samples](samples.png)", ""]
    return "\n".join(lines)


def _reference_lines(m: dict) -> list[str]:
    dup = (f"The training set holds {m['duplicate_groups']} groups of exact duplicates (the largest stored "
           f"{m['largest_group']} times); a copy of any member counts once against its group."
           if m["duplicate_groups"] else "The training set holds no exact duplicates.")
    if "heldout_mem_ratio" not in m:
        return [dup, "", "No held-out images given (--heldout): no reference for what images never trained "
                "on score, and no membership inference."]
    return [dup, "", f"Held-out reference: {m['heldout_mem_ratio']:.1%} of real images never trained on pass "
            "the same test; a model copies beyond chance only above it.", "", "![ratios](ratio_hist.png)"]


def _copied_table(rows: list[dict], top: int = 10) -> list[str]:
    shown = sorted((r for r in rows if r["copies"] > 0), key=lambda r: -r["copies"])[:top]
    if not shown:
        return ["No sample copies a training image.", ""]
    out = ["## Most-copied training images", "", "| image | copies | stored | denoising loss |", "|---|---|---|---|"]
    out += [f"| {r['image']} | {r['copies']} | {r['size']}x | {r['loss']:.4f} |" for r in shown]
    return out + ["", "All of them, with how many samples each is the nearest image of: copied.csv.", ""]


def _leakage_lines(m: dict) -> list[str]:
    if "mia_auc" not in m:
        return []
    return ["## Membership leakage", "",
            f"Loss attack (docs/method.md#membership-inference): ROC AUC {m['mia_auc']:.3f} "
            f"(95% interval {m['mia_auc_low']:.3f} to {m['mia_auc_high']:.3f}), TPR at 1% FPR "
            f"{m['mia_tpr_at_1fpr']:.3f}; PIA: AUC {m['pia_auc']:.3f} ({m['pia_auc_low']:.3f} to "
            f"{m['pia_auc_high']:.3f}). 0.5 is no leakage; {m['mia_members']} members against as many held-out images.",
            ""]


def _quality_lines(m: dict, s: dict) -> list[str]:
    held = f" (held-out real images: FD {m['heldout_fd']:.2f})" if "heldout_fd" in m else ""
    return ["## Quality", "", f"Feature FD {m['fd']:.2f}{held}, KID {m['kid']:.4f}, against the training "
            f"images, in the feature space of {s['features']}.", ""]
