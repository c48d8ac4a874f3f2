#!/usr/bin/env bash
# One prepared GPU check of clue on CUDA, side by side with the PyTorch reference.
#
# Usage: scripts/gpu-check.sh [STAGE_DIR]   (results go to $OUT, default ./gpu-out)
# STAGE_DIR (scripts/gpu-stage.sh makes it) holds: clue or clue.gz (a release build),
# optionally clue-fused or clue-fused.gz (a build with Burn's fusion and autotune), tiny.toml,
# prepared/ (clue prepare output of a small clue synth log), cpu-model/ (a tiny model trained on
# the CPU), torch_clue_ref.py. Every step has its own time limit, and the script stops starting
# new steps after $BUDGET seconds, so one call never overruns its lease.
# BACKEND=flex rehearses the check on this machine, PyTorch on the CPU, with the device's commands
# (BACKEND=flex MAX_STEP=25 EPOCHS=1 OUT=/tmp/rehearsal scripts/gpu-check.sh stage): a flag or a
# path that is wrong fails here, not on the device. $OUT/rc.txt lists each step's exit status.
# Not rehearsed: bf16 (CUDA only: refused on the CPU before any path is read) and the fused build
# (when not staged).
set -u
STAGE=${1:-stage}
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-420}
BACKEND=${BACKEND:-cuda}
MAX_STEP=${MAX_STEP:-600}  # caps every step's limit (a quick rehearsal: MAX_STEP=25)
EPOCHS=${EPOCHS:-4}        # of the tiny fits in f32 and bf16 (a quick rehearsal: EPOCHS=1)
TORCH_DEVICE=cpu; [ "$BACKEND" = cuda ] && TORCH_DEVICE=cuda
mkdir -p "$OUT"
START=$(date +%s)
# The binaries travel gzipped (the carry limit): unpacked to BIN. The runs go to fresh
# directories (a rehearsal again on the same machine); both are removed at the end.
BIN=$(mktemp -d); RUNS=$(mktemp -d); SAMPLER=; NODE1=
trap 'kill $SAMPLER $NODE1 2>/dev/null; rm -rf "$BIN" "$RUNS"' EXIT
for name in clue clue-fused; do
  if [ -x "$STAGE/$name" ]; then cp "$STAGE/$name" "$BIN/$name"
  elif [ -f "$STAGE/$name.gz" ]; then gunzip -c "$STAGE/$name.gz" > "$BIN/$name" && chmod +x "$BIN/$name"
  fi
done
CLUE=$BIN/clue
[ -x "$CLUE" ] || { echo "no clue or clue.gz in $STAGE: run scripts/gpu-stage.sh first" >&2; exit 1; }
REF=$STAGE/torch_clue_ref.py

step() { # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$(( $2 < MAX_STEP ? $2 : MAX_STEP )); shift 2
  local now=$(( $(date +%s) - START ))
  if [ $(( now + 10 )) -gt "$BUDGET" ]; then echo "== $name: skipped (budget, ${now}s used)"; return; fi
  echo "== $name (limit ${limit}s, at ${now}s)"
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  echo "$name $rc" >> "$OUT/rc.txt"
  tail -n 14 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi-before.txt" 2>&1; sed -n 9,10p "$OUT/nvidia-smi-before.txt"
{ ls -d /usr/local/cuda* 2>&1; ls /usr/local/cuda/lib64 2>/dev/null | grep -i nvrtc | head -3
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1; } | tee "$OUT/env.txt"
# Peak GPU memory: sample used memory every 0.5 s in the background.
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done ) > "$OUT/gpu-mem.txt" 2>/dev/null &
SAMPLER=$!
# Compiled kernels are kept between the steps of this check, in caches that start empty (unless
# CLUE_KERNEL_CACHE names one), so that the first step is a cold start even on a machine that
# ran the check before.
export CLUE_KERNEL_CACHE=${CLUE_KERNEL_CACHE:-$BIN/kernels}

