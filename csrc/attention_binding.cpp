// Torch binding of the fused packed-QKV attention: registers
//   mae_fast::attention_fwd(Tensor qkv) -> (Tensor out, Tensor lse)
//   mae_fast::attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse) -> Tensor dqkv
// with the C++ CPU twin (attention_cpu.cpp) and, when built with WITH_CUDA, the CUDA kernels
// (attention/*.cu, reached through the params struct and launchers of attention_params.h).
// The input checks live here, shared by both: the CPU twin and the kernels get checked inputs.
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <torch/library.h>

#include "attention/head_dims.h"
#include "attention_cpu.h"

#ifdef WITH_CUDA
// c10's stream and guard headers need only the CUDA runtime headers (ATen/cuda/CUDAContext.h
// would also pull in cuBLAS/cuSPARSE headers, which a bare toolkit may lack).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "attention/attention_params.h"
#endif

namespace mae_fast {

namespace {

// ---------------------------------------------------------------------------------------------
// Input checks, shared by the CPU and CUDA impls. The Python entry (mae_fast/ops/attention.py)
// raises qkv's dtype, head-dim and stride errors itself, before calling the op: on the H200
// machine (torch 2.11, cu130) some errors thrown inside the extension crashed the process
// instead of raising.

bool is_cuda_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// "2, 5, 3": integer lists for error messages, formatted here rather than by streaming an
// IntArrayRef (on the H200 machine, torch 2.11 cu130, the errors whose messages streamed one
// crashed the process while the others raised; unconfirmed cause, so we avoid it).
std::string join(at::IntArrayRef values) {
  std::string s;
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s;
}

// "(2, 5, 3)": shapes and strides.
std::string dims_str(at::IntArrayRef dims) { return "(" + join(dims) + ")"; }

// Checks qkv is (B, N, 3, H, D), floating, innermost stride 1 (and, for CUDA, fp16/bf16 and a
// head dim of head_dims.h). Errors name the op and the argument.
QkvDims check_qkv(const at::Tensor& qkv, const char* op) {
  TORCH_CHECK_VALUE(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must have shape (B, N, 3, H, D), got ",
                    dims_str(qkv.sizes()));
  const bool cuda = qkv.is_cuda();
  TORCH_CHECK_VALUE(cuda || qkv.is_cpu(), op, ": qkv must be on a CPU or CUDA device, got ", qkv.device());
  if (cuda) {
    TORCH_CHECK_TYPE(is_cuda_dtype(qkv.scalar_type()), op, ": qkv must be float16 or bfloat16 on CUDA, got ",
                     qkv.scalar_type());
  } else {
    TORCH_CHECK_TYPE(is_cuda_dtype(qkv.scalar_type()) || qkv.scalar_type() == at::kFloat, op,
                     ": qkv must be float16, bfloat16 or float32 on CPU, got ", qkv.scalar_type());
  }
  const QkvDims d{qkv.size(0), qkv.size(1), qkv.size(3), qkv.size(4)};
  TORCH_CHECK_VALUE(d.D >= 1, op, ": qkv head dim (size 4) must be >= 1, got ", d.D);
  if (cuda) {
    TORCH_CHECK_VALUE(is_supported_head_dim(d.D), op, ": qkv head dim (size 4) must be one of ",
                      join(kCudaHeadDims), " on CUDA, got ", d.D);
  }
  TORCH_CHECK_VALUE(qkv.stride(4) == 1 || d.D == 1, op,
                    ": qkv must have innermost (head-dim) stride 1, got strides ", dims_str(qkv.strides()),
                    "; pass qkv.contiguous() or a view of the qkv Linear's output");
  return d;
}

// check_qkv for attention_bwd, then dout/out (B, N, H*D) and lse (B, H, N) fp32 against qkv's
// dims, dtype and device.
QkvDims check_bwd_args(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse) {
  const QkvDims d = check_qkv(qkv, "attention_bwd");
  const std::vector<int64_t> out_shape{d.B, d.N, d.H * d.D};
  const std::vector<int64_t> lse_shape{d.B, d.H, d.N};
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape), "attention_bwd: dout must have shape ",
                    dims_str(out_shape), ", got ", dims_str(dout.sizes()));
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "attention_bwd: out must have shape ",
                    dims_str(out_shape), ", got ", dims_str(out.sizes()));
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), "attention_bwd: lse must have shape ",
                    dims_str(lse_shape), ", got ", dims_str(lse.sizes()));
  TORCH_CHECK_TYPE(dout.scalar_type() == qkv.scalar_type() && out.scalar_type() == qkv.scalar_type(),
                   "attention_bwd: dout and out must have qkv's dtype ", qkv.scalar_type(), ", got ",
                   dout.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "attention_bwd: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(dout.device() == qkv.device() && out.device() == qkv.device() && lse.device() == qkv.device(),
                    "attention_bwd: dout, out and lse must be on qkv's device ", qkv.device());
  return d;
}

