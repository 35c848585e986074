"""Encoders, local decoders and the LocalMIM pre-training model."""

from lmim.models.decoders import SwinLocalDecoder, ViTLocalDecoder
from lmim.models.localmim import LocalMIM, LocalMIMOutput
from lmim.models.masking import mask_indices, random_mask
from lmim.models.protocol import MaskedEncoder
from lmim.models.swin import MaskedSwin, MaskedSwinBlock
from lmim.models.vit import MaskedViT

__all__ = [
    "MaskedSwin",
    "MaskedSwinBlock",
    "SwinLocalDecoder",
    "LocalMIM",
    "LocalMIMOutput",
    "MaskedEncoder",
    "MaskedViT",
    "ViTLocalDecoder",
    "mask_indices",
    "random_mask",
]
