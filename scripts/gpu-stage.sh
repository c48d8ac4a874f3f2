#!/usr/bin/env bash
# Stage what scripts/gpu-check.sh needs, on this machine, for one call on a lent GPU machine
# (which builds nothing): the release binaries, gzipped; config/tiny.toml; a prepared synthetic
# dataset; a tiny model trained here on the CPU (for the cuda-vs-ndarray check); the PyTorch
# reference. The stage stays under the device's 64 MiB carry limit.
#
# Usage: scripts/gpu-stage.sh [STAGE_DIR]   (default: stage/, which git ignores)
#   then, on the device: bash scripts/gpu-check.sh stage   (carry: stage)
# Builds first:
#   cargo build --release --locked
#   CARGO_TARGET_DIR=target/fused cargo build --release --locked --features fusion,autotune
# (the second is optional: without it the check skips the fused build's steps).
# Rehearse the check on the CPU before spending device time:
#   BACKEND=flex MAX_STEP=25 EPOCHS=1 OUT=/tmp/rehearsal bash scripts/gpu-check.sh stage
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STAGE=$(realpath -m "${1:-$ROOT/stage}")
cd "$ROOT"
CLUE=${CLUE:-target/release/clue}
FUSED=${FUSED:-target/fused/release/clue}
LIMIT_MIB=64
if [ -z "${REF:-}" ]; then
  for REF in ../shared/bench/torch_clue_ref.py shared/bench/torch_clue_ref.py; do
    [ -f "$REF" ] && break
  done
fi

[ -x "$CLUE" ] || { echo "no $CLUE: run cargo build --release --locked first" >&2; exit 1; }
[ -f "$REF" ] || { echo "no PyTorch reference at $REF: set REF=path/to/torch_clue_ref.py" >&2; exit 1; }
# The stage is made anew: a folder that is there must be an earlier stage (or empty).
if [ -d "$STAGE" ] && [ -n "$(ls -A "$STAGE")" ] && [ ! -f "$STAGE/clue.gz" ]; then
  echo "$STAGE is there and is not a stage (no clue.gz): give another folder" >&2; exit 1
fi
rm -rf "$STAGE"
mkdir -p "$STAGE"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== binaries"
gzip -c "$CLUE" > "$STAGE/clue.gz"
if [ -x "$FUSED" ]; then
  gzip -c "$FUSED" > "$STAGE/clue-fused.gz"
else
  echo "   no fused build at $FUSED: the check will skip its steps"
fi
cp config/tiny.toml "$REF" "$STAGE/"

echo "== data: 2,000 synthetic users, prepared for tiny (16 items of 16 tokens)"
"$CLUE" -q synth --users 2000 --seed 1 --out "$WORK/synth"
"$CLUE" -q prepare "$WORK/synth/logs" --out "$STAGE/prepared" --max-items 16 --max-item-tokens 16

echo "== a tiny model trained here (flex, 1 epoch), for the same weights on two backends"
"$CLUE" -q fit --backend flex --no-tui --config config/tiny.toml --data "$STAGE/prepared" \
  --out "$WORK/cpu-run" --set train.epochs=1
cp -r "$WORK/cpu-run/model" "$STAGE/cpu-model"

SIZE=$(du -sm "$STAGE" | cut -f1)
echo "== $STAGE: ${SIZE} MiB"
du -sh "$STAGE"/* | sed 's/^/   /'
if [ "$SIZE" -ge "$LIMIT_MIB" ]; then
  echo "the stage is over the device's ${LIMIT_MIB} MiB carry limit: leave the fused build out (FUSED=none)" >&2
  exit 1
fi
