#!/usr/bin/env bash
# Forward + backward time of one MoE layer at every expert-parallel size that divides the rank
# count, and the share spent in the all-to-all exchanges (benchmarks/bench_ep.cpp).
# Usage: scripts/bench_ep.sh [ranks] [T D F E K reps]   (needs a built tree)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
ranks=${1:-4}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
mpirun -np "$ranks" "$build/parallel/gbmoe_bench_ep" "${@:2}"
