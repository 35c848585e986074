"""Shared fixtures: the real Hydra config, composed with tiny models on the CPU."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lmim.utils import config_dir

# Under pytest-xdist (make test), each worker and every process it starts uses one thread:
# OpenMP threads of two workers fighting over the same cores make CPU steps many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Tests never talk to the W&B servers: offline runs are real runs written to disk.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.pop("WANDB_API_KEY", None)


def compose_cfg(overrides: Sequence[str], output_dir, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as ``python -m lmim.train`` would.

    The Hydra runtime (run name, choices) is set, and outputs go to ``output_dir``.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(tmp_path) -> Callable[..., DictConfig]:
    """:func:`compose_cfg` with outputs in a per-test folder (``<tmp>/run`` by default)."""

    def _make(
        overrides: Sequence[str] = (), output_dir=None, config_name: str = "train"
    ) -> DictConfig:
        return compose_cfg(overrides, output_dir or tmp_path / "run", config_name)

    yield _make
    GlobalHydra.instance().clear()


def loss_by_hand(out, mask_grid: tuple[int, int]) -> list:
    """The method's loss (section 4) recomputed from a forward's predictions, targets and patch
    mask: per tap, the mean over the masked cells (a coarse cell weighs the share of its
    patches that are masked) of the mean squared error over the target dims.

    Args:
        out: a :class:`lmim.models.LocalMIMOutput`.
        mask_grid: rows and columns of the patch (or Swin unit) mask.

    Returns:
        [(B, N_k) float64 cell weights, float64 loss] per tap.
    """

    B = out.mask.shape[0]
    mask = out.mask.double().reshape(B, *mask_grid)
    result = []
    for pred, target, (h, w) in zip(out.preds, out.targets, out.grids, strict=True):
        if h >= mask_grid[0]:  # finer cells: each patch's value over its sub-cells
            f = h // mask_grid[0]
            weight = mask.repeat_interleave(f, 1).repeat_interleave(f, 2)
        else:  # coarser cells: the masked share of the patches they cover
            f = mask_grid[0] // h
            weight = mask.reshape(B, h, f, w, f).mean(dim=(2, 4))
        weight = weight.reshape(B, h * w)
        err = (pred.double() - target.double()).pow(2).mean(dim=-1)
        result.append((weight, (err * weight).sum() / weight.sum()))
    return result


def assert_loss_by_hand(out, mask_grid: tuple[int, int]) -> None:
    """The forward's cell weights, per-tap losses (in tap order) and their unweighted sum
    equal :func:`loss_by_hand`."""
    import torch

    by_hand = loss_by_hand(out, mask_grid)
    for (weight, loss), w, name in zip(by_hand, out.weights, out.losses, strict=True):
        torch.testing.assert_close(w.double(), weight, rtol=0, atol=1e-7)
        assert out.losses[name].item() == pytest.approx(loss.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(loss.item() for _, loss in by_hand), rel=1e-5)


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST tests look: Debian's dataset-fashion-mnist folder, or
    ``LMIM_TEST_FASHION_MNIST`` (to check the CI rule below on a machine that has it)."""
    from lmim.data.fashion_mnist import DEBIAN_DIR

    return Path(os.environ.get("LMIM_TEST_FASHION_MNIST", DEBIAN_DIR))


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_fashion_mnist() -> Path:
    """The Fashion-MNIST folder. Without it the calling test is skipped, except under
    ``CI=true``, where it fails: CI must not pass while skipping the evaluation tests."""
    folder = fashion_mnist_dir()
    if folder.is_dir():
        return folder
    missing = f"Fashion-MNIST is not installed ({folder}; make fashion-mnist installs it)"
    if under_ci():
        pytest.fail(f"{missing}: under CI=true the evaluation tests must run", pytrace=False)
    pytest.skip(missing)


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """:func:`require_fashion_mnist` as a fixture; session-scoped, so it is checked before any
    module fixture that trains on Fashion-MNIST."""
    return require_fashion_mnist()


# Tests on Fashion-MNIST: `@needs_fmnist`.
needs_fmnist = pytest.mark.usefixtures("fashion_mnist")


# A fast training config: the 8-block test ViT on the embedded photos at 64 px.
TINY_MODEL = [
    "model=vit_test",
    "data.img_size=64",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer=cpu",
    "logger=csv",
]
TINY = [*TINY_MODEL, "data=demo", "data.samples_per_epoch=32"]


@pytest.fixture(autouse=True)
def _close_progress_bars():
    """Close progress bars a failing fit left open, inside the test (whose output is captured),
    rather than at interpreter exit, after pytest's summary line."""
    yield
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@pytest.fixture(autouse=True)
def _own_wandb_service():
    """Commands a test starts get a W&B service of their own. An in-process W&B run (an earlier
    test's) exports WANDB_SERVICE, the address of this process's service; a child inheriting it
    would log through that shared service, where the stream of a run killed by a test stays
    registered, and resuming that run id is then refused ("run ID ... is in use"), which a
    fresh machine never sees."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
