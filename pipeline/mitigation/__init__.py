"""The mitigations, by params.yaml group name, and the one place that decides which are on and
what the resulting variant is called (reports, the tradeoff figure, the ablation table and the
training run's MLflow params all read `variant_name`).

A mitigation's module is imported only when a run uses it, so code that merely names variants (the
report) or trains without mitigations (the baseline) does not depend on it, and DVC does not
re-train the baseline when a mitigation's code changes.

Hooks run in registry order. AGC comes before TAA because TAA reads the bank value AGC's mask used
(AGC keeps it as `reference` when it updates the bank)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Mapping

import torch

from pipeline.core.config import Params
from pipeline.mitigation.base import Context, Mitigation, RoundEnd, Step
from pipeline.core.seeds import AMBIENT, derived_seed


@dataclass(frozen=True)
class Entry:
    name: str                      # its params.yaml group (and pipeline/core/config.py class)
    label: str                     # how variant names show it
    hooks: str                     # "module:Class", a pipeline.mitigation.base.Mitigation subclass
    requires: tuple[str, ...] = ()  # mitigations it reads; off without them
    min_shards: int = 1             # off below this many IET shards
    shows: tuple[str, str] = ()     # (symbol, key of its group) that variant names show: DP-SGD (sigma=1.0)
    options: tuple[str, ...] = ()   # keys of its group whose non-default values variant names show: AGC [pooled]
    modes: tuple[tuple[str, str], ...] = ()  # (value of its group's `mode`, "module:Class") replacing `hooks`

    def load(self, cfg=None) -> type[Mitigation]:
        """Its hooks' class; the one of `cfg.mode` where its entry names one for it."""
        module, cls = dict(self.modes).get(getattr(cfg, "mode", None), self.hooks).split(":")
        return getattr(importlib.import_module(module), cls)


REGISTRY: dict[str, Entry] = {e.name: e for e in (
    Entry("agc", "AGC", "pipeline.mitigation.agc:AGC", options=("reference", "score")),
    Entry("msr", "MSR", "pipeline.mitigation.msr:MSR", requires=("agc",), min_shards=2, options=("mode",),
          modes=(("ring", "pipeline.mitigation.authors:RingMSR"),)),
    Entry("taa", "TAA", "pipeline.mitigation.taa:TAA", requires=("agc",), options=("mode",),
          modes=(("queue", "pipeline.mitigation.authors:QueueTAA"),)),
    Entry("augment", "augment", "pipeline.mitigation.augment:Augment"),
    Entry("dp", "DP-SGD", "pipeline.mitigation.dp:DPSGD", shows=("sigma", "noise_multiplier")),
    Entry("ambient", "ambient", "pipeline.mitigation.ambient:Ambient", shows=("t_n", "timestep")),
    Entry("dedup", "dedup", "pipeline.mitigation.dedup:Dedup"),
)}
# the IET-AGC+ paper's name for IET with all three of its parts (docs/method.md#sources)
FULL_METHOD = ("agc", "msr", "taa")
# the modes of the authors' unreleased prototype: with both, variant names say [authors]
AUTHORS = ("ring", "queue")


def active(enabled: Mapping[str, bool], shards: int) -> tuple[str, ...]:
    """The switched-on mitigations whose requirements hold, in registry order. A mitigation whose
    requirement is off is off too (`agc.enabled=false` turns MSR and TAA off: both read its bank)."""
    on = {name for name, e in REGISTRY.items() if enabled.get(name, False) and shards >= e.min_shards}
    while True:
        unmet = {name for name in on if not set(REGISTRY[name].requires) <= on}
        if not unmet:
            return tuple(name for name in REGISTRY if name in on)
        on -= unmet


def enabled_in(params) -> dict[str, bool]:
    """Each registered mitigation's switch in a Params object."""
    return {name: getattr(params, name).enabled for name in REGISTRY}


def enabled_in_logged(flat: Mapping[str, str]) -> dict[str, bool]:
    """The switches from params as MLflow logs them ('agc.enabled' -> 'True'); a key an older run
    did not log takes its default."""
    defaults = Params()
    return {name: flat.get(f"{name}.enabled", str(getattr(defaults, name).enabled)) == "True" for name in REGISTRY}


