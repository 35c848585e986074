"""What the encoder's attention does, layer by layer: the analysis of LocalMIM's section 5.

* :func:`recorded_attention` makes timm's own attention modules compute their attention matrix
  explicitly (``fused_attn`` off, for the analysis only) and records it through a forward hook on
  their ``attn_drop``: no copy of the model, no re-implementation of attention.
* :func:`attention_nmi`: the normalised mutual information between query and key positions of
  one attention matrix (Park et al., "What do self-supervised ViTs learn?", ICLR 2023). Low at a
  layer whose queries all look at the same keys; high where each query attends to its own.
* :func:`attention_distance`: how far, in pixels, a query's attention reaches (the
  attention-weighted mean distance to the keys).
* :func:`analyze_encoder`: both, per layer, over a batch of images.
* :func:`attention_maps`: where chosen query patches attend at chosen layers (the paper's
  attention-map figure: lower layers look around the query, upper ones at related regions).

Columnar encoders (timm ``VisionTransformer``, lmim ``MaskedViT``) attend globally: one matrix
per image and layer over all patches. Pyramidal ones (timm ``SwinTransformer``) attend inside
windows: one matrix per window, over the window's tokens. :func:`attention_layouts` says where
each matrix's tokens sit in the image (for Swin's shifted blocks, after undoing the cyclic
shift), so the scores are computed per window (NMI with Q = K = the window's tokens, distance
between the tokens' true positions) and averaged over the windows of an image, then over images,
then heads. In a shifted block, the windows at the border hold 2-4 regions that Swin's mask
keeps from attending to one another; that block-diagonal attention raises their NMI, which is
part of what the block computes and is kept. lmim's own ``MaskedSwin`` computes its windowed
attention in fused kernels with no matrix to record: it is analysed through the timm
``SwinTransformer`` its weights export to (:func:`lmim.export.timm_model`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in definition order: modules with timm's
    ``fused_attn`` switch and an ``attn_drop`` applied to the softmaxed attention (timm's
    ``Attention``, as in ViT blocks, and Swin's ``WindowAttention``)."""
    return [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]


@contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Record every attention matrix ``model`` computes inside the ``with`` block.

    Yields:
        One list per attention module (:func:`attention_modules` order), holding the
        (B, heads, queries, keys) matrix of each call, detached. The modules' ``fused_attn``
        settings are restored on exit; outputs are those of the explicit path (equal to the fused
        one up to float rounding).
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no timm attention module (a module with `fused_attn` "
            "and `attn_drop`): pass a timm ViT/Swin or an lmim encoder"
        )
    records: list[list[torch.Tensor]] = [[] for _ in modules]
    saved = [m.fused_attn for m in modules]
    hooks = []
    for i, m in enumerate(modules):
        m.fused_attn = False

        def keep(_module, _args, out, i=i):
            records[i].append(out.detach())

        hooks.append(m.attn_drop.register_forward_hook(keep))
    try:
        yield records
    finally:
        for h in hooks:
            h.remove()
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused


