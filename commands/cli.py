"""`iet-agc`: the project's command line for working with trained models.

Heavy libraries (torch, diffusers, mlflow) are imported inside the commands, so `iet-agc --help`
answers at once.
"""
from __future__ import annotations

import math
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Work with the models the IET-AGC+ pipeline trained and registered."""


def _tracking_uri(given: str | None) -> str:
    """--tracking-uri, else what the pipeline stages use: tracking.uri of ./params.yaml when
    there is one, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repository root."""
    if given:
        return given
    from pipeline.core.store import tracking_uri

    return tracking_uri(_tracking_config())


def _existing_store(given: str | None) -> str:
    """The tracking URI of a command that only reads: a SQLite file that does not exist is a typo
    (MLflow would create it empty), a server that does not answer is said within seconds."""
    from pipeline.core.store import StoreError, check_store, fail_fast_http

    uri = _tracking_uri(given)
    fail_fast_http()
    try:
        check_store(uri, must_exist=True)
    except StoreError as err:
        raise click.ClickException(str(err)) from None
    return uri


def _device(name: str | None):
    """--device as a torch device, refused as a usage error when it does not exist here."""
    from pipeline.core.config import ConfigError, resolve_device

    try:
        return resolve_device(name, key="--device")
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


def _tracking_config():
    """tracking of ./params.yaml when there is one, else the defaults."""
    from pipeline.core.config import TrackingConfig, load_params

    return load_params("params.yaml").tracking if Path("params.yaml").is_file() else TrackingConfig()


def _write_pngs(images, folder: Path) -> None:
    """One PNG per image at the model's resolution: 0000.png, 0001.png, ..."""
    from PIL import Image

    from pipeline.core.data import to_uint8
    from pipeline.core.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    width = max(4, len(str(len(arr) - 1)))
    for i, img in enumerate(arr):
        with atomic_path(folder / f"{i:0{width}d}.png") as tmp:
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")


@main.command()
@click.option("--model", "model_uri", required=True,
              help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a local model directory")
@click.option("--num", "-n", default=16, show_default=True, type=click.IntRange(min=1), help="images to sample")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="same seed, same images")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="DDIM steps  [default: 50, or the model's training timesteps if fewer]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="folder for one PNG per image")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), help="one PNG with all images in a grid")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None, help="torch device  [default: cuda when available, else cpu]")
@click.option("--tracking-uri", default=None,
              help="MLflow store for models:/ and runs:/ URIs  [default: tracking.uri of ./params.yaml, "
                   "else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repository root]")
@click.option("--guidance", type=click.Choice(["none", "amg"]), default="none", show_default=True,
              help="amg: anti-memorization guidance away from the --train images (settings: amg of "
                   "./params.yaml when there is one, else the defaults)")
@click.option("--train", "train_path", type=click.Path(exists=True, path_type=Path),
              help="the model's training images for --guidance amg: a folder of images or an .npz")
def sample(model_uri, num, seed, steps, out, grid, batch_size, device, tracking_uri, guidance, train_path):
    """Sample images from a registered or local model (DDIM, eta 0), seeded, to PNG files and/or a grid.

    \b
    iet-agc sample --model models:/iet-agc@candidate --num 16 --grid grid.png
    iet-agc sample --model runs/iet/model --num 64 --seed 1 --out samples/
    iet-agc sample --model runs/baseline/model --guidance amg --train data/prepared/train.npz --grid amg.png
    """
    if out is None and grid is None:
        raise click.UsageError("nothing to write: give --out FOLDER and/or --grid FILE.png")
    if (guidance == "amg") != (train_path is not None):
        raise click.UsageError("--guidance amg and --train go together: the guidance needs the training images")
    for path, option in ((out, "--out"), (grid, "--grid")):
        if path is not None:
            _check_destination(path, option, folder=option == "--out")
    from mlflow.exceptions import MlflowException

    from pipeline.core.config import ConfigError
    from pipeline.core.data import DataError
    from pipeline.core.io import local_path
    from pipeline.core.fetch import fetched
    from pipeline.core.store import StoreError

    try:
        remote = local_path(model_uri) is None
        with fetched(model_uri, _tracking_uri(tracking_uri) if remote else None) as (path, label):
            # imported only now: diffusers takes seconds, and a wrong model or store is said at once
            device = _device(device)
            from pipeline.core.models import load_pipeline
            from pipeline.evaluate.sampling import sample as ddim_sample

            unet, scheduler = load_pipeline(path)
            from pipeline.train.preflight import check_saved_model

            check_saved_model(unet.config, scheduler.config, min(batch_size, num), label)
        steps = _ddim_steps(steps, scheduler.config.num_train_timesteps)
        unet.to(device)
        if train_path is not None:
            from commands.audit import amg_sampler, read_images

            ddim_sample = amg_sampler(read_images(train_path, unet, "--train"))
            click.echo(f"guidance away from {len(ddim_sample.keywords['reference'])} unique training images in "
                       f"{train_path}", err=True)
        click.echo(f"sampling {num} images from {label} ({steps} DDIM steps, seed {seed}"
                   f"{', AMG' if train_path else ''})", err=True)
        images = ddim_sample(unet, scheduler, num, steps, seed, batch_size=batch_size, progress=True)
    except (StoreError, ConfigError, FileNotFoundError, DataError) as err:
        raise click.ClickException(str(err)) from None
    except MlflowException as err:
        raise click.ClickException(f"MLflow failed ({err.message}); check --tracking-uri") from None

    click.echo("wrote " + " and ".join(_write_samples(images, out, grid)))


