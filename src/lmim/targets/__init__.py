"""Reconstruction targets: frozen maps from images to per-cell features (HOG, normalised
pixels) or codes (a codebook over either)."""

from lmim.targets.base import Target
from lmim.targets.codebook import Codebook
from lmim.targets.hog import HOG
from lmim.targets.pixel import NormalizedPixels, patchify, unpatchify
from lmim.targets.teacher import Teacher

__all__ = ["HOG", "Codebook", "NormalizedPixels", "Target", "Teacher", "patchify", "unpatchify"]
