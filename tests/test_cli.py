"""The command line as a user meets it: every entry point (``python -m lmim.train``,
``lmim.linprobe``, ``lmim.finetune``, ``lmim.export``) answers bad input with one line on stderr
naming the key and the fix, exit status 2, and Hydra's own features keep working. Real
processes, real Hydra, real files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runs import Commands, cli_env, photo_folder


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


# Every command of this file, started at once by the ``commands`` fixture: key -> (module, args).
TYPOS = {
    "train-key": (
        "lmim.train",
        ["data.batchsize=4"],
        "lmim: error: data.batchsize is not a config key: did you mean data.batch_size=4?",
    ),
    "train-option": (
        "lmim.train",
        ["target=hogg"],
        "lmim: error: target=hogg is not an option of the 'target' group: did you mean "
        "target=hog? (options: codebook, hog, hog18, pixel, teacher, tokenizer)",
    ),
    "linprobe-key": (
        "lmim.linprobe",
        ["checkpoint=x.ckpt", "probe.layr=-1"],
        "lmim: error: probe.layr is not a config key: did you mean probe.layer=-1?",
    ),
    "finetune-option": (
        "lmim.finetune",
        ["checkpoint=x.ckpt", "recipe=smal"],
        "lmim: error: recipe=smal is not an option of the 'recipe' group: did you mean "
        "recipe=small? (options: small, swin_b, vit_b, vit_l)",
    ),
}


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """Starts every command line of this file at once (they are independent), in fresh
    folders: mistyped keys and options (``model=vit_zz`` is in tests/test_reliability.py), a
    ``+`` key the class does not take, Hydra's own features, broken checkpoints, an ImageFolder
    without class folders, and a run that stops while its progress bar is drawn."""
    base = tmp_path_factory.mktemp("cli")
    cmds = Commands(base)

    def folder(key: str) -> Path:
        (base / key).mkdir()
        return base / key

    for key, (module, args, _) in TYPOS.items():
        cmds.add(key, module, *args, f"hydra.run.dir={base / key}/run", cwd=folder(key))
    cwd = folder("plus")
    tiny = ["model=vit_test", "logger=csv"]
    cmds.add(
        "plus", "lmim.train", "data=demo", *tiny, "+data.batchsize=4", f"hydra.run.dir={cwd}/run",
        cwd=cwd,
    )  # fmt: skip
    cwd = folder("matmul")
    cmds.add(
        "matmul", "lmim.train", "data=demo", *tiny, "trainer.max_steps=2", "matmul_precision=fast",
        f"hydra.run.dir={cwd}/run", cwd=cwd,
    )  # fmt: skip
    cwd = folder("hydra")
    cmds.add(
        "hydra", "lmim.train", "experiment=vit_b_100ep", "trainer=cpu", "+logger.wandb.id=abc123",
        "--cfg", "job", "--resolve", cwd=cwd,
    )  # fmt: skip
    cmds.add("help", "lmim.linprobe", "--help", cwd=folder("help"))
    for kind in ("truncated", "text"):
        cwd = folder(f"export-{kind}")
        path = cwd / "last.ckpt"
        if kind == "truncated":
            torch.save({"state_dict": {"w": torch.zeros(1000)}, "lmim_config": {}}, path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_text("<html>404 Not Found</html>")
        cmds.add(f"export-{kind}", "lmim.export", str(path), "--out", f"{cwd}/out.pth", cwd=cwd)
    cwd = folder("flat")
    root = photo_folder(cwd / "data", {"train": 1})
    for image in (root / "train").glob("*/*.jpg"):
        image.rename(root / "train" / f"{image.parent.name}_{image.name}")
    for sub in (root / "train").iterdir():
        if sub.is_dir():
            sub.rmdir()
    cmds.add(
        "flat", "lmim.train", "data=imagefolder", f"data.root={root}", *tiny,
        f"hydra.run.dir={cwd}/run", cwd=cwd,
    )  # fmt: skip
    cwd = folder("bar")
    root = photo_folder(cwd / "data", {"train": 2}, photos=("astronaut", "coffee"))
    for i in range(2):
        (root / "train" / "coffee" / f"broken_{i}.jpg").write_text("not an image")
    cmds.add(
        "bar", "lmim.train", "data=imagefolder", f"data.root={root}", "data.img_size=32",
        "data.batch_size=2", "data.num_workers=0", "data.max_skipped_share=0.01", *tiny,
        "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=true",
        "trainer.enable_model_summary=false", "~callbacks.reconstruction",
        "callbacks.perf.count_flops=false", f"hydra.run.dir={cwd}/run", cwd=cwd, merge=True,
    )  # fmt: skip
    cmds.start_all()
    yield cmds, base
    cmds.stop()


def lmim_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim:")]


# -- mistyped keys and group options --------------------------------------------------------------


@pytest.mark.parametrize("key", list(TYPOS))
def test_mistyped_key_or_option_is_one_line(commands, key):
    """A mistyped key or group option stops lmim.train, lmim.linprobe and lmim.finetune with
    exactly one line on stderr, naming it and the closest valid one, exit status 2, and no run
    folder."""
    cmds, base = commands
    proc = cmds.result(key)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [TYPOS[key][2]]
    assert not (base / key / "run").exists()


@pytest.mark.parametrize(
    "module", ["train", "finetune", "linprobe", "report", "analyze", "codebook", "export"]
)
def test_entry_point_answers_before_importing_lightning(module):
    """What ``python -m lmim.<module>`` runs before it parses its arguments (the module's own
    imports) imports neither Lightning nor torch, timm or W&B: a mistyped key, ``--help`` and
    ``--cfg`` answer without their ~5 s of imports."""
    heavy = ("lightning", "torch", "timm", "wandb")
    code = f"import sys, lmim.{module}; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_key_added_with_plus_that_the_class_does_not_take(commands):
    """``+data.batchsize=4`` composes (``+`` adds keys) but the DataModule has no such setting:
    one line naming it and the setting meant, exit 2, instead of a TypeError traceback."""
    proc = commands[0].result("plus")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lmim_lines(proc) == [
        "lmim: error: data.batchsize is not a setting of lmim.data.datamodules.DemoDataModule "
        "(added with +data.batchsize=...): did you mean data.batch_size?"
    ]
    assert "Traceback" not in proc.stderr


def test_matmul_precision_torch_has_not_is_one_line(commands):
    """The README's ``matmul_precision`` key on the command line: a value torch has not stops
    the run with one line naming the values it has, exit 2, before a checkpoint is written."""
    cmds, base = commands
    proc = cmds.result("matmul")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lmim_lines(proc) == [
        "lmim: error: matmul_precision=fast: use one of highest, high, medium, or null "
        "(torch's own setting)"
    ]
    assert not list((base / "matmul").glob("**/*.ckpt"))


def test_hydra_features_still_work(commands):
    """``--cfg job --resolve`` prints the composed config, a valid ``+`` key is accepted, a
    trainer chosen on the command line keeps its devices under an 8-GPU experiment, and
    ``--help`` lists the groups."""
    from omegaconf import OmegaConf

    proc = commands[0].result("hydra")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.logger.wandb.id == "abc123"
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.max_epochs) == ("cpu", 1, 100)
    assert cfg.data.batch_size == 256 and cfg.run_name.endswith("-100ep")
    help_proc = commands[0].result("help")
    assert help_proc.returncode == 0
    assert "data: demo, fashion_mnist, imagefolder" in help_proc.stdout


# -- unreadable inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"), [("truncated", "PytorchStreamReader failed"), ("text", "UnpicklingError")]
)
def test_export_of_a_broken_checkpoint_is_one_line(commands, kind, reason):
    """A truncated checkpoint or a file that is none: one line naming it, exit 2, no output."""
    cmds, base = commands
    proc = cmds.result(f"export-{kind}")
    path = base / f"export-{kind}" / "last.ckpt"
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert line.startswith(f"lmim: error: checkpoint {path} is not a readable checkpoint (")
    assert reason in line and "pass a .ckpt written by python -m lmim.train" in line
    assert not (path.parent / "out.pth").exists()


def test_images_without_class_folders_are_one_line(commands):
    """A train/ folder holding images directly (no class folders): one line with the fix."""
    cmds, base = commands
    proc = cmds.result("flat")
    train = base / "flat" / "data" / "train"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lmim_lines(proc) == [
        f"lmim: error: data.root={train.parent}: the 6 images of {train} lie directly in it, "
        f"but an ImageFolder reads one folder per class (expected {train}/<class>/<images>): "
        f"move them into class folders (for pre-training any one folder works, e.g. "
        f"{train}/all/)"
    ]
    assert "Traceback" not in proc.stderr


def test_error_after_a_progress_bar_starts_its_own_line(commands):
    """A run that stops while the progress bar is drawn (too many unreadable images) prints its
    one line at the start of a line, not glued to the bar's last update."""
    proc = commands[0].result("bar")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "Epoch 0" in out  # the bar was drawn
    assert re.search(r"(^|\n)lmim: stopped: .*data\.max_skipped_share=0\.01", out), out[-3000:]
    assert not re.search(r"[^\n]lmim: stopped:", out), out[-3000:]


def test_lightning_lines_are_printed_once(commands):
    """Lightning's own lines (the seed, the devices) reach the console once, not a second time
    through Hydra's console handler, and still reach the run's log file."""
    cmds, base = commands
    out = cmds.result("bar").stdout
    assert out.count("Seed set to 0") == 1, out[-3000:]
    assert out.count("GPU available:") == 1, out[-3000:]
    assert "Seed set to 0" in (base / "bar" / "run" / "train.log").read_text()