def _ddim_steps(steps: int | None, trained: int) -> int:
    """--steps, by default 50 or the model's training timesteps if fewer; never more than those."""
    if steps is None:
        return min(50, trained)
    if steps > trained:
        raise click.BadParameter(f"{steps} is more than the model's {trained} training timesteps", param_hint="--steps")
    return steps


def _write_samples(images, out: Path | None, grid: Path | None) -> list[str]:
    """One PNG per image in `out` and/or one grid; what was written, for the closing line."""
    written = []
    if out is not None:
        _write_pngs(images, out)
        written.append(f"{len(images)} PNG files in {out}")
    if grid is not None:
        from pipeline.core.figures import save_grid

        save_grid(images, grid, nrow=math.ceil(math.sqrt(len(images))))
        written.append(f"grid {grid}")
    return written


@main.command()
@click.option("--out", default="tradeoff.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--experiment", default=None, help="MLflow experiment  [default: tracking.experiment of ./params.yaml]")
@click.option("--tracking-uri", default=None, help="MLflow store  [default: as for `sample`]")
def tradeoff(out, experiment, tracking_uri):
    """Memorization vs quality of every run in MLflow (e.g. a tau sweep), with its Pareto front.

    \b
    dvc exp run --queue -S 'agc.tau=range(0.3,0.9,0.1)' && dvc queue start -j 2
    iet-agc tradeoff --out tau_sweep.png
    """
    from mlflow.exceptions import MlflowException

    from commands.tradeoff import main as plot_tradeoff, markdown_table

    _check_destination(out, "--out")
    experiment = experiment or _tracking_config().experiment
    try:
        points = plot_tradeoff(_existing_store(tracking_uri), experiment, out)
    except MlflowException as err:
        raise click.ClickException(f"MLflow failed ({err.message}); check --tracking-uri") from None
    if not points:
        raise click.ClickException(f"no finished pipeline runs in MLflow experiment '{experiment}'")
    click.echo(markdown_table(points))
    click.echo(f"wrote {out}")


@main.command()
@click.option("--experiment", default=None, help="MLflow experiment  [default: tracking.experiment of ./params.yaml]")
@click.option("--tracking-uri", default=None, help="MLflow store  [default: as for `sample`]")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also draw every variant's frontier and band here (one file per setting)")
@click.option("--null-seeds", type=click.IntRange(min=1), default=None,
              help="baseline seeds playing the model in the null, the rest the baseline  [default: half]")
def ablation(experiment, tracking_uri, figure, null_seeds):
    """Every variant's metrics as mean ± sd over seeds (seeds.train), from the runs in MLflow; *
    where a variant differs from the baseline beyond the seed spread (Welch's t-test, p < 0.05).

    \b
    dvc exp run --queue -n def-s1 -S seeds.train=1 -S train.threads=1      # baseline and IET-AGC+
    dvc exp run --queue -n iet-s1 -S seeds.train=1 -S train.threads=1 -S agc.enabled=false evaluate@iet
    dvc queue start -j 2                  # ... one per variant and seed; then
    iet-agc ablation

    A variant queued with the target evaluate@iet (single-model ones: -S iet.shards=1) does not
    re-train the baseline; its memorization at matched quality is compared with the baseline's of
    the same setting seed by seed (Welch interval, exact permutation p, a verdict; IET-AGC+ is the
    primary comparison, Holm-adjusted over settings, the others Benjamini-Hochberg q). With two or
    more baseline seeds, the null follows: the baseline's seeds split in two every way (half a side,
    or --null-seeds against the rest), where better/worse is a false verdict.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from commands import ablation as ab

    if figure is not None:
        _check_destination(figure, "--figure")
    experiment = experiment or _tracking_config().experiment
    try:
        records = ab.collect(MlflowClient(tracking_uri=_existing_store(tracking_uri)), experiment)
    except MlflowException as err:
        raise click.ClickException(f"MLflow failed ({err.message}); check --tracking-uri") from None
    if not records:
        raise click.ClickException(f"no finished evaluations in MLflow experiment '{experiment}'")
    rows = ab.table(records)
    click.echo(ab.markdown(rows) + ab.null_markdown(ab.null_check(rows, null_seeds)))
    for path in ab.save_frontier_figures(rows, figure) if figure else []:
        click.echo(f"wrote {path}")


def _merged_preset(preset: Path, base: Path) -> tuple[dict, dict]:
    """The preset's values as 'group.key' -> value, and `base`'s mapping with them set; a file
    that is not a parameter mapping, or a value where the preset sets a group's key, in one line."""
    from pipeline.core.config import ConfigError, flatten, read_yaml

    try:
        overrides, merged = flatten(read_yaml(preset) or {}), read_yaml(base) or {}
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    for key, value in overrides.items():  # nested groups too: data.duplicates.images
        *groups, name = key.split(".")
        node = merged
        for depth, group in enumerate(groups):
            node = node.setdefault(group, {})
            if not isinstance(node, dict):
                raise click.ClickException(f"{preset}: {key}: {base} holds a value, not a group, at "
                                           f"{'.'.join(groups[:depth + 1])}")
        node[name] = value
    return overrides, merged


