"""The equal-budget benchmark's parts: budget-point checkpoints under a real Trainer, the
cached-feature linear probe, evaluations merged into lmim.report, and benchmarks/budget.py
end to end at toy size on Fashion-MNIST."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

import lmim
from lmim.callbacks import BudgetCheckpoints
from lmim.callbacks.perf import DEVICE_HOURS
from lmim.errors import ConfigError
from lmim.evaluation import extract_features, extract_layer_features, linear_probe_accuracy
from lmim.export import load_pretrainer
from lmim.report import Run, figure, mean_curve, plot, read_evals, report
from lmim.train import train
from tests.conftest import TINY, needs_fmnist

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("budget_bench", ROOT / "benchmarks/budget.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


# ---- BudgetCheckpoints -------------------------------------------------------------------


def test_budget_checkpoints_save_at_each_point_and_stop_at_the_last(make_cfg, tmp_path):
    """A real fit with points at 0.01 and 0.02 device-minutes: the initial weights, one
    checkpoint per point (saved once the run's device-hours passed it, in step order), and
    training stops at the last, long before max_steps. Each file holds weights only and loads
    back as a pre-trainer."""
    cfg = make_cfg(
        [
            *TINY,
            "callbacks=budget",
            "callbacks.budget.minutes=[0.01,0.02]",
            "trainer.max_steps=400",
            "trainer.max_epochs=-1",
        ]
    )
    train(cfg)
    folder = tmp_path / "run" / "checkpoints"
    points = {p["name"]: p for p in json.loads((folder / "points.json").read_text())}
    assert list(points) == ["start", "0.01min", "0.02min", "end"]
    assert points["start"]["step"] == 0
    # one slow step (a busy machine) may pass both points: then both hold that step
    assert 0 < points["0.01min"]["step"] <= points["0.02min"]["step"] == points["end"]["step"]
    assert points["end"]["step"] < 400  # stopped by the budget, not by max_steps
    for name, minutes in (("0.01min", 0.01), ("0.02min", 0.02)):
        assert points[name]["device_hours"] * 60 >= minutes
    start = load_pretrainer(points["start"]["path"]).encoder.state_dict()
    end = load_pretrainer(points["end"]["path"]).encoder.state_dict()
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], end["blocks.0.attn.qkv.weight"])
    ckpt = torch.load(points["end"]["path"], map_location="cpu", weights_only=False)
    assert "optimizer_states" not in ckpt and "lmim_config" in ckpt


def test_budget_points_must_increase():
    with pytest.raises(ConfigError, match="callbacks.budget.minutes"):
        BudgetCheckpoints("/tmp/x", [6, 3])
    with pytest.raises(ConfigError, match="increasing positive"):
        BudgetCheckpoints("/tmp/x", [0, 3])


# ---- features and the linear probe ------------------------------------------------------------


def test_one_pass_gives_each_layers_features():
    """extract_layer_features([-1, 1]) equals two single-layer extractions."""
    images = torch.randn(5, 3, 64, 64)
    loader = DataLoader(list(zip(images, torch.arange(5), strict=True)), batch_size=2)
    enc = lmim.create_pretrainer("vit_test", img_size=64).encoder
    (last, mid), labels = extract_layer_features(enc, loader, [-1, 1])
    assert torch.allclose(last, extract_features(enc, loader, -1)[0], atol=1e-6)
    assert torch.allclose(mid, extract_features(enc, loader, 1)[0], atol=1e-6)
    assert not torch.allclose(last, mid)
    assert labels.tolist() == list(range(5))


def test_linear_probe_separable_is_perfect_and_shuffled_is_chance():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g) * 3
    y = torch.randint(0, 10, (3000,), generator=g)
    x = centers[y] + torch.randn(3000, 32, generator=g)
    assert linear_probe_accuracy(x[:2000], y[:2000], x[2000:], y[2000:], 10) == 1.0
    shuffled = y[:2000][torch.randperm(2000, generator=g)]
    assert linear_probe_accuracy(x[:2000], shuffled, x[2000:], y[2000:], 10) < 0.2


def test_linear_probe_is_invariant_to_feature_scale():
    """The BatchNorm-without-affine step: scaling or shifting a feature changes nothing."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)  # linearly separable, 3 classes
    a = linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:], 3)
    scale = torch.tensor([100.0, 0.01, 5, 1, 1, 1, 1, 1])
    b = linear_probe_accuracy(x[:400] * scale + 7, y[:400], x[400:] * scale + 7, y[400:], 3)
    assert a == pytest.approx(b, abs=0.01)
    assert a > 0.9