// ---------------------------------------------------------------------------------------------
// CPU: the C++ twin.

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu_impl(const at::Tensor& qkv) {
  return attention_fwd_cpu(qkv, check_qkv(qkv, "attention_fwd"));
}

at::Tensor attention_bwd_cpu_impl(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                                  const at::Tensor& lse) {
  const QkvDims d = check_bwd_args(dout, qkv, out, lse);
  return attention_bwd_cpu(dout, qkv, out, lse, d);
}

#ifdef WITH_CUDA
// ---------------------------------------------------------------------------------------------
// CUDA: the kernels.

// The kernels move 16-byte vectors: every row they load must start 16-byte aligned.
bool rows_16b_aligned(const at::Tensor& t, int64_t last_dim_to_check) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i <= last_dim_to_check; ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  return true;
}

// A fresh, aligned buffer when `t` is not (`.contiguous()` would hand back a contiguous tensor
// that starts at a misaligned offset unchanged).
at::Tensor aligned(const at::Tensor& t, int64_t last_dim_to_check, bool need_unit_inner_stride = false) {
  const bool ok = (!need_unit_inner_stride || t.stride(t.dim() - 1) == 1) && rows_16b_aligned(t, last_dim_to_check);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

AttnDtype attn_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? AttnDtype::kBFloat16 : AttnDtype::kFloat16;
}

void check_grid(const QkvDims& d, const char* op) {
  const int64_t ctas = d.B * d.H * ((d.N + 63) / 64);
  TORCH_CHECK_VALUE(ctas < (int64_t{1} << 31) && d.N < (int64_t{1} << 31), op,
                    ": B * H * ceil(N / 64) must be < 2**31, got B=", d.B, " N=", d.N, " H=", d.H);
}

