// The C++ CPU twin of the fused attention op (the math only: the binding checks the inputs).
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace mae_fast {

// The dims of a checked qkv (B, N, 3, H, D).
struct QkvDims {
  int64_t B, N, H, D;
};

// Inputs as checked by attention_binding.cpp: qkv (B, N, 3, H, D) fp16/bf16/fp32 with innermost
// stride 1; dout and out (B, N, H*D) in qkv's dtype and lse (B, H, N) fp32, on qkv's device.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv, const QkvDims& d);
at::Tensor attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                             const at::Tensor& lse, const QkvDims& d);

}  // namespace mae_fast