# ---- report: evaluations beside runs, seeds averaged --------------------------------------------


def test_evals_csv_reaches_the_report(make_cfg, tmp_path):
    """<run>/evals.csv rows join the run's history: the table's accuracy is the last evaluation
    and the accuracy panel is drawn."""
    run_dir = tmp_path / "runs" / "a"
    overrides = [
        *TINY,
        "trainer.max_steps=2",
        "trainer.max_epochs=-1",
        "trainer.log_every_n_steps=1",
    ]
    train(make_cfg(overrides, output_dir=run_dir))
    with open(run_dir / "evals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [DEVICE_HOURS, "trainer/global_step", "eval/knn_last_top1"])
        w.writeheader()
        w.writerows(
            [
                {DEVICE_HOURS: 2e-4, "trainer/global_step": 2, "eval/knn_last_top1": 71.5},
                {DEVICE_HOURS: 0.0, "trainer/global_step": 0, "eval/knn_last_top1": 60.0},
            ]
        )
    assert [r["eval/knn_last_top1"] for r in read_evals(run_dir)] == ["60.0", "71.5"]
    out = report([str(tmp_path / "runs")], tmp_path / "rep", acc_key="eval/knn_last_top1")
    assert out["rows"][0]["accuracy"] == 71.5
    assert "eval/knn_last_top1" in out["markdown"].read_text()


def test_seeds_are_drawn_as_a_mean_curve_with_its_range(tmp_path):
    """Two seeds of one method: the points both have, averaged, with their min and max."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    curves = [
        ([0.0, 0.1, 0.2], [50.0, 60.0, 70.0]),
        ([0.0, 0.12, 0.2, 0.3], [52.0, 58.0, 74.0, 80]),
    ]
    xs, mean, lo, hi = mean_curve(curves)
    assert xs == pytest.approx([0.0, 0.11, 0.2])
    assert mean == pytest.approx([51.0, 59.0, 72.0])
    assert (lo, hi) == ([50.0, 58.0, 70.0], [52.0, 60.0, 74.0])

    def run(seed: int, curve) -> Run:
        rows = [{DEVICE_HOURS: x, "train/loss": 1.0} for x in curve[0]]
        rows += [{DEVICE_HOURS: x, "eval/top1": y} for x, y in zip(*curve, strict=True)]
        return Run(f"s{seed}", {"method": "localmim"}, "g", rows, "x")

    runs = [run(0, curves[0]), run(1, curves[1])]
    fig = figure(runs, "eval/top1")
    loss, acc = fig.axes
    assert loss.get_title() == "pre-training loss, target ?" and len(loss.get_lines()) == 2
    (line,) = acc.get_lines()
    assert line.get_label() == "localmim (mean of 2, range shaded)"
    assert list(line.get_xdata()) == pytest.approx(xs) and list(line.get_ydata()) == mean
    (band,) = acc.collections  # fill_between: the min-max range of the seeds
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == 50.0 and max(ys) == 74.0
    plt.close(fig)
    png = plot(runs, tmp_path / "p.png", "eval/top1")
    assert matplotlib.image.imread(png).shape[1] == 12 * 120  # saved with both panels


# ---- benchmarks/budget.py ------------------------------------------------------------------------


def test_minutes_to_reach():
    bench = load_bench()
    curve = [(0.0, 60.0), (2.0, 70.0), (4.0, 80.0)]
    assert bench.minutes_to_reach(curve, 75.0) == pytest.approx(3.0)
    assert bench.minutes_to_reach(curve, 80.0) == pytest.approx(4.0)
    assert bench.minutes_to_reach(curve, 55.0) == 0.0  # the initialisation is already there
    assert bench.minutes_to_reach(curve, 81.0) is None
    assert bench.minutes_to_reach([(0.0, 60.0), (1.0, 50.0), (2.0, 70.0)], 65.0) == pytest.approx(
        1.75
    )


def test_a_run_that_ended_early_counts_at_every_later_point():
    bench = load_bench()
    args = bench.parse(["--minutes", "5", "--arms", "mae-sized"])

    def row(name, minutes, step, acc):
        r = {"name": name, "perf/device_hours": minutes / 60, "trainer/global_step": step}
        return r | {f"eval/{k}_top1": acc for k in bench.EVAL_KEYS}

    full = [row("start", 0, 0, 60)] + [
        row(f"{m}min", m, 10 * m, 60 + m) for m in (2, 3, 4, 5)
    ]  # every point reached
    early = [row("start", 0, 0, 60), row("2min", 2, 20, 70), row("3min", 3, 30, 72)]
    res = bench.summarise(args, {}, {"mae-sized": {0: full, 1: early}}, {}, {}, {}, {}, [])
    table = res["equal_time"]["mae-sized"]
    assert table["2"]["knn_last"] == {"mean": 66.0, "min": 62.0, "max": 70.0, "n": 2}
    # seed 1 stopped at 3 minutes: its final encoder stands for it at 4 and 5
    assert table["5"]["knn_last"] == {"mean": 68.5, "min": 65.0, "max": 72.0, "n": 2}
    assert table["5"]["device_minutes"]["min"] == pytest.approx(3.0)


def test_eval_points_last_tabulates_only_the_last_point():
    """--eval-points last: each run holds its initialisation and its last evaluation; the table
    has the last budget point only (not the last encoder copied to the earlier points)."""
    bench = load_bench()
    args = bench.parse(["--minutes", "5", "--arms", "mae-sized", "--eval-points", "last"])

    def row(name, minutes, step, acc):
        r = {"name": name, "perf/device_hours": minutes / 60, "trainer/global_step": step}
        return r | {f"eval/{k}_top1": acc for k in bench.EVAL_KEYS}

    runs = {0: [row("start", 0, 0, 60), row("5min", 5, 50, 70)],
            1: [row("start", 0, 0, 60), row("end", 4.5, 45, 74)]}  # fmt: skip
    res = bench.summarise(args, {}, {"mae-sized": runs}, {}, {}, {}, {}, [])
    table = res["equal_time"]["mae-sized"]
    assert list(table) == ["5"]
    assert table["5"]["knn_last"] == {"mean": 72.0, "min": 70.0, "max": 74.0, "n": 2}
    assert table["5"]["steps"]["min"] == 45


@pytest.mark.slow
@needs_fmnist
def test_budget_benchmark_end_to_end(tmp_path):
    """Two arms, toy budget: each run stops at its time budget with checkpoints at 40/60/80/100%,
    every checkpoint is evaluated (evals.csv; the table holds those evaluations, and evaluating
    the last checkpoint again gives the same accuracies), the arms of a seed share the
    initialisation, the equal-steps MAE run makes exactly LocalMIM's steps, fine-tunes and the
    from-scratch level are reported, and results.md, results.json and the lmim.report PNG are
    written. A second call keeps every finished stage, and with --analyze adds lmim.analyze's
    per-block NMI and distance of each final encoder and of the initial weights."""
    bench = load_bench()
    out = tmp_path / "bench"
    argv = [
        "--minutes", "0.1", "--seeds", "0", "--arms", "localmim-sized", "mae-sized",
        "--img-size", "32", "--batch", "32", "--calibration-steps", "1",
        "--eval-train", "200", "--eval-test", "100", "--no-eval-bf16",
        "--finetune-images", "64", "--finetune-test", "64", "--finetune-batch", "32",
        "--finetune-epochs", "1", "--out", str(out),
        # a cosine 10x the budget: the time budget, not a slow calibration, ends each run
        "--margin", "10",
        "model.encoder.embed_dim=96", "model.encoder.patch_size=4", "data.num_workers=0",
        "trainer.log_every_n_steps=1",  # a busy machine may make fewer than 10 steps
    ]  # fmt: skip
    res = bench.main(argv)
    assert res["points"] == pytest.approx([0.04, 0.06, 0.08, 0.1])
    data = bench.EvalData(bench.parse(argv))
    for arm in ("localmim-sized", "mae-sized"):
        table = res["equal_time"][arm]
        assert list(table) == ["0.04", "0.06", "0.08", "0.1"]
        minutes = [v["device_minutes"]["mean"] for v in table.values()]
        steps = [v["steps"]["mean"] for v in table.values()]
        assert steps == sorted(steps) and steps[0] > 0
        assert all(m >= p * 0.999 for m, p in zip(minutes, res["points"], strict=True))
        rows = read_evals(out / "equal_time" / f"{arm}-s0")
        assert rows[0]["name"] == "start" and len(rows) == len(table) + 1
        for (point, v), row in zip(table.items(), rows[1:], strict=True):
            assert row["name"] == f"{point}min"
            for k in bench.EVAL_KEYS:  # one seed: the mean is that checkpoint's evaluation
                acc = float(row[f"eval/{k}_top1"])
                assert v[k] == {"mean": acc, "min": acc, "max": acc, "n": 1}
                assert acc == pytest.approx(round(acc), abs=1e-4)  # k of the 100 test images
        points = json.loads(
            (out / "equal_time" / f"{arm}-s0" / "checkpoints" / "points.json").read_text()
        )
        last = load_pretrainer(next(p["path"] for p in points if p["name"] == "0.1min"))
        again = bench.evaluate_encoder(last.encoder, data, last.encoder.depth // 2 - 1)
        assert again == {k: float(rows[-1][f"eval/{k}_top1"]) for k in bench.EVAL_KEYS}
    # one shared initialisation, evaluated once
    a, b = (read_evals(out / "equal_time" / f"{arm}-s0")[0] for arm in bench.ARMS if "sized" in arm)
    assert a["eval/knn_last_top1"] == b["eval/knn_last_top1"]
    lm_table = res["equal_time"]["localmim-sized"]
    lm_steps = lm_table[max(lm_table, key=float)]["steps"]["mean"]
    assert res["equal_steps"]["steps"] == [lm_steps]
    eq = json.loads(
        (out / "equal_steps" / "mae-sized-s0" / "checkpoints" / "points.json").read_text()
    )
    assert eq[-1]["step"] == lm_steps
    assert set(res["finetune"]) == {"localmim-sized", "mae-sized", "from scratch"}
    assert set(res["raw_pixels"]) == {"knn", "linear"}
    assert len(res["crossing"]) == 4
    text = (out / "results.md").read_text()
    assert "## Equal time: 20-NN, last block" in text and "from scratch" in text
    assert (out / "report" / "budget.png").stat().st_size > 10_000
    # a second call keeps every finished stage and gives the same table; with --analyze it adds
    # the attention analysis of the final encoders and the shared initial weights
    again = bench.main([*argv, "--analyze", "--analysis-images", "16"])
    assert again["equal_time"] == res["equal_time"]
    assert again["finetune"] == res["finetune"]
    assert list(again["analysis"]) == ["localmim-sized", "mae-sized", "random init"]
    record = json.loads((out / "analysis" / "s0" / "analysis.json").read_text())
    assert record["num_images"] == 16
    for label, v in again["analysis"].items():  # one seed: the mean is that seed's number
        assert len(v["nmi"]) == len(v["distance"]) == 8
        nmi = [s["mean"] for s in v["nmi"]]
        assert nmi == record["encoders"][label]["nmi"]
        assert all(0 <= x <= 1 for x in nmi)
    assert again["analysis"]["mae-sized"]["nmi"] != again["analysis"]["random init"]["nmi"]
    assert "## Attention per block (16 test images" in (out / "results.md").read_text()
    for name in ("nmi.png", "attention_distance.png", "s0/attention_maps.png"):
        assert (out / "analysis" / name).stat().st_size > 5_000


def test_ablation_arms_build_the_schedules_they_name(make_cfg):
    """--arms localmim-single-scale / -top-only / -isolated: the sized LocalMIM decoders with
    the paper's ablation schedules (4 taps at x1; one decoder on the top block; detached
    segments); a plain run still trains the four method arms."""
    bench = load_bench()
    assert bench.DEFAULT_ARMS == [
        "localmim-released",
        "localmim-sized",
        "mae-released",
        "mae-sized",
    ]
    built = {}
    for arm in (
        "localmim-sized",
        "localmim-single-scale",
        "localmim-top-only",
        "localmim-isolated",
    ):
        cfg = make_cfg(bench.experiment_overrides(argparse.Namespace(override=[]), arm))
        net = instantiate(cfg.model)
        assert cfg.model.decoder_dim == 64 and cfg.model.decoder_heads == 2, arm
        built[arm] = (len(net.tap_names), list(net.scales), net.isolate_gradients)
    assert built["localmim-sized"] == (4, [4, 2, 1, 0.5], False)
    assert built["localmim-single-scale"] == (4, [1, 1, 1, 1], False)
    assert built["localmim-top-only"] == (1, [1], False)
    assert built["localmim-isolated"] == (4, [4, 2, 1, 0.5], True)


def test_target_arms_are_localmim_sized_with_each_target(make_cfg, tmp_path):
    """--targets hog,pixel codebook teacher (commas or spaces): localmim-sized with each target;
    the codebook and teacher arms read the files prepare_targets made, and the teacher's model
    arguments are the exported encoder's architecture."""
    import timm

    from lmim.targets import HOG, Codebook, NormalizedPixels, Teacher
    from tests.test_targets import write_book

    bench = load_bench()
    args = bench.parse(["--targets", "hog,pixel", "codebook", "teacher", "--minutes", "2"])
    assert args.arms == [f"localmim-sized-{t}" for t in ("hog", "pixel", "codebook", "teacher")]
    assert args.teacher_minutes == 2 and args.equal_steps_arms == []
    with pytest.raises(SystemExit):
        bench.parse(["--targets", "hog,clip"])
    # the files of prepare_targets: the budget model's 2/4/8/16-px cells; its ViT as teacher
    book = write_book(tmp_path / "codebook.pt", cell_sizes=(2, 4, 8, 16))
    vit = timm.create_model(bench.TEACHER_TIMM, num_classes=0, img_size=64, patch_size=8, depth=8)
    torch.save(vit.state_dict(), tmp_path / "teacher.pth")
    args.override = []
    args.target_overrides = {
        "localmim-sized-codebook": [f"target.path={book}", "target.base=hog"],
        "localmim-sized-teacher": [
            f"target.model={bench.TEACHER_TIMM}",
            f"target.checkpoint_path={tmp_path / 'teacher.pth'}",
            "target.model_kwargs={patch_size:8,depth:8,qkv_bias:true}",
        ],
    }
    kinds = {}
    for arm in args.arms:
        cfg = make_cfg(bench.experiment_overrides(args, arm))
        net = instantiate(cfg.model)
        assert cfg.model.decoder_dim == 64 and net.cell_sizes == [2, 4, 8, 16], arm
        kinds[arm] = type(net.target)
    assert list(kinds.values()) == [HOG, NormalizedPixels, Codebook, Teacher]
    assert "target.codes=512" in bench.codebook_overrides(args)


