"""Pydantic models that mirror params.yaml, and the one function that loads and validates it."""
from __future__ import annotations

import re
from pathlib import Path
import math
import posixpath
import typing
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A bad parameter; the message names the key and what is allowed."""


class _Group(BaseModel):
    # inf and NaN are never what a parameter file means, and fail only later (an infinite
    # iet.local_epochs overflows the step count, an infinite train.lr diverges)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, v, info: ValidationInfo):
        # bool is a subclass of int, so pydantic's lax mode reads `iet.shards: true` as 1 and
        # `train.lr: yes` as 1.0; a number key never means a boolean
        values = v if isinstance(v, (list, tuple)) else [v]
        if _numbers_only(cls.model_fields[info.field_name].annotation) and any(isinstance(x, bool) for x in values):
            raise ValueError("must be a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)")
        return v


def _numbers_only(annotation) -> bool:
    """Whether a field's type takes numbers (or lists of them) and no boolean."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return any(type(a) in (int, float) for a in args)
    if annotation in (int, float):
        return True
    return bool not in args and any(_numbers_only(a) for a in args if a is not Ellipsis)


SEED_MAX = 2**32 - 1  # numpy's legacy seeding and torch both accept this range
# images in the sources of a fixed size (fashion-mnist: the Debian package's, at data.path null);
# tests/test_data.py checks them against the files
SOURCE_SIZES = {"mnist5k": 5000, "digits": 1797, "fashion-mnist": 70000}


class Seeds(_Group):
    data: int = Field(0, ge=0, le=SEED_MAX)
    split: int = Field(0, ge=0, le=SEED_MAX)
    train: int = Field(0, ge=0, le=SEED_MAX)
    eval: int = Field(0, ge=0, le=SEED_MAX)


class Duplicates(_Group):
    """Training images stored several times over, as web-scale sets hold them: the images diffusion
    models copy most (Carlini et al. 2023). The copies are extra training samples."""
    images: int = Field(8, ge=0)   # how many of the data.train_size images are duplicated (0: none)
    copies: int = Field(16, ge=2)  # samples of each such image in total, the original included
    near: bool = False  # each extra copy a seeded near copy (pipeline/core/data.py near_copy), not pixel-identical


class DataConfig(_Group):
    source: Literal["mnist5k", "digits", "fashion-mnist", "folder", "npz"] = "mnist5k"
    path: str | None = None
    train_size: int = Field(264, ge=2)
    # two at least: a Frechet distance needs a covariance, SSCD splits them in two halves
    heldout_size: int = Field(256, ge=2)
    resolution: int = Field(16, ge=4, le=512)
    channels: Literal[1, 3] = 1
    duplicates: Duplicates = Duplicates()

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source in ("folder", "npz") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.duplicates.images > self.train_size:
            raise ValueError(f"data.duplicates.images ({self.duplicates.images}) must not exceed data.train_size "
                             f"({self.train_size})")
        size = SOURCE_SIZES.get(self.source) if self.source != "fashion-mnist" or self.path is None else None
        if size is not None and self.train_size + self.heldout_size > size:
            # the same message as prepare's (pipeline/core/data.py), which counts the images of any source
            raise ValueError(f"data.train_size ({self.train_size}) + data.heldout_size ({self.heldout_size}) = "
                             f"{self.train_size + self.heldout_size} images needed, but data.source "
                             f"'{self.source}' has only {size}")
        return self

    @property
    def train_samples(self) -> int:
        """Training samples: the train_size unique images plus the duplicates' extra copies."""
        return self.train_size + self.duplicates.images * (self.duplicates.copies - 1)


