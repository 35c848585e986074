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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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
    yy, xx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    pos = torch.stack([yy.flatten(), xx.flatten()], -1) * patch_size
    dist = torch.cdist(pos, pos).to(a.device)  # (L, L)
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


@torch.no_grad()
def analyze_encoder(
    encoder: nn.Module,
    images: torch.Tensor,
    num_prefix: int | None = None,
    grid: tuple[int, int] | None = None,
    patch_size: int | None = None,
    batch_size: int = 16,
) -> dict[str, list]:
    """Per-layer NMI and attention distance of a columnar (global-attention) encoder.

    The encoder runs on ``images`` in batches of ``batch_size`` (eval mode, nothing masked; only
    one batch's attention is held at a time); each block's attention is scored per image and
    head, averaged over images, then over heads.

    Args:
        encoder: called as ``encoder(images)``; a timm ViT or an lmim ``MaskedViT`` (which then
            returns its last block only: every block still runs).
        images: (B, C, H, W) normalised images.
        num_prefix, grid, patch_size: leading non-patch tokens, patch rows and columns, patch
            side in pixels; by default those of the encoder (:func:`patch_layout`).

    Returns:
        ``nmi`` and ``distance`` (pixels): one value per attention module, in depth order, and
        ``nmi_per_head`` / ``distance_per_head``: per module, one value per head.
    """
    if num_prefix is None or grid is None or patch_size is None:
        prefix0, grid0, patch0 = patch_layout(encoder)
        num_prefix = prefix0 if num_prefix is None else num_prefix
        grid = grid0 if grid is None else grid
        patch_size = patch0 if patch_size is None else patch_size
    was_training = encoder.training
    encoder.eval()
    per_image: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # per batch: (nmi, dist)
    try:
        for batch in images.split(batch_size):
            with recorded_attention(encoder) as records:
                encoder(batch)
            reached = [torch.cat(calls) for calls in records if calls]  # (b, H, N, N) per block
            per_image.append(
                (
                    [attention_nmi(a, num_prefix) for a in reached],
                    [attention_distance(a, grid, patch_size, num_prefix) for a in reached],
                )
            )
    finally:
        encoder.train(was_training)
    out: dict[str, list] = {"nmi": [], "distance": [], "nmi_per_head": [], "distance_per_head": []}
    for layer in range(len(per_image[0][0])):
        nmi = torch.cat([b[0][layer] for b in per_image]).mean(0)  # (H,)
        dist = torch.cat([b[1][layer] for b in per_image]).mean(0)
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


@torch.no_grad()
def attention_maps(
    encoder: nn.Module,
    images: torch.Tensor,
    queries: list[tuple[int, int]] | None = None,
    layers: list[int] | None = None,
) -> dict[str, Any]:
    """Where each query patch attends, at each chosen layer of a columnar encoder.

    Args:
        encoder: as for :func:`analyze_encoder` (a timm ViT or an lmim ``MaskedViT``).
        images: (B, C, H, W) normalised images.
        queries: (row, column) patches; default :func:`spread_queries`.
        layers: 0-indexed attention layers; default :func:`spread_layers` (4 of them).

    Returns:
        ``maps``: (layers, B, queries, rows, cols) head-averaged attention, ``queries``,
        ``layers``, ``grid`` and ``patch_size``.
    """
    num_prefix, grid, patch_size = patch_layout(encoder)
    queries, layers = map_settings(encoder, queries, layers)
    was_training = encoder.training
    encoder.eval()
    try:
        with recorded_attention(encoder) as records:
            encoder(images)
    finally:
        encoder.train(was_training)
    recorded = [torch.cat(calls) for calls in records if calls]
    maps = torch.stack(
        [
            torch.stack(
                [query_attention(recorded[layer], r * grid[1] + c, num_prefix) for r, c in queries],
                1,
            )
            for layer in layers
        ]
    )  # (layers, B, queries, patches)
    return {
        "maps": maps.reshape(len(layers), len(images), len(queries), *grid),
        "queries": queries,
        "layers": layers,
        "grid": grid,
        "patch_size": patch_size,
    }
