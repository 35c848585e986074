"""Pyramidal encoder: a Swin Transformer built from timm's modules that encodes only the
visible tokens, with windowed attention restricted to visible tokens (LocalMIM section 5).

Masking works on units of one last-stage token (32 px for patch 4 and three merges). The visible
stage-1 tokens are kept unit-major: each visible unit's w x w block of tokens is contiguous and
in raster order inside, so a 2 x 2 patch merge stays inside a unit at every stage.

Differences from the released (GreenMIM-derived) code, on purpose:

* True coordinates at every stage. The released code rebuilds the coordinates after each merge
  from a raster-order grid indexed by a unit-major mask, so at stages 2-3 window membership and
  relative positions do not match the real geometry. Here a token's coordinate is always its
  unit's position times the unit side plus its offset inside the unit.
* timm's 2 x 2 merge order ((0,0), (1,0), (0,1), (1,1)), the order of timm's (and the official)
  Swin used for fine-tuning; the released pre-training code concatenates (0,0), (0,1), (1,0),
  (1,1), which swaps two chunks of the merge weights between pre-training and fine-tuning.
* Any equivalent masked attention is allowed. Here, where few visible tokens share a window
  (stage 1), the visible tokens are packed into their occupied windows, padded to the window
  area (a static bound on occupied windows keeps every shape fixed); elsewhere attention is
  dense over the visible tokens of an image with an additive bias: the window's
  relative-position bias inside a (shifted) window and -inf across windows. Window ids are
  non-cyclic, ``floor((coord + (ws - shift) mod ws) / ws)``, which equals Swin's cyclic shift
  plus region masks; windows that do not tile the grid are truncated at the border. Nothing
  synchronises the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmim.errors import ConfigError
from lmim.models.masking import mask_indices
from lmim.models.vit import init_linear_and_norm


def window_index(
    coords: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which visible tokens share a (shifted) window, and their relative-position index.

    Args:
        coords: (B, V, 2) long (row, col) of each token on its stage's grid.
        window: window size (rows, cols) of the block.
        shift: shift of the block's windows.

    Returns:
        same: (B, V, V) bool, True where two tokens are in the same window.
        index: (B, V, V) long into the ((2 wh - 1) (2 ww - 1), heads) bias table:
            ``(dr + wh - 1) (2 ww - 1) + (dc + ww - 1)`` inside a window, 0 elsewhere.
    """
    wh, ww = window
    sh, sw = shift
    r, c = coords[..., 0], coords[..., 1]
    win_r = torch.div(r + (wh - sh) % wh, wh, rounding_mode="floor")
    win_c = torch.div(c + (ww - sw) % ww, ww, rounding_mode="floor")
    same = (win_r[:, :, None] == win_r[:, None, :]) & (win_c[:, :, None] == win_c[:, None, :])
    dr = r[:, :, None] - r[:, None, :] + wh - 1
    dc = c[:, :, None] - c[:, None, :] + ww - 1
    index = torch.where(same, dr * (2 * ww - 1) + dc, torch.zeros_like(dr))
    return same, index


def window_bias(same: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, heads, V, V) additive attention bias: the table's entry inside a window, -inf across."""
    bias = table[index].permute(0, 3, 1, 2)
    return bias.masked_fill(~same[:, None], float("-inf"))


