// Parameters and launchers of the fused packed-QKV attention kernels.
//
// This header is shared by the CUDA kernels (.cu) and the torch binding (.cpp); it includes no
// torch header, so the .cu files compile with a bare CUDA toolkit.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "head_dims.h"

namespace mae_fast {

enum class AttnDtype : int { kFloat16 = 0, kBFloat16 = 1 };

// Which kernel family runs (the binding reads MAE_FAST_ATTENTION_KERNELS at each call):
// kAuto is the measured default (today: the tiled kernels everywhere), kTiled the 64-row tiled
// kernels, kShort the one-CTA-per-head kernels of short_kernels.cuh where they cover the shape
// (N <= 272; the backward at D >= 64 only N <= 80), the tiled ones elsewhere.
enum class AttnKernels : int { kAuto = 0, kTiled = 1, kShort = 2 };

// All strides are in elements (not bytes) and 64-bit. Every innermost (head-dim) stride is 1.
struct AttentionParams {
  // qkv: (B, N, 3, H, D), the qkv Linear's output viewed without permute or copy.
  const void* qkv;
  int64_t qkv_stride_b, qkv_stride_n, qkv_stride_3, qkv_stride_h;
  // out: (B, N, H*D); head h occupies columns [h*D, (h+1)*D).
  void* out;
  int64_t out_stride_b, out_stride_n;
  // lse: (B, H, N) contiguous fp32, natural-log logsumexp of the scaled scores of each query.
  float* lse;

  // Backward only.
  // dout: (B, N, H*D), same layout rules as out.
  const void* dout;
  int64_t dout_stride_b, dout_stride_n;
  // dqkv: (B, N, 3, H, D), every element is written (no zero-fill needed).
  void* dqkv;
  int64_t dqkv_stride_b, dqkv_stride_n, dqkv_stride_3, dqkv_stride_h;
  // delta: (B, H, N) contiguous fp32 workspace, rowsum(dout * out).
  float* delta;

  int B, N, H, D;
  float scale;  // softmax scale, D**-0.5 for the op
  AttnDtype dtype;
  AttnKernels kernels;
};

// Entry points: dispatch on dtype and head dim, launch on `stream`, return the launch error.
// The pointers must be 16-byte aligned and the qkv/out/dout/dqkv row strides multiples of 8
// elements (the kernels move 16-byte vectors); the binding checks or copies.
// Tiled backward: for N <= 64 and D <= 64 one kernel per head does everything; otherwise a delta
// kernel, a dK/dV kernel (per 64 keys) and a dQ kernel (per 64 queries) run in turn. Short
// kernels (kernels == kShort, where they cover N and D): one launch each way, one CTA per head.
cudaError_t attention_fwd_cuda(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_bwd_cuda(const AttentionParams& p, cudaStream_t stream);

// Per head dim D of head_dims.h, attention_fwd_hdim<D> and attention_bwd_hdim<D> (one .cu file
// each, so they compile in parallel).
#define MAE_FAST_DECLARE_HDIM(DIR, D) \
  cudaError_t attention_##DIR##_hdim##D(const AttentionParams& p, cudaStream_t stream);
MAE_FAST_FOR_EACH_HEAD_DIM(MAE_FAST_DECLARE_HDIM, fwd)
MAE_FAST_FOR_EACH_HEAD_DIM(MAE_FAST_DECLARE_HDIM, bwd)
#undef MAE_FAST_DECLARE_HDIM

// Backward preprocessing, delta = rowsum(dout * out); called by attention_bwd_hdim*.
cudaError_t attention_bwd_delta(const AttentionParams& p, cudaStream_t stream);

}  // namespace mae_fast
