"""Frozen-encoder evaluation: k-NN measures what it claims, features are deterministic, and the
monitor runs under a real Trainer on Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import lmim
from lmim.data.fashion_mnist import FashionMNISTDataModule
from lmim.errors import ConfigError
from lmim.evaluation import extract_features, knn_accuracy
from lmim.train import train
from tests.conftest import TINY_MODEL, needs_fmnist


def separable(n_per_class: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on distinct directions with small noise: linearly (and cosine) separable."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(classes) * 5
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centers[labels] + 0.3 * torch.randn(len(labels), classes, generator=g)
    return feats, labels


def test_knn_separable_is_perfect_and_shuffled_is_chance():
    """100% on separable classes; about chance (10%) when the reference labels are shuffled."""
    train_x, train_y = separable(100, 10, seed=0)
    test_x, test_y = separable(50, 10, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10) == 1.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(2))]
    acc = knn_accuracy(train_x, shuffled, test_x, test_y, num_classes=10)
    assert 0.0 <= acc < 0.25


def test_knn_votes_are_weighted_by_similarity():
    """One very close neighbour of class 1 outvotes two far ones of class 0 (k=3, T small)."""
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.3]])
    assert knn_accuracy(train_x, train_y, query, torch.tensor([1]), 2, k=3, temperature=0.05) == 1
    assert knn_accuracy(train_x, train_y, query, torch.tensor([0]), 2, k=3, temperature=100) == 1


def test_features_are_deterministic():
    """The same images give the same features twice (eval mode, no masking), for ViT and Swin,
    and the encoder's training mode is restored."""
    images = torch.randn(6, 3, 64, 64)
    loader = DataLoader(list(zip(images, torch.arange(6), strict=True)), batch_size=4)
    for model in ("vit_test", "swin_test"):
        enc = lmim.create_pretrainer(model, img_size=64).encoder.train()
        a, ya = extract_features(enc, loader, layer=-1)
        b, _ = extract_features(enc, loader, layer=1)
        c, _ = extract_features(enc, loader, layer=-1)
        assert torch.equal(a, c) and enc.training
        assert (
            a.shape[0] == 6
            and ya.tolist() == list(range(6))
            and not torch.equal(a[:, :8], b[:, :8])
        )


def test_missing_fashion_mnist_names_the_fix(tmp_path):
    """A folder without the idx files is refused with the make target and the file names."""
    dm = FashionMNISTDataModule(root=str(tmp_path), img_size=32, batch_size=8)
    with pytest.raises(ConfigError, match="make fashion-mnist"):
        dm.validate()


@needs_fmnist
def test_fashion_mnist_splits():
    """60,000 / 10,000 labelled images in 10 balanced classes, served as 3 x S x S."""
    dm = FashionMNISTDataModule(img_size=32, batch_size=8, num_workers=0)
    test = dm.eval_dataset("test")
    assert len(test) == 10_000 and torch.bincount(torch.as_tensor(test.labels)).eq(1000).all()
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    dm.setup()
    assert len(dm.train_set) == 60_000


@needs_fmnist
def test_knn_monitor_under_trainer(make_cfg):
    """callbacks=knn logs val/knn_top1 during a short pre-training on Fashion-MNIST, above
    chance even for a barely trained encoder (raw-ish features of real images)."""
    cfg = make_cfg(
        [
            *TINY_MODEL,
            "data=fashion_mnist",
            "data.img_size=32",
            "data.train_limit=512",
            "data.test_limit=256",
            "data.num_workers=0",
            "callbacks=knn",
            "callbacks.knn.train_limit=512",
            "debug=limit",
            "model.encoder.patch_size=8",
        ]
    )
    result = train(cfg)
    acc = result["metrics"]["val/knn_top1"]
    assert 0.3 < acc <= 1.0


@pytest.fixture(scope="module")
def fmnist_checkpoint(tmp_path_factory):
    """A real (short) pre-training checkpoint of the tiny ViT on Fashion-MNIST at 32 px."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lmim.utils import config_dir

    out = tmp_path_factory.mktemp("pretrain")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            return_hydra_config=True,
            overrides=[
                *TINY_MODEL,
                "data=fashion_mnist",
                "data.img_size=32",
                "data.train_limit=256",
                "data.num_workers=0",
                "debug=limit",
                "model.encoder.patch_size=8",
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    result = train(cfg)
    GlobalHydra.instance().clear()
    return result["checkpoint"]


@needs_fmnist
def test_linprobe_one_epoch(make_cfg, fmnist_checkpoint):
    """python -m lmim.linprobe's job on a pre-training checkpoint, through the composed config."""
    from lmim.linprobe import linprobe

    cfg = make_cfg(
        [
            f"checkpoint={fmnist_checkpoint}",
            "data.img_size=32",
            "data.train_limit=1000",
            "data.test_limit=500",
            "data.num_workers=0",
            "trainer.max_epochs=1",
        ],
        config_name="linprobe",
    )
    result = linprobe(cfg)
    assert result["num_train"] == 1000 and result["num_test"] == 500
    assert 0.2 < result["val/top1"] <= 1.0  # far above chance (0.1) on real images


@needs_fmnist
def test_finetune_one_epoch_loads_all_encoder_weights(make_cfg, fmnist_checkpoint):
    """python -m lmim.finetune's job: exported weights load with no missing encoder key (only
    the new head and pooled-feature norm are missing), and one epoch trains."""
    from lmim.finetune import finetune

    cfg = make_cfg(
        [
            f"checkpoint={fmnist_checkpoint}",
            "data.img_size=32",
            "recipe=small",
            "data.train_limit=256",
            "data.test_limit=128",
            "data.num_workers=0",
            "trainer.max_epochs=1",
        ],
        config_name="finetune",
    )
    result = finetune(cfg)
    assert set(result["missing"]) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert result["unexpected"] == []
    top1 = result["val/top1"]
    assert top1 * 128 == pytest.approx(round(top1 * 128), abs=1e-6)  # a share of the 128 images
    assert top1 > 0.15  # one epoch learns: above chance (0.1); 0.227 (29 of 128) here


def test_probe_commands_refuse_a_missing_encoder(make_cfg):
    """Without checkpoint or init_model the probes stop with the keys to set."""
    from lmim.linprobe import load_encoder

    with pytest.raises(ConfigError, match="checkpoint=.*init_model="):
        load_encoder(None, None, 32)


def test_finetune_randaugment_posterizes_to_zero_bits_like_old_pillow():
    """The recipe's RandAugment (rand-m9-mstd0.5-inc1) draws posterize to 0 bits at magnitude
    10; Pillow >= 11 raises there. After pillow_safe_posterize the op gives the all-black image
    older Pillow gave, and other bit counts are unchanged."""
    from PIL import Image
    from timm.data import create_transform
    from timm.data.auto_augment import posterize

    from lmim.finetune import pillow_safe_posterize

    tf = create_transform(input_size=32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    assert pillow_safe_posterize(tf) == 1
    (op,) = [o for t in tf.transforms for o in getattr(t, "ops", []) if "Posterize" in o.name]
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op.aug_fn(img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert op.aug_fn(img, 2).tobytes() == posterize(img, 2).tobytes()
