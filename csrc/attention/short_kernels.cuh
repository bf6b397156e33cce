// Short-sequence kernels of the fused packed-QKV attention (N <= kShortMaxN = 272; MAE's 50, 65,
// 197 and 257 tokens), built from the helpers of fragments.cuh.
//
// One CTA per (batch, head) with one warp per 16 rows: ceil(N / 16) warps, so N = 65 runs 5 warps
// with 15 padded rows (the tiled kernels run two 64-row CTAs, the second with one valid row), and
// the whole head's K and V (forward) or Q, K, V and dO (backward) sit in shared memory, loaded
// once by cp.async (rows N..R-1, R = roundup(N, 16), zero-filled: padded keys and queries give
// exact zeros in every product). Scores never leave registers between the two matmuls (C layout
// of one mma = A layout of the next, see fragments.cuh).
//
// Forward: each warp runs the online softmax of the tiled forward over the resident keys, in
// steps of kStepFwd keys and a tail of 16-key steps (N = 197: 3 x 64 + 16 keys, not 4 x 64).
// Backward, one launch, no delta kernel and no separate dQ kernel: delta = rowsum(dO * O) is
// computed in the CTA while the tiles land; then each warp owns 16 keys and loops over all
// queries (dV = P^T dO, dK = dS^T Q, P recomputed from the saved lse); then each warp owns 16
// queries for dQ = dS K, either from dS^T that the first phase left in shared memory (when the
// R x R tile fits, kShortDsSmemLimit) or by recomputing S and dP against the resident K and V.
// Every output row is written by exactly one warp in a fixed order: deterministic, no atomics.
//
// Two instantiations per (dtype, D) of each kernel, by the most warps a CTA may have (the register
// cap of __launch_bounds__ follows from it): kShortWarpsSmall (N <= 80, the encoders) and
// kShortWarpsLarge (N <= 272, the decoders). ShortConfig<D>::kBwdMaxN says which N the backward
// covers at each D (its fp32 dK and dV accumulators do not fit 17 warps' registers at D >= 64).
#pragma once

#include <type_traits>

#include "fragments.cuh"

namespace mae_fast {
namespace attn {

constexpr int kShortWarpsSmall = 5;
constexpr int kShortWarpsLarge = 17;
constexpr int kShortMaxN = kShortWarpsLarge * 16;
// The backward keeps dS^T (R x (R + 8) elements) in shared memory for dQ only when the whole
// CTA's shared memory stays within this, so that two CTAs still fit an H100/H200 SM (228 KiB;
// an A100's 164 KiB holds one); beyond it dQ recomputes S and dP from the resident tiles.
constexpr int kShortDsSmemLimit = 112 * 1024;

__host__ __device__ __forceinline__ int short_rows(int N) { return (N + 15) / 16 * 16; }

template <int D>
struct ShortConfig {
  static constexpr int kPitch = D + kPad;
  // Keys per online-softmax step (forward) and queries per step (backward, first phase): wide
  // steps amortise the rescale; narrower ones keep the fp32 tiles within the register cap.
  static constexpr int kStepFwd = D <= 32 ? 64 : 32;
  static constexpr int kStepBwd = 16;
  // Q fragments kept in registers for the whole key loop, except where the 17-warp register cap
  // (96) does not hold them (sm_80 spilled at D = 80): there they are reloaded from shared memory.
  template <int MAXW>
  __host__ __device__ static constexpr bool cache_q() {
    return D <= 64 || (D <= 80 && MAXW == kShortWarpsSmall);
  }
  // Largest N each direction takes (and so which instantiations exist): 17 warps leave 96
  // registers a thread (an SM sub-partition's 16384 over 5 warps), too few for D = 128's forward
  // and for the backward's dK and dV accumulators at D >= 64.
  static constexpr int kFwdMaxN = D <= 80 ? kShortWarpsLarge * 16 : kShortWarpsSmall * 16;
  static constexpr int kBwdMaxN = D <= 32 ? kShortWarpsLarge * 16 : kShortWarpsSmall * 16;
  // Minimum resident CTAs of the kShortWarpsSmall instantiations (register cap 65536 / (160 n)).
  static constexpr int kFwdMinCtasSmall = D <= 64 ? 4 : 3;
  static constexpr int kBwdMinCtasSmall = D <= 32 ? 4 : D <= 64 ? 3 : D <= 80 ? 2 : 1;

