// Runs the production attention kernels (forward and backward, through the same launchers and
// dispatch) on the CPU emulator and compares them with a float64 reference.
//
//   emulate B N H D dtype(0 = fp16, 1 = bf16) row_pad seed [kernels]
//
// kernels: 0 auto (the default dispatch), 1 tiled, 2 short (AttnKernels, attention_params.h).
// qkv is a (B, N, 3*H*D + row_pad) buffer viewed as (B, N, 3, H, D) (row_pad % 8 == 0), every
// output buffer starts NaN-filled. Prints one line of errors; exit status 1 on failure.
#define MAE_FAST_EMULATE 1

#include "../attention_api.cu"
#include "../attention_hdim128.cu"
#include "../attention_hdim32.cu"
#include "../attention_hdim64.cu"
#include "../attention_hdim80.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace {

template <typename T>
uint16_t to_bits(float x) {
  T h = mae_fast::attn::from_float<T>(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

template <typename T>
float from_bits(uint16_t b) {
  return emu::half_bits_to_float(b, T{});
}

template <typename T>
int run(int B, int N, int H, int D, int row_pad, unsigned seed, int kernels) {
  const int64_t row = 3LL * H * D + row_pad;
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> qkv(static_cast<size_t>(B) * N * row), dout(static_cast<size_t>(B) * N * H * D);
  for (auto& x : qkv) x = to_bits<T>(normal(gen));
  for (auto& x : dout) x = to_bits<T>(normal(gen));
  std::vector<uint16_t> out(dout.size(), 0xffff), dqkv(static_cast<size_t>(B) * N * 3 * H * D, 0xffff);
  std::vector<float> lse(static_cast<size_t>(B) * H * N), delta(lse.size());
  std::memset(lse.data(), 0xff, lse.size() * 4);
  std::memset(delta.data(), 0xff, delta.size() * 4);

  mae_fast::AttentionParams p{};
  p.qkv = qkv.data();
  p.qkv_stride_b = N * row;
  p.qkv_stride_n = row;
  p.qkv_stride_3 = static_cast<int64_t>(H) * D;
  p.qkv_stride_h = D;
  p.out = out.data();
  p.out_stride_b = static_cast<int64_t>(N) * H * D;
  p.out_stride_n = static_cast<int64_t>(H) * D;
  p.lse = lse.data();
  p.dout = dout.data();
  p.dout_stride_b = p.out_stride_b;
  p.dout_stride_n = p.out_stride_n;
  p.dqkv = dqkv.data();
  p.dqkv_stride_b = 3LL * N * H * D;
  p.dqkv_stride_n = 3LL * H * D;
  p.dqkv_stride_3 = static_cast<int64_t>(H) * D;
  p.dqkv_stride_h = D;
  p.delta = delta.data();
  p.B = B;
  p.N = N;
  p.H = H;
  p.D = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.dtype = sizeof(T) == 2 && std::is_same_v<T, __nv_bfloat16> ? mae_fast::AttnDtype::kBFloat16
                                                                 : mae_fast::AttnDtype::kFloat16;
  p.kernels = static_cast<mae_fast::AttnKernels>(kernels);
  if (mae_fast::attention_fwd_cuda(p, nullptr) != cudaSuccess) return 2;
  if (mae_fast::attention_bwd_cuda(p, nullptr) != cudaSuccess) return 2;

  // float64 reference from the same rounded inputs.
  double err_o = 0, err_lse = 0, err_g[3] = {0, 0, 0}, max_o = 0, max_g[3] = {0, 0, 0};
  bool finite = true;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      auto in = [&](int i, int which, int d) {
        return static_cast<double>(from_bits<T>(qkv[b * N * row + i * row + (which * H + h) * D + d]));
      };
      auto gdo = [&](int i, int d) { return static_cast<double>(from_bits<T>(dout[((b * N + i) * H + h) * D + d])); };
      std::vector<double> P(static_cast<size_t>(N) * N), O(static_cast<size_t>(N) * D, 0.0), L(N), Dl(N, 0.0);
      for (int i = 0; i < N; ++i) {
        double m = -INFINITY;
        for (int j = 0; j < N; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += in(i, 0, d) * in(j, 1, d);
          P[i * N + j] = s * scale;
          m = std::max(m, s * scale);
        }
        double l = 0;
        for (int j = 0; j < N; ++j) l += std::exp(P[i * N + j] - m);
        L[i] = m + std::log(l);
        for (int j = 0; j < N; ++j) P[i * N + j] = std::exp(P[i * N + j] - L[i]);
        for (int d = 0; d < D; ++d) {
          for (int j = 0; j < N; ++j) O[i * D + d] += P[i * N + j] * in(j, 2, d);
          Dl[i] += O[i * D + d] * gdo(i, d);
        }
      }
      std::vector<double> g(3 * static_cast<size_t>(N) * D, 0.0);  // dq, dk, dv
      for (int i = 0; i < N; ++i) {
        for (int j = 0; j < N; ++j) {
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += gdo(i, d) * in(j, 2, d);
          const double pij = P[i * N + j], ds = pij * (dp - Dl[i]) * scale;
          for (int d = 0; d < D; ++d) {
            g[(0 * N + i) * D + d] += ds * in(j, 1, d);
            g[(1 * N + j) * D + d] += ds * in(i, 0, d);
            g[(2 * N + j) * D + d] += pij * gdo(i, d);
          }
        }
      }
      for (int i = 0; i < N; ++i) {
        const double got_lse = lse[(b * H + h) * N + i];
        finite &= std::isfinite(got_lse);
        err_lse = std::max(err_lse, std::abs(got_lse - L[i]));
        for (int d = 0; d < D; ++d) {
          const double got = from_bits<T>(out[((b * N + i) * H + h) * D + d]);
          finite &= std::isfinite(got);
          err_o = std::max(err_o, std::abs(got - O[i * D + d]));
          max_o = std::max(max_o, std::abs(O[i * D + d]));
          for (int w = 0; w < 3; ++w) {
            const double gg = from_bits<T>(dqkv[(((static_cast<int64_t>(b) * N + i) * 3 + w) * H + h) * D + d]);
            const double ref = g[(w * N + i) * D + d];
            finite &= std::isfinite(gg);
            err_g[w] = std::max(err_g[w], std::abs(gg - ref));
            max_g[w] = std::max(max_g[w], std::abs(ref));
          }
        }
      }
    }
  }
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const double tol_o = bf16 ? 3e-2 : 4e-3, tol_g = bf16 ? 5e-2 : 1e-2;
  bool ok = finite && err_o <= tol_o * std::max(1.0, max_o) && err_lse <= 1e-2;
  for (int w = 0; w < 3; ++w) ok &= err_g[w] <= tol_g * std::max(1.0, max_g[w]);
  static const char* kKernelNames[] = {"auto", "tiled", "short"};
  std::printf("%s %s B=%d N=%d H=%d D=%d %s pad=%d: out %.3g lse %.3g dq %.3g/%.3g dk %.3g/%.3g dv %.3g/%.3g%s\n",
              ok ? "OK" : "FAIL", kKernelNames[kernels], B, N, H, D, bf16 ? "bf16" : "fp16", row_pad, err_o, err_lse, err_g[0], max_g[0],
              err_g[1], max_g[1], err_g[2], max_g[2], finite ? "" : " NON-FINITE");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8 && argc != 9) {
    std::fprintf(stderr, "usage: %s B N H D dtype(0=fp16,1=bf16) row_pad seed [kernels 0=auto,1=tiled,2=short]\n",
                 argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), N = std::atoi(argv[2]), H = std::atoi(argv[3]), D = std::atoi(argv[4]);
  const int dtype = std::atoi(argv[5]), pad = std::atoi(argv[6]);
  const unsigned seed = static_cast<unsigned>(std::atoi(argv[7]));
  const int kernels = argc == 9 ? std::atoi(argv[8]) : 0;
  if (kernels < 0 || kernels > 2) return 2;
  return dtype == 1 ? run<__nv_bfloat16>(B, N, H, D, pad, seed, kernels) : run<__half>(B, N, H, D, pad, seed, kernels);
}
