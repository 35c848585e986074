"""The GPU step (issue 13), checked on the CPU: between logging steps a training step reads no
device value on the host, so a GPU never waits for the Python loop (counted by
:class:`lmim.callbacks.HostSyncMonitor`, ``callbacks=sync_check``); ``compile``;
``data=resident``; the GPU session script's dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmim.errors import ConfigError, HostSyncError
from lmim.train import train
from tests.runs import ROOT, SMALL, cli, cli_env, loss_rows

# 10 optimizer steps, logged every 5: steps 4 and 9 are the logging steps.
TEN_STEPS = [
    *[o for o in SMALL if not o.startswith("trainer.log_every_n_steps")],
    "callbacks=sync_check",
    "trainer.log_every_n_steps=5",
    "trainer.max_steps=10",
    "trainer.max_epochs=-1",
    "data.samples_per_epoch=40",
    "callbacks.last_checkpoint.every_n_train_steps=1000",
]


def test_cli_fit_syncs_on_logging_steps_only(tmp_path):
    """``python -m lmim.train callbacks=sync_check callbacks.host_sync.strict=true`` (the
    README's check) runs 10 steps to the end: no synchronisation outside the logging steps,
    and on those the one read of the losses and non-finite counts is seen."""
    done = cli(
        *TEN_STEPS, "callbacks.host_sync.strict=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "host_syncs.json").read_text())
    per_step = {int(k): v for k, v in report["per_step"].items()}
    assert sorted(per_step) == list(range(10))
    assert report["expected_steps"] == [4, 9]
    assert {s: n for s, n in per_step.items() if s not in (4, 9)} == dict.fromkeys(
        [0, 1, 2, 3, 5, 6, 7, 8], 0
    )
    assert per_step[4] >= 1 and per_step[9] >= 1
    assert report["unexpected"] == []
    assert "host synchronisations: " in done.stderr + done.stdout


def test_readme_sync_check_runs_as_written(tmp_path):
    """The README's sync-check line, word for word, in an empty folder: it runs its 20 steps
    to the end (strict: no synchronisation outside the expected steps) and writes its report."""
    readme = (ROOT / "README.md").read_text().splitlines()
    (line,) = [ln for ln in readme if ln.startswith("python -m lmim.train") and "sync_check" in ln]
    done = cli(*line.split()[3:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("outputs/*/runs/*/host_syncs.json")
    report = json.loads(path.read_text())
    assert len(report["per_step"]) == 20 and report["unexpected"] == []
    assert report["summary"]["host_syncs_per_other_step"] == 0


def test_host_skip_mode_syncs_every_step_and_strict_names_it(make_cfg, tmp_path):
    """A non-fused optimizer decides the non-finite skip on the host: the counter sees that
    read (lmim/module.py) on every step, and ``strict`` stops at the first, naming it."""
    host = [*TEN_STEPS, "optim.optimizer.fused=false", "trainer.max_steps=4"]  # 3: the last
    cfg = make_cfg(host)
    train(cfg)
    report = json.loads((Path(cfg.paths.output_dir) / "host_syncs.json").read_text())
    ours = {e["step"] for e in report["unexpected"] if "lmim/module.py" in e["where"]}
    assert ours == {0, 1, 2}
    cfg = make_cfg([*host, "callbacks.host_sync.strict=true"], output_dir=tmp_path / "strict")
    with pytest.raises(HostSyncError, match=r"at step 0, not a logging step: .*lmim/module\.py"):
        train(cfg)


def test_sync_check_refuses_compile(make_cfg):
    """The counter's op hook stops torch.compile, so the two together are refused up front."""
    cfg = make_cfg([*TEN_STEPS, "compile.enabled=true", "compile.backend=eager"])
    with pytest.raises(ConfigError, match=r"compile\.enabled=false"):
        train(cfg)


def test_fused_adamw_found_inf():
    """The device-side skip relies on fused AdamW: found_inf=0 steps exactly as no flag does;
    found_inf=1 leaves weights, moments and step count as if that step had not been."""
    torch.manual_seed(0)
    grads = [torch.randn(7, 5) for _ in range(3)]

    def run(steps):
        p = torch.nn.Parameter(torch.ones(7, 5))
        opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        for g, flag in steps:
            p.grad = g.clone()
            if flag is not None:
                opt.found_inf = torch.tensor(float(flag))
            opt.step()
            opt.__dict__.pop("found_inf", None)
        return p.detach(), opt.state[p]

    def same(a, b):
        return torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])

    plain = run([(g, None) for g in grads])
    assert same(plain, run([(g, 0) for g in grads]))
    skipped = run([(grads[0], None), (grads[1], 1), (grads[2], None)])
    assert same(skipped, run([(grads[0], None), (grads[2], None)]))
    assert not same(skipped, plain)


