"""Saves (and logs to W&B) pictures of targets against predictions for fixed images."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lmim.viz import CellScores, format_scores, masked_cell_scores, reconstruction_figure

log = logging.getLogger("lmim")


class ReconstructionFigure(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, draw for a few fixed images
    the input, the mask and every tap's target next to its prediction
    (:func:`lmim.viz.reconstruction_figure`), with each tap's masked-cell R² against predicting
    the mean target (:func:`lmim.viz.masked_cell_scores`) in the title, logged as
    ``recon/r2_<tap>``.

    Every process runs the same forward on the same images, through the strategy's wrapped
    model (as training does, so FSDP gathers its shards) and under the trainer's precision;
    rank 0 draws, saves and logs. At the end of training the checkpoint callbacks write
    ``last.ckpt`` before the picture is drawn, and a picture that cannot be drawn is a warning:
    a picture never costs a finished run.

    Args:
        dirpath: where PNGs go (``epoch_XXXX.png`` and ``last.png``).
        num_images: rows of the figure.
        every_n_epochs: 0 draws only at the end.
        seed: seed of the fixed mask.
        score_images: images (at least ``num_images``; as many as the data's preview offers)
            whose masked cells the scores are computed on.
        dpi: resolution of the PNGs.
    """

    def __init__(
        self,
        dirpath: str,
        num_images: int = 4,
        every_n_epochs: int = 0,
        seed: int = 0,
        score_images: int = 16,
        dpi: int = 100,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)
        self.every_n_epochs = int(every_n_epochs)
        self.seed = int(seed)
        self.score_images = max(int(score_images), self.num_images)
        self.dpi = int(dpi)
        self.last_path: Path | None = None
        self.last_scores: dict[str, CellScores] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n, epoch = self.every_n_epochs, trainer.current_epoch + 1
        if n and epoch % n == 0 and epoch != trainer.max_epochs:  # the last: last.png
            self.draw_or_warn(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning calls the checkpoint callbacks after all others (_reorder_callbacks): let
        # them write last.ckpt now, so that a picture that fails, hangs or is killed cannot lose
        # the run. A ModelCheckpoint's on_train_end saves only what it has not saved yet, so
        # Lightning's own call afterwards writes nothing twice.
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.on_train_end(trainer, pl_module)
        self.draw_or_warn(trainer, pl_module, "last.png")

    def draw_or_warn(
        self, trainer: L.Trainer, pl_module: L.LightningModule, filename: str
    ) -> Path | None:
        """:meth:`draw`, with any failure turned into a one-line warning."""
        try:
            return self.draw(trainer, pl_module, filename)
        except Exception as err:  # a picture must never stop or fail a run
            first = (str(err).strip().splitlines() or [""])[0]
            log.warning(
                "reconstruction picture %s not drawn (%s: %s); training and checkpoints are "
                "unaffected",
                self.dirpath / filename,
                type(err).__name__,
                first,
            )
            return None

    @torch.no_grad()
    def preview(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The forward behind the picture, on every process: ``(images, output)`` or None when
        the data has no preview images.

        All processes build the same images and mask and call the strategy's model (DDP, the
        FSDP root, or the module itself) under the precision plugin's forward context, so every
        collective a wrapper runs in its forward happens on every process.
        """
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "preview_images"):
            return None
        images = dm.preview_images(self.score_images).to(pl_module.device)
        net = pl_module.net
        gen = torch.Generator().manual_seed(self.seed)
        mask = net.random_mask(images.shape[0], generator=gen).to(images.device)
        model = trainer.strategy.model
        model = pl_module if model is None else model
        precision = trainer.precision_plugin
        was_training = net.training
        net.eval()
        try:
            with precision.forward_context():
                out = model(precision.convert_input(images), mask)
        finally:
            net.train(was_training)
        return images, out

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, filename: str) -> Path | None:
        """Run :meth:`preview` (on every process) and, on rank 0, save ``dirpath/filename``,
        log the scores and the picture; returns the path on rank 0."""
        result = self.preview(trainer, pl_module)
        if result is None or not trainer.is_global_zero:
            return None
        images, out = result
        net = pl_module.net
        scores = masked_cell_scores(*net.target.comparable(out.preds, out.targets), out.weights)
        self.last_scores = dict(zip(net.tap_names, scores, strict=True))
        n = min(self.num_images, images.shape[0])
        dm = trainer.datamodule
        fig = reconstruction_figure(
            images[:n],
            out,
            net.tap_names,
            tuple(net.encoder.mask_grid),
            net.target,
            mean=getattr(dm, "mean", IMAGENET_MEAN),
            std=getattr(dm, "std", IMAGENET_STD),
            title=(
                f"step {trainer.global_step}, loss {float(out.loss):.4f} on "
                f"{images.shape[0]} images; {format_scores(net.tap_names, scores)}"
            ),
            scores=scores,
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / filename
        fig.savefig(path, dpi=self.dpi)
        self.last_path = path
        log.info("reconstruction picture: %s (%s)", path, format_scores(net.tap_names, scores))
        metrics = {f"recon/r2_{name}": s.r2 for name, s in self.last_scores.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_image("reconstructions", [str(path)], step=trainer.global_step)
        return path
