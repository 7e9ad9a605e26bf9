// gbmoe::cuda: the LibTorch glue of the CUDA kernels (autograd functions over csrc_cuda/
// kernels.h) and their registration as the fused kernels of CUDA tensors (moe/kernels.h).
#pragma once

#include "moe/kernels.h"

namespace gbmoe::cuda {

/// The CUDA implementations of MoEKernels. Inputs the kernels do not cover (dtypes other than
/// fp32 / bf16, E > 1024 or K > 16 in the router) run the plain LibTorch code instead.
const MoEKernels& kernels();

/// Registers kernels() for CUDA tensors. Call once at startup; KernelMode (GBMOE_KERNELS)
/// still chooses between them and the reference at run time.
///
/// Example:
///   gbmoe::cuda::register_kernels();
///   MoELayer moe(MoELayerOptions(2048, 64, 1408).router(RouterOptions().top_k(8)));
///   moe->to(torch::kCUDA);
///   auto y = moe->forward(x_TD.cuda());  // fused router, permutation, grouped GEMM
void register_kernels();

}  // namespace gbmoe::cuda
