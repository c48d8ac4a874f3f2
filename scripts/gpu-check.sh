#!/usr/bin/env bash
# One prepared GPU check of clue on CUDA, side by side with the PyTorch reference.
#
# Usage: scripts/gpu-check.sh [STAGE_DIR]   (results go to $OUT, default ./gpu-out)
# STAGE_DIR holds: clue (or clue.gz, a release build), optionally clue-fused (a build with
# Burn's fusion and autotune), tiny.toml, prepared/ (clue prepare output of
# a small clue synth log), torch_clue_ref.py. Every step has its own time limit, and the script
# stops starting new steps after $BUDGET seconds, so one call never overruns its lease.
set -u
STAGE=${1:-stage}
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT"
START=$(date +%s)
[ -f "$STAGE/clue.gz" ] && [ ! -f "$STAGE/clue" ] && gunzip -c "$STAGE/clue.gz" > /tmp/clue && chmod +x /tmp/clue
CLUE=$STAGE/clue; [ -x "$CLUE" ] || CLUE=/tmp/clue
REF=$STAGE/torch_clue_ref.py

step() { # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local now=$(( $(date +%s) - START ))
  if [ $(( now + 10 )) -gt "$BUDGET" ]; then echo "== $name: skipped (budget, ${now}s used)"; return; fi
  echo "== $name (limit ${limit}s, at ${now}s)"
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  tail -n 14 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi-before.txt" 2>&1; sed -n 9,10p "$OUT/nvidia-smi-before.txt"
{ ls -d /usr/local/cuda* 2>&1; ls /usr/local/cuda/lib64 2>/dev/null | grep -i nvrtc | head -3
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1; } | tee "$OUT/env.txt"
# Peak GPU memory: sample used memory every 0.5 s in the background.
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done ) > "$OUT/gpu-mem.txt" 2>/dev/null &
SAMPLER=$!
# Compiled kernels are kept between the steps (and runs) of this check.
export CLUE_KERNEL_CACHE=${CLUE_KERNEL_CACHE:-/tmp/clue-kernels}

# 1. Where does the time of a first CUDA run go? Kernel compilation/autotune log, sampled every 5 s.
LOG=$OUT/cubecl-first.log
( while sleep 5; do echo "$(( $(date +%s) - START )) s: $(grep -c __global__ "$LOG" 2>/dev/null) kernels compiled, $(grep -ci autotun "$LOG" 2>/dev/null) autotune lines"; done ) > "$OUT/compile-rate.txt" 2>/dev/null &
RATE=$!
CUBECL_DEBUG_LOG=$LOG step bench-tiny-first 150 "$CLUE" -v bench --backend cuda --preset tiny --steps 3 --warmup 1
kill $RATE 2>/dev/null; tail -n 4 "$OUT/compile-rate.txt"
gzip -f "$LOG" 2>/dev/null
# 1b. The fused build (Burn's fusion + autotune; README "The GPU build"), if the stage holds one
# (STAGE/clue-fused: cargo build --release --features fusion,autotune): its first step with its
# own cold cache, then small's steady state next to the default build's below.
if [ -x "$STAGE/clue-fused" ]; then
  CLUE_KERNEL_CACHE=/tmp/clue-kernels-fused step bench-tiny-fused-first 120 "$STAGE/clue-fused" -v bench --backend cuda --preset tiny --steps 3 --warmup 1
  CLUE_KERNEL_CACHE=/tmp/clue-kernels-fused step bench-small-fused 150 "$STAGE/clue-fused" -v bench --backend cuda --preset small --steps 10 --warmup 3
fi
# 2. The same run again: with the kernel cache warm it should start at once.
step bench-tiny-cached 90 "$CLUE" -v bench --backend cuda --preset tiny --steps 5 --warmup 2
echo "   kernel cache: $(du -sh "$CLUE_KERNEL_CACHE" 2>/dev/null | cut -f1) (CubeCL's PTX: $(du -sh "$CLUE_KERNEL_CACHE/cuda" 2>/dev/null | cut -f1); the driver's cache: $(du -sh "$CLUE_KERNEL_CACHE/cuda-driver" 2>/dev/null | cut -f1))"

# 3. Learning on cuda: a few hundred steps of tiny (f32).
step fit-f32 150 "$CLUE" fit --backend cuda --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out /tmp/gpu-runs/run-f32 --no-tui --set train.epochs=4
grep -E "^GPU (warm-up|kernels after)" "$OUT/fit-f32.log" | sed 's/^/   /'
cp /tmp/gpu-runs/run-f32/summary.json "$OUT/fit-f32-summary.json" 2>/dev/null && python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('   summary:', {k: s.get(k) for k in ['final_train_loss','final_valid_loss','valid_retrieval_top1','chance_top1','steps','wall_s']})" "$OUT/fit-f32-summary.json"

