// Fused packed-QKV attention for short sequences: forward and deterministic backward.
//
// Shapes (see attention_params.h): qkv (B, N, 3, H, D) in fp16/bf16 with innermost stride 1,
// out (B, N, H*D), lse/delta (B, H, N) fp32. Scale p.scale, no mask, no dropout.
//
// Tiling. A CTA is 4 warps; each warp owns 16 rows of a 64-row tile and computes with
// tensor-core mma.sync.m16n8k16 (fp16/bf16 inputs, fp32 accumulators). Softmax is fp32 and
// online (running max and sum), computed in base 2 with the scale folded into one multiply.
// The other operand (keys, or queries in dK/dV) streams through shared memory in blocks, two
// stages deep: cp.async fetches block j+1 while block j is multiplied. For MAE's N <= 257 that is
// at most 5 blocks.
//
// Fragment layouts of mma.m16n8k16 (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, k x n):      b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8, fp32):       c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// so the C fragments of two adjacent 8-column tiles, rounded to 16 bits, are exactly the A
// fragment of one 16-wide k-chunk: scores never leave registers between the two matmuls.
//
// Backward: P is recomputed from lse; every output row is owned by one CTA (no atomics, so
// dqkv is bit-deterministic). N <= 64 with D <= 64 (the ViT-B/L encoders) runs one kernel per
// head; otherwise delta, dK/dV (per 64 keys) and dQ (per 64 queries) kernels run in turn.
//
// Shared-memory tiles have a row pitch of D + 8 elements: (D + 8) / 2 words per row puts the
// 8 rows touched by one fragment load in distinct banks for every supported D (32, 64, 80,
// 128), and keeps rows 16-byte aligned for vector stores and ldmatrix.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_params.h"