SMALL="--vocab 16384 --dim 256 --layers 4 --heads 4 --L 32 --S 64 --batch 32 --device $TORCH_DEVICE --steps 10 --warmup 3"
BASE="--vocab 50257 --dim 720 --layers 8 --heads 6 --L 32 --S 64 --batch 8 --device $TORCH_DEVICE --steps 10 --warmup 3"
cache() { echo "   kernel cache: $(du -sh "$CLUE_KERNEL_CACHE" 2>/dev/null | cut -f1) (CubeCL's PTX: $(du -sh "$CLUE_KERNEL_CACHE/cuda" 2>/dev/null | cut -f1); the driver's cache: $(du -sh "$CLUE_KERNEL_CACHE/cuda-driver" 2>/dev/null | cut -f1))"; }
summary() { # summary NAME: the run's summary.json to $OUT, its figures printed
  cp "$RUNS/$1/summary.json" "$OUT/$1-summary.json" 2>/dev/null && python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('   summary:', {k: s.get(k) for k in ['train_loss_final','valid_loss_final','valid_retrieval_top1','chance_top1','steps','wall_seconds']})" "$OUT/$1-summary.json"
}
# The steps in the order of what #12 still lacks, in case the budget ends the check early.
# 1. small's first step with cold caches (target < 30 s; without the kernel count, whose loggers
#    cost time), then a second process on the warm caches: its first step (target < 5 s), the
#    kernels it still compiles (-v), and its steady state beside PyTorch's on the same card.
cache
CLUE_KERNEL_COUNT=off step bench-small-first 240 "$CLUE" -v bench --backend "$BACKEND" --preset small --steps 2 --warmup 0
cache
step bench-small-f32 120 "$CLUE" -v bench --backend "$BACKEND" --preset small --steps 10 --warmup 3
cache
step torch-small-f32 60 python3 "$REF" $SMALL
# 2. bf16, and base in f32 and bf16, each beside PyTorch.
step bench-small-bf16 120 "$CLUE" -v bench --backend "$BACKEND" --precision bf16 --preset small --steps 10 --warmup 3
step torch-small-bf16 60 python3 "$REF" $SMALL --dtype bf16
step bench-base-f32 120 "$CLUE" -v bench --backend "$BACKEND" --preset base --steps 10 --warmup 3
step torch-base-f32 60 python3 "$REF" $BASE
step bench-base-bf16 120 "$CLUE" -v bench --backend "$BACKEND" --precision bf16 --preset base --steps 10 --warmup 3
step torch-base-bf16 60 python3 "$REF" $BASE --dtype bf16
# 3. Learning: tiny in f32 and in bf16 (the GPU warm-up's kernels, and the bf16 loss against f32's).
step fit-f32 150 "$CLUE" fit --backend "$BACKEND" --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out $RUNS/run-f32 --no-tui --set train.epochs=$EPOCHS
grep -E "^GPU (warm-up|kernels after)" "$OUT/fit-f32.log" | sed 's/^/   /'
summary run-f32
step fit-bf16 150 "$CLUE" fit --backend "$BACKEND" --precision bf16 --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out $RUNS/run-bf16 --no-tui --set train.epochs=$EPOCHS
summary run-bf16
python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/bf16-vs-f32.txt"
import json, sys
try:
    f, b = (json.load(open(f"{sys.argv[1]}/run-{p}-summary.json")) for p in ("f32", "bf16"))
    print(f"bf16 vs f32, the same epochs: valid loss {b['valid_loss_final']:.4f} vs {f['valid_loss_final']:.4f} ({b['valid_loss_final'] / f['valid_loss_final'] - 1:+.2%}); top-1 {b['valid_retrieval_top1']:.3f} vs {f['valid_retrieval_top1']:.3f}")
except Exception as e:
    print("bf16 vs f32: no comparison:", e)
PY
# 4. Same weights on two backends: a model trained on the CPU, scored here and on ndarray.
MODEL=${MODEL:-$STAGE/cpu-model}; DATA=${DATA:-$STAGE/prepared}
step score-gpu 60 "$CLUE" score --backend "$BACKEND" --model "$MODEL" --data "$DATA" --split valid --json
step score-ndarray 40 "$CLUE" score --backend ndarray --model "$MODEL" --data "$DATA" --split valid --json
python3 - "$OUT" "$BACKEND" <<'PY' 2>&1 | tee "$OUT/equivalence.txt"
import json, sys
out = sys.argv[1]
def load(name):
    text = open(f"{out}/{name}.log").read()
    return json.loads(text[text.index("{"):])