# 4. Same weights on two backends: a bundle trained on the CPU, scored on cuda and on ndarray.
MODEL=${MODEL:-$STAGE/cpu-run}; DATA=${DATA:-$STAGE/cpu-data}
step score-cuda 60 "$CLUE" score --backend cuda --model "$MODEL" --data "$DATA" --split valid --json
step score-ndarray 40 "$CLUE" score --backend ndarray --model "$MODEL" --data "$DATA" --split valid --json
python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/equivalence.txt"
import json, sys
out = sys.argv[1]
def load(name):
    text = open(f"{out}/{name}.log").read()
    return json.loads(text[text.index("{"):])
try:
    a, b = load("score-cuda"), load("score-ndarray")
    ea = [x for s in a["embeddings_head"] for u in s for x in u]
    eb = [x for s in b["embeddings_head"] for u in s for x in u]
    diff = max(abs(x - y) for x, y in zip(ea, eb))
    scale = max(abs(x) for x in eb)
    print(f"embeddings cuda vs ndarray: max |diff| = {diff:.3e} (max |value| {scale:.3f}); loss {a['score']['loss']:.6f} vs {b['score']['loss']:.6f}; top1 {a['score']['top1_ab']:.4f} vs {b['score']['top1_ab']:.4f}")
except Exception as e:
    print("equivalence check failed:", e)
PY

# 5. Throughput, clue and PyTorch on the same card.
SMALL="--vocab 16384 --dim 256 --layers 4 --heads 4 --L 32 --S 64 --batch 32 --device cuda --steps 10 --warmup 3"
BASE="--vocab 50257 --dim 720 --layers 8 --heads 6 --L 32 --S 64 --batch 8 --device cuda --steps 10 --warmup 3"
step bench-small-f32 120 "$CLUE" -v bench --backend cuda --preset small --steps 10 --warmup 3
step torch-small-f32 60 python3 "$REF" $SMALL
# GradCache: batch 256 of small in chunks of 32 (the memory of batch 32; the whole batch's negatives).
# Data-parallel: 2 workers (burn-collective all-reduces) on the one card, against 1 worker above.
step bench-small-workers 120 "$CLUE" -v bench --backend cuda --preset small --workers 2 --steps 3 --warmup 1
step bench-small-gradcache 150 "$CLUE" -v bench --backend cuda --preset small --batch 256 --grad-cache 32 --steps 3 --warmup 1
step bench-base-f32 120 "$CLUE" -v bench --backend cuda --preset base --steps 10 --warmup 3
step torch-base-f32 60 python3 "$REF" $BASE
step bench-small-bf16 120 "$CLUE" -v bench --backend cuda --precision bf16 --preset small --steps 10 --warmup 3
step torch-small-bf16 60 python3 "$REF" $SMALL --dtype bf16
# Data-parallel in bf16: the workers' shared flags are read back from bf16 tensors.
step bench-small-workers-bf16 90 "$CLUE" -v bench --backend cuda --precision bf16 --preset small --workers 2 --steps 3 --warmup 1
step fit-bf16 150 "$CLUE" fit --backend cuda --precision bf16 --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out /tmp/gpu-runs/run-bf16 --no-tui --set train.epochs=4
step bench-base-bf16 120 "$CLUE" -v bench --backend cuda --precision bf16 --preset base --steps 10 --warmup 3
step torch-base-bf16 60 python3 "$REF" $BASE --dtype bf16
# Multi-node on the loopback address: two processes on the one card, rank 1 in the background
# (under its own time limit, and only when the budget lets rank 0's step run).
if [ $(( $(date +%s) - START + 170 )) -le "$BUDGET" ]; then
  timeout 160 "$CLUE" fit --backend cuda --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out /tmp/gpu-runs/node1 --no-tui --set train.epochs=1 --nodes 2 --node-rank 1 --coordinator 127.0.0.1:29500 --join-timeout 60 > "$OUT/fit-node1.log" 2>&1 &
  NODE1=$!
  step fit-node0 150 "$CLUE" fit --backend cuda --config "$STAGE/tiny.toml" --data "$STAGE/prepared" --out /tmp/gpu-runs/node0 --no-tui --set train.epochs=1 --nodes 2 --node-rank 0 --coordinator 127.0.0.1:29500 --join-timeout 60
  wait $NODE1; tail -n 3 "$OUT/fit-node1.log"
  # Both nodes warm up in step after the join.
  grep -E "^GPU (warm-up|kernels after)" "$OUT/fit-node0.log" "$OUT/fit-node1.log" | sed 's/^/   /'
else
  echo "== fit-node0/1: skipped (budget)"
fi
kill $SAMPLER 2>/dev/null
nvidia-smi > "$OUT/nvidia-smi-after.txt" 2>&1
echo "== peak GPU memory used (MiB, whole card): $(sort -n "$OUT/gpu-mem.txt" | tail -n 1)"
echo "== total $(( $(date +%s) - START )) s"