def _patch_attention(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``attn`` without the prefix tokens' rows and columns, each row renormalised to sum 1."""
    attn = attn[..., num_prefix:, num_prefix:].double()
    return attn / attn.sum(-1, keepdim=True).clamp_min(1e-300)


def attention_nmi(attn: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    """Normalised mutual information between query and key positions, per image and head.

    With the prefix tokens (cls, registers) removed and rows renormalised, A[q, k] is p(k | q);
    queries are uniform, p(q) = 1/Q, so p(k) = mean_q A[q, k] and
    I(Q; K) = sum_q sum_k p(q) A[q, k] log(A[q, k] / p(k)), NMI = I / sqrt(H(Q) H(K)).

    Args:
        attn: (..., Q, K) attention rows (softmax outputs).
        num_prefix: leading tokens that are not patches.

    Returns:
        (...) NMI in [0, 1]: 0 when every query attends alike (or all to one key: H(K) = 0),
        1 when each query attends to a key of its own.
    """
    a = _patch_attention(attn, num_prefix)
    q = a.shape[-2]
    p_k = a.mean(-2)  # (..., K)
    ratio = torch.where(a > 0, a / p_k.unsqueeze(-2).clamp_min(1e-300), torch.ones_like(a))
    mutual = (a * ratio.log()).sum((-2, -1)) / q
    h_k = -(p_k * torch.where(p_k > 0, p_k.log(), torch.zeros_like(p_k))).sum(-1)
    h_q = math.log(q)
    denom = (h_q * h_k).sqrt()
    return torch.where(denom > 0, mutual / denom.clamp_min(1e-300), torch.zeros_like(mutual))


def attention_distance(
    attn: torch.Tensor, grid: tuple[int, int], patch_size: int, num_prefix: int = 0
) -> torch.Tensor:
    """Attention-weighted mean distance in pixels from each query patch to the key patches,
    averaged over queries, per image and head.

    Args:
        attn: (..., Q, K) attention over a (rows, cols) = ``grid`` of patches in raster order
            (after ``num_prefix`` leading tokens).
        grid: patch rows and columns.
        patch_size: patch side in pixels (distances between patch centres).
        num_prefix: leading tokens that are not patches.

    Returns:
        (...) mean attention distance in pixels.
    """
    a = _patch_attention(attn, num_prefix)
    rows, cols = grid
    if a.shape[-1] != rows * cols or a.shape[-2] != rows * cols:
        raise ValueError(
            f"attention over {a.shape[-2]} x {a.shape[-1]} patches, but a {rows}x{cols} grid "
            f"has {rows * cols}: check num_prefix and grid"
        )
    dist = grid_layout(grid, patch_size).distances()[0].to(a.device)  # (L, L)
    return (a * dist).sum(-1).mean(-1)


def patch_layout(encoder: nn.Module) -> tuple[int, tuple[int, int], int]:
    """``(num_prefix, grid, patch_size)`` of a ViT-like encoder (timm's ``PatchEmbed``: its
    ``grid_size`` and ``patch_size``; the prefix tokens are ``num_prefix_tokens``, or the cls
    token when the encoder has one)."""
    embed = getattr(encoder, "patch_embed", None)
    if embed is None or not hasattr(embed, "grid_size"):
        raise ValueError(
            f"{type(encoder).__name__} has no timm patch_embed with a grid_size: pass grid, "
            "patch_size and num_prefix yourself"
        )
    prefix = getattr(encoder, "num_prefix_tokens", None)
    if prefix is None:
        prefix = int(getattr(encoder, "cls_token", None) is not None)
    rows, cols = (int(v) for v in embed.grid_size)
    return int(prefix), (rows, cols), int(embed.patch_size[0])


@dataclass(frozen=True)
class AttentionLayout:
    """Where the tokens of one attention module's matrices sit.

    Attributes:
        cells: (windows, tokens, 2) long: the (row, col) on the module's token ``grid`` of each
            token, in the order of the matrix rows; one window for global attention.
        grid: the module's token grid (rows, cols).
        stride: pixels per grid cell (the patch side; Swin: patch side x 2^stage).
        num_prefix: leading non-patch tokens (cls, registers) of each matrix.
    """

    cells: torch.Tensor
    grid: tuple[int, int]
    stride: int
    num_prefix: int = 0

    @property
    def windows(self) -> int:
        return self.cells.shape[0]

    def distances(self) -> torch.Tensor:
        """(windows, tokens, tokens) float64 pixel distances between each window's tokens."""
        pos = self.cells.double() * self.stride
        return torch.cdist(pos, pos)


def grid_layout(grid: tuple[int, int], patch_size: int, num_prefix: int = 0) -> AttentionLayout:
    """Global attention over a (rows, cols) patch grid in raster order."""
    rows, cols = grid
    cells = torch.stack(
        torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1
    ).reshape(1, rows * cols, 2)
    return AttentionLayout(cells, (rows, cols), int(patch_size), int(num_prefix))


def window_layout(
    resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], stride: int
) -> AttentionLayout:
    """Swin's (shifted) windows over a stage grid, in timm's order.

    timm rolls the grid by ``-shift``, so rolled row i holds row (i + shift) mod H, then cuts it
    into windows in raster order, each window's tokens in raster order.

    Raises:
        ValueError: the grid is not tiled by the window (timm pads it with tokens that are not
            in the image).
    """
    (h, w), (wh, ww), (sh, sw) = resolution, window, shift
    if h % wh or w % ww:
        raise ValueError(
            f"a {h}x{w} Swin stage grid is not tiled by its {wh}x{ww} windows (timm pads it with "
            "tokens outside the image): analyse at an image size whose stage grids are multiples "
            "of the window"
        )
    rows = ((torch.arange(h) + sh) % h).view(h // wh, 1, wh, 1).expand(-1, w // ww, -1, ww)
    cols = ((torch.arange(w) + sw) % w).view(1, w // ww, 1, ww).expand(h // wh, -1, wh, -1)
    cells = torch.stack([rows, cols], -1).reshape((h // wh) * (w // ww), wh * ww, 2)
    return AttentionLayout(cells, (h, w), int(stride))


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """One :class:`AttentionLayout` per attention module of ``model`` (:func:`attention_modules`
    order): the patch grid for a ViT; each block's (shifted) windows for a timm Swin.

    Raises:
        ValueError: lmim's ``MaskedSwin`` (analyse its timm export), a model without a patch
            grid, or a Swin stage its windows do not tile.
    """
    if getattr(model, "records_attention", True) is False:
        raise ValueError(
            f"{type(model).__name__} computes its attention in fused kernels: analyse the timm "
            "model its weights load into (lmim.export.timm_model + encoder_state_dict)"
        )
    modules = attention_modules(model)
    blocks = {
        id(m.attn): m
        for m in model.modules()
        if hasattr(m, "attn") and hasattr(m, "shift_size") and hasattr(m, "input_resolution")
    }
    if not blocks:
        num_prefix, grid, patch_size = patch_layout(model)
        return [grid_layout(grid, patch_size, num_prefix)] * len(modules)
    image_rows = int(model.patch_embed.img_size[0])
    out = []
    for m in modules:
        blk = blocks[id(m)]
        res = tuple(int(v) for v in blk.input_resolution)
        out.append(
            window_layout(
                res,
                tuple(int(v) for v in blk.window_size),
                tuple(int(v) for v in blk.shift_size),
                image_rows // res[0],
            )
        )
    return out


def _window_attention(attn: torch.Tensor, layout: AttentionLayout, images: int) -> torch.Tensor:
    """(B * windows, heads, N, N) recorded matrices as (B, windows, heads, N, N)."""
    if attn.shape[0] != images * layout.windows:
        raise ValueError(
            f"{attn.shape[0]} attention matrices for {images} images and {layout.windows} "
            "windows: the layout does not belong to this module"
        )
    return attn.reshape(images, layout.windows, *attn.shape[1:])


@torch.no_grad()
def analyze_encoder(
    encoder: nn.Module,
    images: torch.Tensor,
    num_prefix: int | None = None,
    grid: tuple[int, int] | None = None,
    patch_size: int | None = None,
    batch_size: int = 16,
    layouts: list[AttentionLayout] | None = None,
    progress: bool = False,
) -> dict[str, list]:
    """Per-layer NMI and attention distance of an encoder.

    The encoder runs on ``images`` in batches of ``batch_size`` (eval mode, nothing masked; only
    one batch's attention is held at a time); each layer's attention is scored per image, window
    and head, averaged over windows (one for a ViT), then images, then heads.

    Args:
        encoder: called as ``encoder(images)``; a timm ViT or Swin, or an lmim ``MaskedViT``
            (which then returns its last block only: every block still runs).
        images: (B, C, H, W) normalised images.
        num_prefix, grid, patch_size: for a columnar encoder, leading non-patch tokens, patch
            rows and columns and patch side in pixels; by default those of the encoder
            (:func:`patch_layout`).
        layouts: per attention module, where its tokens sit; default
            :func:`attention_layouts` (or the columnar settings above when given).
        progress: show a progress bar over the images (tqdm, on stderr).

    Returns:
        ``nmi`` and ``distance`` (pixels): one value per attention module, in depth order, and
        ``nmi_per_head`` / ``distance_per_head``: per module, one value per head.
    """
    if layouts is None:
        if num_prefix is None and grid is None and patch_size is None:
            layouts = attention_layouts(encoder)
        else:
            prefix0, grid0, patch0 = patch_layout(encoder)
            layout = grid_layout(
                grid0 if grid is None else grid,
                patch0 if patch_size is None else patch_size,
                prefix0 if num_prefix is None else num_prefix,
            )
            layouts = [layout] * len(attention_modules(encoder))
    dists = {id(lay): lay.distances() for lay in layouts}
    was_training = encoder.training
    encoder.eval()
    per_batch: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # layer -> (nmi, dist)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), desc="images", unit="img", leave=False)
    try:
        for batch in images.split(batch_size):
            with recorded_attention(encoder) as records:
                encoder(batch)
            scores = {}
            for i, calls in enumerate(records):
                if not calls:
                    continue
                lay = layouts[i]
                a = _window_attention(torch.cat(calls), lay, len(batch))  # (b, W, H, N, N)
                nmi = attention_nmi(a, lay.num_prefix).mean(1)  # (b, H)
                p = _patch_attention(a, lay.num_prefix)
                dist = (p * dists[id(lay)][None, :, None].to(p.device)).sum(-1).mean(-1).mean(1)
                scores[i] = (nmi, dist)
            per_batch.append(scores)
            if bar is not None:
                bar.update(len(batch))
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
    out: dict[str, list] = {"nmi": [], "distance": [], "nmi_per_head": [], "distance_per_head": []}
    for layer in per_batch[0]:
        nmi = torch.cat([b[layer][0] for b in per_batch]).mean(0)  # (H,)
        dist = torch.cat([b[layer][1] for b in per_batch]).mean(0)
        out["nmi_per_head"].append(nmi.tolist())
        out["distance_per_head"].append(dist.tolist())
        out["nmi"].append(float(nmi.mean()))
        out["distance"].append(float(dist.mean()))
    return out


def query_attention(attn: torch.Tensor, query: int, num_prefix: int = 0) -> torch.Tensor:
    """The head-averaged attention of one query patch over the patches.

    Args:
        attn: (B, heads, N, N) attention of one layer.
        query: the query's raster index among the patches (after the prefix tokens).
        num_prefix: leading tokens that are not patches (removed; rows renormalised).

    Returns:
        (B, patches) float32, each row summing to 1.
    """
    return _patch_attention(attn, num_prefix)[:, :, query, :].mean(1).float()


def spread_queries(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Three query patches spread over the grid: at a quarter, a half and three quarters of the
    way along its diagonal (row, column)."""
    rows, cols = grid
    return [(rows * k // 4, cols * k // 4) for k in (1, 2, 3)]


def spread_layers(depth: int, n: int = 4) -> list[int]:
    """``n`` layers (0-indexed) spread from the first to the last."""
    if depth <= n:
        return list(range(depth))
    return sorted({round(i * (depth - 1) / (n - 1)) for i in range(n)})


def map_settings(
    encoder: nn.Module,
    queries: list[tuple[int, int]] | None = None,
    layers: list[int] | None = None,
) -> tuple[list[tuple[int, int]], list[int]]:
    """The query patches and layers of :func:`attention_maps` for ``encoder`` (defaults filled
    in), checked against its patch grid and depth.

    Raises:
        ValueError: a query outside the patch grid, or a layer the encoder does not have.
    """
    _, grid, _ = patch_layout(encoder)
    depth = len(attention_modules(encoder))
    queries = spread_queries(grid) if queries is None else [tuple(q) for q in queries]
    for r, c in queries:
        if not (0 <= r < grid[0] and 0 <= c < grid[1]):
            raise ValueError(f"query ({r}, {c}) is outside the {grid[0]}x{grid[1]} patch grid")
    layers = spread_layers(depth) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < depth:
            raise ValueError(f"layer {layer} does not exist: the encoder has {depth}")
    return queries, layers


def _query_map(attn: torch.Tensor, layout: AttentionLayout, pixel: tuple[int, int]) -> torch.Tensor:
    """(B, H_img, W_img) head-averaged attention of the token covering ``pixel`` (row, col),
    over its window's keys at their pixels; 0 outside the window.

    Args:
        attn: (B, windows, heads, N, N) patch attention of one layer, rows normalised.
    """
    cell = torch.tensor([pixel[0] // layout.stride, pixel[1] // layout.stride])
    window, token = (layout.cells == cell).all(-1).nonzero()[0].tolist()
    row = attn[:, window, :, token, :].mean(1).float()  # (B, N)
    grid = row.new_zeros(len(attn), *layout.grid)
    r, c = layout.cells[window].unbind(-1)
    grid[:, r, c] = row
    s = layout.stride
    return grid.repeat_interleave(s, 1).repeat_interleave(s, 2)


@torch.no_grad()
def attention_maps(
    encoder: nn.Module,
    images: torch.Tensor,
    queries: list[tuple[int, int]] | None = None,
    layers: list[int] | None = None,
) -> dict[str, Any]:
    """Where each query patch attends, at each chosen layer.

    Args:
        encoder: as for :func:`analyze_encoder` (a timm ViT or Swin, or an lmim ``MaskedViT``).
        images: (B, C, H, W) normalised images.
        queries: (row, column) patches on the first layer's patch grid; default
            :func:`spread_queries`.
        layers: 0-indexed attention layers; default :func:`spread_layers` (4 of them).

    Returns:
        ``maps``: (layers, B, queries, H, W) head-averaged attention of the token that covers
        the query patch, over the image's pixels (each key's weight on the pixels of its token;
        for Swin, 0 outside the query's window), ``queries``, ``layers``, ``grid`` (the patch
        grid) and ``patch_size``.
    """
    _, grid, patch_size = patch_layout(encoder)
    layouts = attention_layouts(encoder)
    queries, layers = map_settings(encoder, queries, layers)
    was_training = encoder.training
    encoder.eval()
    try:
        with recorded_attention(encoder) as records:
            encoder(images)
    finally:
        encoder.train(was_training)
    per_layer = []
    for layer in layers:
        lay = layouts[layer]
        attn = _window_attention(torch.cat(records[layer]), lay, len(images))
        attn = _patch_attention(attn, lay.num_prefix)  # once per layer, for every query
        per_layer.append(
            torch.stack(
                [_query_map(attn, lay, (r * patch_size, c * patch_size)) for r, c in queries], 1
            )
        )
    maps = torch.stack(per_layer)  # (layers, B, queries, H, W)
    return {
        "maps": maps,
        "queries": queries,
        "layers": layers,
        "grid": grid,
        "patch_size": patch_size,
    }
