// A CPU emulator for the CUDA features the attention kernels use, for tests without a GPU.
//
// Each CTA runs as kThreads std::threads; __syncthreads is a CTA barrier; warp collectives
// (mma.sync.m16n8k16, ldmatrix.x2.trans, __shfl_xor_sync) exchange operands through per-warp
// slots between two warp barriers and compute with the fragment layouts the PTX ISA documents.
// It checks the kernels' index math, masking and barriers (a missing barrier shows up as a race);
// it says nothing about speed, and relies on the documented layouts being what hardware does.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define MAE_FAST_DYNAMIC_SMEM(name) unsigned char* name = ::emu::tl_cta->smem.get()
#define threadIdx (::emu::tl_thread)
#define blockIdx (::emu::tl_block)

namespace emu {

struct Idx {
  unsigned x, y, z;
};

struct Warp {
  std::barrier<> bar{32};
  uint32_t a[32][4];
  uint32_t b[32][2];
  const void* addr[32];
  float f[32];
};

struct Cta {
  explicit Cta(int threads, int smem_bytes)
      : bar(threads), warps(threads / 32), smem(new unsigned char[smem_bytes > 0 ? smem_bytes : 16]) {
    // Shared memory starts as garbage on a GPU: all-ones bytes are NaN in fp16, bf16 and fp32.
    std::memset(smem.get(), 0xff, smem_bytes > 0 ? smem_bytes : 16);
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<unsigned char[]> smem;
};

inline thread_local Cta* tl_cta = nullptr;
inline thread_local Idx tl_thread{0, 0, 0};
inline thread_local Idx tl_block{0, 0, 0};

inline Warp& warp() { return *tl_cta->warps[tl_thread.x / 32]; }
inline int lane() { return static_cast<int>(tl_thread.x % 32); }

}  // namespace emu

inline void __syncthreads() { emu::tl_cta->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float x, int mask) {
  emu::Warp& w = emu::warp();
  const int l = emu::lane();
  w.f[l] = x;
  w.bar.arrive_and_wait();
  const float r = w.f[l ^ mask];
  w.bar.arrive_and_wait();
  return r;
}

namespace emu {

inline float half_bits_to_float(uint16_t bits, __half) {
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}
inline float half_bits_to_float(uint16_t bits, __nv_bfloat16) {
  __nv_bfloat16 h;
  std::memcpy(&h, &bits, 2);
  return __bfloat162float(h);
}

// Element `half` (0: low 16 bits = lower index) of a packed 32-bit register.
template <typename T>
float elem(uint32_t reg, int half) {
  return half_bits_to_float(static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu), T{});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with (g = lane/4, t = lane%4)
// A[m][k]: lane (m%8)*4 + (k%8)/2, register (m/8) + 2*(k/8), half k%2
// B[k][n]: lane n*4 + (k%8)/2, register k/8, half k%2
// C[m][n]: lane (m%8)*4 + n/2, element (n%2) + 2*(m/8)
template <typename T>
void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = warp();
  const int l = lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b0;
  w.b[l][1] = b1;
  w.bar.arrive_and_wait();
  const int g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e / 2), n = 2 * t + (e % 2);
    float acc = 0.f;  // one fp32 sum per output, like the tensor core's fp32 accumulate
    for (int k = 0; k < 16; ++k) {
      const float av = elem<T>(w.a[(m % 8) * 4 + (k % 8) / 2][(m / 8) + 2 * (k / 8)], k % 2);
      const float bv = elem<T>(w.b[n * 4 + (k % 8) / 2][k / 8], k % 2);
      acc += av * bv;
    }
    c[e] += acc;
  }
  w.bar.arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16: lanes 8i..8i+7 give the row addresses of
// 8x8 matrix i; with .trans lane l receives in register i the pair (M_i[2t][g], M_i[2t+1][g]).
inline void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* row_addr) {
  Warp& w = warp();
  const int l = lane();
  w.addr[l] = row_addr;
  w.bar.arrive_and_wait();
  const int g = l / 4, t = l % 4;
  uint32_t r[2];
  for (int i = 0; i < 2; ++i) {
    const uint16_t lo = static_cast<const uint16_t*>(w.addr[8 * i + 2 * t])[g];
    const uint16_t hi = static_cast<const uint16_t*>(w.addr[8 * i + 2 * t + 1])[g];
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  r0 = r[0];
  r1 = r[1];
  w.bar.arrive_and_wait();
}

// cp.async. Hardware completes a copy at some time between issue and cp.async.wait_all; the
// emulator takes either extreme: at issue (default: a copy racing with readers of the old tile
// shows up) or, with MAE_FAST_EMU_DEFERRED=1 in the environment, at the wait (a read before the
// wait sees the old tile).
struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<PendingCopy> tl_pending;
inline bool deferred_copies() {
  static const bool deferred = [] {
    const char* v = std::getenv("MAE_FAST_EMU_DEFERRED");
    return v != nullptr && v[0] == '1';
  }();
  return deferred;
}

inline void do_copy(const PendingCopy& c) {
  if (c.valid)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}

inline void cp_async16(void* smem, const void* gmem, bool valid) {
  if (deferred_copies())
    tl_pending.push_back({smem, gmem, valid});
  else
    do_copy({smem, gmem, valid});
}

inline void cp_async_wait_all() {
  for (const PendingCopy& c : tl_pending) do_copy(c);
  tl_pending.clear();
}

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, int64_t ctas, int threads, int smem_bytes, const Params& p) {
  for (int64_t blk = 0; blk < ctas; ++blk) {
    Cta cta(threads, smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        tl_cta = &cta;
        tl_thread = {static_cast<unsigned>(t), 0, 0};
        tl_block = {static_cast<unsigned>(blk), 0, 0};
        kernel(p);
        // A thread that returns early (a whole warp in the delta kernel) must not block others.
        tl_cta = nullptr;
      });
    }
    for (auto& th : pool) th.join();
  }
  return cudaSuccess;
}

}  // namespace emu
