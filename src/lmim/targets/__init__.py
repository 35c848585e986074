"""Reconstruction targets: frozen maps from images to per-cell features (HOG, normalised
pixels, a teacher's features) or codes (a codebook over HOG or pixels, a tokenizer of yours)."""

from lmim.targets.base import Target
from lmim.targets.codebook import Codebook
from lmim.targets.hog import HOG
from lmim.targets.pixel import NormalizedPixels, patchify, unpatchify
from lmim.targets.teacher import Teacher
from lmim.targets.tokenizer import CodebookTokenizer, Tokenizer

__all__ = [
    "HOG",
    "Codebook",
    "CodebookTokenizer",
    "NormalizedPixels",
    "Target",
    "Teacher",
    "Tokenizer",
    "patchify",
    "unpatchify",
]
