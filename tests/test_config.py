"""The real Hydra configs compose, are strict, and reject bad values before training."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmim.errors import ConfigError
from lmim.train import build
from lmim.utils import config_dir
from tests.conftest import TINY, TINY_MODEL

GROUPS = [
    "method",
    "model",
    "target",
    "schedule",
    "data",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "debug",
    "optim",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def test_groups_exist():
    """Every config group the issue names is a folder with at least one option."""
    for group in GROUPS:
        assert options(group), group
    assert {"vit_tiny", "vit_s", "vit_b", "vit_l", "vit_h"} <= set(options("model"))
    assert {"hog", "pixel"} <= set(options("target"))
    assert {"localmim", "isolated", "top_only", "single_scale"} <= set(options("schedule"))
    assert {"localmim", "mae"} <= set(options("method"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_resolve(make_cfg, experiment):
    """Each experiment composes, resolves fully and keeps struct mode on."""
    cfg = make_cfg([f"experiment={experiment}"])
    assert OmegaConf.is_struct(cfg)
    resolved = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    assert resolved["run_name"].startswith(cfg.hydra.runtime.choices.model)
    assert cfg.model._target_ == "lmim.models.LocalMIM"


def test_paper_defaults(make_cfg):
    """Defaults are the paper's: ViT-B/16, HOG-9, taps [1,3,-3,-1], scales 4,2,1,0.5, AdamW."""
    cfg = make_cfg([])
    assert cfg.model.encoder.patch_size == 16 and cfg.model.encoder.embed_dim == 768
    # null = the encoder's paper schedule
    assert cfg.schedule.taps is None and cfg.schedule.scales is None
    net = instantiate(cfg.model)
    assert net.taps == [1, 3, 9, 11] and net.scales == [4, 2, 1, 0.5]
    assert net.loss_weights == [1, 1, 1, 1] and net.cell_sizes == [4, 8, 16, 32]
    assert cfg.target.nbins == 9 and cfg.target.bias is False
    assert cfg.model.mask_ratio == 0.75
    assert list(cfg.optim.optimizer.betas) == [0.9, 0.95]
    assert cfg.optim.optimizer.weight_decay == 0.05
    assert cfg.model.decoder_dim == 256 and cfg.model.decoder_heads == 8


def test_vit_l_recipe(make_cfg):
    """The ViT-L experiment: HOG-18 with bias, 128 x 4 accumulation x 8 GPUs, blr 1.5e-4."""
    cfg = make_cfg(["experiment=vit_l_800ep"])
    assert cfg.target.nbins == 18 and cfg.target.bias is True
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices == 4096
    assert cfg.optim.blr * 4096 / 256 == pytest.approx(2.4e-3)


def test_mistyped_key_is_an_error(make_cfg):
    """Struct mode: an unknown key on the command line fails composition."""
    with pytest.raises(ConfigCompositionException):
        make_cfg(["model.mask_ratoi=0.5"])
    with pytest.raises(ConfigCompositionException):
        make_cfg(["model=vit_zz"])


def test_command_line_reaches_the_model(make_cfg):
    """Overrides of any level reach the instantiated model."""
    cfg = make_cfg([*TINY, "model.mask_ratio=0.6", "target.nbins=18", "schedule=isolated"])
    net = instantiate(cfg.model)
    assert net.mask_ratio == 0.6 and net.target.nbins == 18 and net.isolate_gradients


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["data.img_size=72"], "data.img_size"),
        (["schedule.taps=[1,3,5,12]"], "schedule.taps"),
        (["data.img_size=96", "schedule.scales=[4,2,1,0.25]"], "schedule.scales"),
        (["schedule.scales=[3,2,1,0.5]"], "schedule.scales"),
        (["model.mask_ratio=1.0"], "model.mask_ratio"),
        (["model.mask_ratio=0"], "model.mask_ratio"),
    ],
)
def test_bad_values_stop_before_training(make_cfg, override, key):
    """Each bad value raises one ConfigError that names the key, while building."""
    cfg = make_cfg([*TINY, *override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(cfg)


@pytest.mark.parametrize("root", ["/nonexistent/imagenet", "null"])
def test_missing_data_root(make_cfg, root):
    """A missing or unset data root is refused with the key and the expected layout."""
    cfg = make_cfg([*TINY_MODEL, "data=imagefolder", f"data.root={root}"])
    with pytest.raises(ConfigError, match=r"data\.root.*train/<class>"):
        build(cfg)


def test_empty_data_root(make_cfg, tmp_path):
    """A data root whose train folder has no images is refused with the expected layout."""
    (tmp_path / "data" / "train" / "class_a").mkdir(parents=True)
    (tmp_path / "data" / "train" / "class_a" / "notes.txt").write_text("no images")
    cfg = make_cfg([*TINY_MODEL, "data=imagefolder", f"data.root={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match="holds no images"):
        build(cfg)


@pytest.mark.parametrize(
    ("override", "label"),
    [([], "1600ep"), (["trainer.max_epochs=-1", "trainer.max_steps=500"], "500steps")],
)
def test_budget_label(make_cfg, override, label):
    """Runs are labelled with their budget: epochs, or steps for step-limited runs."""
    cfg = make_cfg(override)
    assert cfg.labels.budget == label
    assert f"budget:{label}" in list(cfg.tags)
