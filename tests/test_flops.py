"""The analytic FLOPs model against torch's own counter, and the paper's figures."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae_fast import flops
from test_model import tiny_model


@pytest.mark.parametrize("encoder_mask_tokens", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_matches_torch_flop_counter(encoder_mask_tokens, mask_ratio):
    model = tiny_model(encoder_mask_tokens=encoder_mask_tokens, backend="torch")
    N = 2
    imgs = torch.randn(N, 3, 32, 32)
    # CPU SDPA's fused kernel has no counter formula; its math backend runs plain bmm's, which count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(imgs, mask_ratio=mask_ratio)
    macs = flops.stage_macs(flops.ModelDims.of(model), mask_ratio, encoder_mask_tokens=encoder_mask_tokens)
    assert counter.get_total_flops() == 2 * N * sum(macs.values())


def test_stage_split_matches_counter_per_module():
    model = tiny_model(backend="torch")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    per_module = counter.get_flop_counts()
    macs = flops.stage_macs(flops.ModelDims.of(model))
    def count(module):  # ModuleList containers are not listed: sum their blocks
        name = f"MaskedAutoencoderViT.{module}"
        return sum(sum(v.values()) for k, v in per_module.items() if k == name or k.count(".") == 2
                   and k.startswith(name + "."))

    assert count("decoder_embed") == 2 * macs["decoder_embed"]
    assert count("decoder_pred") == 2 * macs["decoder_pred"]
    assert count("blocks") == 2 * (macs["encoder_attention"] + macs["encoder_mlp"])
    assert count("decoder_blocks") == 2 * (macs["decoder_attention"] + macs["decoder_mlp"])


def test_paper_figures_for_vit_large():
    dims = flops.ModelDims()  # ViT-L/16 at 224 with the 8x512 decoder
    without = flops.summarize(flops.stage_macs(dims, 0.75))
    with_tokens = flops.summarize(flops.stage_macs(dims, 0.75, encoder_mask_tokens=True))
    assert round(without.total_gflops, 1) == 41.5
    assert round(with_tokens.total_gflops, 1) == 134.0
    assert round(with_tokens.total_gflops / without.total_gflops, 2) == 3.23
    enc, dec = flops.per_token_macs(dims)
    assert 0.08 < dec / enc < 0.10  # "the decoder has <10% computation per token"