@pytest.mark.slow
def test_target_study_end_to_end(tmp_path):
    """--targets at toy size: the codebook is fitted and the teacher pre-trained and exported
    first (reported with their cost and the teacher's accuracy), then each target arm trains
    for the budget and is evaluated; results.md names the study."""
    bench = load_bench()
    out = tmp_path / "targets"
    argv = [
        "--minutes", "0.05", "--seeds", "0", "--targets", "hog,pixel,codebook,teacher",
        "--img-size", "32", "--batch", "16", "--calibration-steps", "1",
        "--eval-train", "100", "--eval-test", "100", "--no-eval-bf16", "--eval-points", "last",
        "--finetune-epochs", "0", "--codebook-codes", "16", "--codebook-images", "64",
        "--margin", "10", "--out", str(out),
        "model.encoder.embed_dim=96", "model.encoder.patch_size=4", "data.num_workers=0",
        "trainer.log_every_n_steps=1",
    ]  # fmt: skip
    res = bench.main(argv)
    assert set(res["equal_time"]) == {f"localmim-sized-{t}" for t in bench.TARGETS}
    prep = res["targets"]
    assert prep["codebook"]["codes"] == 16 and len(prep["codebook"]["usage"]) == 4
    teacher = prep["teacher"]
    assert teacher["model_kwargs"]["patch_size"] == 4 and teacher["model_kwargs"]["embed_dim"] == 96
    assert set(teacher["eval"]) == set(bench.EVAL_KEYS) and teacher["device_minutes"] > 0
    text = (out / "results.md").read_text()
    assert text.startswith("# LocalMIM's targets for equal device time")
    assert "## Target inputs" in text and "teacher's own level" in text
