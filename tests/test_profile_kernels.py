"""`mae-fast profile --kernels` and the decoder ablation: kernel kinds, attribution to encoder /
decoder, floors and the split step, on CPU with synthetic traces (the real trace needs CUDA)."""
import pytest
import torch

from mae_fast import cli, flops, models_mae, profile
from test_model import tiny_model


@pytest.mark.parametrize("name, kind", [
    # ours: the CUDA extension's kernels and the Triton ops'
    ("void attention_fwd_kernel<64>(AttentionParams)", "attention"),
    ("void attention_bwd_dkdv_kernel<32>(AttentionParams)", "attention"),
    ("attention_bwd_delta_kernel", "attention"),
    ("_add_ln_fwd_kernel", "norm"),
    ("_add_ln_bwd_kernel", "norm"),
    ("_bias_gelu_bwd_kernel", "elementwise"),
    ("_patch_mse_fwd_kernel", "elementwise"),
    ("_unshuffle_bwd_kernel", "copy/other"),
    ("_patch_copy_kernel", "copy/other"),
    # the libraries'
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
     "GEMM"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "GEMM"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", "GEMM"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>(cublasSplitKParams<float>)", "GEMM"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "GEMM"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>(Flash_fwd_params)", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(float*, float const*, int)", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, ...)", "norm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel_32x32<float, float>(long, ...)", "norm"),
    ("triton_per_fused__to_copy_add_native_layer_norm_0", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)::{lambda(float)#1}>",
     "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
     "at::native::sum_functor<float, float, float>::operator()>>>", "elementwise"),
    ("triton_poi_fused_add_gelu_1", "elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<4>, at::native::(anonymous namespace)::BinaryOpListAlphaFunctor<float, 4, 2, 0>>",
     "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>", "copy/other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(...)>", "copy/other"),
    ("Memcpy DtoD (Device -> Device)", "copy/other"),
    ("Memset (Device)", "copy/other"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3, 64, 64>(...)",
     "copy/other"),
    ("void at::native::_scatter_gather_elementwise_kernel<128, 4, ...>", "copy/other"),
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<...>", "copy/other"),
    ("void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, ...>",
     "copy/other"),
    ("some_kernel_nobody_knows", "copy/other"),
])
def test_kernel_kinds(name, kind):
    assert profile.kernel_kind(name) == kind
    assert kind in profile.KINDS


def _range(name, ts, dur, cat="user_annotation"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1}


def _launch(corr, ts, cat="cuda_runtime", tid=1):
    return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
            "args": {"correlation": corr}}


