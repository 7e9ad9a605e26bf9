#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU, the torch of its python3 (LibTorch
# with CUDA), CMake, nvcc and NCCL, and no network: builds gbmoe's core, CUDA kernels, CUDA tests
# and GPU benchmark against that LibTorch (GoogleTest from source), runs the *_CUDA tests, the
# benchmark (fused and reference path) and the Python loop-over-experts baseline, and writes
# every log to $OUT (default build-gpu/gpu-check).
# Before: scripts/setup_cuda.sh here copies GoogleTest's source to .cache/googletest; carry it
# (with the device tool: carry [".cache/googletest"], command "bash scripts/gpu_check.sh").
# Usage: OUT=dir scripts/gpu_check.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${GBMOE_GPU_BUILD_DIR:-$root/build-gpu}
out=${OUT:-$build/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
log() { echo "gpu_check: $*" | tee -a "$out/summary.txt"; }

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)') || { log "no torch in $py"; exit 1; }
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)' | tee -a "$out/summary.txt"
arch=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
site=$(cd "$prefix/../../.." && pwd)
toolkit=$(bash "$root/scripts/find_nvcc.sh" "$site") || { log "no CUDA toolkit with nvcc found"; exit 1; }
nvcc=$toolkit/bin/nvcc
gtest=${GBMOE_GTEST_SOURCE_DIR:-$root/.cache/googletest}
[ -f "$gtest/CMakeLists.txt" ] || gtest=/usr/src/googletest
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
mpi=ON
command -v mpicxx >/dev/null || mpi=OFF
log "LibTorch $prefix, nvcc $nvcc, arch $arch, GoogleTest $gtest, MPI $mpi"

start=$(date +%s)
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" -DGBMOE_WITH_CUDA=ON -DGBMOE_WITH_MPI="$mpi" \
  -DGBMOE_BUILD_TESTS=ON -DGBMOE_GTEST_SOURCE_DIR="$gtest" \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DCUDAToolkit_ROOT="$toolkit" -DCUDA_TOOLKIT_ROOT_DIR="$toolkit" \
  -DTORCH_CUDA_ARCH_LIST="$arch" \
  "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--unresolved-symbols=ignore-in-shared-libs" \
  >"$out/configure.txt" 2>&1 || { log "configure failed (configure.txt)"; tail -40 "$out/configure.txt"; exit 1; }
cmake --build "$build" -j"$(nproc)" --target gbmoe_cuda_tests gbmoe_bench_moe_cuda \
  >"$out/build.txt" 2>&1 || { log "build failed (build.txt)"; grep -m20 -B2 -A10 "error" "$out/build.txt"; exit 1; }
log "built in $(($(date +%s) - start)) s"

tests="$build/tests/gbmoe_cuda_tests"
timeout 300 "$tests" --gtest_filter='*_CUDA' >"$out/cuda_tests.txt" 2>&1
log "CUDA tests exit $? : $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/cuda_tests.txt" | tr '\n' ' ')"
grep -E "Failure|Expected|Which is|error" "$out/cuda_tests.txt" | head -40
timeout 180 "$build/benchmarks/gbmoe_bench_moe_cuda" >"$out/bench_moe_cuda.txt" 2>&1
log "benchmark exit $?"
cat "$out/bench_moe_cuda.txt" | tee -a "$out/summary.txt"
timeout 180 "$py" "$root/benchmarks/moe_loop_gpu.py" >"$out/python_loop.txt" 2>&1
log "python loop exit $?"
cat "$out/python_loop.txt" | tee -a "$out/summary.txt"
