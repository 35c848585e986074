"""Evaluation: k-NN measures what it claims, features are deterministic, the labelled splits of
every data group, export to timm for any encoder setting, and every command of the README's
Evaluation and Export sections through the real command line (a checkpoint pre-trained by a
real ``python -m lmim.train`` run)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import lmim
from lmim.data import DemoDataModule, ImageFolderDataModule
from lmim.data.fashion_mnist import FashionMNISTDataModule
from lmim.errors import ConfigError
from lmim.evaluation import accuracy_metrics, extract_features, knn_accuracy
from tests.conftest import needs_fmnist
from tests.runs import Commands, photo_folder


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


# -- labelled splits of every data group ---------------------------------------------------------


def test_imagefolder_labelled_splits(tmp_path):
    """Labels are the class folders' sorted positions, the same in train/ and val/; a limit keeps
    every class; the evaluation view is the paper's resize 256 / centre crop 224 at 224 px."""
    root = photo_folder(tmp_path / "data", {"train": 3, "val": 2}, photos=("coffee", "astronaut"))
    dm = ImageFolderDataModule(root=str(root), img_size=32, batch_size=4, num_workers=0)
    dm.validate_labelled()
    assert dm.classes == ["astronaut", "coffee"] and dm.num_classes == 2
    train, val = dm.eval_dataset("train"), dm.eval_dataset("val")
    assert [y for _, y in train] == [0, 0, 0, 1, 1, 1] and [y for _, y in val] == [0, 0, 1, 1]
    assert train[0][0].shape == (3, 32, 32)
    assert sorted({y for _, y in dm.eval_dataset("train", limit=2)}) == [0, 1]
    big = ImageFolderDataModule(root=str(root), img_size=224)
    resize, crop = big.eval_view().transforms[:2]
    assert (resize.size, tuple(crop.size)) == (256, (224, 224))


def test_imagefolder_without_val_or_with_other_classes_is_refused(tmp_path):
    """Evaluation needs val/ with the class folders of train/: each is one clear error."""
    root = photo_folder(tmp_path / "data", {"train": 1}, photos=("coffee", "astronaut"))
    dm = ImageFolderDataModule(root=str(root), img_size=32)
    dm.validate()  # pre-training needs no val/
    with pytest.raises(ConfigError, match=r"has no 'val' folder.*data\.val_split"):
        dm.validate_labelled()
    photo_folder(root, {"val": 1}, photos=("coffee", "rocket"))
    with pytest.raises(ConfigError, match=r"1 only in train/: astronaut; 1 only in val/: rocket"):
        dm.validate_labelled()