def _kernel(name, corr, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def synthetic_trace():
    """A step as torch.profiler exports it: CPU ranges, launches (backward's from autograd's
    thread), and kernels that run later on the GPU's timeline, past the range that launched them."""
    p = profile.RANGE_PREFIX
    return [
        {"ph": "i", "name": "instant", "ts": 0},
        _range(f"{p}encoder/forward", 0, 100),
        _range(f"{p}decoder/forward", 100, 100),
        _range(f"{p}decoder/backward", 200, 100),
        _range(f"{p}encoder/backward", 300, 100),
        _range(f"{p}encoder/optimizer", 400, 50),
        _range(f"{p}decoder/optimizer", 450, 50),
        _range(f"{p}decoder/forward", 140, 60, cat="gpu_user_annotation"),  # a range's copy on the GPU timeline
        _launch(1, 10), _kernel("nvjet_tst_128x256", 1, 150, 40.0),  # runs during the decoder's range
        _launch(2, 20, cat="cuda_driver"), _kernel("_add_ln_fwd_kernel", 2, 190, 5.0),
        _launch(3, 110), _kernel("attention_fwd_kernel", 3, 250, 30.0),
        _launch(4, 210, tid=2), _kernel("attention_bwd_dq_kernel", 4, 260, 50.0),  # autograd's thread
        _launch(5, 310, tid=2), _kernel("sm90_xmma_gemm_bf16", 5, 330, 80.0),
        _launch(6, 320, tid=2), _kernel("Memcpy DtoD (Device -> Device)", 6, 340, 3.0, cat="gpu_memcpy"),
        _launch(7, 410), _kernel("multi_tensor_apply_kernel<FusedAdam>", 7, 420, 12.0),
        _launch(8, 460), _kernel("multi_tensor_apply_kernel<FusedAdam>", 8, 470, 4.0),
        _launch(9, 600), _kernel("vectorized_elementwise_kernel<FillFunctor>", 9, 610, 1.0, cat="gpu_memset"),
        _kernel("orphan_kernel", 99, 700, 2.0),  # no launch event, outside the GPU ranges: other
        _kernel("_unshuffle_fwd_kernel", 98, 180, 6.0),  # no launch event, inside a GPU range
    ]


def test_attribute_kernels_by_launch_time():
    ks = profile.attribute_kernels(synthetic_trace())
    got = [(k.part, k.phase, k.name[:14], k.us) for k in ks]
    assert got == [
        ("encoder", "forward", "nvjet_tst_128x", 40.0),
        ("encoder", "forward", "_add_ln_fwd_ke", 5.0),
        ("decoder", "forward", "attention_fwd_", 30.0),
        ("decoder", "backward", "attention_bwd_", 50.0),
        ("encoder", "backward", "sm90_xmma_gemm", 80.0),
        ("encoder", "backward", "Memcpy DtoD (D", 3.0),
        ("encoder", "optimizer", "multi_tensor_a", 12.0),
        ("decoder", "optimizer", "multi_tensor_a", 4.0),
        ("other", "other", "vectorized_ele", 1.0),
        ("other", "other", "orphan_kernel", 2.0),
        ("decoder", "forward", "_unshuffle_fwd", 6.0),
    ]


def test_group_rows_and_floors_add_up():
    ks = profile.attribute_kernels(synthetic_trace())
    groups = profile.group_kernels(ks)
    assert groups["encoder", "GEMM"]["count"] == 2
    assert groups["encoder", "GEMM"]["forward"] == pytest.approx(0.040)
    assert groups["encoder", "GEMM"]["backward"] == pytest.approx(0.080)
    step_ms = sum(k.us for k in ks) / 1e3
    floors = {"encoder": {"GEMM": (0.06, "FLOPs"), "norm": (0.001, "bytes")}, "decoder": {"attention": (0.02, "FLOPs")}}
    rows = profile.kernel_rows(groups, floors, step_ms)
    parts = [r["part"] for r in rows if r["kind"] == "all"]
    assert parts == ["encoder", "decoder", "other"]
    assert sum(r["share"] for r in rows if r["kind"] == "all") == pytest.approx(1.0)
    enc_gemm = next(r for r in rows if (r["part"], r["kind"]) == ("encoder", "GEMM"))
    assert enc_gemm["x_floor"] == pytest.approx(0.120 / 0.06) and enc_gemm["floor_basis"] == "FLOPs"
    # a kind with a floor but no kernel stays in the table (0 ms), one with neither does not
    dec = {r["kind"]: r for r in rows if r["part"] == "decoder"}
    assert set(dec) == {"attention", "optimizer", "copy/other", "all"}
    text = profile.format_kernel_profile({"step_gpu_ms": step_ms, "kernels": len(ks), "matmul_tflops": 700.0,
                                          "copy_gbps": 4000.0, "rows": rows,
                                          "top_kernels": {"encoder": profile.top_kernels(ks, "encoder", 2)}},
                                         "title")
    assert "encoder  GEMM" in text and "2.0x" in text and "sm90_xmma_gemm_bf16 (GEMM, 1x) 0.08 ms" in text


def test_kind_macs_regroup_the_stage_macs():
    dims = flops.ModelDims()
    for emt in (False, True):
        by_kind = flops.kind_macs(dims, 0.75, encoder_mask_tokens=emt)
        stages = flops.stage_macs(dims, 0.75, encoder_mask_tokens=emt)
        assert sum(v for part in by_kind.values() for v in part.values()) == sum(stages.values())
        enc = sum(stages[k] for k in flops.ENCODER_STAGES)
        assert sum(by_kind["encoder"].values()) == enc
    # ViT-L encoder at 50 tokens: attention's own products are a sliver of the block's matmuls
    k = flops.kind_macs(dims)["encoder"]
    assert k["attention"] == 24 * 2 * 50 * 50 * 1024 and 0.005 < k["attention"] / k["gemm"] < 0.015


def test_floors_follow_flops_and_bytes():
    dims = flops.ModelDims()  # ViT-L/16
    params = {"encoder": {"trainable": 303_000_000, "matmul": 302_000_000},
              "decoder": {"trainable": 26_000_000, "matmul": 25_000_000}}
    kw = dict(matmul_tflops=750.0, copy_gbps=4000.0, params=params, visible_patch_embed=True)
    bf16 = profile.kind_floors(dims, 256, 0.75, act_bytes=2, **kw)
    macs = flops.kind_macs(dims, visible_patch_embed=True)
    pe = flops.stage_macs(dims, visible_patch_embed=True)["patch_embed"]
    gemm_ms = 2 * 256 * (3 * macs["encoder"]["gemm"] - pe) / 750e12 * 1e3
    assert bf16["encoder"]["GEMM"] == (pytest.approx(gemm_ms), "FLOPs")
    assert bf16["decoder"]["optimizer"] == (pytest.approx(28 * 26e6 / 4e12 * 1e3), "bytes")
    # bytes floors scale with the batch, the optimizer's does not; fp32 has no autocast casts
    half = profile.kind_floors(dims, 128, 0.75, act_bytes=2, **kw)
    assert half["encoder"]["norm"][0] == pytest.approx(bf16["encoder"]["norm"][0] / 2)
    assert half["encoder"]["optimizer"] == bf16["encoder"]["optimizer"]
    fp32 = profile.kind_bytes(dims, 256, 0.75, act_bytes=4, params=params)
    b16 = profile.kind_bytes(dims, 256, 0.75, act_bytes=2, params=params)
    assert b16["encoder"]["copy/other"] - 12 * 302_000_000 < fp32["encoder"]["copy/other"]
    assert all(v > 0 for part in b16.values() for v in part.values())
    # ViT-L step at batch 256: 3 x 41.5 GFLOPs x 256 images at 750 TFLOP/s = 42 ms of GEMM floor (minus
    # attention's own products and the patch embedding's input gradient); memory-bound floors a few ms each
    assert 38 < bf16["encoder"]["GEMM"][0] + bf16["decoder"]["GEMM"][0] < 43
    assert all(bf16[p][k][0] < 15 for p in profile.PARTS for k in ("norm", "elementwise", "optimizer"))


def test_param_counts_split_encoder_and_decoder():
    model = tiny_model(backend="torch")
    counts = profile.param_counts(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["encoder"]["trainable"] + counts["decoder"]["trainable"] == trainable
    dec = sum(p.numel() for n, p in model.named_parameters()
              if p.requires_grad and (n.startswith("decoder_") or n == "mask_token"))
    assert counts["decoder"]["trainable"] == dec
    assert counts["encoder"]["matmul"] < counts["encoder"]["trainable"]  # norms, cls token are not matmul weights
    assert counts["decoder"]["matmul"] == sum(m.weight.numel() + m.bias.numel() for n, m in model.named_modules()
                                              if isinstance(m, torch.nn.Linear) and n.startswith("decoder_"))


def test_split_step_is_the_model_step():
    torch.manual_seed(0)
    model = tiny_model(backend="torch")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss = model(imgs, noise=noise)[0]
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    marks = []
    split_loss = profile.split_step(model, imgs, 0.75, noise, {}, mark=marks.append)
    assert marks == ["start", "encoder_forward", "decoder_forward", "decoder_backward", "encoder_backward", "optimizer"]
    assert torch.allclose(split_loss, loss.detach())
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], msg=n)
    # with the optimizers, both parts step and their grads are cleared
    opts = profile.part_optimizers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    profile.split_step(model, imgs, 0.75, noise, opts)
    moved = {profile.part_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"encoder", "decoder"} and all(p.grad is None for p in model.parameters())


