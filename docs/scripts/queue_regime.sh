#!/usr/bin/env bash
# Queue the two-regime benchmark (docs/results.md) as DVC experiments: one regime, the named
# variants, the given seeds, one thread each (run them with `dvc queue start -j 2`, read them with
# `iet-agc ablation`).
#
#   docs/scripts/queue_regime.sh finetune 0 1 2 -- baseline dedup agcplus   # these variants, 3 seeds
#   docs/scripts/queue_regime.sh scratch 0                                  # every variant, seed 0
#
# Regimes: scratch (the default data, from random weights) | finetune (the pretrain stage's model, fine-tuned).
# Extra `-S` settings for every experiment of the call go in $EXTRA (e.g. EXTRA="-S iet.local_epochs=24").
# Experiments are named <regime>-<variant>-s<seed>; the single-model variants target evaluate@iet,
# so that their iet.shards=1 does not re-train the baseline.
set -euo pipefail

declare -A VARIANT=(
  [baseline]="evaluate@baseline"
  [dedup]="-S iet.shards=1 -S agc.enabled=false -S dedup.enabled=true evaluate@iet"
  [augment]="-S iet.shards=1 -S agc.enabled=false -S augment.enabled=true evaluate@iet"
  [ambient]="-S iet.shards=1 -S agc.enabled=false -S ambient.enabled=true evaluate@iet"
  [iet]="-S agc.enabled=false -S msr.enabled=false -S taa.enabled=false evaluate@iet"
  [agcplus]="evaluate@iet"
  [agcplus-new]="-S agc.reference=pooled -S iet.split=groups evaluate@iet"
  [agc]="-S iet.shards=1 -S taa.enabled=false evaluate@iet"
  [agc-pooled]="-S iet.shards=1 -S taa.enabled=false -S agc.reference=pooled evaluate@iet"
  [dp]="-S iet.shards=1 -S agc.enabled=false -S dp.enabled=true evaluate@iet"
)
ORDER=(baseline agcplus dedup iet agcplus-new agc agc-pooled augment ambient dp)
# Each regime states its own steps and curve (the defaults are shorter, for a 10-minute `make repro`):
# from scratch 2,304 optimizer steps a model (long enough for the ensembles to reach the quality at
# which the baseline copies), fine-tuning 1,152 (the calibration of docs/results.md); 256 samples a
# checkpoint in both.
declare -A REGIME=(
  [scratch]="-S iet.local_epochs=96 -S eval.curve_samples=256"
  [finetune]="-S pretrain.enabled=true -S model.init_from=runs/pretrain/model -S iet.local_epochs=48 -S eval.curve_samples=256"
)

regime=${1:?usage: $0 scratch|finetune SEED... [-- VARIANT...]}
shift
[[ -v REGIME[$regime] ]] || { echo "unknown regime: $regime (scratch | finetune)" >&2; exit 2; }
seeds=()
while [[ $# -gt 0 && $1 != "--" ]]; do seeds+=("$1"); shift; done
[[ ${#seeds[@]} -gt 0 ]] || { echo "no seed given" >&2; exit 2; }
[[ $# -gt 0 ]] && shift
variants=("$@")
[[ ${#variants[@]} -gt 0 ]] || variants=("${ORDER[@]}")
for v in "${variants[@]}"; do
  [[ -v VARIANT[$v] ]] || { echo "unknown variant: $v (${ORDER[*]})" >&2; exit 2; }
done
for seed in "${seeds[@]}"; do
  for v in "${variants[@]}"; do
    # shellcheck disable=SC2086  # the settings are words on purpose
    dvc exp run --queue -n "$regime-$v-s$seed" -S train.threads=1 -S "seeds.train=$seed" \
      ${REGIME[$regime]} ${EXTRA:-} ${VARIANT[$v]}
  done
done
