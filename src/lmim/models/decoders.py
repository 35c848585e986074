"""Local decoders: one light transformer block per tapped layer, then a rescale head.

LocalMIM section 2.3. The transformer always runs on the encoder's patch grid; the rescale head
turns that grid into the tap's target grid (x4: two transposed convs, x2: one, x1: nothing,
x0.5: average pooling), and a 1x1 conv maps to the target width. The head runs on the tokens'
channels-last layout (:func:`rescale_tokens`). With ``model.batch_decoders``
the alike decoders of a ViT run their transformer part as one batched block
(:func:`batched_decoder_tokens`) on their own parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import nn

from lmim.errors import ConfigError
from lmim.models.pos_embed import sincos_2d
from lmim.models.vit import init_linear_and_norm
from lmim.scales import scale_exponent, scaled_grid


def rescale_head(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The head that takes a (B, dim, h, w) map to (B, C, h * scale, w * scale).

    x2^k (k >= 1): k stride-2 transposed convs that halve the channels, with channel-LayerNorm and
    GELU between them (x4: ConvT -> LN -> GELU -> ConvT; x2: a single ConvT with no norm or
    activation). x1: identity. x2^-k: a 2^k x 2^k average pool. These modules hold the
    parameters and define the function; :func:`rescale_tokens` computes it channels-last.

    Returns:
        The module and its output channels C.
    """
    k = scale_exponent(scale)
    if k == 0:
        return nn.Identity(), dim
    if k < 0:
        f = 1 << -k
        return nn.AvgPool2d(f, stride=f), dim
    layers: list[nn.Module] = []
    ch = dim
    for i in range(k):
        if ch < 2:
            raise ConfigError(f"model.decoder.dim={dim} is too narrow for scale {scale}")
        if i:
            layers += [LayerNorm2d(ch, eps=1e-6), nn.GELU()]
        layers.append(nn.ConvTranspose2d(ch, ch // 2, kernel_size=2, stride=2))
        ch //= 2
    return nn.Sequential(*layers), ch


def decoder_body(
    in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float
) -> tuple[nn.Linear, nn.Sequential, nn.LayerNorm]:
    """What every local decoder shares: a Linear from the tap's width, ``depth`` timm Blocks
    (qkv bias, LayerNorm eps 1e-6) and a final LayerNorm, with the MAE init (xavier Linear)."""
    if dim % num_heads:
        raise ConfigError(
            f"model.decoder_dim={dim} is not divisible by model.decoder_heads={num_heads}"
        )
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    embed = nn.Linear(in_dim, dim)
    blocks = nn.Sequential(
        *[
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)
        ]
    )
    norm = norm_layer(dim)
    for m in (embed, blocks, norm):
        m.apply(init_linear_and_norm)
    return embed, blocks, norm


class ViTLocalDecoder(nn.Module):
    """The decoder of one ViT tap.

    Args:
        in_dim: encoder width at the tap.
        out_dim: target width per cell (3 * nbins for HOG, 3 * cell^2 for pixels).
        grid_size: encoder patch grid (rows, cols).
        scale: target grid / patch grid, a power of two.
        dim: decoder width (256 in LocalMIM).
        depth: transformer blocks (1 in LocalMIM).
        num_heads: attention heads (8 in LocalMIM).
        mlp_ratio: block MLP ratio.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        scale: float,
        dim: int = 256,
        depth: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.out_grid = scaled_grid(self.grid_size, scale)
        self.scale = scale
        self.embed, self.blocks, self.norm = decoder_body(in_dim, dim, depth, num_heads, mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_embed", sincos_2d(dim, self.grid_size, cls_token=True), persistent=False
        )
        self.rescale, ch = rescale_head(dim, scale)
        # 1x1 conv to the target width; the convs keep PyTorch's default init.
        self.proj = nn.Conv2d(ch, out_dim, kernel_size=1)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct a tap's targets on its grid.

        Args:
            x: (B, 1 + V, in_dim) normed tap output, cls first.
            ids_restore: (B, L) from :func:`lmim.models.masking.mask_indices`; (1, L) when the
                batch shares one mask.

        Returns:
            (B, h * w, out_dim) predictions on the (h, w) target grid, raster order.
        """
        x = self.embed(x)  # (B, 1 + V, dim)
        x = with_mask_tokens(x, self.mask_token, ids_restore) + self.pos_embed  # (B, 1 + L, dim)
        return self.predict(self.norm(self.blocks(x))[:, 1:])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) decoded patch tokens -> (B, h * w, out_dim) predictions: the rescale head
        and the 1x1 conv."""
        h, w = self.grid_size
        x = rescale_tokens(self.rescale, x.unflatten(1, (h, w))).flatten(1, 2)  # (B, H * W, C)
        # The 1x1 conv is a linear map of each cell's channels.
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


def with_mask_tokens(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """(..., 1 + V, dim) cls + visible tokens -> (..., 1 + L, dim) with ``mask_token``
    (broadcastable to (..., 1, dim)) at the masked patches, patches in raster order.

    ``ids_restore`` is (B|1, L) and indexes the batch dimension just before the tokens; any
    leading dimensions (the taps of :func:`batched_decoder_tokens`) share it."""
    lead, V1, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    L = ids_restore.shape[1]
    fill = mask_token.expand(*lead, L + 1 - V1, d)
    patches = torch.cat([x[..., 1:, :], fill], dim=-2)
    index = ids_restore.expand(lead[-1], L)[..., None].expand(*lead, L, d)
    return torch.cat([x[..., :1, :], patches.gather(-2, index)], dim=-2)


# -- the alike decoders of a ViT as one batched block (model.batch_decoders) -----------------------


def check_batchable(decoders: Sequence[nn.Module]) -> None:
    """Raise a ConfigError unless :func:`batched_decoder_tokens` can run ``decoders``: several
    ViT decoders of one width and one head count per block (what a per-tap
    ``model.decoder_dim`` or ``model.decoder_heads`` list could make differ; the rest of their
    shape comes from the encoder and from settings shared by all taps)."""
    if len(decoders) < 2:
        raise ConfigError(
            f"model.batch_decoders=true batches several decoders; this model has {len(decoders)}: "
            "use model.batch_decoders=false"
        )
    for d in decoders:
        if type(d) is not ViTLocalDecoder:
            raise ConfigError(
                f"model.batch_decoders=true runs ViT decoders (ViTLocalDecoder) as one block; "
                f"this model's are {type(d).__name__}, whose widths and grids differ per tap: "
                "use model.batch_decoders=false"
            )
    shapes = {
        "model.decoder_dim": [d.embed.out_features for d in decoders],
        "model.decoder_heads": [[b.attn.num_heads for b in d.blocks] for d in decoders],
    }
    for key, values in shapes.items():
        for k, value in enumerate(values):
            if value != values[0]:
                raise ConfigError(
                    f"model.batch_decoders=true needs decoders of one shape, but {key} is "
                    f"{value} at tap {k} and {values[0]} at tap 0: give it one value or "
                    "model.batch_decoders=false"
                )


def _stack(modules: Sequence[nn.Module], name: str) -> torch.Tensor:
    return torch.stack([m.get_parameter(name) for m in modules])


def _linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """(T, B, N, in) -> (T, B, N, out): tap t through ``layers[t]``, one batched matmul."""
    T, B, N, _ = x.shape
    w, b = _stack(layers, "weight"), _stack(layers, "bias")
    out = torch.baddbmm(b.unsqueeze(1), x.reshape(T, B * N, -1), w.transpose(1, 2))
    return out.view(T, B, N, -1)


def _layer_norm(x: torch.Tensor, norms: Sequence[nn.LayerNorm]) -> torch.Tensor:
    """(T, B, N, D): tap t normalised by ``norms[t]`` (one normalisation, one affine)."""
    w, b = _stack(norms, "weight"), _stack(norms, "bias")
    y = F.layer_norm(x, norms[0].normalized_shape, eps=norms[0].eps)
    return torch.addcmul(b[:, None, None], y, w[:, None, None])


def _attention(x: torch.Tensor, attns: Sequence[nn.Module]) -> torch.Tensor:
    """timm's Attention of each tap on (T, B, N, C): per-tap projections, one attention call
    over the T * B sequences."""
    T, B, N, _ = x.shape
    heads = attns[0].num_heads
    qkv = _linear(x, [a.qkv for a in attns])
    q, k, v = qkv.reshape(T * B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # (T * B, heads, N, head_dim)
    return _linear(out.transpose(1, 2).reshape(T, B, N, -1), [a.proj for a in attns])


def batched_decoder_tokens(
    decoders: Sequence[ViTLocalDecoder],
    norms: Sequence[nn.LayerNorm],
    feats: Sequence[torch.Tensor],
    ids_restore: torch.Tensor,
) -> torch.Tensor:
    """The transformer part of T alike ViT decoders (:func:`check_batchable`) on their taps at
    once: ``decoders[t](norms[t](feats[t]), ids_restore)`` before the rescale head, with each
    layer's weights stacked over the taps, so that each Linear is one batched matmul and each
    attention one call, instead of T of each. The parameters stay the decoders' own (state
    dicts and checkpoints are those of the per-tap path); the results agree with it to
    rounding (the matmuls are batched differently).

    Args:
        decoders: T decoders of one shape.
        norms: the T tap norms.
        feats: T (B, 1 + V, D) tap outputs, cls first.
        ids_restore: (B|1, L) from :func:`lmim.models.masking.mask_indices`.

    Returns:
        (T, B, L, dim) decoded patch tokens; ``decoders[t].predict`` turns row t into predictions.
    """
    x = _layer_norm(torch.stack(list(feats)), norms)
    x = _linear(x, [d.embed for d in decoders])
    tokens = torch.stack([d.mask_token for d in decoders])  # (T, 1, 1, dim)
    x = with_mask_tokens(x, tokens, ids_restore) + decoders[0].pos_embed
    for j in range(len(decoders[0].blocks)):
        blocks = [d.blocks[j] for d in decoders]
        x = x + _attention(_layer_norm(x, [b.norm1 for b in blocks]), [b.attn for b in blocks])
        h = F.gelu(_linear(_layer_norm(x, [b.norm2 for b in blocks]), [b.mlp.fc1 for b in blocks]))
        x = x + _linear(h, [b.mlp.fc2 for b in blocks])
    return _layer_norm(x, [d.norm for d in decoders])[:, :, 1:]


def rescale_tokens(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A :func:`rescale_head` on a channels-last (B, h, w, C) map, returned channels-last.

    The same function as the head's own (B, C, h, w) forward, to rounding, without its layout
    changes: a transposed conv whose stride is its kernel (2x2 here) does not overlap, so it is
    one Linear from C to the kh x kw x C' outputs of each input pixel (the conv's weight and
    bias, rearranged) followed by a pixel shuffle; the channel LayerNorm is a LayerNorm over
    the last dim (what timm's LayerNorm2d computes after its permute); the average pool runs on
    the channels-last view.
    All are matmuls and elementwise passes over contiguous tokens (the tensor-core layout on
    GPUs), and the weights' gradients have the weights' own layout (as DDP's gradient buckets
    expect).
    """
    for layer in head if isinstance(head, nn.Sequential) else [head]:
        if isinstance(layer, nn.ConvTranspose2d):
            (kh, kw), c = layer.kernel_size, layer.out_channels
            if layer.stride != (kh, kw) or layer.padding != (0, 0):
                raise TypeError("rescale_tokens: a transposed conv whose kernels overlap")
            B, h, w, _ = x.shape
            weight = layer.weight.permute(2, 3, 1, 0).reshape(kh * kw * c, -1)  # (dy, dx, c) x C
            x = F.linear(x, weight, layer.bias.repeat(kh * kw))  # (B, h, w, kh * kw * c)
            x = x.reshape(B, h, w, kh, kw, c).transpose(2, 3).reshape(B, kh * h, kw * w, c)
        elif isinstance(layer, nn.LayerNorm):  # LayerNorm2d: over the channels
            x = F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
        elif isinstance(layer, nn.AvgPool2d):
            x = layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        elif isinstance(layer, (nn.GELU, nn.Identity)):
            x = layer(x)
        else:
            raise TypeError(f"rescale_tokens: no channels-last form of {type(layer).__name__}")
    return x


