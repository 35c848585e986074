"""Columnar encoder: a ViT built from timm's modules that encodes only the visible patches."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmim.errors import ConfigError
from lmim.models.masking import mask_indices
from lmim.models.pos_embed import sincos_2d


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE/LocalMIM init: Linear xavier-uniform, zero bias; LayerNorm (1, 0); convs untouched."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MaskedViT(nn.Module):
    """ViT encoder (MAE style) that encodes only visible patches and returns tapped layers.

    Parameter names match ``timm.models.vision_transformer.VisionTransformer`` (``patch_embed``,
    ``cls_token``, ``pos_embed``, ``blocks``), so the weights load into timm; see
    :func:`lmim.export.encoder_state_dict`. There is no final norm: every tapped layer gets its
    own LayerNorm in the pre-training model.

    Args:
        img_size: input side in pixels (square), a multiple of ``patch_size``.
        patch_size: patch side in pixels.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth (0 in pre-training).
        timm_name: the registered timm model of this architecture; the exporter uses it only
            while the settings above equal that model's (else it builds timm's
            ``VisionTransformer`` with them, :func:`lmim.export.timm_model`).
        grad_checkpointing: recompute each block in the backward (activation checkpointing,
            :meth:`set_grad_checkpointing`): less memory, about 1/3 more compute per step.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        timm_name: str | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(
                f"data.img_size={img_size} is not divisible by model.encoder.patch_size="
                f"{patch_size}: use a multiple of {patch_size} "
                f"(e.g. data.img_size={max(patch_size, img_size // patch_size * patch_size)})"
            )
        if embed_dim % num_heads:
            raise ConfigError(
                f"model.encoder.embed_dim={embed_dim} is not divisible by "
                f"model.encoder.num_heads={num_heads}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.timm_name = timm_name
        self.grad_checkpointing = bool(grad_checkpointing)
        self.num_prefix_tokens = 1  # the cls token leads every tap's output
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # Masking works on patches; LocalMIM's paper schedule for columnar encoders.
        self.mask_grid, self.mask_unit = self.grid_size, patch_size
        self.paper_taps, self.paper_scales = (1, 3, -3, -1), (4, 2, 1, 0.5)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (not learned) 2-D sin-cos position embedding with a zero row for cls.
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid_size, cls_token=True))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}", name=f"block{i}")
            for i in range(depth)
        ]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (timm's
        switch): less memory for larger batches or models, about one more forward per step."""
        self.grad_checkpointing = bool(enable)

    def timm_architecture(self) -> tuple[type[nn.Module], dict[str, Any]]:
        """timm's ``VisionTransformer`` and the keyword arguments that build this architecture
        (what export, fine-tuning and analysis load these weights into)."""
        return VisionTransformer, dict(
            img_size=int(self.img_size),
            patch_size=int(self.patch_size),
            in_chans=int(self.in_chans),
            embed_dim=int(self.embed_dim),
            depth=int(self.depth),
            num_heads=int(self.num_heads),
            mlp_ratio=float(self.mlp_ratio),
            qkv_bias=bool(self.qkv_bias),
        )

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        taps: list[int] | None = None,
        isolate_gradients: bool = False,
        ids_keep: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encode the visible patches and return the outputs of the tapped blocks.

        Args:
            images: (B, C, H, W) normalised images.
            mask: (B, L) bool, True = masked, raster order; None keeps every patch.
            taps: 0-indexed block indices, ascending; None returns the last block only.
            isolate_gradients: detach the sequence after each tap, so every segment of blocks
                learns only from the losses of its own tap (LocalMIM's gradient-isolated variant).
            ids_keep: (B, V) visible indices already derived from ``mask``
                (:func:`lmim.models.masking.mask_indices`); saves recomputing them.

        Returns:
            One (B, 1 + V, D) tensor per tap (cls first, then the V visible tokens in raster
            order). Blocks after the last tap are not run.
        """
        taps = [self.depth - 1] if taps is None else list(taps)
        x = self.patch_embed(images)  # (B, L, D)
        x = x + self.pos_embed[:, 1:]
        if ids_keep is None and mask is not None:
            ids_keep, _ = mask_indices(mask)
        if ids_keep is not None:
            # (B, V, D); ids_keep may be (1, V) when the batch shares one mask
            x = x.gather(1, ids_keep.unsqueeze(-1).expand(x.shape[0], -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        outs = []
        tap_set = set(taps)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i in range(taps[-1] + 1):
            if recompute:
                # Non-reentrant: the drop-path draws are replayed, so the step is the same.
                x = checkpoint(self.blocks[i], x, use_reentrant=False)
            else:
                x = self.blocks[i](x)
            if i in tap_set:
                outs.append(x)
                if isolate_gradients:
                    x = x.detach()
        return outs
