"""Reconstruction targets: frozen, stateless maps from images to per-cell features."""

from lmim.targets.base import Target
from lmim.targets.hog import HOG
from lmim.targets.pixel import NormalizedPixels, patchify, unpatchify

__all__ = ["HOG", "NormalizedPixels", "Target", "patchify", "unpatchify"]