  template <typename T>
  __host__ __device__ static int fwd_smem_bytes(int N) {
    return 3 * short_rows(N) * kPitch * static_cast<int>(sizeof(T));  // Q, K, V
  }
  __host__ __device__ static int ds_pitch(int N) { return short_rows(N) + kPad; }
  template <typename T>
  __host__ __device__ static int bwd_tiles_bytes(int N) {  // Q, K, V, dO + lse, delta
    return 4 * short_rows(N) * kPitch * static_cast<int>(sizeof(T)) + 2 * short_rows(N) * 4;
  }
  template <typename T>
  __host__ __device__ static bool bwd_stores_ds(int N) {
    return bwd_tiles_bytes<T>(N) + short_rows(N) * ds_pitch(N) * static_cast<int>(sizeof(T)) <= kShortDsSmemLimit;
  }
  template <typename T>
  __host__ __device__ static int bwd_smem_bytes(int N) {
    return bwd_tiles_bytes<T>(N) + (bwd_stores_ds<T>(N) ? short_rows(N) * ds_pitch(N) * static_cast<int>(sizeof(T)) : 0);
  }
};

// f(std::integral_constant<int, NT>{}, n0) for the steps that cover rows [0, R) (R a multiple of
// 16): steps of kStep rows (NT = kStep / 8 eight-column tiles), then of 16. Every step starts
// below N (R - N < 16).
template <int kStep, typename F>
__device__ __forceinline__ void for_each_step(int R, F&& f) {
  int n0 = 0;
#pragma unroll 1
  for (; n0 + kStep <= R; n0 += kStep) f(std::integral_constant<int, kStep / 8>{}, n0);
#pragma unroll 1
  for (; n0 < R; n0 += 16) f(std::integral_constant<int, 2>{}, n0);
}

// Start copying `rows` rows of an (N, D) global slice into a shared tile of pitch D + kPad with
// `nthreads` threads; rows >= N are zero-filled (see load_tile_async).
template <typename T, int D>
__device__ __forceinline__ void load_rows_async(T* s, const T* g, int64_t stride, int rows, int N, int nthreads) {
  constexpr int kChunksPerRow = D / 8;
  for (int i = threadIdx.x; i < rows * kChunksPerRow; i += nthreads) {
    const int r = i / kChunksPerRow;
    const int c = (i % kChunksPerRow) * 8;
    const bool valid = r < N;
    cp_async16(s + r * (D + kPad) + c, g + (valid ? static_cast<int64_t>(r) * stride + c : 0), valid);
  }
}

// One online-softmax step of a warp's 16 query rows over keys [n0, n0 + NT*8) of the resident
// K and V: s = Q K^T, running max / sum update, o = alpha * o + P V.
template <typename T, int D, int NT, bool kCacheQ, int NQF>
__device__ __forceinline__ void short_fwd_step(float (&o)[D / 8][4], float (&m_run)[2], float (&l_run)[2],
                                               const uint32_t (&qf)[NQF][4], const T* sQ, const T* sK,
                                               const T* sV, int n0, int N, float sl2, int r0, int lane) {
  constexpr int P = D + kPad;
  float s[NT][4];
  zero_acc(s);
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    uint32_t a[4];
    if constexpr (kCacheQ) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = qf[kc][i];
    } else {
      load_a(a, sQ, P, r0, kc * 16, lane);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      load_b_rows(b0, b1, sK, P, n0 + nt * 8, kc * 16, lane);
      mma16816<T>(s[nt], a, b0, b1);
    }
  }
  // Keys >= N get -inf (masking only in the step that reaches past N).
  online_softmax_update(s, o, m_run, l_run, n0, N, /*mask=*/n0 + NT * 8 > N, sl2, lane);
  mma_acc_b<T>(o, s, sV + n0 * P, P, lane);
}

