#!/usr/bin/env bash
# Compiles and links gbmoe's whole CUDA path against the CUDA build of LibTorch 2.14.1 (unpacked
# by scripts/setup_cuda.sh): kernels (nvcc), their LibTorch glue, the NCCL communicator, the CUDA
# and NCCL tests, the GPU benchmark and the trainer; then installs the package and builds
# examples/consumer against it with gbmoe::cuda. Nothing of it runs: CI has no GPU.
# Usage: scripts/build_cuda.sh   (build dir: $GBMOE_CUDA_BUILD_DIR, default build-cuda/;
#        GBMOE_CUDA_BUILD=auto skips with a message when nvcc or the wheels are missing, on fails)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_CUDA_BUILD_DIR:-$root/build-cuda}
mode=${GBMOE_CUDA_BUILD:-auto}
skip() {
  if [ "$mode" = on ]; then
    echo "build_cuda: $1" >&2
    exit 1
  fi
  echo "build_cuda: SKIPPED, $1 (GBMOE_CUDA_BUILD=on makes this an error)"
  exit 0
}
toolkit=$(bash "$root/scripts/find_nvcc.sh") || skip "no CUDA toolkit with nvcc found"
prefix=$(bash "$root/scripts/setup_cuda.sh") || skip "no CUDA torch wheels"
start=$(date +%s)
mkdir -p "$build"
# A build dir configured against another LibTorch keeps it in its cache: start that one afresh.
if [ -f "$build/CMakeCache.txt" ] &&
  ! grep -qxE "Torch_DIR:[A-Z]+=$prefix/torch/share/cmake/Torch" "$build/CMakeCache.txt"; then
  rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"
fi
# The CUDA LibTorch and toolkit, for gbmoe and for the consumer built against its install.
# libtorch_cuda.so needs cuBLAS, cuDNN, ... which CI does not unpack (they are only loaded at run
# time), so executables link with their symbols left to the loader.
cuda_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DTorch_DIR="$prefix/torch/share/cmake/Torch"
  -DCMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" -DCUDAToolkit_ROOT="$toolkit"
  -DCUDA_TOOLKIT_ROOT_DIR="$toolkit" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--unresolved-symbols=ignore-in-shared-libs")
cmake -S "$root" -B "$build" "${cuda_args[@]}" -DGBMOE_BUILD_TESTS=ON -DGBMOE_WITH_CUDA=ON \
  >"$build/configure.log" 2>&1 || { cat "$build/configure.log"; exit 1; }
grep -E "gbmoe: (LibTorch|CUDA kernels|NCCL)" "$build/configure.log"
cmake --build "$build" -j"${GBMOE_JOBS:-2}" --target gbmoe_cuda_kernels gbmoe_cuda gbmoe_parallel \
  gbmoe_cuda_tests gbmoe_parallel_tests gbmoe_bench_moe_cuda gbmoe-train
cmake --install "$build" --prefix "$build/prefix" --component Development > /dev/null
consumer=$build/consumer
cmake -S "$root/examples/consumer" -B "$consumer" "${cuda_args[@]}" \
  -DCMAKE_PREFIX_PATH="$build/prefix" >"$consumer.log" 2>&1 || { cat "$consumer.log"; exit 1; }
cmake --build "$consumer" -j"${GBMOE_JOBS:-2}"
nm -C "$consumer/consumer" | grep "gbmoe::cuda::register_kernels()" > /dev/null ||
  { echo "build_cuda: the consumer did not link gbmoe::cuda::register_kernels" >&2; exit 1; }
echo "build_cuda: CUDA path compiled and linked in $(($(date +%s) - start)) s ($build)"
