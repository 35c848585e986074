"""The real Hydra configs compose, are strict, and reject bad values before training."""

from __future__ import annotations

import pytest
import yaml
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


@pytest.mark.parametrize("name", options("model"))
def test_model_options_are_a_base_plus_the_encoder_size(name):
    """Every model option composes its family's base (model/_base_/) and sets only the encoder's
    size (and, for the test Swin, the decoder widths): configs do not copy each other."""
    text = yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text())
    family = "swin" if name.startswith("swin") else "vit"
    assert text.pop("defaults") == [f"_base_/{family}@_here_", "_self_"]
    size = {"patch_size", "embed_dim", "depth", "depths", "num_heads", "window_size", "timm_name"}
    assert set(text.pop("encoder")) <= size
    assert set(text) <= {"decoder_dim"}, text


def test_callback_sets_compose_one_file_per_callback():
    """callbacks=default is its per-callback files in order; knn adds the k-NN monitor; budget
    takes the accounting with a 10-step window."""
    folder = config_dir() / "callbacks"
    default = yaml.safe_load((folder / "default.yaml").read_text())["defaults"]
    assert default[-1] == "_self_" and len(default) == 7
    for name in default[:-1]:
        body = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert len(body) == 1 and "_target_" in next(iter(body.values())), name
    knn = yaml.safe_load((folder / "knn.yaml").read_text())
    assert knn["defaults"] == ["default", "knn_monitor", "_self_"]
    budget = yaml.safe_load((folder / "budget.yaml").read_text())
    assert budget["perf"] == {"window": 10}


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
    [
        ([], "1600ep"),
        (["trainer.max_epochs=100"], "100ep"),
        (["trainer.max_steps=10"], "10steps"),
        (["trainer.max_epochs=-1", "trainer.max_steps=500"], "500steps"),
        (["debug=fdr"], "fast_dev_run"),
    ],
)
def test_budget_label(make_cfg, override, label):
    """Runs are named and tagged by what bounds them: the epochs, a step limit when one is set
    (trainer.max_steps=10 under the default 1600 epochs is a 10-step run), or fast_dev_run."""
    cfg = make_cfg(override)
    assert cfg.labels.budget == label
    assert cfg.run_name == f"vit_b-localmim-hog-localmim-{label}"
    assert f"budget:{label}" in list(cfg.tags)


PAPER_RUNS = ["vit_b_100ep", "vit_b_1600ep", "vit_l_800ep", "swin_b_400ep", "swin_l_800ep"]


@pytest.mark.parametrize("experiment", PAPER_RUNS)
def test_experiment_keeps_a_trainer_chosen_on_the_command_line(make_cfg, experiment):
    """A paper experiment runs on its 8 GPUs (DDP); with trainer=cpu (or ddp_cpu, or
    trainer.devices=N) the chosen trainer's devices win, and the recipe's global batch is
    reached with trainer.accumulate_grad_batches."""
    paper = make_cfg([f"experiment={experiment}"])
    assert (paper.trainer.accelerator, paper.trainer.devices) == ("gpu", 8)
    global_batch = paper.data.batch_size * paper.trainer.accumulate_grad_batches * 8
    # (read each config before composing the next: devices resolve against the Hydra runtime)
    cpu = make_cfg([f"experiment={experiment}", "trainer=cpu"])
    assert (cpu.trainer.accelerator, cpu.trainer.devices, cpu.trainer.strategy) == (
        "cpu",
        1,
        "auto",
    )
    assert cpu.trainer.max_epochs == paper.trainer.max_epochs  # the budget stays the recipe's
    accumulate = global_batch // cpu.data.batch_size
    assert make_cfg([f"experiment={experiment}", "trainer=ddp_cpu"]).trainer.devices == 2
    assert make_cfg([f"experiment={experiment}", "trainer.devices=4"]).trainer.devices == 4
    reached = make_cfg(
        [f"experiment={experiment}", "trainer=cpu", f"trainer.accumulate_grad_batches={accumulate}"]
    )
    batch = reached.data.batch_size * reached.trainer.devices
    assert batch * reached.trainer.accumulate_grad_batches == global_batch


@pytest.mark.parametrize(
    ("overrides", "cap", "devices"),
    [
        (["data=imagefolder", "trainer=cpu"], 8, 1),
        (["data=imagefolder", "trainer=ddp_cpu"], 8, 2),
        (["data=fashion_mnist", "trainer=cpu"], 2, 1),
        (["experiment=vit_b_100ep"], 8, 8),
    ],
)
def test_num_workers_fit_the_machine(make_cfg, overrides, cap, devices):
    """data.num_workers defaults to min(cap, CPUs this process may use / devices per node - 1,
    at least 1): no more workers than the machine has, e.g. 1 on a 2-core machine."""
    import os

    cpus = len(os.sched_getaffinity(0))
    cfg = make_cfg(overrides)
    assert cfg.data.num_workers == min(cap, max(1, cpus // devices - 1))
    assert 1 <= cfg.data.num_workers <= cpus
    assert make_cfg([*overrides, "data.num_workers=3"]).data.num_workers == 3