// Forward for one (b, h): out rows and lse of all N queries. Grid: B * H CTAs of 32 * R / 16
// threads (R = roundup(N, 16) <= 16 * MAXW). Moves per CTA: q, k, v of the head once
// (3 * N * D * 2 bytes), N * D * 2 + N * 4 written. FLOPs: 4 * R * R * D (padded to 16).
template <typename T, int D, int MAXW>
__global__ void __launch_bounds__(MAXW * 32, MAXW == kShortWarpsSmall ? ShortConfig<D>::kFwdMinCtasSmall : 1)
    attention_fwd_short_kernel(const AttentionParams p) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  using Cfg = ShortConfig<D>;
  constexpr int P = Cfg::kPitch;
  constexpr bool kCacheQ = Cfg::template cache_q<MAXW>();
  constexpr int kStep = Cfg::kStepFwd;

  MAE_FAST_DYNAMIC_SMEM(smem_raw);
  const int N = p.N, H = p.H, R = short_rows(N), nthreads = 2 * R;
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + R * P;
  T* sV = sK + R * P;
  const int b = static_cast<int>(blockIdx.x) / H, h = static_cast<int>(blockIdx.x) % H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;

  const T* gQ = static_cast<const T*>(p.qkv) + b * p.qkv_stride_b + h * p.qkv_stride_h;
  const T* gK = gQ + p.qkv_stride_3;
  const T* gV = gK + p.qkv_stride_3;
  load_rows_async<T, D>(sQ, gQ, p.qkv_stride_n, R, N, nthreads);
  load_rows_async<T, D>(sK, gK, p.qkv_stride_n, R, N, nthreads);
  load_rows_async<T, D>(sV, gV, p.qkv_stride_n, R, N, nthreads);
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[kCacheQ ? D / 16 : 1][4];
  if constexpr (kCacheQ) {
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) load_a(qf[kc], sQ, P, r0, kc * 16, lane);
  }
  float o[D / 8][4];
  zero_acc(o);
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  const float sl2 = p.scale * kLog2e;
  for_each_step<kStep>(R, [&](auto nt, int n0) {
    short_fwd_step<T, D, decltype(nt)::value, kCacheQ>(o, m_run, l_run, qf, sQ, sK, sV, n0, N, sl2, r0, lane);
  });

  const int row[2] = {r0 + lane / 4, r0 + lane / 4 + 8};
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    inv[r] = 1.f / l;
    if (lane % 4 == 0 && row[r] < N) p.lse[(static_cast<int64_t>(b) * H + h) * N + row[r]] = m_run[r] * kLn2 + logf(l);
  }
  T* gO = static_cast<T*>(p.out) + b * p.out_stride_b + static_cast<int64_t>(h) * D;
  store_acc_rows(gO, p.out_stride_n, r0, N, o, inv[0], inv[1], lane);
}

// sum over 8 packed elements of a[i] * b[i], in fp32.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  T x[8], y[8];
  memcpy(x, &a, 16);
  memcpy(y, &b, 16);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc += to_float(x[i]) * to_float(y[i]);
  return acc;
}

