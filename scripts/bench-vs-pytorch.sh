#!/usr/bin/env bash
# clue against the PyTorch reference (../shared/bench/torch_clue_ref.py), side by side on this
# machine: the two run interleaved (clue, PyTorch, clue, PyTorch, ...) so that a noisy neighbour
# hits both, RUNS times per preset, and the table gives medians and ratios. PyTorch runs at its
# best CPU setting: tcmalloc preloaded when installed (apt-get install libtcmalloc-minimal4) and
# as many threads as clue uses. Each figure carries the CPU it was measured on.
#
#   scripts/bench-vs-pytorch.sh                      # tiny and small, 3 runs each, flex
#   RUNS=5 PRESETS=tiny scripts/bench-vs-pytorch.sh  # more runs, one preset
#
# Settings (environment): CLUE (binary, default target/release/clue), BACKEND (flex), RUNS (3),
# PRESETS ("tiny small"), THREADS (nproc), STEPS_<preset> / WARMUP_<preset> (timed and warm-up
# steps; small and base default to 3 and 1), REF (the reference script; default
# ../shared/bench/torch_clue_ref.py beside the repository, or shared/ inside it), OUT (folder for
# the raw JSON and table.md; default bench-out/<date>). Relative paths are taken from the current
# directory. Needs python3 with torch and numpy.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
CLUE=$(absolute "${CLUE:-$ROOT/target/release/clue}")
BACKEND=${BACKEND:-flex}
RUNS=${RUNS:-3}
PRESETS=${PRESETS:-tiny small}
THREADS=${THREADS:-$(nproc)}
if [ -z "${REF:-}" ]; then
  for REF in "$ROOT/../shared/bench/torch_clue_ref.py" "$ROOT/shared/bench/torch_clue_ref.py"; do
    [ -f "$REF" ] && break
  done
fi
REF=$(absolute "$REF")
OUT=$(absolute "${OUT:-$ROOT/bench-out/$(date +%Y%m%d-%H%M%S)}")
cd "$ROOT"
for preset in $PRESETS; do
  case $preset in tiny | small | base) ;; *) echo "unknown preset '$preset': use tiny, small or base" >&2; exit 2 ;; esac
done

[ -x "$CLUE" ] || { echo "no clue binary at $CLUE: run cargo build --release first" >&2; exit 2; }
[ -f "$REF" ] || { echo "no reference script at $REF (set REF=...)" >&2; exit 2; }
python3 -c "import torch, numpy" 2>/dev/null \
  || { echo "python3 cannot import torch and numpy: pip install torch numpy" >&2; exit 2; }
TCMALLOC=""
for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
  /usr/lib64/libtcmalloc_minimal.so.4; do
  [ -f "$lib" ] && { TCMALLOC=$lib; break; }
done
[ -n "$TCMALLOC" ] || echo "warning: tcmalloc not found; PyTorch runs with glibc malloc (slower on small)" >&2
mkdir -p "$OUT"
# rayon's pool (flex, gemm) and ndarray's matrix products (matrixmultiply's own threads).
export RAYON_NUM_THREADS=$THREADS MATMUL_NUM_THREADS=$THREADS

torch_run() { # json-out, then the reference's arguments
  local out=$1; shift
  if [ -n "$TCMALLOC" ]; then
    LD_PRELOAD=$TCMALLOC python3 "$REF" --threads "$THREADS" --json "$out" "$@" > /dev/null
  else
    python3 "$REF" --threads "$THREADS" --json "$out" "$@" > /dev/null
  fi
}

# The reference's arguments for a preset, read from clue's own report of it.
ref_args() {
  python3 - "$1" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))["preset"]
print(f"--vocab {p['vocab']} --dim {p['dim']} --ffn {p['ffn']} --layers {p['layers']} "
      f"--heads {p['heads']} --L {p['tokens']} --S {p['items']} --batch {p['batch']}")
EOF
}

