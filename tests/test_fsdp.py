"""FSDP trained for real: PyTorch FSDP2 through Lightning's ModelParallelStrategy
(``trainer=fsdp_cpu``: 2 gloo processes on the CPU, float32), ViT and Swin, sharded checkpoints
written atomically, resumed and exported. Real CLI runs, real processes, real files.

The runs leave out the ReconstructionFigure callback: it runs the model on rank 0 alone at the
end of training, which hangs under FSDP (every rank must take part in a forward; issue 12 item 2).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from hydra.utils import get_class, instantiate

import lmim
from lmim.errors import ConfigError
from lmim.export import encoder_state_dict, load_pretrainer
from lmim.fsdp import DEFAULT_WRAP, FSDP2Strategy, shard_model
from lmim.resume import (
    remove_stale_temp_files,
    replace_path,
    resume_checkpoint,
    temp_path_for,
)
from tests import runs
from tests.runs import SMALL, loss_rows

# The 8-block test ViT with a narrow decoder at 32 px on two embedded photos: 40 samples make
# one epoch of 5 steps of 8 images (2 processes x 4, or 1 x 8).
RUN = [
    # tests.runs.SMALL without its trainer and batch (set per run below), FLOPs counted (as by
    # default: the count runs on the sharded model too), 40 samples
    *(o for o in SMALL if not o.startswith(("trainer=", "data.batch_size", "callbacks.perf"))),
    "data.samples_per_epoch=40",
]
ONE = ["trainer=cpu", "data.batch_size=8"]
FSDP = ["trainer=fsdp_cpu", "data.batch_size=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_env() -> dict[str, str]:
    """Where a run that starts its own processes (``trainer=fsdp_cpu``) meets them."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def cli(*args: str, cwd: Path, module: str = "lmim.train") -> subprocess.CompletedProcess:
    return runs.cli(*args, cwd=cwd, module=module, **master_env())


def metric_rows(metrics_csv: Path, name: str) -> dict[int, float]:
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def meta(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "meta.pt", map_location="cpu", weights_only=True)


def assert_losses_match(got: dict[int, float], want: dict[int, float], tol: float) -> None:
    assert sorted(got) == sorted(want)
    for step, value in want.items():
        assert abs(got[step] - value) < tol, (step, got[step], value)


# -- the sharding plan -----------------------------------------------------------------------


@pytest.fixture
def one_process_group():
    """A real gloo process group of this process alone, and its 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("model", "img_size"), [("vit_test", 32), ("swin_test", 64)])
def test_every_block_is_a_shard_unit_the_forward_gathers(one_process_group, model, img_size):
    """Every encoder block (ViT Block, MaskedSwinBlock) and every decoder block is a shard unit,
    the model the root; in a forward + backward each unit is called once with its weights
    gathered by FSDP's hook (no DTensor left inside it), and every weight gets a gradient.
    Reaching into a sharded block's submodules (what MaskedSwin used to do) fails."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    net = lmim.create_pretrainer(model, "hog", img_size=img_size)
    enc = net.encoder
    if hasattr(enc, "layers"):
        encoder_blocks = [b for layer in enc.layers for b in layer.blocks]
    else:
        encoder_blocks = list(enc.blocks)
    decoder_blocks = [b for d in net.decoders for b in d.blocks]
    expected = {id(b) for b in encoder_blocks + decoder_blocks}
    assert len(expected) == 12  # 8 encoder blocks + one per decoder (4 taps), both models

    units = shard_model(net, one_process_group, [get_class(c) for c in DEFAULT_WRAP])
    assert {id(u) for u in units} == expected and len(units) == len(expected)
    assert isinstance(net, FSDPModule) and all(isinstance(u, FSDPModule) for u in units)
    assert all(isinstance(p, DTensor) for p in net.parameters())

    gathered: Counter[int] = Counter()

    def check(module, args):  # runs after FSDP's own pre-forward hook, which is prepended
        gathered[id(module)] += all(not isinstance(p, DTensor) for p in module.parameters())

    for u in units:
        u.register_forward_pre_hook(check)
    out = net(torch.randn(2, 3, img_size, img_size))
    out.loss.backward()
    assert [gathered[id(u)] for u in units] == [1] * len(units)
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert all(isinstance(p.grad, DTensor) for _, p in trainable), [
        n for n, p in trainable if p.grad is None
    ]
    block = units[-1]  # the first encoder block (units are innermost-first, in reverse)
    with pytest.raises(RuntimeError, match="DTensor"):
        block.mlp(torch.randn(1, 3, block.mlp.fc1.in_features))