// First backward phase, one step: a warp's 16 keys (rows r0.. of sK, sV) against queries
// [q0, q0 + NT*8): S^T = K Q^T, dP^T = V dO^T, P^T from lse, dS^T = P^T (dP^T - delta),
// dV += P^T dO, dK += dS^T Q; dS^T also to sdS[query][key] when dQ will read it.
template <typename T, int D, int NT>
__device__ __forceinline__ void short_dkdv_step(float (&dk)[D / 8][4], float (&dv)[D / 8][4], const T* sQ,
                                                const T* sK, const T* sV, const T* sdO, const float* sLse,
                                                const float* sDelta, T* sdS, int ps, bool store_ds, int q0, int N,
                                                float sl2, int r0, int lane) {
  constexpr int P = D + kPad;
  float s[NT][4], dp[NT][4];
  zero_acc(s);
  zero_acc(dp);
  mma_abt<T, NT, D>(s, sK, sQ + q0 * P, P, r0, lane);
  mma_abt<T, NT, D>(dp, sV, sdO + q0 * P, P, r0, lane);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = q0 + nt * 8 + (lane % 4) * 2 + (j & 1);
      const int key = r0 + lane / 4 + 8 * (j >> 1);
      s[nt][j] = exp2f(s[nt][j] * sl2 - sLse[q]);  // lse = +inf in padded queries: P = 0
      dp[nt][j] = key < N ? s[nt][j] * (dp[nt][j] - sDelta[q]) : 0.f;
      if (store_ds) sdS[q * ps + key] = from_float<T>(dp[nt][j]);
    }
  }
  mma_acc_b<T>(dv, s, sdO + q0 * P, P, lane);
  mma_acc_b<T>(dk, dp, sQ + q0 * P, P, lane);
}

// Second backward phase without a stored dS, one step: a warp's 16 queries against keys
// [n0, n0 + NT*8): S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
template <typename T, int D, int NT>
__device__ __forceinline__ void short_dq_step(float (&dq)[D / 8][4], const T* sQ, const T* sK, const T* sV,
                                              const T* sdO, const float (&lse)[2], const float (&delta)[2], int n0,
                                              int N, float sl2, int r0, int lane) {
  constexpr int P = D + kPad;
  float s[NT][4], dp[NT][4];
  zero_acc(s);
  zero_acc(dp);
  mma_abt<T, NT, D>(s, sQ, sK + n0 * P, P, r0, lane);
  mma_abt<T, NT, D>(dp, sdO, sV + n0 * P, P, r0, lane);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int key = n0 + nt * 8 + (lane % 4) * 2 + (j & 1);
      const float pr = key < N ? exp2f(s[nt][j] * sl2 - lse[j >> 1]) : 0.f;
      dp[nt][j] = pr * (dp[nt][j] - delta[j >> 1]);
    }
  }
  mma_acc_b<T>(dq, dp, sK + n0 * P, P, lane);
}