def test_compiled_fit_on_resident_data_keeps_checkpoint_names(make_cfg):
    """``compile.enabled=true`` with ``fullgraph=true`` traces the whole model in one graph (no
    break: the step has no data-dependent Python) and trains on ``data=resident`` (one uint8
    batch kept on the device); the checkpoint's parameter names are the eager model's."""
    cfg = make_cfg(
        [
            *[o for o in TEN_STEPS if not o.startswith(("callbacks=", "data="))],
            "data=resident",
            "data.img_size=32",
            "data.batch_size=4",
            "trainer.max_steps=3",
            "compile.enabled=true",
            "compile.backend=eager",
            "compile.fullgraph=true",
        ]
    )
    from torch._dynamo.utils import counters

    counters.clear()
    result = train(cfg)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, in one graph, reused
    names = set(torch.load(result["checkpoint"], weights_only=True)["state_dict"])
    eager = make_cfg([*[o for o in TEN_STEPS if not o.startswith("callbacks=")]])
    from lmim.train import build

    _, module = build(eager)
    assert names == set(module.state_dict())
    assert all("_orig_mod" not in n for n in names)


# Slow: inductor's C++ compile of the forward and backward takes about a minute on 2 cores.
@pytest.mark.slow
def test_inductor_compiled_cli_fit_trains_like_eager(tmp_path):
    """``compile.enabled=true`` with the default backend (inductor: C++ here, Triton on a GPU,
    what ``gpu.sh``'s ``fit+compile`` runs) compiles the training forward and backward, and
    the losses of 4 steps are the eager run's to float32 rounding."""
    keep = [
        o
        for o in TEN_STEPS
        if not o.startswith(("callbacks=", "trainer.log_every", "trainer.max_steps"))
    ]
    args = [*keep, "trainer.log_every_n_steps=1", "trainer.max_steps=4"]
    runs = {}
    for name, extra in (("eager", []), ("inductor", ["compile.enabled=true"])):
        done = cli(*args, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        (path,) = (tmp_path / name).glob("**/metrics.csv")
        runs[name] = loss_rows(path)
    assert len(runs["eager"]) == 4
    assert runs["inductor"].keys() == runs["eager"].keys()
    assert list(runs["inductor"].values()) == pytest.approx(list(runs["eager"].values()), rel=1e-4)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["callbacks.last_checkpoint.check_every_n_steps=0"], "last_checkpoint"),
        (["callbacks=budget", "callbacks.budget.check_every_n_steps=0"], "budget"),
    ],
)
def test_check_intervals_are_checked(make_cfg, overrides, key):
    """``check_every_n_steps`` of the signal agreement and of the budget points: 0 is refused,
    naming the key and what it may be."""
    from lmim.utils import build_callbacks

    cfg = make_cfg(overrides)
    with pytest.raises(ConfigError, match=rf"callbacks\.{key}\.check_every_n_steps=0 must be >= 1"):
        build_callbacks(cfg.callbacks)