def shown(params) -> dict[str, object]:
    """The settings variant names show, 'group.key' -> value, from a Params object."""
    return {key: getattr(getattr(params, key.split(".")[0]), key.split(".")[1]) for key in shown_keys()}


# how IET's shards are drawn, not a mitigation's: variant names show its non-default value too
SPLIT = "iet.split"


def shown_keys() -> list[str]:
    """Every 'group.key' a variant name can show (its entry's `shows` and `options`, and SPLIT)."""
    return [f"{name}.{key}" for name, e in REGISTRY.items()
            for key in ((e.shows[1],) if e.shows else ()) + e.options] + [SPLIT]


def _label(name: str, settings: Mapping[str, object]) -> str:
    """A mitigation's label, with the setting its entry shows when `settings` has it: DP-SGD (sigma=1.0)."""
    e = REGISTRY[name]
    key = f"{name}.{e.shows[1]}" if e.shows else None
    if key not in settings:
        return e.label
    value = settings[key]
    try:
        value = float(value)  # one spelling whether it comes from Params (1.0) or MLflow ('1.0', '1')
    except (TypeError, ValueError):
        pass
    return f"{e.label} ({e.shows[0]}={value})"


def _options(names: tuple[str, ...], settings: Mapping[str, object], shards: int) -> str:
    """' [pooled, image]': the active mitigations' options that differ from their defaults, and a
    non-default shard split when there are shards ('groups')."""
    defaults = Params()
    changed = [str(settings[key]) for name in names for key in (f"{name}.{o}" for o in REGISTRY[name].options)
               if key in settings and str(settings[key]) != str(getattr(getattr(defaults, name), key.split(".")[1]))]
    if set(AUTHORS) <= set(changed):
        changed = ["authors"] + [c for c in changed if c not in AUTHORS]
    if shards > 1 and str(settings.get(SPLIT, defaults.iet.split)) != defaults.iet.split:
        changed.append(str(settings[SPLIT]))
    return f" [{', '.join(changed)}]" if changed else ""


def variant_name(shards: int, names: tuple[str, ...], settings: Mapping[str, object] | None = None) -> str:
    """'IET' with K > 1 shards, then the mitigations' labels: IET-AGC, IET-AGC+MSR, IET-AGC+ (all
    of FULL_METHOD), AGC (one shard), IET-augment, DP-SGD (sigma=1.0), ... `settings` ('group.key' ->
    value, as `shown` or MLflow's params give them) adds what an entry `shows` to its label."""
    full = set(FULL_METHOD) <= set(names)
    labels = "+".join(_label(n, settings or {}) for n in names if not (full and n in FULL_METHOD))
    if full:
        labels = "AGC+" + (f" with {labels}" if labels else "")
    return ("-".join(part for part in ("IET" if shards > 1 else "", labels) if part) or "plain") + _options(
        names, settings or {}, shards)


# Remedies applied when sampling, not training: group -> (label, the key whose non-default value the
# name shows). Evaluating a trained model with one makes a variant of its own: the baseline's
# training (reused from DVC's cache) sampled with AMG is "AMG [sampling]", IET-AGC+'s is
# "IET-AGC+ with AMG [sampling]", at another strength "AMG [sampling] (scale=4.0)".
SAMPLING = {"amg": ("AMG [sampling]", "scale")}


def sampling_keys() -> list[str]:
    """Every 'group.key' of the sampling-time remedies' groups (their settings make the variant)."""
    return [f"{group}.{key}" for group in SAMPLING for key in type(getattr(Params(), group)).model_fields]


def with_sampling(name: str, flat: Mapping[str, str]) -> str:
    """A trained variant's name as evaluated with the sampling-time remedies switched on in `flat`
    (logged params as strings: 'amg.enabled' -> 'True')."""
    labels = []
    for group, (label, key) in SAMPLING.items():
        if flat.get(f"{group}.enabled") != "True":
            continue
        default = getattr(getattr(Params(), group), key)
        value = flat.get(f"{group}.{key}", default)
        labels.append(label if float(value) == float(default) else f"{label} ({key}={float(value)})")
    if not labels:
        return name
    return "+".join(labels) if name == "baseline" else f"{name} with {'+'.join(labels)}"


