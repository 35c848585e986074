"""Saves (and logs to W&B) pictures of targets against predictions for fixed images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lmim.data.transforms import denormalize
from lmim.targets import HOG
from lmim.viz import reconstruction_figure


class ReconstructionFigure(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, draw for a few fixed images
    the input, the mask and every tap's target next to its prediction.

    Args:
        dirpath: where PNGs go (``epoch_XXXX.png`` and ``last.png``).
        num_images: rows of the figure.
        every_n_epochs: 0 draws only at the end.
        seed: seed of the fixed mask.
    """

    def __init__(
        self, dirpath: str, num_images: int = 4, every_n_epochs: int = 0, seed: int = 0
    ) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.last_path: Path | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.draw(trainer, pl_module, f"epoch_{trainer.current_epoch:04d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module, "last.png")

    @torch.no_grad()
    def draw(self, trainer, pl_module, filename: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "preview_images"):
            return None
        net = pl_module.net
        images = dm.preview_images(self.num_images).to(pl_module.device)
        gen = torch.Generator().manual_seed(self.seed)
        mask = net.random_mask(images.shape[0], generator=gen)
        was_training = net.training
        net.eval()
        out = net(images, mask.to(images.device))
        net.train(was_training)
        target = net.target
        fig = reconstruction_figure(
            denormalize(images),
            out.mask,
            out.preds,
            out.targets,
            out.grids,
            tuple(net.encoder.mask_grid),
            net.tap_names,
            target_kind="hog" if isinstance(target, HOG) else "pixel",
            nbins=getattr(target, "nbins", 9),
            cell_sizes=net.cell_sizes,
            title=f"step {trainer.global_step}  loss {out.loss.item():.4f}",
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / filename
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("reconstructions", [str(path)], step=trainer.global_step)
        return path