class ModelConfig(_Group):
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    attention: bool = True
    # resolutions whose down and up blocks get self-attention (the official CIFAR-10 model: [16])
    attention_resolutions: tuple[int, ...] = ()
    attention_head_dim: int | None = Field(8, ge=1)  # null: one head over all channels (official DDPM)
    norm_groups: int = Field(8, ge=1)                # GroupNorm groups (official DDPM: 32)
    dropout: float = Field(0.0, ge=0, lt=1)          # in every residual block (official CIFAR-10: 0.1)
    num_train_timesteps: int = Field(1000, ge=10)
    init_from: str | None = Field(None, min_length=1)  # pretrained model to fine-tune (see models.initial_unet)

    @field_validator("block_out_channels")
    @classmethod
    def _widths(cls, v):
        if not v or any(c < 1 for c in v):
            raise ValueError("must be a non-empty list of positive widths")
        return v

    @model_validator(mode="after")
    def _groups_divide_widths(self):
        # GroupNorm splits a width into norm_groups equal parts; nothing else limits the widths.
        # A pretrained model (init_from) brings its own architecture, and these keys are ignored.
        if self.init_from is None and any(c % self.norm_groups for c in self.block_out_channels):
            raise ValueError(f"model.norm_groups ({self.norm_groups}) must divide every width of "
                             f"model.block_out_channels {list(self.block_out_channels)} (GroupNorm's groups)")
        return self

    def attention_levels(self, resolution: int) -> list[bool]:
        """Per level, from the highest resolution down: whether its down and up blocks get
        self-attention (level i works at resolution / 2**i)."""
        return [resolution // 2 ** i in self.attention_resolutions for i in range(len(self.block_out_channels))]

    def attention_widths(self, resolution: int) -> list[int]:
        """The width of every block with self-attention, the mid block's (the last level's) included."""
        levels = zip(self.block_out_channels, self.attention_levels(resolution))
        return [c for c, attn in levels if attn] + list(self.block_out_channels[-1:]) * self.attention


class TrainConfig(_Group):
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_share: float = Field(0.015, ge=0, lt=1)  # of each model's optimizer steps (official: ~1.5% for both)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    threads: int = Field(2, ge=1)
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # autocast of the UNet forward (fp16: with loss scaling)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step; the step still sees batch_size images
    launcher: str = "python"  # runs the baseline and iet stages: `python`, or `accelerate launch [options]`
    device: str = "auto"  # where every stage computes: auto (CUDA when present) | cpu | cuda | cuda:N
    stack_proxies: Literal["auto", "true", "false"] = "auto"  # a process's proxies in one batched step (CUDA: auto)

    @field_validator("stack_proxies", mode="before")
    @classmethod
    def _yaml_bool(cls, v):
        return str(v).lower() if isinstance(v, bool) else v  # YAML reads true/false as booleans

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        # the spelling here; whether the device exists is resolve_device's question, on the machine that runs
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {v!r})")
        return v

    @model_validator(mode="after")
    def _accum_fits(self):
        if self.grad_accum > self.batch_size:
            raise ValueError(f"grad_accum ({self.grad_accum}) cannot exceed batch_size ({self.batch_size})")
        return self


class PretrainConfig(_Group):
    """The fine-tuning regime's own pretrained model (stages/pretrain.py): trained on the pool's
    images that are neither training nor held-out images, so it has seen none of them."""
    enabled: bool = False          # off: the stage writes only its info.json (training from scratch)
    images: int = Field(2000, ge=1)  # at most this many pool images, seeded
    steps: int = Field(2000, ge=1)  # optimizer steps of train.batch_size
    rounds: int = Field(4, ge=1)    # checkpoints (and resume points) over those steps
    # its weights' init and batches: not seeds.train, so that every training seed fine-tunes one model
    seed: int = Field(0, ge=0, le=SEED_MAX)


class IETConfig(_Group):
    shards: int = Field(4, ge=1)
    rounds: int = Field(4, ge=1)
    local_epochs: float = Field(24, gt=0)
    split: Literal["random", "groups"] = "random"  # groups: near-duplicate groups stay whole in one shard
    near_duplicate: float = Field(0.02, ge=0, le=1)  # groups: RMS pixel distance ([0, 1]) joining near copies
    checkpoints_per_round: int = Field(2, ge=1)  # evaluation checkpoints a round, the same for every model


# ---- the mitigations' groups (pipeline/mitigation reads each through its registry entry) ----

class AGCConfig(_Group):
    enabled: bool = True
    tau: float = 0.5
    bank_decay: float = Field(0.8, ge=0, lt=1)           # the official bank's decay
    reference: Literal["official", "pooled"] = "official"  # docs/method.md#agc-variants
    bins: int = Field(20, ge=1)                           # pooled: timestep bins
    pooled_decay: float = Field(0.9, ge=0, lt=1)          # pooled: each bin's EMA decay (short memory)
    score: Literal["draw", "image"] = "draw"              # skip on the draw's relative loss, or the image's EMA of it
    image_decay: float = Field(0.8, ge=0, lt=1)           # image: EMA decay over the image's own draws
    min_draws: int = Field(3, ge=1)                       # image: draws before an image can be skipped

    @field_validator("tau")
    @classmethod
    def _tau(cls, v):
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1] (got {v})")
        return v


