// Launchers of the fused packed-QKV attention kernels, and the macro that defines the entry
// points of one head dim (each attention_hdim<D>.cu expands it once).
#pragma once

#include "bwd_kernels.cuh"
#include "fwd_kernel.cuh"
#include "short_kernels.cuh"

namespace mae_fast {
namespace attn {

inline int64_t num_ctas(const AttentionParams& p) {
  return static_cast<int64_t>(p.B) * p.H * ((p.N + kBlockM - 1) / kBlockM);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t ctas, int threads, int smem, const AttentionParams& p,
                   cudaStream_t stream) {
  if (ctas > 0x7fffffff) return cudaErrorInvalidConfiguration;  // the binding checks this too
#ifdef MAE_FAST_EMULATE
  return emu::launch(kernel, ctas, threads, smem, p);
#else
  // Above 48 KiB dynamic shared memory must be opted into per kernel (cheap host call).
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(ctas), threads, smem, stream>>>(p);
  return cudaGetLastError();
#endif
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t ctas, int smem, const AttentionParams& p, cudaStream_t stream) {
  return launch(kernel, ctas, kThreads, smem, p, stream);
}

// The short kernels: one CTA of 32 * roundup(N, 16) / 16 threads per (b, h); the instantiation
// with the fewest warps that holds N.
inline bool use_short(const AttentionParams& p, int max_n) {
  return p.kernels == AttnKernels::kShort && p.N <= max_n;
}

template <typename T, int D>
cudaError_t run_fwd_short(const AttentionParams& p, cudaStream_t stream) {
  const int64_t ctas = static_cast<int64_t>(p.B) * p.H;
  const int threads = 2 * short_rows(p.N), smem = ShortConfig<D>::template fwd_smem_bytes<T>(p.N);
  if constexpr (ShortConfig<D>::kFwdMaxN > kShortWarpsSmall * 16) {
    if (p.N > kShortWarpsSmall * 16)
      return launch(attention_fwd_short_kernel<T, D, kShortWarpsLarge>, ctas, threads, smem, p, stream);
  }
  return launch(attention_fwd_short_kernel<T, D, kShortWarpsSmall>, ctas, threads, smem, p, stream);
}

template <typename T, int D>
cudaError_t run_bwd_short(const AttentionParams& p, cudaStream_t stream) {
  const int64_t ctas = static_cast<int64_t>(p.B) * p.H;
  const int threads = 2 * short_rows(p.N), smem = ShortConfig<D>::template bwd_smem_bytes<T>(p.N);
  if constexpr (ShortConfig<D>::kBwdMaxN > kShortWarpsSmall * 16) {
    if (p.N > kShortWarpsSmall * 16)
      return launch(attention_bwd_short_kernel<T, D, kShortWarpsLarge>, ctas, threads, smem, p, stream);
  }
  return launch(attention_bwd_short_kernel<T, D, kShortWarpsSmall>, ctas, threads, smem, p, stream);
}

template <typename T>
cudaError_t run_delta(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.N * p.H;
  return launch(attention_bwd_delta_kernel<T>, (rows + kWarps - 1) / kWarps, 0, p, stream);
}

template <typename T, int D>
cudaError_t run_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (use_short(p, ShortConfig<D>::kFwdMaxN)) return run_fwd_short<T, D>(p, stream);
  return launch(attention_fwd_kernel<T, D>, num_ctas(p), FwdConfig<D>::template smem_bytes<T>(), p, stream);
}

template <typename T, int D>
cudaError_t run_bwd(const AttentionParams& p, cudaStream_t stream) {
  if (use_short(p, ShortConfig<D>::kBwdMaxN)) return run_bwd_short<T, D>(p, stream);
  // The one-CTA-per-head path holds five 64 x D tiles; it fits registers and shared memory
  // without spills for D <= 64, which covers the N <= 64 encoders (ViT-B/L).
  if constexpr (D <= 64) {
    if (p.N <= kBlockM)
      return launch(attention_bwd_small_kernel<T, D>, num_ctas(p), BwdSmallConfig<D>::template smem_bytes<T>(), p, stream);
  }
  cudaError_t err = attention_bwd_delta(p, stream);
  if (err != cudaSuccess) return err;
  err = launch(attention_bwd_dkdv_kernel<T, D>, num_ctas(p), BwdConfig<D>::template dkdv_smem_bytes<T>(), p, stream);
  if (err != cudaSuccess) return err;
  return launch(attention_bwd_dq_kernel<T, D>, num_ctas(p), BwdConfig<D>::template dq_smem_bytes<T>(), p, stream);
}

}  // namespace attn
}  // namespace mae_fast

// Defines the fwd/bwd entry points of one head dim for both dtypes.
#define MAE_FAST_ATTENTION_HDIM(D)                                                             \
  namespace mae_fast {                                                                         \
  static_assert(is_supported_head_dim(D), "add the head dim to head_dims.h");                  \
  cudaError_t attention_fwd_hdim##D(const AttentionParams& p, cudaStream_t stream) {           \
    return p.dtype == AttnDtype::kBFloat16 ? attn::run_fwd<__nv_bfloat16, D>(p, stream)        \
                                           : attn::run_fwd<__half, D>(p, stream);              \
  }                                                                                            \
  cudaError_t attention_bwd_hdim##D(const AttentionParams& p, cudaStream_t stream) {           \
    return p.dtype == AttnDtype::kBFloat16 ? attn::run_bwd<__nv_bfloat16, D>(p, stream)        \
                                           : attn::run_bwd<__half, D>(p, stream);              \
  }                                                                                            \
  }