class SwinLocalDecoder(nn.Module):
    """The decoder of one pyramid (Swin) tap (LocalMIM section 5.5).

    Linear to ``dim``, mask tokens for the masked units, un-shuffle to the full unit-major
    sequence, reorder to raster order over the stage's grid, fixed sin-cos positions (no cls),
    one block, LayerNorm, and a linear head to the target width. It predicts on its stage's own
    grid, so ``scale`` must be the stage's tokens per mask-unit side.

    Args:
        in_dim: encoder width at the tap.
        out_dim: target width per cell.
        grid_size: mask-unit grid (rows, cols).
        scale: tokens per unit side at this tap (4, 2, 1, 1 for Swin's four stages).
        dim: decoder width (64, 128, 128, 128 in LocalMIM).
        depth: transformer blocks (1).
        num_heads: attention heads (4).
        mlp_ratio: block MLP ratio.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_size: tuple[int, int],
        scale: float,
        dim: int = 128,
        depth: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        k = scale_exponent(scale)
        if k < 0:
            raise ConfigError(
                f"schedule.scales: a Swin tap predicts on its own stage grid, which is never "
                f"coarser than the mask-unit grid; got scale {scale}"
            )
        self.grid_size = tuple(grid_size)
        self.side = 1 << k
        self.out_grid = scaled_grid(self.grid_size, scale)
        self.embed, self.blocks, self.norm = decoder_body(in_dim, dim, depth, num_heads, mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, self.out_grid), persistent=False)
        self.head = nn.Linear(dim, out_dim)
        init_linear_and_norm(self.head)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct a tap's targets on its stage grid.

        Args:
            x: (B, Uv * s^2, in_dim) normed tap output, unit-major (s = tokens per unit side).
            ids_restore: (B|1, U) from :func:`lmim.models.masking.mask_indices` on the unit mask.

        Returns:
            (B, U * s^2, out_dim) predictions in raster order over the (gh * s, gw * s) grid.
        """
        B = x.shape[0]
        U = ids_restore.shape[1]
        s2 = self.side * self.side
        x = self.embed(x).reshape(B, -1, s2, self.embed.out_features)  # (B, Uv, s^2, dim)
        d = x.shape[-1]
        x = torch.cat([x, self.mask_token.expand(B, U - x.shape[1], s2, d)], dim=1)
        x = x.gather(1, ids_restore[:, :, None, None].expand(B, U, s2, d))  # unit raster order
        gh, gw = self.grid_size
        s = self.side
        x = x.reshape(B, gh, gw, s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(B, U * s2, d)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x)