class MSRConfig(_Group):
    enabled: bool = True
    skip_rate: float = Field(0.5, ge=0, le=1)
    fraction: float | None = Field(None, gt=0, le=1)
    max_imbalance: float = Field(0.25, ge=0, le=1)
    profile_timesteps: int = Field(1, ge=1)
    profile: Literal["candidates", "all"] = "candidates"
    # ring: the authors' unreleased prototype (docs/authors_variant.md): on odd rounds each proxy sends
    # its top `exchange` share of samples by AGC skips to the next proxy; proxies are averaged (plain
    # mean) only after even rounds and the last
    mode: Literal["ours", "ring"] = "ours"
    exchange: float = Field(0.25, gt=0, le=1)


class Transforms(_Group):
    """Label-preserving transforms at strength 1 (TAA's, and the plain augmentation baseline's)."""
    enabled: bool = True
    max_shift: int = Field(2, ge=0)
    flip: bool = False
    jitter: float = Field(0.1, ge=0, le=1)


class TAAConfig(Transforms):
    margin: float = Field(0.1, ge=0)
    rise: float = Field(0.1, gt=0)
    decay: float = Field(0.9, ge=0, lt=1)
    # queue: the authors' unreleased prototype (docs/authors_variant.md): kept samples queue with strength
    # exp(-5 d); a full queue's first 8 take one step under RandAugment(2, int(mean strength x augment_base))
    mode: Literal["ours", "queue"] = "ours"
    augment_base: float = Field(5.0, ge=0, le=30)  # RandAugment has 31 magnitude bins: int(s x base) <= 30


class AugmentConfig(Transforms):
    enabled: bool = False
    strength: float = Field(0.5, ge=0, le=1)


class AmbientConfig(_Group):
    """Ambient high-noise training (Shah, Kalavasis, Klivans, Daras, ICML 2025): above timestep t_n
    the model learns only from one fixed noisy copy of each image (pipeline/mitigation/ambient.py)."""
    enabled: bool = False
    timestep: int = Field(500, ge=0)  # t_n: at and below it the clean image, above it only x_{t_n}


class DedupConfig(_Group):
    """Each duplicate group trained on once (pipeline/mitigation/dedup.py)."""
    enabled: bool = False
    near_duplicate: float = Field(0.0, ge=0, le=1)  # 0: exact duplicates; else RMS pixel distance joining near copies


class DPConfig(_Group):
    """DP-SGD (Abadi et al. 2016) through Opacus: each sample's gradient clipped to max_grad_norm, Gaussian
    noise of sd noise_multiplier x max_grad_norm added to their sum (pipeline/mitigation/dp.py)."""
    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)  # the (epsilon, delta) guarantee's delta; below 1/N to mean anything


class AMGConfig(_Group):
    """Anti-memorization guidance at sampling time (pipeline/evaluate/guidance.py): the evaluate stage samples
    with it when enabled, the trained models unchanged. Thresholds are normalized L2 distances."""
    enabled: bool = False
    scale: float = Field(2.0, ge=0)  # the noise estimate's shift per unit of normalized L2 past the threshold
    threshold_start: float = Field(1.6, gt=0)  # at pure noise; the paper's parabolic schedule in a_t to...
    threshold_end: float = Field(1.4, gt=0)  # ...the clean image (1.4: the paper's copy threshold)


class EvalConfig(_Group):
    num_samples: int = Field(256, ge=2)
    ddim_steps: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    weights: Literal["raw", "ema"] = "raw"
    curve_samples: int = Field(128, ge=0)  # samples per checkpoint for the memorization-quality curve; 0: none
    classifier_epochs: int = Field(3, ge=1)
    inception: bool | Literal["auto"] = "auto"  # Inception FID/KID; auto: only with CUDA
    sscd: bool = False  # SSCD copy detection (optional extra)
    sscd_quantile: float = Field(0.99, gt=0, lt=1)  # held-out quantile that sets the SSCD threshold

    @field_validator("curve_samples")
    @classmethod
    def _curve_samples(cls, v):
        # each point's Frechet distance takes a covariance, and its KID pairs of samples
        if v == 1:
            raise ValueError("must be 0 (no curve) or at least 2: a Frechet distance and a KID need two samples")
        return v

    @field_validator("inception", mode="before")
    @classmethod
    def _inception(cls, v):
        # one message instead of pydantic's two (one per member of the union)
        if v != "auto" and not isinstance(v, bool):
            raise ValueError(f"must be auto, true or false (got {v!r})")
        return v