def test_compile_settings_are_checked():
    from lmim.module import compile_options

    assert compile_options({"enabled": False, "mode": "bogus"}) is None
    assert compile_options({"enabled": True, "mode": "max-autotune", "backend": "inductor"}) == {
        "mode": "max-autotune",
        "backend": "inductor",
    }
    with pytest.raises(ConfigError, match=r"compile\.mode='fast': use one of default"):
        compile_options({"enabled": True, "mode": "fast"})
    with pytest.raises(ConfigError, match=r"compile\.fulgraph is not a setting"):
        compile_options({"enabled": True, "fulgraph": True})


@pytest.mark.slow
def test_gpu_session_script_dry_run(tmp_path):
    """``bash benchmarks/gpu.sh <out> --smoke`` (the one prepared GPU script, at toy sizes on
    the CPU) runs every item and writes gpu.json and gpu.md."""
    import subprocess
    import sys

    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", str(tmp_path), "--smoke"],
        cwd=ROOT,
        env={**cli_env(), "PYTHON": sys.executable},  # this interpreter, wherever its venv is
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = {r["item"]: r for r in report["rows"]}
    assert set(rows) == {
        "fit", "fit mae", "syncs", "step vit_b", "step vit_b+batched", "step swin_b",
        "step vit_l", "step vit_l+ckpt", "profile vit_b", "heads", "fit+compile",
    }  # fmt: skip
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["syncs"]["syncs/step"] == 0
    assert all(rows[k]["img/s"] > 0 for k in rows if k not in ("syncs", "heads"))
    assert rows["profile vit_b"]["top kernels"]
    assert [h["scale"] for h in rows["heads"]["heads"]] == [4, 2, 0.5]
    assert "| fit | ok |" in (tmp_path / "gpu.md").read_text()


def test_nonfinite_counts_on_the_device_carry_a_resumed_run():
    """The non-finite counts live on the device between reads: a resumed run's counts (from the
    checkpoint) go on from where they were, a finite step ends the streak, and a streak past
    ``max_nonfinite_in_a_row`` stops at the read."""
    from lmim.errors import NonFiniteError
    from lmim.module import LocalMIMModule

    module = LocalMIMModule(torch.nn.Linear(2, 2), torch.optim.AdamW, max_nonfinite_in_a_row=3)
    module.on_load_checkpoint({"lmim_nonfinite": {"steps": 5, "streak": 1}})
    module._count_nonfinite(torch.tensor(True))
    assert module._nonfinite_counts.tolist() == [6, 2, 2]
    module._count_nonfinite(torch.tensor(False))
    assert (module.nonfinite_steps, module.nonfinite_streak) == (6, 0)
    for _ in range(3):
        module._count_nonfinite(torch.tensor(True))
    module._count_nonfinite(torch.tensor(False))  # the streak ended, but it reached the limit
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row"):
        module._read_nonfinite(step=10)


@pytest.mark.slow
def test_ddp_fit_syncs_on_logging_steps_only(tmp_path):
    """Two DDP processes (gloo) with the budget-point callback: the signal and budget
    agreements and Lightning's own SIGTERM broadcast no longer read a value each step, so
    ``strict`` passes on both ranks and their reports count 0 on the other steps."""
    done = cli(
        *[o for o in TEN_STEPS if not o.startswith("trainer=")],
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "data.samples_per_epoch=80",
        "callbacks.host_sync.strict=true",
        "+callbacks.budget._target_=lmim.callbacks.BudgetCheckpoints",
        f"+callbacks.budget.dirpath={tmp_path}/budget",
        "+callbacks.budget.minutes=[60]",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("host_syncs.json", "host_syncs.json.rank1"):
        report = json.loads((tmp_path / name).read_text())
        assert report["summary"]["host_syncs_per_other_step"] == 0
        assert report["summary"]["other_steps"] == 8
        assert report["unexpected"] == []
