// Building blocks of the fused packed-QKV attention kernels: the CTA shape, the mma.sync /
// ldmatrix / cp.async / shuffle wrappers (emulated on CPU threads under MAE_FAST_EMULATE) and
// the warp-tile matmul and store helpers that fwd_kernel.cuh and bwd_kernels.cuh are made of.
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
// Shared-memory tiles have a row pitch of D + 8 elements: (D + 8) / 2 words per row puts the
// 8 rows touched by one fragment load in distinct banks for every head dim of head_dims.h,
// and keeps rows 16-byte aligned for vector stores and ldmatrix.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_params.h"

#ifdef MAE_FAST_EMULATE
// Tests only (emulator/): runs these kernels, unchanged, on CPU threads with the
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

// One online-softmax update of a warp's 16 query rows (rows lane / 4 and lane / 4 + 8) with the
// raw scores s of keys [n0, n0 + NT * 8): s becomes P = exp2(scale * log2(e) * s - m) (keys >= N:
// 0, when `mask`), the running max m_run (base-2 units) and this thread's partial row sums l_run
// are updated and the accumulator o is rescaled. Key n0 must be < N so the max stays finite.
template <int NT, int ND>
__device__ __forceinline__ void online_softmax_update(float (&s)[NT][4], float (&o)[ND][4], float (&m_run)[2],
                                                      float (&l_run)[2], int n0, int N, bool mask, float sl2,
                                                      int lane) {
  float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int key = n0 + nt * 8 + (lane % 4) * 2 + (j & 1);
      const float v = !mask || key < N ? s[nt][j] * sl2 : -INFINITY;
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
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[nt][j] = exp2f(s[nt][j] - m_run[j >> 1]);
      l_run[j >> 1] += s[nt][j];
    }
  }
#pragma unroll
  for (int dt = 0; dt < ND; ++dt) {
    o[dt][0] *= alpha[0];
    o[dt][1] *= alpha[0];
    o[dt][2] *= alpha[1];
    o[dt][3] *= alpha[1];
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

}  // namespace attn
}  // namespace mae_fast
