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
