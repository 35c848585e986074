"""lmim: LocalMIM pre-training as PyTorch Lightning modules composed by Hydra."""

__version__ = "0.1.0"
