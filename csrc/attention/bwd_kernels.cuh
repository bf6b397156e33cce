// The backward kernels of the fused packed-QKV attention (building blocks in fragments.cuh).
//
// Backward: P is recomputed from lse; every output row is owned by one CTA (no atomics, so
// dqkv is bit-deterministic). N <= 64 with D <= 64 (the ViT-B/L encoders) runs one kernel per
// head; otherwise delta, dK/dV (per 64 keys) and dQ (per 64 queries) kernels run in turn.
#pragma once

#include "fragments.cuh"

namespace mae_fast {
namespace attn {

// With P = softmax(scale * Q K^T): dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
// delta_i = rowsum(dO_i * O_i), dQ = scale * dS K, dK = scale * dS^T Q.

template <int D>
struct BwdConfig {
  // The second dimension of the score tile: queries per block in dK/dV, keys per block in dQ.
  // 32 for the large head dims keeps the D-wide fp32 accumulators plus the score and dP tiles
  // under the register limit without spills.
  static constexpr int kBlockN = D <= 64 ? 64 : 32;
  static constexpr int kPitch = D + kPad;
  template <typename T>
  static constexpr int dkdv_smem_bytes() {
    // K, V + 2 stages of (Q, dO) tiles and of (lse, delta)
    return (2 * kBlockM + 4 * kBlockN) * kPitch * static_cast<int>(sizeof(T)) + 4 * kBlockN * 4;
  }
  template <typename T>
  static constexpr int dq_smem_bytes() {
    return (2 * kBlockM + 4 * kBlockN) * kPitch * static_cast<int>(sizeof(T));  // Q, dO + 2 stages of K, V
  }
  static_assert(kBlockN <= kThreads, "one thread per query for the lse/delta prefetch");
};

// delta[b, h, i] = sum_d dout[b, i, h*D + d] * out[b, i, h*D + d] in fp32.
// One warp per (b, i, h) row: B*N*H rows, reads 2 * D * 2 bytes and writes 4 bytes per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionParams p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.N * p.H;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int h = static_cast<int>(r % p.H);
  const int i = static_cast<int>((r / p.H) % p.N);
  const int64_t b = r / (static_cast<int64_t>(p.H) * p.N);
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride_b + i * p.out_stride_n + static_cast<int64_t>(h) * p.D;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + i * p.dout_stride_n + static_cast<int64_t>(h) * p.D;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc += to_float(o[d]) * to_float(dout[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[(b * p.H + h) * p.N + i] = acc;
}

// dK and dV for 64 keys of one (b, h); each warp owns 16 keys and loops over all queries in
// blocks of kBlockN. Grid: B * H * ceil(N / 64) CTAs of 128 threads.
// Moves per CTA: K, V tiles once; Q, dO (N x D each), lse and delta once: ~(128 + 2N) * D * 2
// bytes read, 2 * 64 * D * 2 written. FLOPs: 8 * 64 * N * D (S^T, dP^T, dV, dK).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, MinCtas<D>::kDkdv) attention_bwd_dkdv_kernel(const AttentionParams p) {
  using Cfg = BwdConfig<D>;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int P = Cfg::kPitch;

  MAE_FAST_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockM * P;
  T* sQdO = sV + kBlockM * P;  // two stages of (Q, dO) tiles, 2 * kBlockN rows each
  float* sLD = reinterpret_cast<float*>(sQdO + 4 * kBlockN * P);  // two stages of (lse, delta)

  const int N = p.N, H = p.H;
  const TileIndex ti = tile_index(N, H);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* gQ = static_cast<const T*>(p.qkv) + ti.b * p.qkv_stride_b + ti.h * p.qkv_stride_h;
  const T* gK = gQ + p.qkv_stride_3;
  const T* gV = gK + p.qkv_stride_3;
  const T* gdO = static_cast<const T*>(p.dout) + ti.b * p.dout_stride_b + static_cast<int64_t>(ti.h) * D;
  const int64_t bh = static_cast<int64_t>(ti.b) * H + ti.h;
  const float* gLse = p.lse + bh * N;
  const float* gDelta = p.delta + bh * N;

  load_tile_async<T, kBlockM, D>(sK, gK, p.qkv_stride_n, ti.row0, N);
  load_tile_async<T, kBlockM, D>(sV, gV, p.qkv_stride_n, ti.row0, N);
  load_tile_async<T, kBlockN, D>(sQdO, gQ, p.qkv_stride_n, 0, N);
  load_tile_async<T, kBlockN, D>(sQdO + kBlockN * P, gdO, p.dout_stride_n, 0, N);
  if (threadIdx.x < kBlockN) {
    const bool valid = static_cast<int>(threadIdx.x) < N;
    // lse = +inf makes P exactly 0 in the padded query columns.
    sLD[threadIdx.x] = valid ? gLse[threadIdx.x] * kLog2e : INFINITY;
    sLD[kBlockN + threadIdx.x] = valid ? gDelta[threadIdx.x] : 0.f;
  }
  cp_async_wait_all();
  __syncthreads();

  float dk[D / 8][4], dv[D / 8][4];
  zero_acc(dk);
  zero_acc(dv);
  const float sl2 = p.scale * kLog2e;

  for (int q0 = 0, stage = 0; q0 < N; q0 += kBlockN, stage ^= 1) {
    const T* sQ = sQdO + stage * 2 * kBlockN * P;
    const T* sdO = sQ + kBlockN * P;
    const float* sLse = sLD + stage * 2 * kBlockN;
    const float* sDelta = sLse + kBlockN;
    // Prefetch the next query block into the other stage: tiles by cp.async, lse/delta into
    // registers now and into shared memory after this block's math.
    const bool has_next = q0 + kBlockN < N;
    float next_lse = INFINITY, next_delta = 0.f;
    if (has_next) {
      T* next = sQdO + (stage ^ 1) * 2 * kBlockN * P;
      load_tile_async<T, kBlockN, D>(next, gQ, p.qkv_stride_n, q0 + kBlockN, N);
      load_tile_async<T, kBlockN, D>(next + kBlockN * P, gdO, p.dout_stride_n, q0 + kBlockN, N);
      const int i = q0 + kBlockN + static_cast<int>(threadIdx.x);
      if (threadIdx.x < kBlockN && i < N) {
        next_lse = gLse[i] * kLog2e;
        next_delta = gDelta[i];
      }
    }

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x kBlockN queries per warp.
    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    zero_acc(s);
    zero_acc(dp);
    mma_abt<T, kBlockN / 8, D>(s, sK, sQ, P, warp * 16, lane);
    mma_abt<T, kBlockN / 8, D>(dp, sV, sdO, P, warp * 16, lane);
    // P^T from lse (columns are queries), then dS^T = P^T * (dP^T - delta).
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int q = nt * 8 + (lane % 4) * 2 + (j & 1);
        s[nt][j] = exp2f(s[nt][j] * sl2 - sLse[q]);
        dp[nt][j] = s[nt][j] * (dp[nt][j] - sDelta[q]);
      }
    }
    // dV += P^T dO and dK += dS^T Q (scale applied once at the end).
    mma_acc_b<T>(dv, s, sdO, P, lane);
    mma_acc_b<T>(dk, dp, sQ, P, lane);
    if (has_next && threadIdx.x < kBlockN) {
      float* next_ld = sLD + (stage ^ 1) * 2 * kBlockN;
      next_ld[threadIdx.x] = next_lse;
      next_ld[kBlockN + threadIdx.x] = next_delta;
    }
    cp_async_wait_all();
    __syncthreads();  // the next stage is complete and this one is free
  }

