"""Seeds derived from the run seed, and the process RNG states stored in checkpoints.

Per-sample and per-step randomness (augmentation, masks) is drawn from generators seeded by
:func:`derive_seed` with the run seed and *where* the draw happens (epoch and sample index, or
optimizer step), never from a process's running RNG. So it does not depend on how a global batch
is split across processes, on data-loader workers, or on whether the run was resumed.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Streams: one per kind of draw, so that e.g. step 3's mask and sample 3's crop are unrelated.
AUGMENT = 1
MASK = 2


def derive_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers (run seed, stream, position...)."""
    words = [int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in values]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch CPU and, on a GPU, its CUDA generator.

    Plain Python values and tensors only, so that checkpoints load with ``weights_only=True``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            str(name),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_states` captured (the CUDA state only on a GPU)."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