def test_trainer_configs(make_cfg):
    """trainer=fsdp: FSDP2 over every GPU, bf16 autocast, block weights gathered in bf16 and
    gradients reduced in float32; trainer=fsdp_cpu: the same plan on gloo processes in float32."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from timm.models.vision_transformer import Block

    from lmim.models import MaskedSwinBlock

    gpu = make_cfg(["trainer=fsdp"]).trainer
    strategy = instantiate(gpu.strategy)
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.wrap == [Block, MaskedSwinBlock]
    assert (strategy.param_dtype, strategy.reduce_dtype) == (None, torch.float32)
    assert gpu.precision == "bf16-mixed" and gpu.accelerator == "gpu"
    cpu = make_cfg(["trainer=fsdp_cpu"]).trainer
    strategy = instantiate(cpu.strategy)
    assert strategy.param_dtype is None and strategy.process_group_backend == "gloo"
    assert (cpu.precision, cpu.accelerator, cpu.devices) == ("32-true", "cpu", 2)


def test_bf16_weights_without_autocast_refused(tmp_path):
    """Block weights in bf16 without bf16 autocast stop the CLI before any process starts, with
    one line naming the keys."""
    proc = cli(
        *RUN,
        *FSDP,
        "trainer.strategy.param_dtype=bfloat16",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "trainer.strategy.param_dtype=bfloat16 needs trainer.precision=bf16-mixed" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batched_decoders_refused_before_any_process_starts(make_cfg):
    """``model.batch_decoders=true`` under ``trainer=fsdp_cpu``: lmim.train's check after the
    Trainer is built (before it launches processes) names the key and the fix; sharding such a
    model directly is refused too."""
    from lmim.train import build, check_strategy
    from lmim.utils import instantiate_checked

    cfg = make_cfg([*RUN, *FSDP, "model.batch_decoders=true"])
    _, module = build(cfg)
    trainer = instantiate_checked(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
    with pytest.raises(ConfigError, match="use model.batch_decoders=false with trainer=fsdp"):
        check_strategy(trainer, module)
    with pytest.raises(ConfigError, match="model.batch_decoders=true cannot be sharded"):
        shard_model(module.net, None, [get_class(c) for c in DEFAULT_WRAP])


def test_readme_fsdp_command_composes(tmp_path):
    """The README's FSDP command composes (printed, not trained: it needs GPUs and ImageNet)."""
    proc = cli(
        "experiment=vit_l_800ep",
        "trainer=fsdp",
        "trainer.num_nodes=4",
        "data.root=/data/imagenet",
        "run_id=vitl-1",
        "print_config_only=true",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: lmim.fsdp.FSDP2Strategy" in proc.stdout
    assert "num_nodes: 4" in proc.stdout


# -- atomic folders ----------------------------------------------------------------------------


def folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_path_swaps_files_and_folders(tmp_path, monkeypatch, exchange):
    """A folder (or file) replaces nothing, a file or a folder at the target, which then holds
    exactly the new content; nothing else is left. ``exchange=False``: a platform without an
    atomic exchange (the old one is moved aside, then deleted)."""
    if not exchange:
        monkeypatch.setattr("lmim.resume._rename_exchange", lambda a, b: False)
    target = tmp_path / "last.ckpt"
    replace_path(folder(temp_path_for(target), a="1"), target)  # over nothing
    assert (target / "a").read_text() == "1"
    replace_path(folder(temp_path_for(target), b="2"), target)  # folder over folder
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    new_file = temp_path_for(target)
    new_file.write_text("3")
    replace_path(new_file, target)  # file over folder
    assert target.read_text() == "3"
    replace_path(folder(temp_path_for(target), c="4"), target)  # folder over file
    assert (target / "c").read_text() == "4"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_interrupted_replace_is_undone_before_the_resume_decision(tmp_path):
    """Killed between the two renames of a replace without atomic exchange: no last.ckpt, the
    old one moved aside, the new one complete in its temporary folder. The next start puts the
    old one back (and resumes from it), then removes the leftovers."""
    last = tmp_path / "last.ckpt"
    folder(temp_path_for(last, ".old-"), step="4")
    folder(temp_path_for(last), step="6")
    assert resume_checkpoint(None, True, last) == str(last)
    assert (last / "step").read_text() == "4"
    removed = remove_stale_temp_files(tmp_path)
    assert len(removed) == 1 and ".tmp-" in removed[0].name
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# -- real training -------------------------------------------------------------------------------


def test_fsdp_vit_two_processes_equal_one_process_and_resume(tmp_path):
    """2 FSDP processes x 4 images, SIGKILLed after their first mid-epoch last.ckpt and run
    again with the same command, log the losses of 1 process x 8 (same global batch, data order
    and masks), to 1e-5, before the kill and over every step after it. last.ckpt is a folder
    with one shard per process (each holds half of every block weight), nothing else.
    ``python -m lmim.export`` reads it: the weights equal the shards assembled by Lightning's
    own reader and load into timm (strict)."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from torch.distributed.checkpoint import FileSystemReader

    # 2 epochs of 5 steps; last.ckpt every 3 steps: always mid-epoch. With the k-NN monitor and
    # the reconstruction picture: their forwards go through the sharded root on every process.
    common = [
        *(o for o in RUN if o != "~callbacks.reconstruction"),
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks=knn",
        "callbacks.knn.train_limit=32",
        "callbacks.knn.test_limit=16",
        "callbacks.knn.batch_size=8",
        "callbacks.reconstruction.every_n_epochs=0",
    ]
    # The reference runs beside the first FSDP launch (one thread each: they share the cores).
    one = runs.start_cli(
        *common, *ONE, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path, log=tmp_path / "one.log"
    )
    args = [*common, *FSDP, f"hydra.run.dir={tmp_path}/run"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # One process group: rank 0 and the rank it launched.
    proc = runs.start_cli(
        *args, cwd=tmp_path, log=tmp_path / "first.log", new_session=True, **master_env()
    )
    try:
        runs.wait_for(last, proc, log=tmp_path / "first.log")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert one.wait(timeout=600) == 0, (tmp_path / "one.log").read_text()[-3000:]
    first_log = (tmp_path / "first.log").read_text()
    assert "FSDP: 12 shard units + the root over 2 processes" in first_log  # 8 + 4 blocks
    killed_at = meta(last)["global_step"]
    assert killed_at in (3, 6, 9), first_log[-3000:]

    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last} (step {killed_at})" in again.stdout + again.stderr
    assert meta(last)["global_step"] == 10
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    names = sorted(p.name for p in last.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    qkv = FileSystemReader(last).read_metadata().state_dict_metadata
    qkv = qkv["state_dict.net.encoder.blocks.0.attn.qkv.weight"]
    assert tuple(qkv.size) == (192, 64)
    assert sorted(tuple(c.offsets) for c in qkv.chunks) == [(0, 0), (96, 0)]
    csv_dir = tmp_path / "run" / "csv"
    # The killed run's rows: those its CSV logger had flushed (steps after the checkpoint too).
    before, after = loss_rows(csv_dir / "metrics.part1.csv"), loss_rows(csv_dir / "metrics.csv")
    assert min(before) == 0 and sorted(after) == list(range(killed_at, 10))
    reference = loss_rows(tmp_path / "one" / "csv" / "metrics.csv")
    assert sorted(reference) == list(range(10))
    assert len(set(reference.values())) == 10  # the loss moves: the comparison is not vacuous
    for rows in (before, after):
        assert_losses_match(rows, {s: reference[s] for s in rows}, 1e-5)
    # The k-NN score at the end of epoch 1, from features of the sharded encoder on both
    # processes, equals the single process's; the picture is drawn once.
    knn = {
        k: metric_rows(d / "csv" / "metrics.csv", "val/knn_top1")
        for k, d in (("one", tmp_path / "one"), ("run", tmp_path / "run"))
    }
    assert 9 in knn["one"] and knn["run"][9] == knn["one"][9]
    assert (tmp_path / "run" / "reconstructions" / "last.png").is_file()
    assert [p.name for p in (tmp_path / "run" / "reconstructions").iterdir()] == ["last.png"]

    out = tmp_path / "vit_fsdp.pth"
    exported = cli(str(last), "--out", str(out), cwd=tmp_path, module="lmim.export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.startswith(f"wrote {out}")
    net = load_pretrainer(last)
    assembled = _load_distributed_checkpoint(last)["state_dict"]
    state = net.state_dict()
    assert {f"net.{k}" for k in state} == set(assembled)
    assert all(torch.equal(v, assembled[f"net.{k}"]) for k, v in state.items())
    sd = torch.load(out, weights_only=True)
    expected = encoder_state_dict(net)
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    # The 1-process run's weights: close, not equal (AdamW divides by the gradients' RMS, so
    # rounding differences of the gradient sums show in the weights, ~2e-5 after 5 steps;
    # 1e-3 is the size of a few updates).
    single = load_pretrainer(tmp_path / "one" / "checkpoints" / "last.ckpt").state_dict()
    assert max((single[k] - v).abs().max().item() for k, v in state.items()) < 1e-3


@pytest.mark.slow
def test_fsdp_swin_two_processes_equal_one_process(tmp_path):
    """The tiny Swin at its smallest size (64 px: 2 x 2 mask units) under FSDP on 2 processes
    logs the losses of 1 process with the same global batch, also across a step whose loss is
    NaN (skipped the same way: no update), and its sharded checkpoint exports into timm."""
    swin = [
        *[o for o in RUN if not o.startswith(("model", "data.img_size"))],
        "model=swin_test",
        "data.img_size=64",
        "trainer.max_steps=5",
        "trainer.max_epochs=-1",
        "+callbacks.nan._target_=tests.hooks.NaNLoss",
        "+callbacks.nan.steps=[2]",
    ]
    # One Swin mask per process batch: the single process draws one per 4 images, as 2 do.
    one = cli(*swin, *ONE, "model.mask_group_size=4", f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*swin, *FSDP, f"hydra.run.dir={tmp_path}/two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FSDP: 12 shard units + the root over 2 processes" in two.stdout + two.stderr
    a = loss_rows(tmp_path / "one" / "csv" / "metrics.csv")
    b = loss_rows(tmp_path / "two" / "csv" / "metrics.csv")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    assert torch.isnan(torch.tensor([a[2], b[2]])).all()
    del a[2], b[2]
    assert_losses_match(b, a, 1e-5)
    assert len(set(a.values())) == 4
    last = tmp_path / "two" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and meta(last)["lmim_nonfinite"]["steps"] == 1
    out = tmp_path / "swin_fsdp.pth"
    exported = cli(str(last), "--out", str(out), cwd=tmp_path, module="lmim.export")
    assert exported.returncode == 0, exported.stderr[-3000:]  # verified: strict timm load


@pytest.mark.slow
def test_fsdp_bf16_autocast_equals_ddp(tmp_path):
    """trainer=fsdp's arithmetic (float32 shards, bf16 autocast; here with gradient
    accumulation) on 2 CPU processes logs the losses of trainer=ddp's bf16-mixed, to 3e-5:
    the GPU configuration's code path, on CPUs. With ``param_dtype=bfloat16`` (weights gathered
    and blocks computed in bf16) it trains to within 1e-2 of them, not equal."""
    bf16 = [
        *RUN,
        "data.batch_size=4",
        "trainer.precision=bf16-mixed",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=4",
        "trainer.max_epochs=-1",
    ]
    runs = {
        "ddp": ["trainer=ddp_cpu"],
        "fsdp": ["trainer=fsdp_cpu"],
        "fsdp_bf16": ["trainer=fsdp_cpu", "trainer.strategy.param_dtype=bfloat16"],
    }
    losses = {}
    for name, extra in runs.items():
        proc = cli(*bf16, *extra, f"hydra.run.dir={tmp_path}/{name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = loss_rows(tmp_path / name / "csv" / "metrics.csv")
    assert sorted(losses["ddp"]) == [0, 1, 2, 3] and len(set(losses["ddp"].values())) == 4
    assert_losses_match(losses["fsdp"], losses["ddp"], 3e-5)  # 6e-6 measured
    assert_losses_match(losses["fsdp_bf16"], losses["ddp"], 1e-2)
    assert losses["fsdp_bf16"] != losses["ddp"]


class _SlowToPickle:
    """Pickles slowly, touching ``marker`` first."""

    def __init__(self, marker: str, seconds: float) -> None:
        self.marker, self.seconds = marker, seconds

    def __reduce__(self):
        Path(self.marker).touch()
        time.sleep(self.seconds)
        return (dict, ())


class SlowSave(L.Callback):
    """Makes rank 0's ``at``-th checkpoint save hang while it writes ``meta.pt``, after every
    process wrote its shard into the temporary folder (a process killed mid-save)."""

    def __init__(self, at: int, marker: str, seconds: float = 300) -> None:
        self.at, self.marker, self.seconds = int(at), marker, float(seconds)
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves == self.at and trainer.is_global_zero:
            checkpoint["slow"] = _SlowToPickle(self.marker, self.seconds)


@pytest.mark.slow
def test_fsdp_sigkill_while_saving_keeps_last_and_rerun_resumes(tmp_path):
    """Both processes SIGKILLed while the step-4 checkpoint is being written (shards done,
    meta.pt not): last.ckpt is still the whole step-2 folder. Re-running the same command removes
    the unfinished folder, resumes mid-epoch from step 2 and ends with exactly the weights and
    losses of an uninterrupted FSDP run."""
    args = [
        *RUN,
        *FSDP,
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    ref = cli(*args, f"hydra.run.dir={tmp_path}/ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = [*args, f"hydra.run.dir={tmp_path}/run"]
    marker = tmp_path / "saving"
    ckpts = tmp_path / "run" / "checkpoints"
    slow = ["+callbacks.slow._target_=tests.test_fsdp.SlowSave", "+callbacks.slow.at=2"]
    proc = runs.start_cli(
        *run, *slow, f"+callbacks.slow.marker={marker}", cwd=tmp_path,
        log=tmp_path / "first.log", new_session=True, **master_env(),
    )  # fmt: skip
    try:
        runs.wait_for(marker, proc, log=tmp_path / "first.log")
        unfinished = [p for p in ckpts.iterdir() if ".tmp-" in p.name]
        assert len(unfinished) == 1 and (unfinished[0] / "__1_0.distcp").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    last = ckpts / "last.ckpt"
    assert meta(last)["global_step"] == 2
    load_pretrainer(last)  # whole: every shard of step 2 is there

    again = cli(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"removed {unfinished[0]}" in again.stdout + again.stderr
    assert f"resuming from {last} (step 2)" in again.stdout + again.stderr
    assert [p.name for p in ckpts.iterdir()] == ["last.ckpt"]
    ref_last = tmp_path / "ref" / "checkpoints" / "last.ckpt"
    assert meta(last)["global_step"] == meta(ref_last)["global_step"] == 10
    got, want = load_pretrainer(last).state_dict(), load_pretrainer(ref_last).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    resumed = loss_rows(tmp_path / "run" / "csv" / "metrics.csv")
    reference = loss_rows(tmp_path / "ref" / "csv" / "metrics.csv")
    assert min(resumed) == 2 and max(resumed) == 9
    assert_losses_match(resumed, {s: reference[s] for s in resumed}, 1e-6)


def test_sharded_checkpoint_refused_by_name_when_broken(tmp_path):
    """A folder that is not a complete sharded checkpoint: export and resume each stop with one
    line naming it."""
    broken = folder(tmp_path / "run" / "checkpoints" / "last.ckpt", **{"__0_0.distcp": ""})
    exported = cli(str(broken), cwd=tmp_path, module="lmim.export")
    assert exported.returncode == 2
    assert exported.stderr.strip().startswith(
        f"lmim: error: {broken} is not a complete sharded checkpoint"
    )
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        from lmim.train import read_checkpoint

        read_checkpoint(str(broken))