for preset in $PRESETS; do
  steps_var=STEPS_$preset warmup_var=WARMUP_$preset
  default_steps=10 default_warmup=3
  [ "$preset" = tiny ] || { default_steps=3; default_warmup=1; }
  steps=${!steps_var:-$default_steps} warmup=${!warmup_var:-$default_warmup}
  for run in $(seq 1 "$RUNS"); do
    echo "[$preset $run/$RUNS] clue bench --backend $BACKEND ($steps steps after $warmup)" >&2
    "$CLUE" --quiet bench --preset "$preset" --backend "$BACKEND" --steps "$steps" --warmup "$warmup" --json \
      > "$OUT/clue-$preset-$run.json"
    echo "[$preset $run/$RUNS] torch_clue_ref.py" >&2
    args=$(ref_args "$OUT/clue-$preset-$run.json")
    # shellcheck disable=SC2086
    torch_run "$OUT/torch-$preset-$run.json" $args --steps "$steps" --warmup "$warmup"
  done
done

echo "[peak] fp32 matmul, PyTorch ($THREADS threads)" >&2
python3 - "$THREADS" > "$OUT/torch-peak.json" <<'EOF'
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 1024
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
best, t_end = float("inf"), time.perf_counter() + 0.6
runs = 0
while runs < 3 or time.perf_counter() < t_end:
    t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0); runs += 1
print(json.dumps({"gflops_per_s": 2 * n**3 / best / 1e9, "side": n, "runs": runs, "torch": torch.__version__}))
EOF

python3 - "$OUT" "$RUNS" "$PRESETS" "$TCMALLOC" "$THREADS" <<'EOF' | tee "$OUT/table.md"
import json, statistics, sys
out, runs, presets, tcmalloc, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5]
load = lambda p: json.load(open(p))
med = statistics.median
first = load(f"{out}/clue-{presets[0]}-1.json")
peak = load(f"{out}/torch-peak.json")
cpu = first["cpu"]
print(f"CPU: {cpu['model']} ({' '.join(cpu['isa']) or 'no SIMD extensions'}), {threads} threads; "
      f"clue {first['backend']}, denormals {'flushed' if cpu['flush_denormals'] else 'kept'}; "
      f"PyTorch {peak['torch']}, {'tcmalloc' if tcmalloc else 'glibc malloc'}; medians of {runs} interleaved runs.")
clue_peak = first.get("matmul_peak") or {}
print(f"fp32 matmul peak ({peak['side']}³): clue's gemm crate {clue_peak.get('gflops_per_s', float('nan')):.0f} GFLOP/s, "
      f"PyTorch {peak['gflops_per_s']:.0f} GFLOP/s.")
print()
print("| preset | figure | clue | PyTorch | clue vs PyTorch |")
print("|---|---|---|---|---|")
for p in presets:
    c = [load(f"{out}/clue-{p}-{r}.json") for r in range(1, runs + 1)]
    t = [load(f"{out}/torch-{p}-{r}.json") for r in range(1, runs + 1)]
    fmt = lambda xs, f: " / ".join(f.format(x) for x in xs)
    ct, tt = [x["train_s_per_step"] for x in c], [x["train_s"] for x in t]
    ci, ti = [x["infer_embeddings_per_s"] for x in c], [x["infer_users_s"] for x in t]
    cm, tm = [x["peak_rss_mib"] for x in c], [x["rss_peak_mib"] for x in t]
    frac = med([x["train_peak_fraction"] or float("nan") for x in c])
    print(f"| {p} | training, s/step | **{med(ct):.3f}** ({fmt(ct, '{:.3f}')}) | **{med(tt):.3f}** ({fmt(tt, '{:.3f}')}) "
          f"| {med(tt) / med(ct):.2f}× the speed ({100 * frac:.0f} % of the matmul peak) |")
    print(f"| {p} | inference, embeddings/s | **{med(ci):.0f}** ({fmt(ci, '{:.0f}')}) | **{med(ti):.0f}** ({fmt(ti, '{:.0f}')}) "
          f"| {med(ci) / med(ti):.2f}× the speed |")
    print(f"| {p} | peak RSS, MiB | {med(cm):.0f} | {med(tm):.0f} | {med(cm) / med(tm):.2f}× the memory |")
EOF
echo "raw figures: $OUT" >&2
