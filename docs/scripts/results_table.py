"""The benchmark's tables and figures from the exported results files alone (no MLflow: `iet-agc
export` wrote them, docs/benchmark_data.md describes them): per regime, each variant's seeds, its
verdict against the baseline at matched KID (pipeline/compare/verdict.py: per-seed scores, Welch 95% interval,
exact permutation p, equivalence test; the primary comparison, IET-AGC+ against the baseline, Holm
over the regimes given, every other one Benjamini-Hochberg q, as `iet-agc ablation` adjusts them),
memorization at matched KID and relative to the baseline's there, the best KID its checkpoints
reached, membership AUC and TPR at 1% FPR, training time; and one frontier figure per regime.

    python docs/scripts/results_table.py benchmarks/results/N benchmarks/results/U --figures docs/figures

The figure shows each run's checkpoints and each variant's frontier (mean over seeds of the fitted
frontiers) without a band: a band resamples each checkpoint's samples, which these files do not
keep (the curve.npz artifacts in MLflow do: `iet-agc ablation --figure`).
"""
import math
from pathlib import Path

import click
import numpy as np

from commands import ablation, export
from pipeline.compare import comparison, verdict
from pipeline.core import figures
from pipeline.evaluate import frontier
from pipeline import mitigation
from pipeline.evaluate.metric_names import BY_KEY
from regime_table import head, interval

# the quality columns the verdicts read: the headline (KID) and the check (FD-infinity, keys _fd)
MEASURES = {"": "kid", "_fd": "fd_infinity"}
HEAD = ["variant", "seeds", "verdict (KID; FD-infinity)", "memorization at matched KID [95%]",
        "relative to the baseline's there [95%]", "equivalence p", "p (adjusted)", "best KID reached",
        "membership AUC", "TPR at 1% FPR", "train seconds"]


def load_regime(folder: Path) -> dict[str, list[tuple[dict, dict]]]:
    """variant name -> its runs' (# lines, columns), ordered by seed, the baseline first. One line
    naming the files where the runs differ in anything but their variant and seed (another regime)."""
    runs: dict[str, list] = {}
    settings = {}
    for path in sorted(folder.glob("*/seed*.csv")):
        meta, columns = export.read(path)
        runs.setdefault(meta["variant"], []).append((meta, columns))
        settings.setdefault(ablation._setting({k[6:]: v for k, v in meta.items() if k.startswith("param.")}), path)
    if not runs:
        raise click.ClickException(f"{folder}: no <variant>/seed<k>.csv (iet-agc export --regime {folder.name})")
    if len(settings) > 1:
        raise click.ClickException(f"{folder}: runs of different settings ({', '.join(map(str, settings.values()))}); "
                                   "export each regime to its own folder")
    if "baseline" not in runs:
        raise click.ClickException(f"{folder}: no baseline/ runs to compare with")
    for name in runs:
        runs[name].sort(key=lambda run: (len(run[0]["seed"]), run[0]["seed"]))
    return dict(sorted(runs.items(), key=lambda item: mitigation.variant_sort_key(item[0])))


def fits(runs: list[tuple[dict, dict]], column: str) -> list[frontier.Fit] | None:
    """Each run's Fit from its checkpoints (frontier.fit_run); None where a run lacks that quality."""
    if any(not np.isfinite(c[column]).all() for _, c in runs):
        return None
    return [frontier.fit_run(c["mem_ratio"], c[column], c["samples"]) for _, c in runs]


def compare(model: list, baseline: list, margin: float = verdict.EQUIVALENCE_MARGIN) -> dict[str, float]:
    """comparison.frontier_numbers from the files: the same keys, the same numbers."""
    floor = float(np.mean([float(meta["heldout_floor"]) for meta, _ in baseline]))
    samples = [int(c["samples"][0]) for _, c in (*model, *baseline)]
    out = {}
    for suffix, column in MEASURES.items():
        model_fits, base_fits = fits(model, column), fits(baseline, column)
        if model_fits is None or base_fits is None:
            continue
        compared = verdict.compare_seeds(model_fits, base_fits, floor, samples, margin)
        area = frontier.matched_difference([f.frontier for f in model_fits], [f.frontier for f in base_fits], floor).area
        out.update(comparison.seed_numbers(compared, suffix), **{"frontier_area" + suffix: area})
    return out