def window_groups(
    coords: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    max_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack visible tokens into their (shifted) windows, padded to the window area.

    Only occupied windows get a group; their number is bounded by ``max_groups`` (known from the
    unit and window sizes), so every shape is static and nothing synchronises the GPU.

    Args:
        coords: (B, V, 2) long token coordinates on the stage grid.
        grid: stage grid (rows, cols).
        window: window size.
        shift: window shift.
        max_groups: upper bound on the occupied windows per image.

    Returns:
        slot: (B, V) long, each token's position in the (G * P) padded sequence.
        valid: (B, G * P) bool, True where a slot holds a token.
        index: (B, G * P, P) long relative-position index of each slot against the slots of its
            group (0 where either slot is empty).
        P: slots per group (the window area).
    """
    wh, ww = window
    sh, sw = shift
    Bc, V, _ = coords.shape
    P, G = wh * ww, max_groups
    r, c = coords[..., 0], coords[..., 1]
    off_r, off_c = (wh - sh) % wh, (ww - sw) % ww
    n_cols = (grid[1] + off_c + ww - 1) // ww
    n_win = ((grid[0] + off_r + wh - 1) // wh) * n_cols
    win = torch.div(r + off_r, wh, rounding_mode="floor") * n_cols + torch.div(
        c + off_c, ww, rounding_mode="floor"
    )
    occupied = torch.zeros(Bc, n_win, dtype=torch.long, device=coords.device)
    occupied.scatter_(1, win, 1)
    group = (occupied.cumsum(1) - 1).gather(1, win)  # (B, V) rank of the token's window
    order = group.argsort(dim=1, stable=True)
    sorted_group = group.gather(1, order)
    counts = torch.zeros(Bc, G, dtype=torch.long, device=coords.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    starts = counts.cumsum(1) - counts
    rank = torch.arange(V, device=coords.device) - starts.gather(1, sorted_group)
    slot = torch.empty_like(group).scatter_(1, order, sorted_group * P + rank)
    valid = torch.zeros(Bc, G * P, dtype=torch.bool, device=coords.device)
    valid.scatter_(1, slot, True)
    slot_rc = torch.zeros(Bc, G * P, 2, dtype=torch.long, device=coords.device)
    slot_rc.scatter_(1, slot[..., None].expand(-1, -1, 2), coords)
    rc = slot_rc.reshape(Bc, G, P, 2)
    dr = rc[:, :, :, None, 0] - rc[:, :, None, :, 0] + wh - 1
    dc = rc[:, :, :, None, 1] - rc[:, :, None, :, 1] + ww - 1
    pair = valid.reshape(Bc, G, P, 1) & valid.reshape(Bc, G, 1, P)
    index = torch.where(pair, dr * (2 * ww - 1) + dc, torch.zeros_like(dr))
    return slot, valid, index.reshape(Bc, G * P, P), P


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    table: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention inside windows packed by :func:`window_groups`.

    Args:
        q, k, v: (B, heads, V, head_dim).
        groups: the packing (slot, valid, index, P); its batch is B or 1 (shared mask).
        table: relative-position bias table ((2 wh - 1) (2 ww - 1), heads).

    Returns:
        (B, heads, V, head_dim).
    """
    slot, valid, index, P = groups
    B, H, V, D = q.shape
    Bc, GP = valid.shape
    G = GP // P
    idx = slot.expand(B, -1)[:, None, :, None].expand(B, H, V, D)

    def pack(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(B, H, GP, D).scatter(2, idx, t)
        return out.reshape(B, H, G, P, D).transpose(1, 2).reshape(B * G, H, P, D)

    bias = table[index].permute(0, 3, 1, 2).reshape(Bc, H, G, P, P).transpose(1, 2)
    keys = valid.reshape(Bc, G, 1, 1, P)
    queries = valid.reshape(Bc, G, 1, P, 1)
    # Empty key slots are excluded; empty query slots (outputs dropped) see all keys at 0 bias
    # so that no softmax row is all -inf.
    bias = torch.where(keys, bias, float("-inf")).where(queries, 0.0)
    bias = bias.expand(B, -1, -1, -1, -1).reshape(B * G, H, P, P).to(q.dtype)
    o = F.scaled_dot_product_attention(
        pack(q), pack(k), pack(v), attn_mask=bias, dropout_p=dropout_p
    )
    o = o.reshape(B, G, H, P, D).transpose(1, 2).reshape(B, H, GP, D)
    return o.gather(2, idx)


class MaskedSwinBlock(nn.Module):
    """One Swin block on the visible tokens of a stage: timm's ``SwinTransformerBlock``, with
    its windowed attention restricted to visible tokens.

    It adopts the modules of a timm block under timm's names (``norm1``, ``attn``,
    ``drop_path1``, ``norm2``, ``mlp``, ``drop_path2``), so the weights load into timm. It is a
    module of its own so that the block runs through ``__call__``: FSDP shards every block as a
    unit and gathers its weights in a forward hook, which a caller reaching into a block's
    submodules would bypass.

    Args:
        block: the timm block whose modules, window size and shift this block takes over.
    """

    def __init__(self, block: SwinTransformerBlock) -> None:
        super().__init__()
        self.window_size: tuple[int, int] = tuple(block.window_size)
        self.shift_size: tuple[int, int] = tuple(block.shift_size)
        self.norm1 = block.norm1
        self.attn = block.attn
        self.drop_path1 = block.drop_path1
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.drop_path2 = block.drop_path2

    def forward(self, x: torch.Tensor, plan: tuple[str, tuple]) -> torch.Tensor:
        """Pre-norm windowed attention and MLP, each with a residual.

        Args:
            x: (B, V, C) visible tokens of a stage.
            plan: ``("grouped", window_groups(...))`` or ``("dense", window_index(...))`` for
                this block's window size and shift, batch B or 1 (shared mask).

        Returns:
            (B, V, C).
        """
        B, V, _ = x.shape
        attn = self.attn
        kind, plan = plan
        qkv = attn.qkv(self.norm1(x)).reshape(B, V, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, V, head_dim)
        drop = attn.attn_drop.p if self.training else 0.0
        table = attn.relative_position_bias_table
        if kind == "grouped":
            o = grouped_attention(q, k, v, plan, table, drop)
        else:
            bias = window_bias(*plan, table).to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, V, -1)))
        x = x + self.drop_path1(o)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaskedSwin(nn.Module):
    """Swin encoder that encodes only visible mask units and returns the stage outputs.

    Parameter names are timm's ``SwinTransformer`` (``patch_embed``, ``layers.<i>.downsample``,
    ``layers.<i>.blocks``), built by timm itself, so the weights load into it (see
    :func:`lmim.export.encoder_state_dict`); each timm block is taken over by a
    :class:`MaskedSwinBlock`. There is no final norm: each tapped stage has its own LayerNorm in
    the pre-training model.

    Tap ``k`` is the output of stage ``k + 1`` of the paper: after the patch merging that follows
    it for all but the last stage (i.e. after timm's ``layers[k + 1].downsample``), and the last
    stage's blocks for ``k = len(depths) - 1``.

    Args:
        img_size: input side in pixels, a multiple of the mask unit (patch x 2^(stages - 1)).
        patch_size: stage-1 patch side.
        in_chans: input channels.
        embed_dim: stage-1 width (doubles per stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (clamped to the stage's resolution by timm's rule).
        mlp_ratio: MLP hidden width / width.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth (0 in pre-training).
        timm_name: the timm model name these weights load into, when there is one.
        grad_checkpointing: recompute each block in the backward (activation checkpointing,
            :meth:`set_grad_checkpointing`): less memory, about 1/3 more compute per step.
    """

    # Its masked forward computes windowed attention in fused kernels, with no attention matrix
    # to record: lmim.analyze reads the timm export (same weights, this LayerNorm epsilon).
    records_attention = False
    norm_eps = 1e-6
    num_prefix_tokens = 0

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        timm_name: str | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = bool(grad_checkpointing)
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads):
            raise ConfigError(
                f"model.encoder.depths={list(depths)} and model.encoder.num_heads="
                f"{list(num_heads)} need one entry per stage"
            )
        n = len(depths)
        unit = patch_size * 2 ** (n - 1)
        if img_size % unit:
            raise ConfigError(
                f"data.img_size={img_size} is not divisible by the {unit}-px mask unit (one "
                f"last-stage token: patch {patch_size} x 2^{n - 1}): use a multiple of {unit} "
                f"(e.g. data.img_size={max(unit, img_size // unit * unit)})"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.timm_name = timm_name
        swin = SwinTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=self.norm_eps),
        )
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        for layer in self.layers:  # same modules and names, masked forward (MaskedSwinBlock)
            for j, blk in enumerate(layer.blocks):
                layer.blocks[j] = MaskedSwinBlock(blk)
        # LocalMIM init: Linear xavier-uniform, LayerNorm (1, 0); relative-position tables keep
        # timm's trunc-normal(0.02).
        self.apply(init_linear_and_norm)

        self.depth = n  # tappable layers = stages
        self.mask_unit = unit
        self.mask_grid = (img_size // unit, img_size // unit)
        dims = [embed_dim * 2**i for i in range(n)]
        # tokens per mask-unit side at each tap (after the merge that ends the stage)
        self.tap_unit_sides = [2 ** max(n - 2 - k, 0) for k in range(n)]
        self.feature_info = [
            dict(
                num_chs=dims[min(k + 1, n - 1)],
                reduction=unit // self.tap_unit_sides[k],
                module=f"layers.{k + 1}.downsample" if k < n - 1 else f"layers.{k}",
                name=f"stage{k + 1}",
            )
            for k in range(n)
        ]
        self.paper_taps = tuple(range(n))
        self.paper_scales = tuple(self.tap_unit_sides)
        # A tap's decoder predicts on the stage's own grid: scale = tokens per unit side.
        self.native_scales = tuple(self.tap_unit_sides)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (timm's
        switch): less memory, about one more forward per step."""
        self.grad_checkpointing = bool(enable)

    def timm_architecture(self) -> tuple[type[nn.Module], dict[str, Any]]:
        """timm's ``SwinTransformer`` and the keyword arguments that build this architecture
        (what export, fine-tuning and analysis load these weights into)."""
        return SwinTransformer, dict(
            img_size=int(self.img_size),
            patch_size=int(self.patch_size),
            in_chans=int(self.in_chans),
            embed_dim=int(self.embed_dim),
            depths=tuple(int(d) for d in self.depths),
            num_heads=tuple(int(h) for h in self.num_heads),
            window_size=int(self.window_size),
            mlp_ratio=float(self.mlp_ratio),
            qkv_bias=bool(self.qkv_bias),
        )

    def _blocks(
        self, blocks: nn.Sequential, x: torch.Tensor, coords: torch.Tensor, side: int
    ) -> torch.Tensor:
        """Run one stage's blocks on (B, V, C) visible tokens at (B|1, V, 2) coordinates.

        ``side`` is the tokens per mask-unit side at this stage. Attention is dense over the
        visible tokens with a window bias, or, when that is cheaper, computed inside the
        occupied windows packed to the window area. The plans depend on the coordinates only
        and are shared by the blocks of a stage with the same shift.
        """
        V = x.shape[1]
        units = V // (side * side)
        grid = (self.mask_grid[0] * side, self.mask_grid[1] * side)
        plans: dict[tuple, tuple] = {}
        for blk in blocks:
            key = (blk.window_size, blk.shift_size)
            if key not in plans:
                (wh, ww), shift = key
                # a run of `side` tokens meets at most ceil((side - 1) / ws) + 1 windows
                per_unit = (-(-(side - 1) // wh) + 1) * (-(-(side - 1) // ww) + 1)
                n_win = ((grid[0] + wh - 1) // wh + 1) * ((grid[1] + ww - 1) // ww + 1)
                G = min(units * per_unit, n_win)
                if G * (wh * ww) ** 2 < V * V:
                    plans[key] = ("grouped", window_groups(coords, grid, key[0], shift, G))
                else:
                    plans[key] = ("dense", window_index(coords, key[0], shift))
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: the drop-path draws are replayed, so the step is the same.
                x = checkpoint(blk, x, plans[key], use_reentrant=False)
            else:
                x = blk(x, plans[key])  # through __call__: FSDP gathers the block's weights
        return x

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        taps: list[int] | None = None,
        isolate_gradients: bool = False,
        ids_keep: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encode the visible units and return the tapped stages.

        Args:
            images: (B, C, H, W) normalised images.
            mask: (B, U) bool over the mask-unit grid, True = masked, raster order; None keeps
                every unit.
            taps: stage indices (0-based), ascending; None returns the last stage.
            isolate_gradients: detach after each tap (each stage learns only from its tap).
            ids_keep: (B, Uv) or (1, Uv) visible unit indices in raster order, derived from
                ``mask``; a single row means one mask shared by the batch (the attention bias is
                then computed once).

        Returns:
            Per tap, (B, Uv * s^2, C_k) tokens, unit-major: each visible unit's s x s tokens
            (s = ``tap_unit_sides[k]``) contiguous and in raster order inside.
        """
        n = self.depth
        taps = [n - 1] if taps is None else list(taps)
        x = self.patch_embed(images)  # (B, H, W, C)
        B, H, W, C = x.shape
        gh, gw = self.mask_grid
        w = H // gh
        x = x.reshape(B, gh, w, gw, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, gh * gw, w, w, C)
        if ids_keep is None:
            if mask is None:
                ids_keep = torch.arange(gh * gw, device=x.device)[None]
            else:
                ids_keep, _ = mask_indices(mask)
        Uv = ids_keep.shape[1]
        x = x.gather(1, ids_keep[:, :, None, None, None].expand(B, -1, w, w, C))
        unit_rc = torch.stack([ids_keep // gw, ids_keep % gw], dim=-1)  # (B|1, Uv, 2)
        outs: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                merged = layer.downsample(x.reshape(B * Uv, w, w, -1))  # timm PatchMerging
                w //= 2
                x = merged.reshape(B, Uv, w, w, -1)
                if i - 1 in taps:
                    outs.append(x.reshape(B, Uv * w * w, -1))
                    if i - 1 == taps[-1]:
                        return outs
                    if isolate_gradients:
                        x = x.detach()
            offs = torch.stack(
                torch.meshgrid(
                    torch.arange(w, device=x.device),
                    torch.arange(w, device=x.device),
                    indexing="ij",
                ),
                dim=-1,
            ).reshape(1, 1, w * w, 2)
            coords = (unit_rc[:, :, None] * w + offs).reshape(unit_rc.shape[0], -1, 2)
            y = self._blocks(layer.blocks, x.reshape(B, Uv * w * w, -1), coords, w)
            x = y.reshape(B, Uv, w, w, -1)
        outs.append(x.reshape(B, Uv * w * w, -1))
        return outs
