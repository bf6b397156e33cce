// The forward kernel of the fused packed-QKV attention (building blocks in fragments.cuh).
#pragma once

#include "fragments.cuh"

namespace mae_fast {
namespace attn {

template <int D>
struct FwdConfig {
  static constexpr int kBlockN = 64;  // keys per shared-memory block
  static constexpr int kPitch = D + kPad;
  template <typename T>
  static constexpr int smem_bytes() {
    return (kBlockM + 4 * kBlockN) * kPitch * static_cast<int>(sizeof(T));  // Q + 2 stages of K, V
  }
};

// Forward: out[b, i, h*D:(h+1)*D] = softmax(scale * q_i K^T) V and lse[b, h, i].
// Grid: B * H * ceil(N / 64) CTAs of 128 threads; CTA = 64 queries of one (b, h).
// Moves per CTA: Q tile once, all of K and V (N x D each) once: ~ (64 + 2N) * D * 2 bytes read,
// 64 * D * 2 + 64 * 4 written. FLOPs: 4 * 64 * N * D (two matmuls).
// Register budget (D = 128): 32 Q-fragment + 64 O-accumulator + 32 score registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, MinCtas<D>::kFwd) attention_fwd_kernel(const AttentionParams p) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  using Cfg = FwdConfig<D>;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int P = Cfg::kPitch;

  MAE_FAST_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + kBlockM * P;  // two stages of (K, V) tiles, 2 * kBlockN rows each

  const int N = p.N, H = p.H;
  const TileIndex ti = tile_index(N, H);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* gQ = static_cast<const T*>(p.qkv) + ti.b * p.qkv_stride_b + ti.h * p.qkv_stride_h;
  const T* gK = gQ + p.qkv_stride_3;
  const T* gV = gK + p.qkv_stride_3;

  load_tile_async<T, kBlockM, D>(sQ, gQ, p.qkv_stride_n, ti.row0, N);
  load_tile_async<T, kBlockN, D>(sKV, gK, p.qkv_stride_n, 0, N);
  load_tile_async<T, kBlockN, D>(sKV + kBlockN * P, gV, p.qkv_stride_n, 0, N);
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[D / 16][4];  // this warp's 16 query rows, reused for every key block
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) load_a(qf[kc], sQ, P, warp * 16, kc * 16, lane);

  float o[D / 8][4];
  zero_acc(o);
  // Rows g and g+8 of the warp's 16; running max in base-2 units of the scaled score, and
  // this thread's partial row sum (the quad's partial sums are added once at the end).
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  const float sl2 = p.scale * kLog2e;

  for (int n0 = 0, stage = 0; n0 < N; n0 += kBlockN, stage ^= 1) {
    const T* sK = sKV + stage * 2 * kBlockN * P;
    const T* sV = sK + kBlockN * P;
    if (n0 + kBlockN < N) {  // prefetch the next K/V block into the other stage
      T* next = sKV + (stage ^ 1) * 2 * kBlockN * P;
      load_tile_async<T, kBlockN, D>(next, gK, p.qkv_stride_n, n0 + kBlockN, N);
      load_tile_async<T, kBlockN, D>(next + kBlockN * P, gV, p.qkv_stride_n, n0 + kBlockN, N);
    }

    float s[kBlockN / 8][4];
    zero_acc(s);
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        uint32_t b0, b1;
        load_b_rows(b0, b1, sK, P, nt * 8, kc * 16, lane);
        mma16816<T>(s[nt], qf[kc], b0, b1);
      }
    }

    // Keys >= N get -inf; the block's first key (n0 < N) is always valid, so the max is finite.
    online_softmax_update(s, o, m_run, l_run, n0, N, /*mask=*/true, sl2, lane);
    mma_acc_b<T>(o, s, sV, P, lane);  // O += P V, with P taken straight from the score registers
    cp_async_wait_all();  // this thread's part of the next block has landed
    __syncthreads();      // all of it has, and every warp is done with this stage
  }

  // Epilogue: normalise, store rows < N, and the natural-log logsumexp for the backward.
  const int row[2] = {ti.row0 + warp * 16 + lane / 4, ti.row0 + warp * 16 + lane / 4 + 8};
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = 1.f / l;
    if (lane % 4 == 0 && row[r] < N)
      p.lse[(static_cast<int64_t>(ti.b) * H + ti.h) * N + row[r]] = m_run[r] * kLn2 + logf(l);
  }
  T* gO = static_cast<T*>(p.out) + ti.b * p.out_stride_b + static_cast<int64_t>(ti.h) * D;
  store_acc_rows(gO, p.out_stride_n, ti.row0 + warp * 16, N, o, inv[0], inv[1], lane);
}

}  // namespace attn
}  // namespace mae_fast
