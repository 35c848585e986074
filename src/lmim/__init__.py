"""lmim: LocalMIM pre-training as PyTorch Lightning modules composed by Hydra.

Where things are:
    lmim.models.MaskedViT        the encoder (timm blocks, visible-only, returns tapped layers)
    lmim.models.ViTLocalDecoder  the per-tap local decoder
    lmim.targets.HOG / NormalizedPixels   the reconstruction targets
    lmim.losses                  the masked multi-scale loss
    lmim.models.LocalMIM         encoder + decoders + targets + loss (a plain nn.Module)
    lmim.module.LocalMIMModule   the LightningModule (optimiser, lr schedule, logging)
    lmim.train                   ``python -m lmim.train`` (Hydra configs in conf/)
"""

from lmim.api import compose_config, create_pretrainer
from lmim.errors import ConfigError

__version__ = "0.1.0"
__all__ = ["ConfigError", "compose_config", "create_pretrainer", "__version__"]