def _check_destination(path: Path, option: str, folder: bool = False, parents: bool = True) -> None:
    """Before the work: `path` (a file, or with `folder` a folder) can be written: not the other
    kind where it stands, and the nearest existing folder above it (or, without `parents`, its own
    folder) is a writable folder; else a usage error naming the option. Sampling ran to its end
    and then lost its images to a `FileExistsError` where a file stood in the way."""
    import os

    if path.exists() and path.is_dir() != folder:
        raise click.BadParameter(f"{path} is a {'file' if folder else 'folder'}", param_hint=option)
    above = path if folder and path.exists() else path.parent
    while not above.exists():
        if not parents:  # a parameter file's folder must be there: a typo would put it elsewhere
            raise click.BadParameter(f"folder {above} does not exist", param_hint=option)
        above = above.parent
    if not above.is_dir():
        raise click.BadParameter(f"{above} is a file, not a folder, so {path} cannot be written", param_hint=option)
    if not os.access(above, os.W_OK | os.X_OK):
        raise click.BadParameter(f"folder {above} is not writable", param_hint=option)


def _cli_value(value) -> str:
    """A value as DVC's -S reads it (YAML), without spaces so that xargs keeps it one argument."""
    import json

    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if any(c.isspace() or c in "'\"" for c in text):
        raise click.ClickException(f"{text!r}: a value with spaces or quotes cannot go through xargs")
    return text


@main.command()
@click.argument("preset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", default="params.yaml", show_default=True, type=click.Path(exists=True, dir_okay=False),
              help="parameter file the preset overrides")
@click.option("--write", "write_to", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="write the merged, validated parameter file here instead of printing -S arguments")
def preset(preset, base, write_to):
    """A params override file (presets/) as `dvc exp run` arguments, checked against --base first.

    \b
    iet-agc preset presets/p1-cifar10.yaml | xargs dvc exp run
    iet-agc preset presets/p1-cifar10.yaml --write cifar.yaml   # then: dvc repro with it as params.yaml
    """
    import tempfile

    import yaml

    from pipeline.core.config import ConfigError, load_params

    if write_to is not None:
        _check_destination(write_to, "--write", parents=False)
    overrides, merged = _merged_preset(preset, Path(base))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "params.yaml"  # the target only once valid: a refused preset leaves it as it was
        staged.write_text(yaml.safe_dump(merged, sort_keys=False))
        try:
            load_params(staged)
        except ConfigError as err:
            raise click.ClickException(str(err).replace(str(staged), f"{base} + {preset}")) from None
        if write_to is not None:
            from pipeline.core.io import publish

            try:
                publish(staged, write_to)
            except OSError as err:
                raise click.ClickException(f"{write_to}: cannot be written ({err.strerror})") from None
            click.echo(f"wrote {write_to} ({base} with {preset}'s values; YAML comments are not kept)", err=True)
    if write_to is None:
        for key, value in overrides.items():
            click.echo(f"-S\n{key}={_cli_value(value)}")


from commands.audit import audit  # noqa: E402  (it imports its heavy libraries inside, as these commands)

@main.command()
@click.argument("n", type=click.IntRange(min=1, max=1000))
@click.option("--pipeline", "dvc_yaml", default="dvc.yaml", show_default=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def rounds(n, dvc_yaml, params_path):
    """Train N rounds: set iet.rounds in params.yaml and list N rounds' stages in dvc.yaml (DVC's
    templates cannot count), then `dvc repro` or `dvc exp run [--queue]` as usual."""
    from pipeline.core.config import ConfigError
    from pipeline.train.dag import set_rounds

    try:
        removed = set_rounds(n, dvc_yaml, params_path)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{params_path}: iet.rounds {n}; {dvc_yaml}: the stages of {n} rounds"
               + (f"; removed {len(removed)} folders of later rounds" if removed else ""))


main.add_command(audit)
from commands.export import export_command  # noqa: E402
main.add_command(export_command)


if __name__ == "__main__":
    main()
