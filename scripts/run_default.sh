#!/usr/bin/env bash
# The main job on a fresh machine: installs dependencies, builds, prepares the multi-domain
# corpus from Debian packages (once, cached in data/), and trains the default config with 2 ranks.
# Usage: scripts/run_default.sh [--set section.key=value ...]   (extra args go to gbmoe-train)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
ranks=${GBMOE_RANKS:-2}
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$build" -j2 --target gbmoe-data gbmoe-train
bash "$root/scripts/make_corpus.sh" "$root/data"
if [ ! -f "$root/data/corpus/val.idx" ]; then
  "$build/train/gbmoe-data" --input "$root/data/raw" --output "$root/data/corpus" --vocab-size 4096
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
cd "$root"
exec mpirun -np "$ranks" "$build/train/gbmoe-train" --config configs/default.yaml "$@"