#ifdef MAE_FAST_EMULATE
// Tests only (tests/cuda_emulator/): runs these kernels, unchanged, on CPU threads with the
// documented semantics of mma.sync, ldmatrix and shuffles, to check index math without a GPU.
#include "cuda_emulator.h"
#else
#include <cuda_runtime.h>
#define MAE_FAST_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace mae_fast {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 64;  // rows owned by one CTA: queries (fwd, dQ) or keys (dK/dV)
constexpr int kPad = 8;      // shared-memory row padding, in elements
// Minimum resident CTAs per SM for __launch_bounds__, i.e. a register cap of 65536 / (128 * n):
// enough CTAs to hide memory latency in these short, memory-bound kernels, yet room for the
// fp32 accumulators and score tiles without spills (tests/test_cuda_kernels_compile.py checks).
template <int D>
struct MinCtas {
  static constexpr int kFwd = D <= 32 ? 4 : D <= 80 ? 3 : 2;
  static constexpr int kDkdv = D <= 32 ? 3 : 2;
  static constexpr int kDq = D <= 32 ? 4 : 3;
  static constexpr int kSmall = D <= 32 ? 4 : 2;
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Small device helpers.

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo: the lower column index
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// c += a * b on tensor cores, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MAE_FAST_EMULATE
  emu::mma16816<__half>(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#ifdef MAE_FAST_EMULATE
  emu::mma16816<__nv_bfloat16>(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t lds32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment of rows [r0, r0+16) x cols [c0, c0+16) of a row-major shared tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int pitch, int r0, int c0, int lane) {
  const T* p = s + (r0 + lane / 4) * pitch + c0 + (lane % 4) * 2;
  a[0] = lds32(p);
  a[1] = lds32(p + 8 * pitch);
  a[2] = lds32(p + 8);
  a[3] = lds32(p + 8 * pitch + 8);
}

// B fragment with B[k][n] = tile[n0 + n][k0 + k]: the operand is a block of tile rows used as
// columns (K in Q K^T, Q in K Q^T, ...). Two adjacent k share a 32-bit word of one row.
template <typename T>
__device__ __forceinline__ void load_b_rows(uint32_t& b0, uint32_t& b1, const T* s, int pitch, int n0, int k0,
                                            int lane) {
  const T* p = s + (n0 + lane / 4) * pitch + k0 + (lane % 4) * 2;
  b0 = lds32(p);
  b1 = lds32(p + 8);
}

// B fragment with B[k][n] = tile[k0 + k][n0 + n] (V in P V, dO in P^T dO, K in dS K, Q in
// dS^T Q): adjacent k live in different rows, so ldmatrix.trans does the transpose. Lanes 0-7
// address rows k0..k0+7 (-> b0), lanes 8-15 rows k0+8..k0+15 (-> b1); lanes 16-31 are ignored
// by .x2 but given valid addresses.
template <typename T>
__device__ __forceinline__ void load_b_cols(uint32_t& b0, uint32_t& b1, const T* s, int pitch, int k0, int n0,
                                            int lane) {
  const T* p = s + (k0 + (lane & 15)) * pitch + n0;
#ifdef MAE_FAST_EMULATE
  emu::ldmatrix_x2_trans(b0, b1, p);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
#endif
}

// 16-byte global -> shared copy that runs in the background (cp.async, sm_80+) until
// cp_async_wait_all(); valid = false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef MAE_FAST_EMULATE
  emu::cp_async16(smem, gmem, valid);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}

// Waits for this thread's cp.async copies; a __syncthreads() must follow before other threads
// read them.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef MAE_FAST_EMULATE
  emu::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Start copying rows [row0, row0 + ROWS) of an (N, D) global slice (row stride `stride`
// elements, innermost stride 1) into a shared tile of pitch D + kPad; rows >= N are zero-filled
// so that padded rows contribute exact zeros to every product. 16-byte vectors: the binding
// guarantees 16-byte aligned bases and row strides that are multiples of 8 elements.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t stride, int row0, int N) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int i = threadIdx.x; i < kChunks; i += kThreads) {
    const int r = i / kChunksPerRow;
    const int c = (i % kChunksPerRow) * 8;
    const bool valid = row0 + r < N;
    // An invalid row still passes an address inside the slice (row 0 exists: N >= 1).
    cp_async16(s + r * (D + kPad) + c, g + (valid ? static_cast<int64_t>(row0 + r) * stride + c : 0), valid);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// A warp's 16 x (NT * 8) tile of fp32 accumulators in the mma16816 C layout: thread (lane) holds
// rows lane / 4 (elements 0, 1) and lane / 4 + 8 (elements 2, 3), columns 8 * nt + (lane % 4) * 2 + {0, 1}.
template <int NT>
__device__ __forceinline__ void zero_acc(float (&c)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
}

// c += A B^T over K columns: A is rows r0..r0+15 of sA, B rows 0..NT*8-1 of sB, both row-major in
// shared memory with the same pitch.
template <typename T, int NT, int K>
__device__ __forceinline__ void mma_abt(float (&c)[NT][4], const T* sA, const T* sB, int pitch, int r0, int lane) {
#pragma unroll
  for (int kc = 0; kc < K / 16; ++kc) {
    uint32_t a[4];
    load_a(a, sA, pitch, r0, kc * 16, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      load_b_rows(b0, b1, sB, pitch, nt * 8, kc * 16, lane);
      mma16816<T>(c[nt], a, b0, b1);
    }
  }
}

// c += A B where A is the warp's accumulator tile `acc` (16 x NTA*8, rounded to T: the C layout
// of one mma is the A layout of the next) and B is rows 0..NTA*8-1 of sB (row-major, ND*8 wide).
template <typename T, int NTA, int ND>
__device__ __forceinline__ void mma_acc_b(float (&c)[ND][4], const float (&acc)[NTA][4], const T* sB, int pitch,
                                          int lane) {
#pragma unroll
  for (int kc = 0; kc < NTA / 2; ++kc) {
    const uint32_t a[4] = {pack2<T>(acc[2 * kc][0], acc[2 * kc][1]), pack2<T>(acc[2 * kc][2], acc[2 * kc][3]),
                           pack2<T>(acc[2 * kc + 1][0], acc[2 * kc + 1][1]),
                           pack2<T>(acc[2 * kc + 1][2], acc[2 * kc + 1][3])};
#pragma unroll
    for (int dt = 0; dt < ND; ++dt) {
      uint32_t b0, b1;
      load_b_cols(b0, b1, sB, pitch, kc * 16, dt * 8, lane);
      mma16816<T>(c[dt], a, b0, b1);
    }
  }
}

// Rows row0 + lane / 4 and row0 + lane / 4 + 8 of the warp's 16 x ND*8 accumulator tile, those < N,
// times scale0 / scale1, into row-major global rows of `stride` elements.
template <typename T, int ND>
__device__ __forceinline__ void store_acc_rows(T* g, int64_t stride, int row0, int N, const float (&c)[ND][4],
                                               float scale0, float scale1, int lane) {
  const float scale[2] = {scale0, scale1};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + lane / 4 + 8 * r;
    if (row >= N) continue;
    T* dst = g + row * stride + (lane % 4) * 2;
#pragma unroll
    for (int dt = 0; dt < ND; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(c[dt][2 * r] * scale[r], c[dt][2 * r + 1] * scale[r]);
  }
}

// CTA index -> (batch, head, 64-row block). Flattened into blockIdx.x (limit 2**31 - 1) so
// that B * H is not bound by gridDim.y/z's 65535.
struct TileIndex {
  int b, h, row0;
};

__device__ __forceinline__ TileIndex tile_index(int N, int H) {
  const int num_blocks = (N + kBlockM - 1) / kBlockM;
  const int blk = blockIdx.x % num_blocks;
  const int bh = blockIdx.x / num_blocks;
  return {bh / H, bh % H, blk * kBlockM};
}

// ---------------------------------------------------------------------------------------------
// Forward.

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
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = n0 + nt * 8 + (lane % 4) * 2 + (j & 1);
        const float v = key < N ? s[nt][j] * sl2 : -INFINITY;
        s[nt][j] = v;
        mx[j >> 1] = fmaxf(mx[j >> 1], v);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      alpha[r] = exp2f(m_run[r] - mx[r]);  // 0 on the first block (m_run = -inf)
      m_run[r] = mx[r];
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[nt][j] = exp2f(s[nt][j] - m_run[j >> 1]);
        l_run[j >> 1] += s[nt][j];
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

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

// ---------------------------------------------------------------------------------------------
// Backward. With P = softmax(scale * Q K^T), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
// delta_i = rowsum(dO_i * O_i), dQ = scale * dS K, dK = scale * dS^T Q. P is recomputed from
// lse. Two kernels, each owning its output rows, so no atomics: dqkv is bit-deterministic.

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

// ---------------------------------------------------------------------------------------------
// Launchers.

inline int64_t num_ctas(const AttentionParams& p) {
  return static_cast<int64_t>(p.B) * p.H * ((p.N + kBlockM - 1) / kBlockM);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t ctas, int smem, const AttentionParams& p, cudaStream_t stream) {
  if (ctas > 0x7fffffff) return cudaErrorInvalidConfiguration;  // the binding checks this too
#ifdef MAE_FAST_EMULATE
  return emu::launch(kernel, ctas, kThreads, smem, p);
#else
  // Above 48 KiB dynamic shared memory must be opted into per kernel (cheap host call).
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(ctas), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
#endif
}

template <typename T>
cudaError_t run_delta(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.N * p.H;
  return launch(attention_bwd_delta_kernel<T>, (rows + kWarps - 1) / kWarps, 0, p, stream);
}

template <typename T, int D>
cudaError_t run_fwd(const AttentionParams& p, cudaStream_t stream) {
  return launch(attention_fwd_kernel<T, D>, num_ctas(p), FwdConfig<D>::template smem_bytes<T>(), p, stream);
}

template <typename T, int D>
cudaError_t run_bwd(const AttentionParams& p, cudaStream_t stream) {
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
  cudaError_t attention_fwd_hdim##D(const AttentionParams& p, cudaStream_t stream) {           \
    return p.dtype == AttnDtype::kBFloat16 ? attn::run_fwd<__nv_bfloat16, D>(p, stream)        \
                                           : attn::run_fwd<__half, D>(p, stream);              \
  }                                                                                            \
  cudaError_t attention_bwd_hdim##D(const AttentionParams& p, cudaStream_t stream) {           \
    return p.dtype == AttnDtype::kBFloat16 ? attn::run_bwd<__nv_bfloat16, D>(p, stream)        \
                                           : attn::run_bwd<__half, D>(p, stream);              \
  }                                                                                            \
  }
