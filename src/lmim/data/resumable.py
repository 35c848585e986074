"""A data order that does not depend on the process split and resumes mid-epoch.

Every process, one or many, shuffles the whole dataset with the same (seed, epoch) permutation
and takes every ``world``-th index from its rank on (torch's :class:`DistributedSampler`, also
with one process). Batch ``s`` of rank ``r`` thus holds the global batch's samples
``r, r + world, r + 2 world, ...``: N processes see exactly the global batches one process sees.

The loader counts the batches it handed out; Lightning stores that count in checkpoints
(``state_dict``) and a resumed run starts the epoch where the interrupted one stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SampleKey(NamedTuple):
    """What a dataset is indexed with: the sample and the epoch it is drawn in (the epoch seeds
    the sample's augmentation)."""

    index: int
    epoch: int


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` that yields :class:`SampleKey` and can start an epoch late.

    Being a ``DistributedSampler``, Lightning keeps it as is under DDP instead of wrapping it.

    Args:
        dataset: the map-style dataset.
        num_replicas: processes (world size).
        rank: this process's global rank.
        seed: shuffling seed; epoch ``e`` uses the permutation of ``seed + e``.
        shuffle: shuffle (True) or keep the dataset order.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def indices(self) -> Iterator[int]:
        """This process's dataset indices for the epoch, in order (``DistributedSampler``'s)."""
        return super().__iter__()

    def __iter__(self) -> Iterator[SampleKey]:
        start, self.start = self.start, 0
        epoch = self.epoch
        for i, index in enumerate(self.indices()):
            if i >= start:
                yield SampleKey(int(index), epoch)


class ResumableLoader(DataLoader):
    """A :class:`DataLoader` over a :class:`ResumableSampler` whose position can be saved.

    Its dataset returns ``(image, label, skipped)`` where ``skipped`` lists the
    ``(path, reason)`` of unreadable files it replaced (see :mod:`lmim.data.images`); the loader
    yields ``(images, labels)`` batches and keeps the skipped files for
    :class:`lmim.callbacks.BadDataMonitor` (:meth:`take_skipped`).

    ``state_dict`` / ``load_state_dict`` follow Lightning's stateful-dataloader protocol.

    Args:
        dataset: the training set.
        sampler: its sampler.
        batch_size: images per batch and process.
        collate_fn: builds ``(images, labels, skipped)`` from samples.
        **kwargs: the other :class:`DataLoader` arguments (workers, pinning, ``drop_last``...).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        batch_size: int,
        collate_fn: Callable[[list], Any],
        **kwargs: Any,
    ) -> None:
        # Worker seeds come from the loader's own generator, not the process RNG, so loading
        # never shifts the RNG streams that checkpoints save.
        generator = torch.Generator().manual_seed(sampler.seed)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            generator=generator,
            **kwargs,
        )
        self.consumed = 0
        self._resume: tuple[int, int] | None = None
        self._skipped: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing below runs before the first batch is asked for, i.e. after
        # Lightning has set the sampler's epoch (also for worker processes, which start
        # drawing indices as soon as the underlying iterator exists).
        sampler: ResumableSampler = self.sampler
        skip = 0
        if self._resume is not None and self._resume[0] == sampler.epoch:
            skip = min(self._resume[1], len(self))
        self._resume = None
        sampler.start = skip * self.batch_size
        self.consumed = skip
        for batch in super().__iter__():
            images, labels, skipped = batch
            if skipped:
                self._skipped.extend(skipped)
            self.consumed += 1
            yield images, labels

    def add_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """Files found unreadable after the loader (decoded on the device)."""
        self._skipped.extend(skipped)

    def take_skipped(self) -> list[tuple[str, str]]:
        """The ``(path, reason)`` of files skipped since the last call."""
        out, self._skipped = self._skipped, []
        return out

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: the epoch and the batches of it already handed out."""
        return {"epoch": int(self.sampler.epoch), "batches": int(self.consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the saved epoch after its handed-out batches. Another epoch (the saved one was
        complete, so the next one starts) is not skipped into."""
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self.sampler.set_epoch(int(state["epoch"]))