def rows_of(folders: list[Path]) -> list[dict]:
    """Every variant of every regime with its comparison, p adjusted over them all (ablation.adjust)."""
    rows = []
    for folder in folders:
        runs = load_regime(folder)
        for name, variant_runs in runs.items():
            rows.append({"regime": folder.name, "variant": name, "runs": variant_runs,
                         "frontier": {} if name == "baseline" else compare(variant_runs, runs["baseline"])})
    ablation.adjust(rows)
    return rows


def _mean(values: list[float], fmt: str) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    return format(np.mean(values), fmt) + (" ± " + format(np.std(values, ddof=1), fmt) if len(values) > 1 else "")


def _final(row: dict, key: str) -> list[float]:
    return [float(meta.get(f"final.{key}") or "nan") for meta, _ in row["runs"]]


def line(row: dict) -> str:
    f = row["frontier"]
    adjusted = f.get("mem_matched_p_adjusted", math.nan)
    words = "reference" if row["variant"] == "baseline" else (
        f"{comparison.frontier_verdict(f, '', adjusted if math.isfinite(adjusted) else None)} "
        f"({row.get('role', ablation.EXPLORATORY)}); {comparison.frontier_verdict(f, '_fd')}")
    p = f"{f['mem_matched_p']:.3f} ({adjusted:.3f})" if "mem_matched_p" in f else "-"
    equivalence = f"{f['mem_matched_equivalence_p']:.3f}" if math.isfinite(f.get("mem_matched_equivalence_p", math.nan)) else "-"
    cells = [row["variant"], ",".join(meta["seed"] for meta, _ in row["runs"]), words, interval(f, "mem_matched"),
             interval(f, "mem_matched_relative", "+.0%"), equivalence, p,
             _mean([float(np.min(c["kid"])) for _, c in row["runs"]], ".4f"), _mean(_final(row, "mia_auc"), ".3f"),
             _mean(_final(row, "mia_tpr_at_1fpr"), ".3f"), _mean(_final(row, "train_seconds"), ".0f")]
    return "| " + " | ".join(cells) + " |"


def frontier_lines(rows: list[dict], points: int = 64) -> dict[str, dict]:
    """What figures.save_frontiers draws of each variant of one regime under KID: its checkpoints,
    its frontier (mean over seeds) over the range every seed reaches; no band (NaN)."""
    out = {}
    for row in rows:
        point = fits(row["runs"], "kid")
        if point is None:  # a checkpoint without a KID: nothing to draw
            continue
        fitted = [f.frontier for f in point]
        levels = np.linspace(max(f.best for f in fitted), min(f.worst for f in fitted), points)
        out[row["variant"]] = {"quality": np.concatenate([f.raw_quality for f in point]),
                               "memorization": np.concatenate([f.raw_memorization for f in point]),
                               "levels": levels, "frontier": np.mean([f(levels) for f in fitted], axis=0),
                               "low": np.full(points, np.nan), "high": np.full(points, np.nan)}
    return out


def save_figure(rows: list[dict], path: Path) -> None:
    floor = float(np.mean([float(meta["heldout_floor"]) for meta, _ in rows[0]["runs"]]))  # the baseline's
    figures.save_frontiers(frontier_lines(rows), path, BY_KEY["kid"].axis_label + ", curve samples",
                           BY_KEY["mem_ratio"].axis_label, reference=floor,
                           title="Memorization-quality frontiers: checkpoints, frontier (mean over seeds), no band")


def markdown(rows: list[dict]) -> str:
    out = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        out += [f"\nRegime {regime}", head(HEAD)] + [line(r) for r in rows if r["regime"] == regime]
    out += ["", "Memorization at matched KID: variant - baseline from per-seed scores, Welch 95% interval over seeds; "
            "p: exact permutation p over seeds (adjusted: Holm over the regimes for the primary comparison, "
            f"{ablation.PRIMARY_VARIANT} against the baseline, Benjamini-Hochberg q for the exploratory others); "
            f"equivalence p: two one-sided tests against +-{verdict.EQUIVALENCE_MARGIN:g}; relative: where the "
            "baseline copies above the held-out floor; other columns mean ± sd over seeds (pipeline/compare/verdict.py)"]
    return "\n".join(out)


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--figures", "figure_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="draw each regime's frontiers as <folder>/frontier_<regime>.png")
def main(folders, figure_dir):
    """The tables (markdown) of the regimes' exported results FOLDERS (benchmarks/results/<regime>)."""
    rows = rows_of(list(folders))
    click.echo(markdown(rows))
    for regime in dict.fromkeys(r["regime"] for r in rows) if figure_dir else ():
        path = figure_dir / f"frontier_{regime}.png"
        save_figure([r for r in rows if r["regime"] == regime], path)
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
