"""Online k-NN monitor: representation quality of the frozen encoder during pre-training."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from lmim.evaluation import (
    EncoderForward,
    extract_features,
    knn_accuracy,
    shard_indices,
    unshard,
)


class KNNMonitor(L.Callback):
    """Every ``every_n_epochs`` epochs (and at the end), a cosine k-NN on frozen features.

    Features of the encoder (nothing masked, eval mode, ``layer`` average-pooled) are computed
    for a labelled subset of the training split and for the test split; each test image takes
    the temperature-weighted vote of its ``k`` nearest training images. Under several processes
    each extracts its share of both sets through the strategy's model (so DDP and FSDP models
    work), the features are gathered and every process scores the same k-NN: the result equals
    one process's. Logged as
    ``val/knn_top1`` (next to ``perf/device_hours``). Needs a DataModule with
    ``eval_dataset(split, limit)`` and ``num_classes`` (e.g. ``data=fashion_mnist``).

    Args:
        every_n_epochs: evaluation period; 0 evaluates only at the end of training.
        k: neighbours.
        temperature: vote temperature.
        layer: encoder layer to pool (negative counts from the top).
        train_limit: labelled training images used as references.
        test_limit: test images classified.
        batch_size: feature-extraction batch.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        layer: int = -1,
        train_limit: int | None = 10_000,
        test_limit: int | None = None,
        batch_size: int = 256,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.layer = layer
        self.train_limit = train_limit
        self.test_limit = test_limit
        self.batch_size = batch_size
        self.last: float | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if not n or trainer.current_epoch % n != n - 1:
            self.evaluate(trainer, pl_module, log=False)

    def evaluate(self, trainer, pl_module, log: bool = True) -> float | None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_dataset"):
            return None
        train = self._features(trainer, pl_module, dm.eval_dataset("train", self.train_limit))
        test = self._features(trainer, pl_module, dm.eval_dataset("test", self.test_limit))
        # The same gathered features on every process: the same score, no broadcast needed.
        acc = knn_accuracy(
            *train, *test, num_classes=dm.num_classes, k=self.k, temperature=self.temperature
        )
        self.last = acc
        if log:
            pl_module.log("val/knn_top1", acc, on_step=False, on_epoch=True, rank_zero_only=True)
        else:
            for lg in trainer.loggers:
                lg.log_metrics({"val/knn_top1": acc}, step=trainer.global_step)
        return acc

    def _features(self, trainer, pl_module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) features and (N,) labels of ``dataset``: each process extracts its share
        (:func:`lmim.evaluation.shard_indices`), then every process gathers all of them."""
        world, rank = trainer.world_size, trainer.global_rank
        n = len(dataset)
        if world > 1:
            dataset = Subset(dataset, shard_indices(n, world, rank))
        loader = DataLoader(dataset, batch_size=self.batch_size)
        feats, labels = extract_features(
            pl_module.net.encoder, loader, self.layer, forward=encoder_forward(trainer)
        )
        if world == 1:
            return feats, labels
        device = pl_module.device  # where the backend's collectives run (GPU under NCCL)
        feats = unshard(pl_module.all_gather(feats.to(device)), n).cpu()
        labels = unshard(pl_module.all_gather(labels.to(device)), n).cpu()
        return feats, labels


def encoder_forward(trainer) -> EncoderForward:
    """The encoder's forward through the strategy's wrapped model (DDP, FSDP: parameters of a
    sharded model are gathered by its own forward): :meth:`LocalMIMModule.forward` with
    ``taps``. Every process must make the same calls."""
    model = trainer.strategy.model
    return lambda images, taps: model(images, None, taps)
