"""What lmim reads from a masked encoder, in one place.

:class:`lmim.models.LocalMIM` (taps, cell sizes, decoders), evaluation (frozen features of a
layer), the linear probe and fine-tuning (the image size), the FLOP accounting (the forward) and
the exporter, fine-tuning and analysis (``timm_name``, ``timm_architecture``: the timm model
the weights load into) read these members and nothing else; :class:`lmim.models.MaskedViT` and
:class:`lmim.models.MaskedSwin` provide them. A new encoder family is one module defining them,
plus a ``conf/model`` base file (and its block class in ``conf/trainer/fsdp.yaml``'s ``wrap``
to shard it).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from lmim.errors import ConfigError


@runtime_checkable
class MaskedEncoder(Protocol):
    """A visible-only encoder LocalMIM can pre-train.

    Attributes:
        img_size: input side in pixels (fixed position embeddings / windows).
        patch_size: patch-embedding stride in pixels.
        mask_grid: (rows, cols) of the mask (patches for a ViT, last-stage tokens for Swin).
        mask_unit: side in pixels of one mask cell; a tap's cell is ``mask_unit / scale``.
        depth: number of tappable layers (blocks or stages); taps are indices into them.
        feature_info: per tappable layer, ``{"name", "num_chs", "reduction"}`` (timm's format).
        paper_taps, paper_scales: the paper's schedule for this family (``schedule=localmim``).
        num_prefix_tokens: leading non-patch tokens of each tap's output (ViT: the cls token;
            Swin: 0); evaluation's average pooling skips them, ``pool="cls"`` needs one.
        timm_name: the timm model these weights export to, or None.
    """

    img_size: int
    patch_size: int
    mask_grid: tuple[int, int]
    mask_unit: int
    depth: int
    feature_info: list[dict[str, Any]]
    paper_taps: tuple
    paper_scales: tuple
    num_prefix_tokens: int
    timm_name: str | None

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        taps: list[int] | None = None,
        isolate_gradients: bool = False,
        ids_keep: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The tapped layers' outputs (visible tokens only when ``mask`` is given)."""
        ...

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (position embeddings, tokens)."""
        ...

    def timm_architecture(self) -> tuple[type[torch.nn.Module], dict[str, Any]]:
        """The timm class and keyword arguments whose model loads this encoder's weights with
        ``strict=True`` (given :func:`lmim.export.encoder_state_dict` naming)."""
        ...


MEMBERS = (
    "img_size",
    "patch_size",
    "mask_grid",
    "mask_unit",
    "depth",
    "feature_info",
    "paper_taps",
    "paper_scales",
    "num_prefix_tokens",
    "timm_name",
    "forward",
    "no_weight_decay",
    "timm_architecture",
)


def check_encoder(encoder: Any) -> None:
    """Raise :class:`ConfigError` naming what ``encoder`` lacks of :class:`MaskedEncoder`."""
    missing = [m for m in MEMBERS if not hasattr(encoder, m)]
    if missing:
        raise ConfigError(
            f"model.encoder ({type(encoder).__name__}) is not a masked encoder LocalMIM can "
            f"pre-train: it lacks {', '.join(missing)} (see lmim.models.protocol.MaskedEncoder)"
        )
