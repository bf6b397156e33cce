// The C++ CPU twin of the fused packed-QKV attention: the same algorithm as the CUDA kernels
// (keys streamed in blocks of 64 with an online softmax; backward recomputes P from lse), in
// fp32 math for every input dtype. It makes the extension build, load and run on any machine,
// so the custom op, autograd and torch.compile paths are tested without a GPU. The inputs are
// checked by the binding (attention_binding.cpp) before they get here.
#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

namespace mae_fast {

namespace {

constexpr int64_t kBlockN = 64;

// Copies the (N, D) slice of one (b, which, h) from a strided tensor into fp32 rows.
template <typename scalar_t>
void gather_rows(std::vector<float>& dst, const scalar_t* src, int64_t row_stride, int64_t N, int64_t D) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<float>(src[i * row_stride + d]);
}

template <typename scalar_t>
void fwd_cpu_kernel(const at::Tensor& qkv, at::Tensor& out, at::Tensor& lse, const QkvDims& dm, float scale) {
  const int64_t B = dm.B, N = dm.N, H = dm.H, D = dm.D;
  const scalar_t* base = qkv.const_data_ptr<scalar_t>();
  scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();  // (B, N, H*D) contiguous
  float* lse_ptr = lse.mutable_data_ptr<float>();      // (B, H, N) contiguous
  const int64_t sb = qkv.stride(0), sn = qkv.stride(1), s3 = qkv.stride(2), sh = qkv.stride(3);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(N * D), k(N * D), v(N * D), s(kBlockN), acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* gq = base + b * sb + h * sh;
      gather_rows(q, gq, sn, N, D);
      gather_rows(k, gq + s3, sn, N, D);
      gather_rows(v, gq + 2 * s3, sn, N, D);
      for (int64_t i = 0; i < N; ++i) {
        const float* qi = &q[i * D];
        float m = -std::numeric_limits<float>::infinity(), l = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j0 = 0; j0 < N; j0 += kBlockN) {
          const int64_t jn = std::min(kBlockN, N - j0);
          float bm = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < jn; ++j) {
            const float* kj = &k[(j0 + j) * D];
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
            s[j] = dot * scale;
            bm = std::max(bm, s[j]);
          }
          const float m_new = std::max(m, bm);
          const float alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
          l *= alpha;
          for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
          for (int64_t j = 0; j < jn; ++j) {
            const float pj = std::exp(s[j] - m_new);
            l += pj;
            const float* vj = &v[(j0 + j) * D];
            for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
          }
          m = m_new;
        }
        scalar_t* oi = o_ptr + (b * N + i) * H * D + h * D;
        for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<scalar_t>(acc[d] / l);
        lse_ptr[bh * N + i] = m + std::log(l);
      }
    }
  });
}

template <typename scalar_t>
void bwd_cpu_kernel(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                    at::Tensor& dqkv, const QkvDims& dm, float scale) {
  const int64_t B = dm.B, N = dm.N, H = dm.H, D = dm.D;
  const scalar_t* base = qkv.const_data_ptr<scalar_t>();
  const int64_t sb = qkv.stride(0), sn = qkv.stride(1), s3 = qkv.stride(2), sh = qkv.stride(3);
  const scalar_t* do_base = dout.const_data_ptr<scalar_t>();
  const int64_t dob = dout.stride(0), don = dout.stride(1);
  const scalar_t* o_base = out.const_data_ptr<scalar_t>();
  const int64_t ob = out.stride(0), on = out.stride(1);
  const float* lse_ptr = lse.const_data_ptr<float>();  // contiguous (B, H, N)
  scalar_t* dqkv_ptr = dqkv.mutable_data_ptr<scalar_t>();  // contiguous (B, N, 3, H, D)

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(N * D), k(N * D), v(N * D), o(N * D), dO(N * D), delta(N);
    std::vector<float> dq(N * D), dk(N * D), dv(N * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* gq = base + b * sb + h * sh;
      gather_rows(q, gq, sn, N, D);
      gather_rows(k, gq + s3, sn, N, D);
      gather_rows(v, gq + 2 * s3, sn, N, D);
      gather_rows(dO, do_base + b * dob + h * D, don, N, D);
      gather_rows(o, o_base + b * ob + h * D, on, N, D);
      for (int64_t i = 0; i < N; ++i) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += dO[i * D + d] * o[i * D + d];
        delta[i] = acc;
      }
      std::fill(dq.begin(), dq.end(), 0.f);
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      const float* lse_bh = lse_ptr + bh * N;
      for (int64_t i = 0; i < N; ++i) {
        const float* qi = &q[i * D];
        const float* doi = &dO[i * D];
        float* dqi = &dq[i * D];
        for (int64_t j = 0; j < N; ++j) {
          const float* kj = &k[j * D];
          const float* vj = &v[j * D];
          float s = 0.f, dp = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            s += qi[d] * kj[d];
            dp += doi[d] * vj[d];
          }
          const float p = std::exp(s * scale - lse_bh[i]);
          const float ds = p * (dp - delta[i]) * scale;
          float* dkj = &dk[j * D];
          float* dvj = &dv[j * D];
          for (int64_t d = 0; d < D; ++d) {
            dvj[d] += p * doi[d];
            dqi[d] += ds * kj[d];
            dkj[d] += ds * qi[d];
          }
        }
      }
      for (int64_t i = 0; i < N; ++i) {
        scalar_t* row = dqkv_ptr + ((b * N + i) * 3 * H + h) * D;  // slot 0 of (b, i, :, h, :)
        for (int64_t d = 0; d < D; ++d) {
          row[d] = static_cast<scalar_t>(dq[i * D + d]);
          row[H * D + d] = static_cast<scalar_t>(dk[i * D + d]);
          row[2 * H * D + d] = static_cast<scalar_t>(dv[i * D + d]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv, const QkvDims& d) {
  at::Tensor out = at::empty({d.B, d.N, d.H * d.D}, qkv.options());
  at::Tensor lse = at::empty({d.B, d.H, d.N}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const float scale = 1.f / std::sqrt(static_cast<float>(d.D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "attention_fwd_cpu",
                                  [&] { fwd_cpu_kernel<scalar_t>(qkv, out, lse, d, scale); });
  return {out, lse};
}

at::Tensor attention_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& qkv, const at::Tensor& out_in,
                             const at::Tensor& lse_in, const QkvDims& d) {
  // Autograd may hand an expanded (stride-0) or otherwise strided dout; rows of D contiguous
  // elements are all the kernels need, so copy only when the innermost stride is not 1.
  const at::Tensor dout = dout_in.stride(2) == 1 ? dout_in : dout_in.contiguous();
  const at::Tensor out = out_in.stride(2) == 1 ? out_in : out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty({d.B, d.N, 3, d.H, d.D}, qkv.options());
  if (dqkv.numel() == 0) return dqkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(d.D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "attention_bwd_cpu",
                                  [&] { bwd_cpu_kernel<scalar_t>(dout, qkv, out, lse, dqkv, d, scale); });
  return dqkv;
}

}  // namespace mae_fast
