// The head dims with compiled CUDA kernels: the one list that the binding's input check, the
// launcher declarations (attention_params.h) and the dispatch (attention_api.cu) expand. Each
// entry D has its own attention_hdim<D>.cu; tests/test_csrc_layout.py checks that, and that
// mae_fast.ops.attention's CUDA_HEAD_DIMS is the same list. No CUDA or torch header: the
// CPU-only build of the binding includes it too.
#pragma once

#include <cstdint>

// X(ARG, D) for every supported head dim D, in increasing order.
#define MAE_FAST_FOR_EACH_HEAD_DIM(X, ARG) X(ARG, 32) X(ARG, 64) X(ARG, 80) X(ARG, 128)

namespace mae_fast {

#define MAE_FAST_HEAD_DIM_VALUE(UNUSED, D) D,
inline constexpr int64_t kCudaHeadDims[] = {MAE_FAST_FOR_EACH_HEAD_DIM(MAE_FAST_HEAD_DIM_VALUE, )};
#undef MAE_FAST_HEAD_DIM_VALUE

constexpr bool is_supported_head_dim(int64_t d) {
  for (const int64_t x : kCudaHeadDims)
    if (x == d) return true;
  return false;
}

}  // namespace mae_fast