try:
    a, b = load("score-gpu"), load("score-ndarray")
    ea = [x for s in a["embeddings_head"] for u in s for x in u]
    eb = [x for s in b["embeddings_head"] for u in s for x in u]
    diff = max(abs(x - y) for x, y in zip(ea, eb))
    scale = max(abs(x) for x in eb)
    print(f"embeddings {sys.argv[2]} vs ndarray: max |diff| = {diff:.3e} (max |value| {scale:.3f}); loss {a['score']['loss']:.6f} vs {b['score']['loss']:.6f}; top1 {a['score']['top1_ab']:.4f} vs {b['score']['top1_ab']:.4f}")
except Exception as e:
    print("equivalence check failed:", e)
PY
# 5. Data-parallel: 2 workers (burn-collective all-reduces) on the one card, against 1 worker
# above, in f32 and bf16 (the workers' shared flags are read back from bf16 tensors). GradCache:
# batch 256 of small in chunks of 32 (the memory of batch 32; the whole batch's negatives).
step bench-small-workers 120 "$CLUE" -v bench --backend "$BACKEND" --preset small --workers 2 --steps 3 --warmup 1
step bench-small-workers-bf16 90 "$CLUE" -v bench --backend "$BACKEND" --precision bf16 --preset small --workers 2 --steps 3 --warmup 1
step bench-small-gradcache 150 "$CLUE" -v bench --backend "$BACKEND" --preset small --batch 256 --grad-cache 32 --steps 3 --warmup 1
# 6. Multi-node on the loopback address: two processes on the one card, rank 1 in the background
# (under its own time limit, and only when the budget lets rank 0's step run).
NODE_LIMIT=$(( 150 < MAX_STEP ? 150 : MAX_STEP ))
if [ $(( $(date +%s) - START + NODE_LIMIT + 20 )) -le "$BUDGET" ]; then
  timeout $(( NODE_LIMIT + 10 )) "$CLUE" fit --backend "$BACKEND" --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out $RUNS/node1 --no-tui --set train.epochs=1 --nodes 2 --node-rank 1 --coordinator 127.0.0.1:29500 --join-timeout 60 > "$OUT/fit-node1.log" 2>&1 &
  NODE1=$!
  step fit-node0 150 "$CLUE" fit --backend "$BACKEND" --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out $RUNS/node0 --no-tui --set train.epochs=1 --nodes 2 --node-rank 0 --coordinator 127.0.0.1:29500 --join-timeout 60
  wait $NODE1; NODE1=; tail -n 3 "$OUT/fit-node1.log"
  # Both nodes warm up in step after the join.
  grep -E "^GPU (warm-up|kernels after)" "$OUT/fit-node0.log" "$OUT/fit-node1.log" | sed 's/^/   /'
else
  echo "== fit-node0/1: skipped (budget)"
fi
# 7. The fused build (Burn's fusion + autotune; README "The GPU build"), if the stage holds one:
# small's first step with its own cold caches, then its steady state beside the default build's.
if [ -x "$BIN/clue-fused" ]; then
  CLUE_KERNEL_CACHE=$BIN/kernels-fused step bench-small-fused-first 150 "$BIN/clue-fused" -v bench --backend "$BACKEND" --preset small --steps 2 --warmup 0
  CLUE_KERNEL_CACHE=$BIN/kernels-fused step bench-small-fused 120 "$BIN/clue-fused" -v bench --backend "$BACKEND" --preset small --steps 10 --warmup 3
fi
kill $SAMPLER 2>/dev/null; SAMPLER=
nvidia-smi > "$OUT/nvidia-smi-after.txt" 2>&1
echo "== peak GPU memory used (MiB, whole card): $(sort -n "$OUT/gpu-mem.txt" | tail -n 1)"
echo "== total $(( $(date +%s) - START )) s"
