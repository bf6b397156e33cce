// The C++ CPU twin of the fused attention op, and the input checks shared with the CUDA path.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace mae_fast {

struct QkvDims {
  int64_t B, N, H, D;
};

// Checks qkv is (B, N, 3, H, D), floating, innermost stride 1 (and, for CUDA, fp16/bf16 and a
// supported head dim). Errors name the op and the argument.
QkvDims check_qkv(const at::Tensor& qkv, const char* op);
// Checks dout/out (B, N, H*D) and lse (B, H, N) fp32 against qkv's dims, dtype and device.
void check_bwd_args(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                    const QkvDims& d);

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv);
at::Tensor attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                             const at::Tensor& lse);

}  // namespace mae_fast
