"""The LocalMIM pre-training model: encoder + per-tap norm and decoder + targets + loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lmim.errors import ConfigError
from lmim.losses import scale_mask
from lmim.models.decoders import ViTLocalDecoder, batched_decoder_tokens, check_batchable
from lmim.models.masking import check_mask_ratio, mask_indices, num_visible, random_mask
from lmim.models.protocol import check_encoder
from lmim.scales import scaled_grid
from lmim.targets.base import Target


@dataclass
class LocalMIMOutput:
    """What one pre-training forward returns.

    Attributes:
        loss: scalar, the weighted sum of the per-tap losses.
        losses: tap name -> scalar loss of that tap (unweighted).
        preds: per tap, (B, N_k, D_k) predictions on the tap's target grid.
        targets: per tap, (B, N_k, D_k) float32 targets.
        weights: per tap, (B, N_k) loss weights of the cells.
        mask: (B, L) bool patch mask used, True = masked, raster order.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    preds: list[torch.Tensor]
    targets: list[torch.Tensor]
    weights: list[torch.Tensor]
    mask: torch.Tensor
    grids: list[tuple[int, int]] = field(default_factory=list)


def resolve_taps(taps: Sequence[int], depth: int) -> list[int]:
    """Turn tap indices (negative counts from the end, as in Python) into sorted block indices."""
    out = []
    for t in taps:
        t = int(t)
        if not -depth <= t < depth:
            raise ConfigError(
                f"schedule.taps={list(taps)}: tap {t} is outside the encoder's {depth} blocks; "
                f"use 0..{depth - 1} or -{depth}..-1 (e.g. schedule.taps=[1,3,-3,-1])"
            )
        out.append(t % depth)
    if len(set(out)) != len(out):
        raise ConfigError(
            f"schedule.taps={list(taps)} resolve to {out} on a {depth}-block encoder: taps must "
            "be distinct blocks; pick other schedule.taps for this depth"
        )
    if out != sorted(out):
        raise ConfigError(
            f"schedule.taps={list(taps)} resolve to {out}: list them from the lowest block up, "
            "lower taps reconstructing finer scales"
        )
    return out