// MAE_FAST_ATTENTION_KERNELS=auto|tiled|short (unset or empty: auto), read at every call (so
// a benchmark can flip it between calls; a CUDA graph keeps the kernels of its capture): auto is
// the measured default dispatch, tiled the 64-row tiled kernels, short the one-CTA-per-head
// kernels where they cover the shape (attention_params.h, AttnKernels).
AttnKernels kernel_choice() {
  const char* v = std::getenv("MAE_FAST_ATTENTION_KERNELS");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return AttnKernels::kAuto;
  if (std::strcmp(v, "tiled") == 0) return AttnKernels::kTiled;
  if (std::strcmp(v, "short") == 0) return AttnKernels::kShort;
  TORCH_CHECK_VALUE(false, "MAE_FAST_ATTENTION_KERNELS must be auto, tiled or short, got '", std::string(v), "'");
  return AttnKernels::kAuto;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

AttentionParams make_params(const at::Tensor& qkv, const QkvDims& d) {
  AttentionParams p{};
  p.qkv = qkv.data_ptr();
  p.qkv_stride_b = qkv.stride(0);
  p.qkv_stride_n = qkv.stride(1);
  p.qkv_stride_3 = qkv.stride(2);
  p.qkv_stride_h = qkv.stride(3);
  p.B = static_cast<int>(d.B);
  p.N = static_cast<int>(d.N);
  p.H = static_cast<int>(d.H);
  p.D = static_cast<int>(d.D);
  p.scale = 1.f / std::sqrt(static_cast<float>(d.D));
  p.dtype = attn_dtype(qkv);
  p.kernels = kernel_choice();
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda_impl(const at::Tensor& qkv_in) {
  const QkvDims d = check_qkv(qkv_in, "attention_fwd");
  check_grid(d, "attention_fwd");
  c10::cuda::CUDAGuard guard(qkv_in.device());
  // A view of the qkv Linear's output is always aligned; only an odd slice is not, and for it
  // a copy is cheaper than a second, scalar-load kernel variant.
  const at::Tensor qkv = aligned(qkv_in, 3);
  at::Tensor out = at::empty({d.B, d.N, d.H * d.D}, qkv.options());
  at::Tensor lse = at::empty({d.B, d.H, d.N}, qkv.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AttentionParams p = make_params(qkv, d);
  p.out = out.data_ptr();
  p.out_stride_b = out.stride(0);
  p.out_stride_n = out.stride(1);
  p.lse = lse.data_ptr<float>();
  check_launch(attention_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), "attention_fwd");
  return {out, lse};
}

at::Tensor attention_bwd_cuda_impl(const at::Tensor& dout_in, const at::Tensor& qkv_in, const at::Tensor& out_in,
                                   const at::Tensor& lse_in) {
  const QkvDims d = check_bwd_args(dout_in, qkv_in, out_in, lse_in);
  check_grid(d, "attention_bwd");
  c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = aligned(qkv_in, 3);
  // Autograd may pass an expanded or strided dout (e.g. from out.sum().backward()); the
  // kernels need 16-byte aligned rows of D contiguous elements, so copy only otherwise.
  const at::Tensor dout = aligned(dout_in, 1, /*need_unit_inner_stride=*/true);
  // out is our forward's output (contiguous, aligned); the copy is for callers passing others.
  const at::Tensor out = aligned(out_in, 1, /*need_unit_inner_stride=*/true);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty({d.B, d.N, 3, d.H, d.D}, qkv.options());
  if (dqkv.numel() == 0) return dqkv;
  at::Tensor delta = at::empty({d.B, d.H, d.N}, qkv.options().dtype(at::kFloat));
  AttentionParams p = make_params(qkv, d);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_stride_b = out.stride(0);
  p.out_stride_n = out.stride(1);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  p.dout_stride_b = dout.stride(0);
  p.dout_stride_n = dout.stride(1);
  p.dqkv = dqkv.data_ptr();
  p.dqkv_stride_b = dqkv.stride(0);
  p.dqkv_stride_n = dqkv.stride(1);
  p.dqkv_stride_3 = dqkv.stride(2);
  p.dqkv_stride_h = dqkv.stride(3);
  p.delta = delta.data_ptr<float>();
  check_launch(attention_bwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), "attention_bwd");
  return dqkv;
}

#endif  // WITH_CUDA

}  // namespace

}  // namespace mae_fast

// FRAGMENT, not TORCH_LIBRARY: the Python side may define other ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(mae_fast, m) {
  m.def("attention_fwd(Tensor qkv) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse) -> Tensor dqkv");
}

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) {
  m.impl("attention_fwd", &mae_fast::attention_fwd_cpu_impl);
  m.impl("attention_bwd", &mae_fast::attention_bwd_cpu_impl);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("attention_fwd", &mae_fast::attention_fwd_cuda_impl);
  m.impl("attention_bwd", &mae_fast::attention_bwd_cuda_impl);
}
#endif

// `import mae_fast._C` (the setup.py build) needs a module init; the ops register themselves
// when the library is loaded, so the module itself is empty. The JIT build loads the library
// with torch.ops.load_library and never calls this.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mae_fast CUDA/C++ extension (ops in torch.ops.mae_fast)",
                                   -1, nullptr};
  return PyModule_Create(&module_def);
}