// Backward for one (b, h): dq, dk, dv of all N rows in one launch. Grid: B * H CTAs of
// 32 * R / 16 threads. Moves per CTA: q, k, v, dO and O of the head once (5 * N * D * 2 bytes) and
// lse, 3 * N * D * 2 written. FLOPs: 10 * R * R * D with dS kept in shared memory, 14 * R * R * D
// when dQ recomputes S and dP.
template <typename T, int D, int MAXW>
__global__ void __launch_bounds__(MAXW * 32, MAXW == kShortWarpsSmall ? ShortConfig<D>::kBwdMinCtasSmall : 1)
    attention_bwd_short_kernel(const AttentionParams p) {
  using Cfg = ShortConfig<D>;
  constexpr int P = Cfg::kPitch;
  constexpr int kStep = Cfg::kStepBwd;

  MAE_FAST_DYNAMIC_SMEM(smem_raw);
  const int N = p.N, H = p.H, R = short_rows(N), nthreads = 2 * R;
  const bool store_ds = Cfg::template bwd_stores_ds<T>(N);
  const int ps = Cfg::ds_pitch(N);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + R * P;
  T* sV = sK + R * P;
  T* sdO = sV + R * P;
  float* sLse = reinterpret_cast<float*>(sdO + R * P);  // lse * log2(e), +inf in padded rows
  float* sDelta = sLse + R;
  T* sdS = reinterpret_cast<T*>(sDelta + R);  // dS[query][key], only when store_ds
  const int b = static_cast<int>(blockIdx.x) / H, h = static_cast<int>(blockIdx.x) % H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;

  const T* gQ = static_cast<const T*>(p.qkv) + b * p.qkv_stride_b + h * p.qkv_stride_h;
  const T* gK = gQ + p.qkv_stride_3;
  const T* gV = gK + p.qkv_stride_3;
  const T* gdO = static_cast<const T*>(p.dout) + b * p.dout_stride_b + static_cast<int64_t>(h) * D;
  const T* gO = static_cast<const T*>(p.out) + b * p.out_stride_b + static_cast<int64_t>(h) * D;
  const int64_t bh = static_cast<int64_t>(b) * H + h;
  load_rows_async<T, D>(sQ, gQ, p.qkv_stride_n, R, N, nthreads);
  load_rows_async<T, D>(sK, gK, p.qkv_stride_n, R, N, nthreads);
  load_rows_async<T, D>(sV, gV, p.qkv_stride_n, R, N, nthreads);
  load_rows_async<T, D>(sdO, gdO, p.dout_stride_n, R, N, nthreads);
  // delta = rowsum(dO * O) while the tiles land: four threads per row, 16-byte loads of O and dO
  // (dO's second read hits L1/L2). Each warp's 8 rows per pass are all < R or all >= R.
  for (int r = threadIdx.x / 4; r < R; r += nthreads / 4) {
    float acc = 0.f;
    if (r < N) {
      const T* o = gO + static_cast<int64_t>(r) * p.out_stride_n;
      const T* d = gdO + static_cast<int64_t>(r) * p.dout_stride_n;
      for (int v = threadIdx.x % 4; v < D / 8; v += 4)
        acc += dot8<T>(*reinterpret_cast<const uint4*>(o + v * 8), *reinterpret_cast<const uint4*>(d + v * 8));
    }
    acc = quad_sum(acc);
    if (threadIdx.x % 4 == 0) {
      sLse[r] = r < N ? p.lse[bh * N + r] * kLog2e : INFINITY;
      sDelta[r] = r < N ? acc : 0.f;
    }
  }
  cp_async_wait_all();
  __syncthreads();

  const float sl2 = p.scale * kLog2e;
  {  // Phase 1: this warp's 16 keys against every query.
    float dk[D / 8][4], dv[D / 8][4];
    zero_acc(dk);
    zero_acc(dv);
    for_each_step<kStep>(R, [&](auto nt, int q0) {
      short_dkdv_step<T, D, decltype(nt)::value>(dk, dv, sQ, sK, sV, sdO, sLse, sDelta, sdS, ps, store_ds, q0, N,
                                                 sl2, r0, lane);
    });
    T* gdK = static_cast<T*>(p.dqkv) + b * p.dqkv_stride_b + p.dqkv_stride_3 + h * p.dqkv_stride_h;
    store_acc_rows(gdK, p.dqkv_stride_n, r0, N, dk, p.scale, p.scale, lane);
    store_acc_rows(gdK + p.dqkv_stride_3, p.dqkv_stride_n, r0, N, dv, 1.f, 1.f, lane);
  }
  __syncthreads();  // all of dS is in shared memory

  // Phase 2: this warp's 16 queries, dQ = dS K.
  float dq[D / 8][4];
  zero_acc(dq);
  if (store_ds) {
#pragma unroll 1
    for (int kc = 0; kc < R / 16; ++kc) {
      uint32_t a[4];
      load_a(a, sdS, ps, r0, kc * 16, lane);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t b0, b1;
        load_b_cols(b0, b1, sK, P, kc * 16, dt * 8, lane);
        mma16816<T>(dq[dt], a, b0, b1);
      }
    }
  } else {
    const int row[2] = {r0 + lane / 4, r0 + lane / 4 + 8};
    // Padded rows: lse = +inf gives P = 0 (finite products, never stored).
    const float lse[2] = {sLse[row[0]], sLse[row[1]]};
    const float delta[2] = {sDelta[row[0]], sDelta[row[1]]};
    for_each_step<kStep>(R, [&](auto nt, int n0) {
      short_dq_step<T, D, decltype(nt)::value>(dq, sQ, sK, sV, sdO, lse, delta, n0, N, sl2, r0, lane);
    });
  }
  T* gdQ = static_cast<T*>(p.dqkv) + b * p.dqkv_stride_b + h * p.dqkv_stride_h;
  store_acc_rows(gdQ, p.dqkv_stride_n, r0, N, dq, p.scale, p.scale, lane);
}

}  // namespace attn
}  // namespace mae_fast
