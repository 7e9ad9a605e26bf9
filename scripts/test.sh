#!/usr/bin/env bash
# Installs every dependency, builds gbmoe with its tests, and runs the whole test suite.
# Usage: scripts/test.sh [extra ctest args]   (build dir: $GBMOE_BUILD_DIR, default build/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_BUILD_DIR:-$root/build}
bash "$root/scripts/setup.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGBMOE_BUILD_TESTS=ON
cmake --build "$build" -j2
# The CUDA path against CUDA LibTorch in build-cuda/: compile and link only (no GPU here).
GBMOE_CUDA_BUILD=${GBMOE_CUDA_BUILD:-on} bash "$root/scripts/build_cuda.sh"
# Multi-rank tests: mpirun as root on a small machine (see DEVELOPERS.md).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_NUM_THREADS=1
cd "$build"
ctest --output-on-failure "$@"