def test_kernels_needs_cuda_on_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("runs for real on a GPU")
    assert cli.main(["profile", "--kernels", "--device", "cpu", "--img-size", "32", "--batch-size", "1"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs CUDA"):
        profile.kernel_profile(tiny_model(), torch.randn(1, 3, 32, 32))


def test_model_with_decoder_keeps_the_encoder():
    ref = models_mae.create_model("mae_vit_tiny_patch16", img_size=32)
    m = profile.model_with_decoder("mae_vit_tiny_patch16", 2, 64, img_size=32, backend="torch")
    assert len(m.decoder_blocks) == 2 and m.mask_token.shape[-1] == 64 and m.backend == "torch"
    assert m.decoder_blocks[0].attn.num_heads == ref.decoder_blocks[0].attn.num_heads
    enc = {k: v.shape for k, v in ref.state_dict().items() if profile.part_of(k) == "encoder"}
    assert enc == {k: v.shape for k, v in m.state_dict().items() if profile.part_of(k) == "encoder"}
    assert m.norm.eps == ref.norm.eps and m.blocks[0].mlp.fc1.out_features == ref.blocks[0].mlp.fc1.out_features


def test_decoder_ablation_on_a_tiny_model():
    seen = []
    res = profile.decoder_ablation("mae_vit_demo_patch8", img_size=32, batch_size=1, warmup=0, repeats=1,
                                   depths=(1, 2), widths=(32, 64), progress=seen.append)
    assert res["base_depth"] == 2 and res["base_width"] == 64
    assert len(seen) == 3  # the 2 x 64 point is in both sweeps, measured once
    assert [p["decoder_depth"] for p in res["depth"]] == [1, 2]
    assert [p["decoder_width"] for p in res["width"]] == [32, 64]
    for p in res["depth"] + res["width"]:
        assert 0 < p["decoder_time_share"] < 1 and 0 < p["decoder_flops_share"] < 1
        assert p["step_ms_min"] <= p["step_ms_median"] <= p["step_ms_max"] and p["images_per_s"] > 0
    shares = [p["decoder_flops_share"] for p in res["depth"]]
    assert shares[0] < shares[1]
    text = profile.format_ablation(res)
    assert "decoder depth" in text and "decoder width" in text and "FLOPs share" in text


@pytest.mark.gpu
def test_kernel_profile_on_cuda():
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_tiny_patch16", img_size=64, backend="auto").cuda()
    res = profile.kernel_profile(model, torch.randn(4, 3, 64, 64, device="cuda"), warmup=1, dtype=torch.bfloat16)
    rows = {(r["part"], r["kind"]): r for r in res["rows"]}
    for part in profile.PARTS:
        assert rows[part, "GEMM"]["gpu_ms"] > 0 and rows[part, "optimizer"]["gpu_ms"] > 0
        assert rows[part, "all"]["forward_ms"] > 0 and rows[part, "all"]["backward_ms"] > 0
    attributed = sum(r["gpu_ms"] for r in res["rows"] if r["kind"] == "all" and r["part"] in profile.PARTS)
    assert attributed > 0.9 * res["step_gpu_ms"]