class TrackingConfig(_Group):
    uri: str | None = None
    experiment: str = Field("iet-agc", min_length=1)
    registry_name: str = "iet-agc"
    alias: str = "candidate"

    @field_validator("registry_name")
    @classmethod
    def _registry_name(cls, v):
        # '/', ':' and '@' would break models:/NAME/VERSION and models:/NAME@ALIAS URIs
        if not v or any(c in v for c in "/:@") or v != v.strip():
            raise ValueError(f"must be a non-empty name without '/', ':', '@' or surrounding spaces (got {v!r})")
        # MLflow's own rule (mlflow.utils.validation.path_not_unique), met otherwise only in `register`:
        # a name is also a path, and must not resolve to another one
        if posixpath.normpath(v) != v or v == "." or v.startswith(".."):
            raise ValueError(f"must not be a path that resolves to another name, as '.' and '..' do (got {v!r})")
        if len(v) > 256:  # the registry's column
            raise ValueError(f"must be at most 256 characters (got {len(v)})")
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v):
        # MLflow's rules: word characters and '-'; 'latest' and v<number> are reserved
        if not re.fullmatch(r"[\w-]+", v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"must be letters, digits, '_' or '-', and not 'latest' or v<number> (got {v!r})")
        return v


class Params(_Group):
    seeds: Seeds = Seeds()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    iet: IETConfig = IETConfig()
    agc: AGCConfig = AGCConfig()
    msr: MSRConfig = MSRConfig()
    taa: TAAConfig = TAAConfig()
    augment: AugmentConfig = AugmentConfig()
    ambient: AmbientConfig = AmbientConfig()
    pretrain: PretrainConfig = PretrainConfig()
    dedup: DedupConfig = DedupConfig()
    dp: DPConfig = DPConfig()
    amg: AMGConfig = AMGConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.iet.shards > self.data.train_samples:
            raise ValueError(f"iet.shards ({self.iet.shards}) must not exceed the training samples "
                             f"({self.data.train_samples}: data.train_size and data.duplicates' extra copies)")
        # a pretrained model brings its own architecture; models.initial_unet checks its resolution
        if self.model.init_from is None:
            self._architecture_fits()
        self._shifts_fit()
        if self.eval.ddim_steps > self.model.num_train_timesteps:
            raise ValueError(
                f"eval.ddim_steps ({self.eval.ddim_steps}) must be between 1 and model.num_train_timesteps "
                f"({self.model.num_train_timesteps}): DDIM samples a subset of the training timesteps")
        if self.ambient.enabled and self.ambient.timestep >= self.model.num_train_timesteps - 1:
            raise ValueError(f"ambient.timestep ({self.ambient.timestep}) must be below model.num_train_timesteps - 1 "
                             f"({self.model.num_train_timesteps - 1}): above it there must be timesteps to learn from x_tn")
        if self.agc.enabled and self.agc.reference == "pooled" and self.agc.bins > self.model.num_train_timesteps:
            raise ValueError(f"agc.bins ({self.agc.bins}) must not exceed model.num_train_timesteps "
                             f"({self.model.num_train_timesteps})")
        if self.dp.enabled:
            self._dp_fits()
        self._counts_fit()
        self._authors_modes_fit()
        if self.train.stack_proxies == "true" and (why := self.stacking_refused()):
            raise ValueError(f"train.stack_proxies cannot be true with {why}: use auto or false")
        return self

    def _architecture_fits(self) -> None:
        """What diffusers' UNet2DModel needs of data.resolution and the model keys to build."""
        m, resolution = self.model, self.data.resolution
        factor = 2 ** (len(m.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"data.resolution ({resolution}) must be a multiple of {factor} for "
                             f"{len(m.block_out_channels)} UNet levels (model.block_out_channels)")
        levels = [resolution // 2 ** i for i in range(len(m.block_out_channels))]
        if set(m.attention_resolutions) - set(levels):
            raise ValueError(f"model.attention_resolutions {list(m.attention_resolutions)} must be among "
                             f"the UNet's resolutions {levels} (data.resolution halved at each level)")
        # an attention layer has width // attention_head_dim heads: none (a ZeroDivisionError) below one
        narrowest = min(m.attention_widths(resolution), default=m.attention_head_dim)
        if m.attention_head_dim is not None and narrowest < m.attention_head_dim:
            raise ValueError(f"model.attention_head_dim ({m.attention_head_dim}) must not exceed the width of "
                             f"any level with attention (the narrowest is {narrowest}): it would get no head; "
                             "use a smaller value or null (one head over all channels)")

    def iet_steps_per_round(self) -> int:
        """local_epochs over a nominal shard of N/K samples (N counts data.duplicates' copies), in full
        batches: K times it is a round's steps, the baseline's, which proxy_steps shares out by the
        shards' sizes as they are."""
        shard = math.ceil(self.data.train_samples / self.iet.shards)
        return max(1, math.ceil(self.iet.local_epochs * shard / self.train.batch_size))

    def _counts_fit(self) -> None:
        """A count of things no larger than what it counts. Checkpoints: a proxy with fewer steps a
        round than checkpoints is allowed (the round's start weights stand in; MSR can shrink a
        shard, and tiny runs take one step a round), but beyond the run's optimizer steps every
        further checkpoint is a copy, each held in memory until its round ends (100000000 of them
        grew until memory ran out). Pretrain rounds beyond its steps would each take a whole step,
        training more steps than asked."""
        steps = self.iet.rounds * self.iet.shards * self.iet_steps_per_round()
        if self.iet.checkpoints_per_round > steps:
            raise ValueError(f"iet.checkpoints_per_round ({self.iet.checkpoints_per_round}) must not exceed the "
                             f"optimizer steps of the whole run ({steps}: iet.rounds times the baseline's steps a "
                             "round, iet.shards times a proxy's iet.local_epochs over its shard in batches of "
                             "train.batch_size)")
        if self.pretrain.rounds > self.pretrain.steps:
            raise ValueError(f"pretrain.rounds ({self.pretrain.rounds}) must not exceed pretrain.steps "
                             f"({self.pretrain.steps}): each round takes at least one step")

    def _shifts_fit(self) -> None:
        """augment() translates by up to max_shift pixels at strength 1, filling with background: a
        shift of the whole image or more moves every pixel out and leaves a blank sample."""
        for name in ("taa", "augment"):
            group = getattr(self, name)
            if group.enabled and group.max_shift >= self.data.resolution:
                raise ValueError(f"{name}.max_shift ({group.max_shift}) must be less than data.resolution "
                                 f"({self.data.resolution}), at most {self.data.resolution - 1}: a larger shift "
                                 "moves the whole image out of the frame and trains on blank samples")

    def stacking_refused(self) -> str | None:
        """Why the proxies cannot train stacked (pipeline/train/stacked.py), or None when they can."""
        if self.dp.enabled:
            return "dp.enabled (each proxy's Opacus optimizer)"
        if self.train.mixed_precision == "fp16":
            return "train.mixed_precision fp16 (one loss scaler per proxy)"
        if self.train.grad_accum > 1:
            return f"train.grad_accum {self.train.grad_accum} (one backward pass per step)"
        if self.taa.enabled and self.taa.mode == "queue":
            return "taa.mode queue (each proxy steps when its own queue fills)"
        return None

    def _authors_modes_fit(self) -> None:
        """The authors' ring moves single samples, so it cannot keep near-duplicate groups whole."""
        if self.msr.enabled and self.msr.mode == "ring" and self.iet.split == "groups":
            raise ValueError("msr.mode ring moves single samples: it needs iet.split random, not groups")

    def _dp_fits(self) -> None:
        """What DP-SGD is refused with: its per-sample clipping bounds each sample's share of a step
        only when a step is one backward pass of a fixed-size batch of distinct samples in fp32 and
        nothing else reads other samples' losses; its epsilon counts one model trained on all."""
        n, t = self.data.train_samples, self.train
        refused = [
            (self.iet.shards != 1, f"iet.shards ({self.iet.shards}) must be 1 with dp.enabled: DP-SGD trains one "
                                   "model on every sample (run it as the iet stage with iet.shards=1)"),
            (self.agc.enabled, "agc.enabled must be false with dp.enabled: AGC's bank of other samples' losses "
                               "decides which gradients count, which the accountant does not cover"),
            (t.grad_accum != 1, f"train.grad_accum ({t.grad_accum}) must be 1 with dp.enabled: the per-sample "
                                "gradients are taken from one backward pass"),
            (t.mixed_precision != "fp32", f"train.mixed_precision ({t.mixed_precision}) must be fp32 with "
                                          "dp.enabled: the fp16 loss scale would be clipped with the per-sample "
                                          "gradients, and bf16 ones are untested"),
            (n % t.batch_size != 0, f"train.batch_size ({t.batch_size}) must divide the training samples ({n}) "
                                    "with dp.enabled: then no batch holds a sample twice, as the accountant's "
                                    "sampling rate batch/N assumes"),
        ]
        for bad, message in refused:
            if bad:
                raise ValueError(message)


def _received(e: dict) -> str:
    """' (got <value>)' for an error about one value (`-S agc.tau=abc` must show the abc); nothing
    for an unknown key, a message that already names it, or a group's own check, whose input is the
    whole group and whose message names the values it compares."""
    if e["type"] == "extra_forbidden" or "(got " in e["msg"] or (e["type"] == "value_error"
                                                                  and isinstance(e["input"], dict)):
        return ""
    text = repr(e["input"])
    return f" (got {text if len(text) <= 80 else text[:77] + '...'})"


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        msg += _received(e)
        lines.append(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; in a parameter file that hides a typo or a merge
    leftover, so a repeated key is an error."""


def _no_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: its keys are defaults the mapping's own keys override, by design
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}: line {key_node.start_mark.line + 1}: key '{key}' appears twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _missing_keys(raw: dict, model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every key of `model` absent from `raw`, walking nested groups, e.g. ['taa', 'train.lr']."""
    missing = []
    for name, field in model.model_fields.items():
        if name not in raw:
            missing.append(prefix + name)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
                and isinstance(raw[name], dict):
            missing += _missing_keys(raw[name], field.annotation, f"{prefix}{name}.")
    return missing


def read_yaml(path: Path) -> dict | None:
    """A parameter file's mapping (None when empty), or a one-line ConfigError naming the file: not
    there, not UTF-8 (YAML's encoding; the locale's would vary), not YAML, a key twice, or not a
    mapping of groups with names as keys."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such parameter file") from None
    except OSError as err:  # a folder, no permission
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()
    if raw is not None and not (isinstance(raw, dict) and all(isinstance(k, str) for k in _all_keys(raw))):
        raise ConfigError(f"{path}: must be a mapping of parameter groups, with names as keys")
    return raw


def _all_keys(tree: dict) -> list:
    """Every key of a nested mapping."""
    return [k for key, value in tree.items() for k in [key, *(_all_keys(value) if isinstance(value, dict) else [])]]


def load_params(path: str | Path = "params.yaml") -> Params:
    """The parameter file, validated. Unlike parse_params, every key must be present: the file is
    the single source of truth of a run, so a deleted key must not fall back on a built-in default."""
    path = Path(path)
    raw = read_yaml(path)
    params = parse_params(raw, str(path))
    missing = _missing_keys(raw or {})
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (every key must be set; see the "
                          "repository's params.yaml)")
    return params


def resolve_device(setting: str | None, key: str = "train.device"):
    """A device setting as a torch.device on this machine: auto (or None) is CUDA when present; a
    name torch does not know, or a CUDA device that is not here, is a ConfigError naming `key`
    (every computing stage calls this before its work, `iet-agc sample` for its --device)."""
    import torch

    if setting in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:  # train.device is checked when parsed; --device is not
        raise ConfigError(f"{key}: '{setting}' is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(f"{key}: '{setting}' is not available here ({count} CUDA devices); "
                          "use auto or cpu")
    return device


def flatten(tree: BaseModel | dict, prefix: str = "") -> dict[str, object]:
    """Params (or a params file's raw mapping) as 'group.key' -> value (a nested group:
    'group.sub.key'): the form MLflow shows as columns and `dvc exp run -S` takes."""
    values = tree.model_dump() if isinstance(tree, BaseModel) else tree
    out: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
