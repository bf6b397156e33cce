// Dispatch by head dim, and the backward preprocessing kernel (shared by every head dim).
#include "launch.cuh"

namespace mae_fast {

cudaError_t attention_bwd_delta(const AttentionParams& p, cudaStream_t stream) {
  return p.dtype == AttnDtype::kBFloat16 ? attn::run_delta<__nv_bfloat16>(p, stream)
                                         : attn::run_delta<__half>(p, stream);
}

// One case per head dim of head_dims.h: attention_<DIR>_hdim<D>.
#define MAE_FAST_HDIM_CASE(DIR, D) \
  case D:                          \
    return attention_##DIR##_hdim##D(p, stream);

cudaError_t attention_fwd_cuda(const AttentionParams& p, cudaStream_t stream) {
  switch (p.D) {
    MAE_FAST_FOR_EACH_HEAD_DIM(MAE_FAST_HDIM_CASE, fwd)
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_bwd_cuda(const AttentionParams& p, cudaStream_t stream) {
  switch (p.D) {
    MAE_FAST_FOR_EACH_HEAD_DIM(MAE_FAST_HDIM_CASE, bwd)
    default: return cudaErrorInvalidValue;
  }
}

#undef MAE_FAST_HDIM_CASE

}  // namespace mae_fast