def sampling_settings(params) -> dict[str, str]:
    """The sampling-time remedies' settings of a Params object, spelled as MLflow logs them (for
    with_sampling, where a stage names what it evaluated)."""
    return {key: str(getattr(getattr(params, key.split(".")[0]), key.split(".")[1])) for key in sampling_keys()}


def logged_variant(flat: Mapping[str, str], model: str) -> str:
    """The variant a pipeline run's `model` (baseline | iet) was trained and evaluated as, from its
    logged params. Runs from before `iet.shards` could be 1 always had K > 1."""
    if model == "baseline":
        return with_sampling("baseline", flat)
    shards = int(flat.get("iet.shards", 2))
    return with_sampling(variant_name(shards, active(enabled_in_logged(flat), shards), flat), flat)


def variant_sort_key(name: str) -> tuple:
    """Tables list the baseline first, then single-model variants, then IET ones, simplest first."""
    return name != "baseline", name.startswith("IET"), name.count("+") + 2 * ("AGC+" in name), name


class Mitigations:
    """The active mitigations of one run; each hook calls theirs in registry order."""

    def __init__(self, names: tuple[str, ...], params, samples: int, proxies: tuple[int, ...],
                 device: torch.device | str = "cpu", warmup_steps: int = 0, images=None):
        built: dict[str, Mitigation] = {}
        for name in names:
            entry = REGISTRY[name]
            ctx = Context(samples, proxies, params.model.num_train_timesteps, {r: built[r] for r in entry.requires},
                          torch.device(device), params.train.batch_size, warmup_steps,
                          derived_seed(params.seeds.train, AMBIENT), images)
            built[name] = entry.load(getattr(params, name))(getattr(params, name), ctx)
        self.built = built
        self.items = list(built.values())

    def attach(self, k: int, proxy) -> None:
        for m in self.items:
            m.attach(k, proxy)

    def members(self, k: int, positions: torch.Tensor) -> torch.Tensor:
        for m in self.items:
            positions = m.members(k, positions)
        return positions

    def transform(self, k: int, x0: torch.Tensor, positions, generator) -> torch.Tensor:
        for m in self.items:
            x0 = m.transform(k, x0, positions, generator)
        return x0

    def noised(self, k: int, x0: torch.Tensor, positions, timesteps, noise, schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) of the one mitigation that sets the objective, else the plain DDPM one."""
        for m in self.items:
            if (out := m.noised(k, x0, positions, timesteps, noise, schedule)) is not None:
                return out
        return schedule.add_noise(x0, noise, timesteps), noise

    def keep(self, k: int, losses: torch.Tensor, timesteps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        masks = [mask for m in self.items if (mask := m.keep(k, losses, timesteps, positions)) is not None]
        if not masks:
            return None
        out = masks[0]
        for mask in masks[1:]:
            out = out & mask
        return out

    def observe(self, k: int, step: Step) -> None:
        for m in self.items:
            m.observe(k, step)

    @property
    def trains_draws(self) -> bool:
        return all(m.trains_draws for m in self.items)

    def queued(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        for m in self.items:
            if (batch := m.queued(k, generator)) is not None:
                return batch
        return None

    def weights(self, sizes: list[int]) -> list[float]:
        for m in self.items:
            sizes = m.weights(sizes)
        return sizes

    def averages(self, rnd: int, rounds: int) -> bool:
        return all(m.averages(rnd, rounds) for m in self.items)

    def end_round(self, end: RoundEnd) -> None:
        for m in self.items:
            m.end_round(end)

    def sync(self, ranks, owned: torch.Tensor) -> None:
        for m in self.items:
            m.sync(ranks, owned)

    def state(self, k: int | None) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": v for name, m in self.built.items() for key, v in m.state(k).items()}

    def load_state(self, tensors: dict[str, torch.Tensor], k: int | None) -> None:
        for name, m in self.built.items():
            prefix = name + "."
            m.load_state({key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}, k)

    def curve(self, k: int) -> dict[str, float]:
        return {key: v for m in self.items for key, v in m.curve(k).items()}

    def round_metrics(self) -> dict[str, float]:
        return {key: v for m in self.items for key, v in m.round_metrics().items()}

    def summary(self) -> dict[str, float]:
        return {key: v for m in self.items for key, v in m.summary().items()}
