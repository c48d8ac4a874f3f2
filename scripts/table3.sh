#!/usr/bin/env bash
# Reproduce the README's Table 3 (the paper's comparison): five tasks, every model, three seeds,
# on the CPU with --backend flex. About 1.5 hours on a 2-core AMD Zen 5 (news, tag-artist and
# next-product with their encoders: 66 minutes); the 2-core Intel Xeon the first two tasks were
# measured on is slower.
#
#   scripts/table3.sh DATASETS [WORK]
#
# DATASETS holds lastfm-hetrec2011-2k/, movielens-latest-small-2016/ and
# amazon-scientific-unisrec/ as published (datasets/README.md says where to get them); WORK
# (default: table3/) gets the data, runs and evaluations. A stage whose output exists is skipped,
# so a killed run continues. Each evaluation's table is eval/<task>/results.md.
set -euo pipefail
DATA=$(realpath "${1:?usage: scripts/table3.sh DATASETS [WORK]}")
CLUE=${CLUE:-$(realpath "$(dirname "$0")/../target/release/clue")}
CONFIG=$(realpath "$(dirname "$0")/../config/tiny.toml")
mkdir -p "${2:-table3}" && cd "${2:-table3}"
stage() { echo "== $(date +%T) $*"; }
fit() { # OUT ARGS...: a run, unless it finished before
  [ -f "$1/summary.json" ] || { stage "fit $1"; "$CLUE" fit --backend flex --no-tui --out "$@" | tail -8; }
}

# Data: the public datasets converted; the synthetic world is the embedded default's.
[ -d data/lastfm ] || "$CLUE" convert lastfm --input "$DATA/lastfm-hetrec2011-2k" --out data/lastfm -q
[ -d data/ml ] || "$CLUE" convert movielens --input "$DATA/movielens-latest-small-2016" --out data/ml -q
[ -d data/sci ] || "$CLUE" convert amazon-unisrec --input "$DATA/amazon-scientific-unisrec" \
  --name Scientific --out data/sci -q

# Encoders (each the best of a few tries within 30 minutes on 2 cores; see the README).
# Synthetic: the default data, tiny, 12 epochs (the default run has 3).
fit runs/syn --set train.epochs=12
# Last.fm: both services, tiny with 64 items per service, 6 epochs (10 and 20 overfit).
[ -d data/lastfm/prepared ] || "$CLUE" prepare data/lastfm/logs --out data/lastfm/prepared --max-items 64 -q
fit runs/lastfm --config "$CONFIG" --data data/lastfm/prepared --set model.max_items=64 --set train.epochs=6
# MovieLens: one service, so the SimCLR objective, pretrained without each user's last rating
# (the next-movie target) so that the encoder never sees a test target.
if [ ! -d data/ml/prepared ]; then
  mkdir -p data/ml/pretrain
  awk -F, 'NR == FNR { if (FNR > 1 && $3 > last[$1]) last[$1] = $3; next }
           FNR == 1 || $3 < last[$1]' data/ml/logs/movie.csv data/ml/logs/movie.csv \
    > data/ml/pretrain/movie.csv
  "$CLUE" prepare data/ml/pretrain --objective simclr --max-items 64 --out data/ml/prepared -q
fi
fit runs/ml --config "$CONFIG" --data data/ml/prepared --set train.objective=simclr \
  --set model.max_items=64 --set train.epochs=20
# Amazon is another company: its products are read with the Last.fm encoder's `listen` prefix.
sed 's/^service = "scientific"/&\nas_service = "listen"\nitems_as_service = "listen"/' \
  data/sci/tasks/next-product.toml > data/sci/tasks/next-product-lastfm.toml

ev() { # NAME TASK MODEL [MORE EVAL OPTIONS]
  [ -f "eval/$1/results.json" ] && return
  stage "eval $1"
  "$CLUE" eval --backend flex --task "$2" --model "$3" --seeds 3 --out "eval/$1" -q "${@:4}"
  cat "eval/$1/results.md"
}
ev market data/default/synth/tasks/market.toml runs/syn
ev next-movie data/ml/tasks/next-movie.toml runs/ml
ev news data/default/synth/tasks/news.toml runs/syn
ev tag-artist data/lastfm/tasks/tag-artist.toml runs/lastfm
ev next-product data/sci/tasks/next-product-lastfm.toml runs/lastfm
stage done