  // Store rows < N of dK (slot 1) and dV (slot 2) in the packed dqkv layout.
  T* gdK = static_cast<T*>(p.dqkv) + ti.b * p.dqkv_stride_b + p.dqkv_stride_3 + ti.h * p.dqkv_stride_h;
  store_acc_rows(gdK, p.dqkv_stride_n, ti.row0 + warp * 16, N, dk, p.scale, p.scale, lane);
  store_acc_rows(gdK + p.dqkv_stride_3, p.dqkv_stride_n, ti.row0 + warp * 16, N, dv, 1.f, 1.f, lane);
}

// dQ for 64 queries of one (b, h); each warp owns 16 queries and loops over all keys in
// blocks of kBlockN, recomputing P and dP. Grid: B * H * ceil(N / 64) CTAs of 128 threads.
// Moves per CTA: Q, dO tiles once; K, V (N x D each) once: ~(128 + 2N) * D * 2 bytes read,
// 64 * D * 2 written. FLOPs: 6 * 64 * N * D (S, dP, dQ).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, MinCtas<D>::kDq) attention_bwd_dq_kernel(const AttentionParams p) {
  using Cfg = BwdConfig<D>;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int P = Cfg::kPitch;

  MAE_FAST_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * P;
  T* sKV = sdO + kBlockM * P;  // two stages of (K, V) tiles, 2 * kBlockN rows each

  const int N = p.N, H = p.H;
  const TileIndex ti = tile_index(N, H);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* gQ = static_cast<const T*>(p.qkv) + ti.b * p.qkv_stride_b + ti.h * p.qkv_stride_h;
  const T* gK = gQ + p.qkv_stride_3;
  const T* gV = gK + p.qkv_stride_3;
  const T* gdO = static_cast<const T*>(p.dout) + ti.b * p.dout_stride_b + static_cast<int64_t>(ti.h) * D;
  const int64_t bh = static_cast<int64_t>(ti.b) * H + ti.h;

  load_tile_async<T, kBlockM, D>(sQ, gQ, p.qkv_stride_n, ti.row0, N);
  load_tile_async<T, kBlockM, D>(sdO, gdO, p.dout_stride_n, ti.row0, N);
  load_tile_async<T, kBlockN, D>(sKV, gK, p.qkv_stride_n, 0, N);
  load_tile_async<T, kBlockN, D>(sKV + kBlockN * P, gV, p.qkv_stride_n, 0, N);

  const int row[2] = {ti.row0 + warp * 16 + lane / 4, ti.row0 + warp * 16 + lane / 4 + 8};
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // Padded rows compute with lse = delta = 0 on zero inputs (finite) and are never stored.
    lse[r] = row[r] < N ? p.lse[bh * N + row[r]] * kLog2e : 0.f;
    delta[r] = row[r] < N ? p.delta[bh * N + row[r]] : 0.f;
  }

  float dq[D / 8][4];
  zero_acc(dq);
  const float sl2 = p.scale * kLog2e;

  cp_async_wait_all();
  __syncthreads();

  for (int n0 = 0, stage = 0; n0 < N; n0 += kBlockN, stage ^= 1) {
    const T* sK = sKV + stage * 2 * kBlockN * P;
    const T* sV = sK + kBlockN * P;
    if (n0 + kBlockN < N) {  // prefetch the next K/V block into the other stage
      T* next = sKV + (stage ^ 1) * 2 * kBlockN * P;
      load_tile_async<T, kBlockN, D>(next, gK, p.qkv_stride_n, n0 + kBlockN, N);
      load_tile_async<T, kBlockN, D>(next + kBlockN * P, gV, p.qkv_stride_n, n0 + kBlockN, N);
    }

    // S = Q K^T and dP = dO V^T: 16 queries x kBlockN keys per warp.
    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    zero_acc(s);
    zero_acc(dp);
    mma_abt<T, kBlockN / 8, D>(s, sQ, sK, P, warp * 16, lane);
    mma_abt<T, kBlockN / 8, D>(dp, sdO, sV, P, warp * 16, lane);
    // dS = P * (dP - delta), P = 0 for keys >= N.
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = n0 + nt * 8 + (lane % 4) * 2 + (j & 1);
        const float pr = key < N ? exp2f(s[nt][j] * sl2 - lse[j >> 1]) : 0.f;
        dp[nt][j] = pr * (dp[nt][j] - delta[j >> 1]);
      }
    }
    mma_acc_b<T>(dq, dp, sK, P, lane);  // dQ += dS K
    cp_async_wait_all();
    __syncthreads();  // the next stage is complete and this one is free
  }

  T* gdQ = static_cast<T*>(p.dqkv) + ti.b * p.dqkv_stride_b + ti.h * p.dqkv_stride_h;
  store_acc_rows(gdQ, p.dqkv_stride_n, ti.row0 + warp * 16, N, dq, p.scale, p.scale, lane);
}