def test_demo_labelled_crops_are_fixed_and_labelled_by_photo():
    """data=demo: crop i comes from photo i mod n (its label), the same every time; val holds
    other crops than train."""
    dm = DemoDataModule(images=["astronaut", "coffee", "rocket"], samples_per_epoch=12, img_size=32)
    train, val = dm.eval_dataset("train"), dm.eval_dataset("val")
    assert dm.num_classes == 3 and len(train) == 12 and len(val) == 3
    assert [train[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert torch.equal(train[4][0], dm.eval_dataset("train")[4][0])
    assert not torch.equal(train[0][0], val[0][0])


def test_top5_only_with_five_classes():
    """Top-5 is measured (torchmetrics) only when there are at least 5 classes."""
    assert set(accuracy_metrics(4)) == {"top1"}
    metrics = accuracy_metrics(6)
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    target = torch.tensor([1, 0])  # second-lowest score (in the top 5), and the top score
    assert float(metrics["top1"](logits, target)) == 0.5
    assert float(metrics["top5"](logits, target)) == 1.0


# -- export: any encoder setting loads into timm with strict=True ---------------------------------


@pytest.mark.parametrize(
    ("model", "options", "registered"),
    [
        ("vit_tiny", {"img_size": 32}, "vit_tiny_patch16_224"),
        ("vit_tiny", {"img_size": 32, "patch_size": 4}, None),
        ("vit_tiny", {"img_size": 64, "depth": 8}, None),
        ("vit_tiny", {"img_size": 32, "embed_dim": 96}, None),
        ("vit_tiny", {"img_size": 32, "num_heads": 6}, None),
        ("vit_tiny", {"img_size": 32, "mlp_ratio": 2.0}, None),
        ("vit_tiny", {"img_size": 32, "qkv_bias": False}, None),
        ("swin_t", {"img_size": 64}, "swin_tiny_patch4_window7_224"),
        ("swin_t", {"img_size": 64, "window_size": 4}, None),
        ("swin_test", {"img_size": 64, "depths": [2, 2, 4, 2]}, None),
    ],
)
def test_export_loads_strict_for_any_setting(tmp_path, model, options, registered):
    """The exporter names the registered timm model only for its own architecture; any changed
    setting builds timm's class with the encoder's settings. Either way the printed line of
    Python runs and loads the exported weights with strict=True, unchanged."""
    from lmim.export import encoder_state_dict, load_hint, registered_name, timm_model

    net = lmim.create_pretrainer(model, **options)
    assert registered_name(net.encoder) == registered
    state = encoder_state_dict(net)
    timm_model(net.encoder).load_state_dict(state, strict=True)
    path = tmp_path / "encoder.pth"
    torch.save(state, path)
    hint = load_hint(net.encoder, path)
    assert ("timm.create_model(" in hint) == (registered is not None)
    scope: dict = {}
    exec(hint, scope)
    loaded = scope["model"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# -- the README's Evaluation and Export commands, through the command line -------------------------

# Tiny settings added to the README's commands (few images, steps and epochs, no workers).
FAST = ["data.num_workers=0", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The README's Fashion-MNIST pre-training command, run for 4 steps on 256 images."""
    out = tmp_path_factory.mktemp("pretrain")
    cmds = Commands(out)
    cmds.start(
        "pretrain", "lmim.train",
        # README: python -m lmim.train data=fashion_mnist model=vit_tiny model.encoder.patch_size=4
        #         callbacks=knn
        "data=fashion_mnist", "model=vit_tiny", "model.encoder.patch_size=4", "callbacks=knn",
        *FAST, "data.train_limit=256", "data.test_limit=128", "data.batch_size=32",
        "trainer.max_steps=4", "callbacks.knn.train_limit=256", "logger=csv",
        "~callbacks.reconstruction", "callbacks.perf.count_flops=false",
        f"hydra.run.dir={out}/run", cwd=out,
    )  # fmt: skip
    proc = cmds.result("pretrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run"


@pytest.fixture(scope="module")
def evaluations(pretrained, tmp_path_factory):
    """The README's evaluation and export commands on the pre-trained checkpoint (and on a
    small ImageFolder of photo crops), started together."""
    base = tmp_path_factory.mktemp("evals")
    ckpt = f"checkpoint={pretrained}/checkpoints/last.ckpt"
    folder = photo_folder(base / "photos", {"train": 8, "val": 4})
    no_val = photo_folder(base / "no_val", {"train": 1})
    cmds = Commands(base)
    fmnist = ["data.train_limit=64", "data.test_limit=64", "data.batch_size=32"]
    ft = [*FAST, "trainer.max_epochs=1", "trainer.enable_model_summary=false"]
    runs = {
        # python -m lmim.linprobe checkpoint=... probe.layer=-1 probe.pool=avg
        "linprobe": ("lmim.linprobe", [ckpt, "probe.layer=-1", "probe.pool=avg", *FAST,
                     "data.train_limit=1000", "data.test_limit=500", "probe.batch_size=100",
                     "trainer.max_epochs=10"]),
        # python -m lmim.finetune checkpoint=... recipe=small
        "finetune": ("lmim.finetune", [ckpt, "recipe=small", *fmnist, *ft]),
        # python -m lmim.linprobe checkpoint=... data=imagefolder data.root=/data/imagenet
        "linprobe-folder": ("lmim.linprobe", [ckpt, "data=imagefolder", f"data.root={folder}",
                            "data.img_size=32", "data.batch_size=16", "probe.batch_size=16",
                            "trainer.max_epochs=20", *FAST, "logger=wandb"]),
        "no-val": ("lmim.linprobe", [ckpt, "data=imagefolder", f"data.root={no_val}",
                   "data.img_size=32"]),
        # python -m lmim.finetune init_model=vit_tiny data.img_size=32 recipe=small
        "scratch": ("lmim.finetune", ["init_model=vit_tiny", "data.img_size=32", "recipe=small",
                    *fmnist, *ft, "logger=wandb"]),
        # python -m lmim.finetune checkpoint=... data=imagefolder data.root=... recipe=vit_b
        "finetune-folder": ("lmim.finetune", [ckpt, "data=imagefolder", f"data.root={folder}",
                            "recipe=vit_b", "data.img_size=32", "data.batch_size=8", *ft]),
    }  # fmt: skip
    for key, (module, args) in runs.items():
        (base / key).mkdir()
        cmds.add(key, module, *args, f"hydra.run.dir={base / key}/run", cwd=base / key)
    # python -m lmim.export outputs/.../checkpoints/last.ckpt --out vit_b_localmim.pth
    cmds.add("export", "lmim.export", ckpt.split("=", 1)[1], "--out", f"{base}/enc.pth", cwd=base)
    cmds.start_all()
    yield cmds, base, pretrained
    cmds.stop()


def printed(proc, key: str) -> float:
    """The value the entry point printed as ``<key>: <value>``."""
    match = re.search(rf"^{re.escape(key)}: ([0-9.]+)$", proc.stdout, re.M)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return float(match.group(1))


@needs_fmnist
def test_readme_pretraining_with_knn(pretrained):
    """The README's pre-training command leaves last.ckpt, logs the k-NN monitor above chance
    (0.1) and is named by what bounded it (4 steps, not the default 1600 epochs)."""
    with open(pretrained / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    knn = [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")]
    assert knn and knn[-1] > 0.3
    config = torch.load(pretrained / "checkpoints" / "last.ckpt", weights_only=True)["lmim_config"]
    assert config["labels"]["budget"] == "4steps" and config["run_name"].endswith("-4steps")
    assert "budget:4steps" in config["tags"]


@needs_fmnist
def test_readme_linprobe(evaluations):
    """python -m lmim.linprobe checkpoint=... probe.layer=-1 probe.pool=avg: the probe on
    1000 images reaches far above chance (0.1) on 500 test images; top-5 is reported too."""
    proc = evaluations[0].result("linprobe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    top1, top5 = printed(proc, "val/top1"), printed(proc, "val/top5")
    assert top1 > 0.35 and top5 > top1


@needs_fmnist
def test_readme_finetune_loads_every_encoder_weight(evaluations):
    """python -m lmim.finetune checkpoint=... recipe=small: every encoder weight is loaded;
    only the new head and pooled-feature norm are not; top-1 and top-5 are printed."""
    proc = evaluations[0].result("finetune")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new: fc_norm.bias, fc_norm.weight, head.bias, head.weight; dropped: none" in proc.stdout
    assert printed(proc, "val/top5") >= printed(proc, "val/top1")


@needs_fmnist
def test_readme_finetune_from_scratch(evaluations):
    """python -m lmim.finetune init_model=vit_tiny data.img_size=32 recipe=small runs from
    random weights."""
    proc = evaluations[0].result("scratch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "init_model=vit_tiny: training from randomly initialised weights" in proc.stdout
    assert printed(proc, "val/top5") >= printed(proc, "val/top1")
    run = evaluations[1] / "scratch" / "run"
    assert_logged_to_wandb(run, "finetune", printed(proc, "val/top1"))


@needs_fmnist
def test_readme_finetune_on_an_imagefolder(evaluations):
    """data=imagefolder: recipe=vit_b fine-tunes on train/ and validates on val/, reporting
    top-1 and top-5."""
    tune = evaluations[0].result("finetune-folder")
    assert tune.returncode == 0, tune.stderr[-3000:]
    assert "new: fc_norm.bias, fc_norm.weight, head.bias, head.weight" in tune.stdout
    assert printed(tune, "val/top5") >= printed(tune, "val/top1")


def assert_logged_to_wandb(run, task: str, top1: float) -> None:
    """With logger=wandb, the job logged an offline W&B run of its own job type whose last
    val/top1 is the one it printed."""
    from lmim.wandb_file import read_wandb_file

    (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_wandb_file(file)
    assert logged.job_type == logged.group == task and logged.tags == [task]
    top1s = [h["val/top1"] for h in logged.history if "val/top1" in h]
    assert top1s and top1s[-1] == pytest.approx(top1, abs=1e-4)


@needs_fmnist
def test_readme_evaluation_on_an_imagefolder(evaluations):
    """data=imagefolder: the linear probe tells 6 photos' crops apart on val/ (chance 1/6),
    reporting top-1 and top-5 (the fine-tune on it: test_readme_finetune_on_an_imagefolder)."""
    cmds = evaluations[0]
    probe = cmds.result("linprobe-folder")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert printed(probe, "val/top1") >= 0.5 and printed(probe, "val/top5") == 1.0
    run = evaluations[1] / "linprobe-folder" / "run"
    assert_logged_to_wandb(run, "linprobe", printed(probe, "val/top1"))


@needs_fmnist
def test_evaluation_without_val_folder_is_one_line(evaluations):
    """An ImageFolder without val/: one line naming data.root, the folder and the fix, exit 2."""
    proc = evaluations[0].result("no-val")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim:")]
    assert (
        len(lines) == 1 and "has no 'val' folder, which linear probing and fine-tuning" in lines[0]
    )
    assert "Traceback" not in proc.stderr


@needs_fmnist
def test_readme_export_prints_a_line_that_loads_strict(evaluations):
    """python -m lmim.export of the README's patch-4 ViT-Ti checkpoint (not timm's registered
    patch-16 model): the printed line of Python builds timm's VisionTransformer with patch 4 and
    loads the file with strict=True."""
    cmds, base, pretrained = evaluations
    proc = cmds.result("export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hint = proc.stdout.strip().splitlines()[-1]
    assert hint.startswith("import timm, torch; model = timm.models.VisionTransformer(img_size=32")
    assert "patch_size=4" in hint and f"torch.load('{base}/enc.pth'), strict=True" in hint
    scope: dict = {}
    exec(hint, scope)
    exported = torch.load(base / "enc.pth")
    assert all(torch.equal(scope["model"].state_dict()[k], v) for k, v in exported.items())
    ckpt = torch.load(pretrained / "checkpoints" / "last.ckpt", weights_only=True)
    proj = ckpt["state_dict"]["net.encoder.patch_embed.proj.weight"]
    assert proj.shape == (192, 3, 4, 4) and torch.equal(exported["patch_embed.proj.weight"], proj)


def test_readme_export_line_is_what_export_prints_for_vit_b():
    """The README's load line for model=vit_b is the exporter's, word for word."""
    from lmim.export import load_hint

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    net = lmim.create_pretrainer("vit_b")
    assert load_hint(net.encoder, "vit_b_localmim.pth") in readme
