"""Analytic matmul FLOPs of MAE, per stage.

Counts every matrix product of a forward pass (Linear layers, the patch-embedding conv, and the
two attention products ``q k^T`` and ``attn v``); a multiply-add is 2 FLOPs (1 MAC). Norms,
softmax, GELU and the loss are elementwise and left out (well under 1% of the total).

The reference embeds all ``L`` patches and then drops the removed ones; our fast path embeds the
kept ones only (``visible_patch_embed=True``). With ``encoder_mask_tokens`` (the paper's ablation)
the encoder sees all ``1+L`` tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

STAGES = ("patch_embed", "encoder_attention", "encoder_mlp", "decoder_embed",
          "decoder_attention", "decoder_mlp", "decoder_pred")
ENCODER_STAGES = ("patch_embed", "encoder_attention", "encoder_mlp")


@dataclass(frozen=True)
class ModelDims:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def of(cls, model) -> "ModelDims":
        pe = model.patch_embed
        if pe.img_size[0] != pe.img_size[1]:
            raise ValueError(f"the FLOPs model assumes square images, got img_size={pe.img_size}")
        return cls(img_size=pe.img_size[0], patch_size=pe.patch_size[0], in_chans=model.in_chans,
                   embed_dim=model.cls_token.shape[-1], depth=len(model.blocks),
                   decoder_embed_dim=model.mask_token.shape[-1], decoder_depth=len(model.decoder_blocks),
                   mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.cls_token.shape[-1])


def attention_core_macs(tokens: int, dim: int) -> int:
    """``q k^T`` and ``attn v`` of one block (all heads): the products inside the attention kernel."""
    return 2 * tokens * tokens * dim


def attention_macs(tokens: int, dim: int) -> int:
    """qkv projection, ``q k^T``, ``attn v`` and the output projection, for one block."""
    return tokens * 3 * dim * dim + attention_core_macs(tokens, dim) + tokens * dim * dim


def mlp_macs(tokens: int, dim: int, mlp_ratio: float) -> int:
    return 2 * tokens * dim * int(dim * mlp_ratio)


def stage_macs(dims: ModelDims, mask_ratio: float = 0.75, *, encoder_mask_tokens: bool = False,
               visible_patch_embed: bool = False) -> dict[str, int]:
    """MACs of one image's forward pass, per stage (see :data:`STAGES`)."""
    L = dims.num_patches
    K = int(L * (1 - mask_ratio))
    D, d, P = dims.embed_dim, dims.decoder_embed_dim, dims.patch_size
    enc_tokens = 1 + (L if encoder_mask_tokens else K)
    dec_tokens = 1 + L
    embedded = K if visible_patch_embed and not encoder_mask_tokens else L
    pix = P * P * dims.in_chans
    return {
        "patch_embed": embedded * pix * D,
        "encoder_attention": dims.depth * attention_macs(enc_tokens, D),
        "encoder_mlp": dims.depth * mlp_macs(enc_tokens, D, dims.mlp_ratio),
        "decoder_embed": enc_tokens * D * d,
        "decoder_attention": dims.decoder_depth * attention_macs(dec_tokens, d),
        "decoder_mlp": dims.decoder_depth * mlp_macs(dec_tokens, d, dims.mlp_ratio),
        "decoder_pred": dec_tokens * d * pix,  # the reference predicts the cls row too, then drops it
    }


def kind_macs(dims: ModelDims, mask_ratio: float = 0.75, *, encoder_mask_tokens: bool = False,
              visible_patch_embed: bool = False) -> dict[str, dict[str, int]]:
    """:func:`stage_macs` regrouped by who runs them: ``{"encoder" | "decoder": {"gemm": the
    Linear / conv layers, "attention": the products inside the attention kernel}}``."""
    macs = stage_macs(dims, mask_ratio, encoder_mask_tokens=encoder_mask_tokens,
                      visible_patch_embed=visible_patch_embed)
    L = dims.num_patches
    enc_tokens = 1 + (L if encoder_mask_tokens else int(L * (1 - mask_ratio)))
    core = {"encoder": dims.depth * attention_core_macs(enc_tokens, dims.embed_dim),
            "decoder": dims.decoder_depth * attention_core_macs(1 + L, dims.decoder_embed_dim)}
    enc = sum(macs[k] for k in ENCODER_STAGES)
    total = {"encoder": enc, "decoder": sum(macs.values()) - enc}
    return {part: {"gemm": total[part] - core[part], "attention": core[part]} for part in ("encoder", "decoder")}


@dataclass(frozen=True)
class FlopsSummary:
    encoder_gflops: float
    decoder_gflops: float
    total_gflops: float
    total_gmacs: float
    stages_gflops: dict

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(macs: dict[str, int]) -> FlopsSummary:
    enc = sum(v for k, v in macs.items() if k in ENCODER_STAGES)
    total = sum(macs.values())
    return FlopsSummary(encoder_gflops=2 * enc / 1e9, decoder_gflops=2 * (total - enc) / 1e9,
                        total_gflops=2 * total / 1e9, total_gmacs=total / 1e9,
                        stages_gflops={k: 2 * v / 1e9 for k, v in macs.items()})


def per_token_macs(dims: ModelDims) -> tuple[int, int]:
    """(encoder, decoder) MACs per token, at the sequence lengths of the default 0.75 ratio:
    the paper's "the decoder has <10% computation per token vs. the encoder"."""
    L = dims.num_patches
    K = int(L * 0.25)
    enc = dims.depth * (attention_macs(1 + K, dims.embed_dim) + mlp_macs(1 + K, dims.embed_dim, dims.mlp_ratio))
    dec = dims.decoder_depth * (attention_macs(1 + L, dims.decoder_embed_dim)
                                + mlp_macs(1 + L, dims.decoder_embed_dim, dims.mlp_ratio))
    return enc // (1 + K), dec // (1 + L)