// Whole-head backward for N <= 64 (MAE's ViT-B/L encoder, N = 50): one CTA holds a head's Q, K,
// V, dO and O on chip and computes delta, dK, dV and dQ in one pass, so neither the delta nor
// the dQ kernel (which re-reads Q, K, V, dO and recomputes S and dP) runs. Each warp owns 16
// keys for dK/dV; dS is exchanged through shared memory so that each warp then owns 16 queries
// for dQ = dS K, still without atomics. Grid: B * H CTAs of 128 threads.
// Moves per CTA: 4 * N * D * 2 bytes of q, k, v, dO plus N * D * 2 of O read, 3 * N * D * 2
// written. FLOPs: 10 * 64 * 64 * D (S^T, dP^T, dV, dK, dQ on the padded 64 x 64 tile).
template <int D>
struct BwdSmallConfig {
  static constexpr int kPitch = D + kPad;
  static constexpr int kPitchS = kBlockM + kPad;  // dS tile, 64 keys wide
  template <typename T>
  static constexpr int smem_bytes() {
    return (5 * kPitch + kPitchS) * kBlockM * static_cast<int>(sizeof(T)) + 2 * kBlockM * 4;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, MinCtas<D>::kSmall) attention_bwd_small_kernel(const AttentionParams p) {
  using Cfg = BwdSmallConfig<D>;
  constexpr int P = Cfg::kPitch;
  constexpr int PS = Cfg::kPitchS;

  MAE_FAST_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * P;
  T* sV = sK + kBlockM * P;
  T* sdO = sV + kBlockM * P;
  T* sO = sdO + kBlockM * P;
  T* sdS = sO + kBlockM * P;  // dS[query][key]
  float* sLse = reinterpret_cast<float*>(sdS + kBlockM * PS);
  float* sDelta = sLse + kBlockM;

  const int N = p.N, H = p.H;  // N <= kBlockM
  const TileIndex ti = tile_index(N, H);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* gQ = static_cast<const T*>(p.qkv) + ti.b * p.qkv_stride_b + ti.h * p.qkv_stride_h;
  const T* gK = gQ + p.qkv_stride_3;
  const T* gV = gK + p.qkv_stride_3;
  const T* gdO = static_cast<const T*>(p.dout) + ti.b * p.dout_stride_b + static_cast<int64_t>(ti.h) * D;
  const T* gO = static_cast<const T*>(p.out) + ti.b * p.out_stride_b + static_cast<int64_t>(ti.h) * D;
  const int64_t bh = static_cast<int64_t>(ti.b) * H + ti.h;

  // All five tiles in flight at once.
  load_tile_async<T, kBlockM, D>(sQ, gQ, p.qkv_stride_n, 0, N);
  load_tile_async<T, kBlockM, D>(sK, gK, p.qkv_stride_n, 0, N);
  load_tile_async<T, kBlockM, D>(sV, gV, p.qkv_stride_n, 0, N);
  load_tile_async<T, kBlockM, D>(sdO, gdO, p.dout_stride_n, 0, N);
  load_tile_async<T, kBlockM, D>(sO, gO, p.out_stride_n, 0, N);
  cp_async_wait_all();
  __syncthreads();
  for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
    float acc = 0.f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) acc += to_float(sO[i * P + d]) * to_float(sdO[i * P + d]);
    const bool valid = i < N;
    sLse[i] = valid ? p.lse[bh * N + i] * kLog2e : INFINITY;  // +inf: P = 0 in padded columns
    sDelta[i] = valid ? acc : 0.f;
  }
  __syncthreads();

  // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries per warp.
  float s[kBlockM / 8][4], dp[kBlockM / 8][4];
  zero_acc(s);
  zero_acc(dp);
  mma_abt<T, kBlockM / 8, D>(s, sK, sQ, P, warp * 16, lane);
  mma_abt<T, kBlockM / 8, D>(dp, sV, sdO, P, warp * 16, lane);
  // P^T, dS^T = P^T * (dP^T - delta); dS (keys >= N zeroed) also goes to shared memory for dQ.
