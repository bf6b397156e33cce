// Dispatch by head dim, and the backward preprocessing kernel (shared by every head dim).
#include "attention_kernels.cuh"

namespace mae_fast {

cudaError_t attention_bwd_delta(const AttentionParams& p, cudaStream_t stream) {
  return p.dtype == AttnDtype::kBFloat16 ? attn::run_delta<__nv_bfloat16>(p, stream)
                                         : attn::run_delta<__half>(p, stream);
}

cudaError_t attention_fwd_cuda(const AttentionParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 32: return attention_fwd_hdim32(p, stream);
    case 64: return attention_fwd_hdim64(p, stream);
    case 80: return attention_fwd_hdim80(p, stream);
    case 128: return attention_fwd_hdim128(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_bwd_cuda(const AttentionParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 32: return attention_bwd_hdim32(p, stream);
    case 64: return attention_bwd_hdim64(p, stream);
    case 80: return attention_bwd_hdim80(p, stream);
    case 128: return attention_bwd_hdim128(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mae_fast
