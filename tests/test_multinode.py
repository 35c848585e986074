"""Several processes on several "nodes", each process started by itself as srun or torchrun
start them: one run folder, one resume decision, one W&B run, every callback, the losses of one
process. Real processes joined by gloo over the loopback (127.0.0.1), the real command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmim.evaluation import shard_indices, unshard
from lmim.rendezvous import run_id_from_env
from tests.runs import (
    SMALL,
    cli,
    cli_env,
    load,
    loss_rows,
    max_weight_difference,
    wait_for,
)

# The fast suite's cluster run: the 8-block test ViT with a narrow decoder at 32 px on 32
# Fashion-MNIST images, 2 per process: 4 processes x 2 = a global batch of 8, 4 steps per epoch,
# 2 epochs; last.ckpt every 3 steps (mid-epoch). The default callbacks (last.ckpt, perf, bad data,
# reconstruction picture), the k-NN monitor (42 references, 18 queries: neither a multiple of 4
# processes) and budget checkpoints (with one process's clock off), CSV and W&B (offline) logging.
CLUSTER = [
    "model=vit_test",
    "model.decoder_dim=64",
    "model.decoder_heads=2",
    "data=fashion_mnist",
    "data.train_limit=32",
    "data.img_size=32",
    "data.num_workers=0",
    "logger=many",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "optim.warmup_steps=2",
    "optim.blr=1e-2",
    "callbacks=knn",
    "callbacks.knn.train_limit=42",
    "callbacks.knn.test_limit=18",
    "callbacks.knn.k=5",
    "callbacks.knn.batch_size=8",
    "callbacks.last_checkpoint.every_n_train_steps=3",
    "+callbacks.budget._target_=lmim.callbacks.BudgetCheckpoints",
    "+callbacks.budget.dirpath=${paths.output_dir}/checkpoints",
    "+callbacks.budget.minutes=[0.0001,30,100000]",
    "+callbacks.budget.stop_at_last=false",
    # Rank 3's device clock an hour ahead: past the 30-minute point from its first step.
    "+callbacks.skew._target_=tests.hooks.ShiftDeviceClock",
    "+callbacks.skew.rank=3",
    "+callbacks.skew.hours=1.0",
]
NODES, PER_NODE = 2, 2
PER_PROCESS = [*CLUSTER, "trainer=ddp_cpu", "data.batch_size=2"]
ONE_PROCESS = [*CLUSTER, "trainer=cpu", f"data.batch_size={2 * NODES * PER_NODE}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """The processes of one launch, by global rank, with their log files."""

    procs: list[subprocess.Popen]
    logs: list[Path]

    def wait(self, timeout: float = 900, grace: float = 120) -> list[int]:
        """Every process's exit status. Once one has failed, the others get ``grace`` seconds
        (they stop too after a signal, or fail in their next collective) before all are killed,
        instead of waiting out the 30-minute process-group timeout."""
        end = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if any(p.returncode not in (None, 0) for p in self.procs):
                end = min(end, time.monotonic() + grace)
            if time.monotonic() > end:
                self.kill()
                for p in self.procs:
                    p.wait()
                raise AssertionError(f"no end in time:\n{self.output()}")
            time.sleep(0.2)
        return [p.returncode for p in self.procs]

    def kill(self, sig: int = signal.SIGKILL, ranks: list[int] | None = None) -> None:
        for rank, p in enumerate(self.procs):
            if (ranks is None or rank in ranks) and p.poll() is None:
                p.send_signal(sig)

    def output(self, tail: int = 3000) -> str:
        return "\n".join(f"== {log.name}\n{log.read_text()[-tail:]}" for log in self.logs)

    def texts(self) -> list[str]:
        return [log.read_text() for log in self.logs]


def start_nodes(
    args: list[str],
    cwd: Path,
    name: str,
    slurm_job: str | None = None,
    delay: float = 3.0,
    **extra_env: str,
) -> Cluster:
    """Start ``NODES`` x ``PER_NODE`` processes of ``python -m lmim.train``, each by itself, the
    nodes ``delay`` seconds apart, as ``srun`` does: with ``MASTER_ADDR/MASTER_PORT/WORLD_SIZE/
    NODE_RANK/LOCAL_RANK`` (Lightning's environment), or with ``slurm_job`` the variables Slurm
    sets for each task (``SLURM_JOB_ID``, ``SLURM_PROCID``, ``SLURM_LOCALID``, ...)."""
    port, world = free_port(), NODES * PER_NODE
    procs, logs = [], []
    for node in range(NODES):
        if node:
            time.sleep(delay)
        for local in range(PER_NODE):
            rank = node * PER_NODE + local
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra_env}
            if slurm_job is None:
                env.update(WORLD_SIZE=str(world), NODE_RANK=str(node), LOCAL_RANK=str(local))
            else:
                env.update(
                    SLURM_JOB_ID=slurm_job,
                    SLURM_JOB_NAME="lmim",
                    SLURM_NTASKS=str(world),
                    SLURM_NTASKS_PER_NODE=str(PER_NODE),
                    SLURM_NNODES=str(NODES),
                    SLURM_NODELIST="127.0.0.1",
                    SLURM_PROCID=str(rank),
                    SLURM_LOCALID=str(local),
                    SLURM_NODEID=str(node),
                )
            log = cwd / f"{name}.rank{rank}.log"
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "lmim.train",
                            *args,
                            f"trainer.num_nodes={NODES}",
                            f"trainer.devices={PER_NODE}",
                        ],
                        cwd=cwd,
                        env=cli_env(**env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            logs.append(log)
    return Cluster(procs, logs)


def run_folders(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "pretrain" / "runs").iterdir())


def wandb_runs(run: Path) -> list[str]:
    """The ids of the W&B runs written in a run folder (offline-run-<time>-<id>)."""
    return sorted(p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*"))


def knn_top1(metrics_csv: Path) -> list[float]:
    import csv

    with open(metrics_csv) as f:
        return [float(r["val/knn_top1"]) for r in csv.DictReader(f) if r.get("val/knn_top1")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process with the cluster's global batch."""
    tmp = tmp_path_factory.mktemp("one_process")
    proc = cli(*ONE_PROCESS, f"hydra.run.dir={tmp}/run", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> tuple[Path, Cluster]:
    """2 nodes x 2 processes, started by themselves, node 1 three seconds after node 0; the
    run folder is named by the processes (no run_id, no hydra.run.dir)."""
    tmp = tmp_path_factory.mktemp("cluster")
    nodes = start_nodes(PER_PROCESS, tmp, "run")
    status = nodes.wait()
    assert status == [0] * 4, nodes.output()
    return tmp, nodes


# -- 2 nodes x 2 processes: one run ------------------------------------------------------------


def test_two_nodes_write_one_run_equal_to_one_process(cluster_run, one_process):
    """Four processes started by themselves on two "nodes" a few seconds apart write one run
    folder (named by rank 0's start time) with one .hydra, one W&B run (its id recorded in the
    folder), last.ckpt, the reconstruction picture, the k-NN accuracy and the budget
    checkpoints; the logged losses and the k-NN accuracy equal one process's with the same
    global batch, and DDP does not warn about gradient layouts.

    Budget points follow rank 0's clock: rank 3's, an hour ahead, does not save the 30-minute
    point (with per-process clocks rank 3 alone would enter the checkpoint's barrier, and the
    run would deadlock)."""
    tmp, nodes = cluster_run
    (run,) = run_folders(tmp)
    assert len(run.name) == len("2026-01-01_00-00-00") and run.name[4] == "-"
    assert [p.name for p in run.rglob(".hydra")] == [".hydra"]
    assert wandb_runs(run) == [(run / "wandb_run_id").read_text().strip()]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert (run / "reconstructions" / "last.png").stat().st_size > 1000
    points = json.loads((run / "checkpoints" / "points.json").read_text())
    assert [(p["name"], p["step"]) for p in points] == [("start", 0), ("0.0001min", 1), ("end", 8)]
    for p in points:
        assert load(Path(p["path"]))["global_step"] == p["step"]

    ours = loss_rows(run / "csv" / "metrics.csv")
    ref = loss_rows(one_process / "csv" / "metrics.csv")
    assert sorted(ours) == sorted(ref) == list(range(8))
    assert ours == pytest.approx(ref, abs=1e-6)
    assert len(set(ours.values())) == 8  # the loss moves: the comparison is not vacuous
    accs = knn_top1(run / "csv" / "metrics.csv")
    assert len(accs) == 2 and accs == knn_top1(one_process / "csv" / "metrics.csv")
    for text in nodes.texts():
        assert "Grad strides do not match" not in text
        assert "Traceback" not in text


# -- SIGKILL of every process, then the same command -------------------------------------------


def test_killed_cluster_resumes_to_the_uninterrupted_weights(tmp_path, cluster_run):
    """Under Slurm's variables (job 4242: the folder is slurm-4242), SIGKILL every process
    right after the first last.ckpt (mid-epoch), start the same command again (a requeued job):
    every rank resumes from the same step, the losses and final weights equal the uninterrupted
    run's, and both launches log to one W&B run.

    Equal to float rounding, not bit for bit: DDP sums the 4 processes' gradients in an order
    set by its gradient buckets, which it rebuilds after the first step of every launch, so the
    first step after a resume rounds differently (2 processes resume bit for bit:
    tests/test_reliability.py)."""
    first = start_nodes(PER_PROCESS, tmp_path, "first", slurm_job="4242")
    run = tmp_path / "outputs" / "pretrain" / "runs" / "slurm-4242"
    last = run / "checkpoints" / "last.ckpt"
    wait_for(last, first.procs[0])
    first.kill()
    first.wait()
    killed = load(last)
    killed_at = killed["global_step"]
    assert killed_at % 4 != 0 and killed_at < 8, first.output()

    again = start_nodes(PER_PROCESS, tmp_path, "again", slurm_job="4242")
    assert again.wait() == [0] * 4, again.output()
    assert run_folders(tmp_path) == [run]
    for text in again.texts():
        assert f"resuming from {last} (step {killed_at})" in text
    reference = run_folders(cluster_run[0])[0]
    resumed = loss_rows(run / "csv" / "metrics.csv")
    assert sorted(resumed) == list(range(killed_at, 8))
    expected = loss_rows(reference / "csv" / "metrics.csv")
    assert resumed == pytest.approx({s: expected[s] for s in resumed}, abs=1e-6)
    uninterrupted = reference / "checkpoints" / "last.ckpt"
    moved = max(
        float((v - killed["state_dict"][k]).abs().max())
        for k, v in load(last)["state_dict"].items()
        if v.is_floating_point()
    )
    assert max_weight_difference(last, uninterrupted) < 0.02 * moved
    recorded = (run / "wandb_run_id").read_text().strip()
    assert wandb_runs(run) == [recorded, recorded]  # two launches, one W&B run


# -- a signal to one node ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_to_one_node_stops_every_rank_at_one_step(tmp_path, signame):
    """SIGTERM (preemption) or SIGUSR1 (time limit) to node 1's processes only: the 4 ranks
    agree at the next step boundary, last.ckpt is saved once, at that step, every process exits
    with 128 + the signal, and after SIGUSR1 rank 0 requeues the Slurm job."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.args\n')
    scontrol.chmod(0o755)
    path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    args = [*PER_PROCESS, "trainer.max_epochs=3"]  # 12 steps
    nodes = start_nodes(args, tmp_path, "run", slurm_job="5151", PATH=path)
    last = tmp_path / "outputs" / "pretrain" / "runs" / "slurm-5151" / "checkpoints" / "last.ckpt"
    wait_for(last, nodes.procs[0])
    signum = int(getattr(signal, signame))
    nodes.kill(signum, ranks=[2, 3])
    assert nodes.wait() == [128 + signum] * 4, nodes.output()
    step = load(last)["global_step"]
    assert 3 <= step < 12
    out = "".join(nodes.texts())
    assert out.count(" received: saved ") == 1
    assert f"lmim: stopped: {signame} received: saved {last} at step {step}" in out
    requeued = tmp_path / "scontrol.args"
    if signame == "SIGUSR1":
        assert requeued.read_text().split() == ["requeue", "5151"]  # once, by rank 0
    else:
        assert not requeued.exists()


# -- torchrun ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rdzv_id", [None, "vitb-7"])
def test_torchrun_two_nodes_write_one_run_equal_to_one_process(tmp_path, one_process, rdzv_id):
    """Two ``torchrun`` invocations as two nodes (c10d rendezvous on 127.0.0.1, 2 processes
    each, started 3 s apart), as in the README: one run folder, named by ``--rdzv-id`` or else by
    rank 0's start time (agreed through torchrun's store), one W&B run, and the losses of one
    process."""
    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    procs, logs = [], []
    for node in range(NODES):
        if node:
            time.sleep(3)
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        str(torchrun),
                        f"--nnodes={NODES}",
                        f"--nproc-per-node={PER_NODE}",
                        "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}",
                        *([f"--rdzv-id={rdzv_id}"] if rdzv_id else []),
                        "-m",
                        "lmim.train",
                        *PER_PROCESS,
                        f"trainer.num_nodes={NODES}",
                        f"trainer.devices={PER_NODE}",
                    ],
                    cwd=tmp_path,
                    env=cli_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    nodes = Cluster(procs, logs)
    assert nodes.wait() == [0, 0], nodes.output()
    (run,) = run_folders(tmp_path)
    assert run.name == rdzv_id if rdzv_id else len(run.name) == len("2026-01-01_00-00-00")
    assert wandb_runs(run) == [(run / "wandb_run_id").read_text().strip()]
    ours = loss_rows(run / "csv" / "metrics.csv")
    assert ours == pytest.approx(loss_rows(one_process / "csv" / "metrics.csv"), abs=1e-6)
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 8


# -- Swin: a mask per process batch ---------------------------------------------------------------

SWIN = [
    "model=swin_test",
    "data=demo",
    "data.images=[astronaut,coffee]",
    "data.img_size=128",
    "data.num_workers=0",
    "data.samples_per_epoch=16",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_steps=3",
    "trainer.max_epochs=-1",
    "optim.warmup_steps=1",
    "optim.blr=1e-2",
    "~callbacks.reconstruction",
    "+callbacks.masks._target_=tests.hooks.RecordMasks",
    "+callbacks.masks.dirpath=${paths.output_dir}/masks",
]


@pytest.mark.slow
def test_swin_masks_one_per_process_batch(tmp_path):
    """Swin with share_mask: 2 processes with batch 2 train with one mask each, different on
    each rank; one process with batch 4 and model.mask_group_size=2 draws the same two masks
    for the same samples (global row i takes mask i mod 2) and logs the same losses."""
    one = cli(
        *SWIN,
        "trainer=cpu",
        "data.batch_size=4",
        "model.mask_group_size=2",
        f"hydra.run.dir={tmp_path}/one",
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(
        *SWIN,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "data.batch_size=2",
        f"hydra.run.dir={tmp_path}/two",
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    whole = torch.load(tmp_path / "one" / "masks" / "masks_rank0.pt")
    ranks = [torch.load(tmp_path / "two" / "masks" / f"masks_rank{r}.pt") for r in (0, 1)]
    assert sorted(whole) == sorted(ranks[0]) == sorted(ranks[1]) == [0, 1, 2]
    for step, rows in whole.items():
        r0, r1 = ranks[0][step], ranks[1][step]
        assert (r0 == r0[0]).all() and (r1 == r1[0]).all()  # one mask per process
        assert not torch.equal(r0[0], r1[0])  # a different one on each rank
        assert torch.equal(rows[0::2], r0) and torch.equal(rows[1::2], r1)
    a = loss_rows(tmp_path / "one" / "csv" / "metrics.csv")
    b = loss_rows(tmp_path / "two" / "csv" / "metrics.csv")
    assert sorted(a) == [0, 1, 2] and a == pytest.approx(b, abs=1e-6)


# -- unit checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(18, 4), (42, 4), (3, 4), (8, 2), (5, 1)])
def test_shards_cover_every_sample_once_after_unshard(n, world):
    """Each process gets ceil(n / world) samples (the same number of forwards), and gathering
    them by rank then unsharding gives every sample once, in order."""
    shards = [shard_indices(n, world, r) for r in range(world)]
    assert {len(s) for s in shards} == {-(-n // world)}
    gathered = torch.tensor(shards)[..., None].expand(-1, -1, 3)  # (world, m, 3)
    assert unshard(gathered, n)[:, 0].tolist() == list(range(n))


def test_run_id_from_the_launcher(monkeypatch):
    """Slurm names the folder by its job (or array task), torchrun by its --rdzv-id; torchrun's
    default id and an interactive Slurm shell name nothing."""
    for var in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(var)
    assert run_id_from_env() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert run_id_from_env() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/7")
    assert run_id_from_env() == "job_7"
    monkeypatch.setenv("SLURM_JOB_ID", "81")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert run_id_from_env() == "slurm-81"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "80")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_id_from_env() == "slurm-80_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert run_id_from_env() == "job_7"


def test_mask_group_size_that_does_not_divide_the_batch_is_refused(make_cfg, tmp_path):
    """A shared-mask group size that does not divide the global batch stops before the first
    step with one line naming the key."""
    from lmim.errors import ConfigError
    from lmim.train import train

    small = [o for o in SMALL if not o.startswith("model")]
    cfg = make_cfg([*small, "model=swin_test", "data.img_size=64", "model.mask_group_size=3"])
    with pytest.raises(ConfigError, match=r"model\.mask_group_size=3 does not divide .* of 4"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_decoder_weight_gradients_keep_the_weights_layout():
    """Every weight gradient has its weight's strides (what DDP's gradient buckets expect), the
    rescale heads' transposed-conv weights included: the heads run channels-last on the tokens
    as Linears of the rearranged weights (``lmim.models.decoders.rescale_tokens``), where a conv
    on the transposed, channels-last map returned channels-last weight gradients."""
    from lmim import create_pretrainer

    net = create_pretrainer("vit_test", "hog", img_size=64)
    net(torch.randn(3, 3, 64, 64)).loss.backward()
    checked = []
    for name, p in net.named_parameters():
        if p.grad is not None:
            assert p.grad.stride() == p.stride(), name
            checked.append(name)
    heads = [n for n in checked if ".rescale." in n and n.endswith("weight")]
    assert len(heads) >= 3  # the x4 head's two transposed convs and its norm, the x2 head's conv