#pragma unroll
  for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = nt * 8 + (lane % 4) * 2 + (j & 1);
      const int key = warp * 16 + lane / 4 + 8 * (j >> 1);
      s[nt][j] = exp2f(s[nt][j] * p.scale * kLog2e - sLse[q]);
      dp[nt][j] = key < N ? s[nt][j] * (dp[nt][j] - sDelta[q]) : 0.f;
      sdS[q * PS + key] = from_float<T>(dp[nt][j]);
    }
  }
  // dV = P^T dO, dK = dS^T Q.
  float dk[D / 8][4], dv[D / 8][4];
  zero_acc(dk);
  zero_acc(dv);
  mma_acc_b<T>(dv, s, sdO, P, lane);
  mma_acc_b<T>(dk, dp, sQ, P, lane);
  T* gdQ = static_cast<T*>(p.dqkv) + ti.b * p.dqkv_stride_b + ti.h * p.dqkv_stride_h;
  T* gdK = gdQ + p.dqkv_stride_3;
  store_acc_rows(gdK, p.dqkv_stride_n, warp * 16, N, dk, p.scale, p.scale, lane);
  store_acc_rows(gdK + p.dqkv_stride_3, p.dqkv_stride_n, warp * 16, N, dv, 1.f, 1.f, lane);

  __syncthreads();  // all of dS is in shared memory
  // dQ = dS K: now each warp owns 16 queries.
  float dq[D / 8][4];
  zero_acc(dq);
#pragma unroll
  for (int kc = 0; kc < kBlockM / 16; ++kc) {
    uint32_t a[4];
    load_a(a, sdS, PS, warp * 16, kc * 16, lane);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      uint32_t b0, b1;
      load_b_cols(b0, b1, sK, P, kc * 16, dt * 8, lane);
      mma16816<T>(dq[dt], a, b0, b1);
    }
  }
  store_acc_rows(gdQ, p.dqkv_stride_n, warp * 16, N, dq, p.scale, p.scale, lane);
}

}  // namespace attn
}  // namespace mae_fast