class LocalMIM(nn.Module):
    """Masked image modeling with local multi-scale reconstruction.

    Args:
        encoder: a masked encoder (:class:`lmim.models.MaskedViT`, ...). It masks units of
            ``mask_unit`` pixels on a ``mask_grid`` (the patches of a ViT), exposes ``depth``
            (number of tappable layers), ``feature_info`` (width and name per layer) and its
            paper schedule (``paper_taps``, ``paper_scales``), and is called as
            ``encoder(images, mask, taps, isolate_gradients, ids_keep=...)``.
        target: builds the target module from ``cell_sizes`` (e.g. ``partial(HOG, nbins=9)``).
        taps: encoder layers whose outputs are decoded, lowest first; negative counts from the
            end; None = the encoder's paper taps.
        scales: per tap, target grid / mask grid (powers of two); cell size = mask unit / scale.
            None = the encoder's paper scales.
        weights: per tap loss weight (None = 1 each; LocalMIM sums the losses unweighted).
        decoder: builds a tap's decoder from ``in_dim, out_dim, grid_size, scale`` plus width
            keywords; defaults to :class:`ViTLocalDecoder`.
        decoder_dim: decoder width, one int or one per tap.
        decoder_heads: decoder attention heads, one int or one per tap.
        decoder_depth: decoder transformer blocks.
        mask_ratio: share of mask units hidden from the encoder.
        isolate_gradients: detach the encoder sequence after each tap (paper section 8).
        share_mask: one random mask for a group of samples (the released Swin code: one per
            process batch) instead of one per sample; cheaper for pyramid encoders, whose
            attention bias is then shared.
        mask_group_size: with ``share_mask``, samples of the global batch sharing one mask per
            step (None: a process's batch); see :meth:`lmim.module.LocalMIMModule.step_mask`.
        batch_decoders: run the decoders' transformer part as one batched block
            (:func:`lmim.models.decoders.batched_decoder_tokens`: stacked weights, one attention
            call) instead of one tap after the other; for ViT decoders of one shape, equal to
            the per-tap path to rounding, same parameters and checkpoints. Not with FSDP, which
            shards each decoder block on its own.
    """

    def __init__(
        self,
        encoder: nn.Module,
        target: Callable[..., Target],
        taps: Sequence[int] | None = None,
        scales: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        decoder: Callable[..., nn.Module] = ViTLocalDecoder,
        decoder_dim: int | Sequence[int] = 256,
        decoder_heads: int | Sequence[int] = 8,
        decoder_depth: int = 1,
        decoder_mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        isolate_gradients: bool = False,
        share_mask: bool = False,
        mask_group_size: int | None = None,
        batch_decoders: bool = False,
    ) -> None:
        super().__init__()
        check_encoder(encoder)
        self.encoder = encoder
        taps = encoder.paper_taps if taps is None else taps
        scales = encoder.paper_scales if scales is None else scales
        self.taps = resolve_taps(taps, encoder.depth)
        n = len(self.taps)
        self.scales = [float(s) for s in scales]
        self.loss_weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(self.scales) != n or len(self.loss_weights) != n:
            raise ConfigError(
                f"schedule.taps has {n} entries but schedule.scales has {len(self.scales)} and "
                f"schedule.weights {len(self.loss_weights)}: give one scale and weight per tap"
            )
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.isolate_gradients = bool(isolate_gradients)
        self.share_mask = bool(share_mask)
        if mask_group_size is not None and int(mask_group_size) < 1:
            raise ConfigError(
                f"model.mask_group_size={mask_group_size} must be >= 1 (samples sharing one mask "
                "with model.share_mask), e.g. model.mask_group_size=${data.batch_size}"
            )
        self.mask_group_size = None if mask_group_size is None else int(mask_group_size)
        grid = tuple(encoder.mask_grid)
        self.grids = [scaled_grid(grid, s) for s in self.scales]
        self.cell_sizes = [encoder.mask_unit / s for s in self.scales]
        self.target = target(cell_sizes=self.cell_sizes)
        info = encoder.feature_info
        self.tap_names = [info[t]["name"] for t in self.taps]
        native = getattr(encoder, "native_scales", None)
        if native is not None:  # pyramid taps are predicted on the stage's own grid
            want = [native[t] for t in self.taps]
            if self.scales != [float(w) for w in want]:
                raise ConfigError(
                    f"schedule.scales={self.scales}: the tapped stages {self.tap_names} are "
                    f"on grids x{want} of the mask-unit grid, and their decoders predict there; "
                    f"use schedule.scales={want} (or null for the paper's)"
                )
        dims = _per_tap(decoder_dim, n, "model.decoder.dim")
        heads = _per_tap(decoder_heads, n, "model.decoder.num_heads")
        self.norms = nn.ModuleList(nn.LayerNorm(info[t]["num_chs"], eps=1e-6) for t in self.taps)
        self.decoders = nn.ModuleList(
            decoder(
                in_dim=info[t]["num_chs"],
                out_dim=self.target.dims[k],
                grid_size=grid,
                scale=self.scales[k],
                dim=dims[k],
                depth=decoder_depth,
                num_heads=heads[k],
                mlp_ratio=decoder_mlp_ratio,
            )
            for k, t in enumerate(self.taps)
        )
        self.batch_decoders = bool(batch_decoders)
        if self.batch_decoders:
            check_batchable(self.decoders)

    @property
    def num_patches(self) -> int:
        """Mask units per image (patches for a ViT)."""
        return self.encoder.mask_grid[0] * self.encoder.mask_grid[1]

    def random_mask(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        groups: int = 1,
    ) -> torch.Tensor:
        """(B, L) bool random mask at the configured ratio, True = masked, raster order; one per
        sample, or with ``share_mask`` ``groups`` masks, row i taking mask ``i mod groups`` (one
        for the whole batch by default)."""
        if self.share_mask:
            m = random_mask(groups, self.num_patches, self.mask_ratio, device, generator)
            if groups == 1:
                return m.expand(batch, -1)
            return m.repeat(-(-batch // groups), 1)[:batch]
        return random_mask(batch, self.num_patches, self.mask_ratio, device, generator)

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        from_random_mask: bool = False,
        shared_rows: bool | None = None,
        features: Sequence[int] | None = None,
    ) -> LocalMIMOutput | list[torch.Tensor]:
        """One pre-training forward, or with ``features`` the encoder's features.

        Args:
            images: (B, 3, H, W) ImageNet-normalised images.
            mask: (B, L) patch mask, 1/True = masked, raster order, used as given; every row
                must mask the same number of patches. None draws a random mask per sample
                (one for the batch with ``share_mask``).
            from_random_mask: ``mask`` comes from :meth:`random_mask` (e.g. rows of a
                global batch's mask, as the LightningModule draws it): the row counts are known,
                so they are not checked (no GPU sync), and with ``share_mask`` the rows are
                equal, so indices (and a pyramid's attention bias) are computed once.
            shared_rows: with ``from_random_mask`` and ``share_mask``: whether every row is the
                same mask (default True); False for rows of several groups' masks, which take
                the per-sample path.
            features: encoder layers, increasing: return their outputs for the whole images
                (nothing masked; no targets or decoders). Through this module's own call, so
                that a sharded root (FSDP) gathers the encoder's own parameters.

        Returns:
            :class:`LocalMIMOutput` with the total loss, per-tap losses, predictions, targets,
            cell weights and the mask; with ``features``, one (B, [1 +] N, D) tensor per layer.
        """
        if features is not None:
            return self.encoder(images, None, list(features))
        num_keep = None
        shared = False
        if mask is None or from_random_mask:
            if mask is None:
                mask = self.random_mask(images.shape[0], images.device)
            num_keep = num_visible(self.num_patches, self.mask_ratio)
            shared = self.share_mask and shared_rows is not False
        if mask.shape != (images.shape[0], self.num_patches):
            raise ConfigError(
                f"mask has shape {tuple(mask.shape)}, expected (batch, patches) = "
                f"({images.shape[0]}, {self.num_patches})"
            )
        mask = mask.to(device=images.device, dtype=torch.bool)
        if shared:
            # One mask for the batch: indices (and a pyramid's attention bias) computed once.
            ids_keep, ids_restore = mask_indices(mask[:1], num_keep)
        else:
            ids_keep, ids_restore = mask_indices(mask, num_keep)
        feats = self.encoder(images, mask, self.taps, self.isolate_gradients, ids_keep=ids_keep)
        targets = self.target(images)
        preds, weights, losses = [], [], {}
        total = images.new_zeros((), dtype=torch.float32)
        grid = tuple(self.encoder.mask_grid)
        if self.batch_decoders:
            tokens = batched_decoder_tokens(self.decoders, self.norms, feats, ids_restore)
        for k, name in enumerate(self.tap_names):
            if self.batch_decoders:
                pred = self.decoders[k].predict(tokens[k])
            else:
                pred = self.decoders[k](self.norms[k](feats[k]), ids_restore)
            w = scale_mask(mask, grid, self.scales[k])
            loss = self.target.loss(pred, targets[k], w)
            losses[name] = loss
            total = total + self.loss_weights[k] * loss
            preds.append(pred)
            weights.append(w)
        return LocalMIMOutput(total, losses, preds, targets, weights, mask, list(self.grids))


def _per_tap(value: int | Sequence[int], n: int, key: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = [int(v) for v in value]
    if len(value) != n:
        raise ConfigError(f"{key}={value} needs one entry per tap ({n}) or a single number")
    return value
