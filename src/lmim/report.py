"""Compare methods against the device-hours they spent: ``python -m lmim.report RUN [RUN ...]``.

Writes a PNG (loss against ``perf/device_hours``, one panel per target since HOG and pixel
losses are not on one scale, and evaluation accuracy when logged; one colour and legend entry
per method) and a Markdown table (one row per run: budget, steps, images, device-hours,
throughput, MFU, final loss and accuracy). Runs that logged no ``train/loss`` (e.g. shorter
than ``trainer.log_every_n_steps`` before lmim logged the last step) are skipped with a note.
A RUN is any of

* a run or sweep folder (``outputs/<task>/runs/<time>``, ``outputs/<task>/multiruns/<time>``,
  any folder above them): every run below it, read from its W&B log
  (``wandb/*run-*/run-<id>.wandb``, offline or not, no network needed) or else from
  ``csv/metrics.csv`` (``logger=csv`` or ``logger=many``), plus the evaluations of its
  checkpoints in ``<run>/evals.csv`` when present (``benchmarks/budget.py`` writes them);
* a ``.wandb`` file or a Lightning ``metrics.csv``;
* a W&B path when online: ``entity/project/run_id``, or ``entity/project`` for all its runs
  (``--group`` narrows to one experiment), read through the W&B API.

Examples::

    python -m lmim.report outputs/vit_b_100ep/multiruns/2026-01-01_10-00-00 --out report/
    python -m lmim.report outputs/ --group vit_b_100ep
    python -m lmim.report me/lmim --group vit_b_100ep --acc eval/top1
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmim.wandb_file import WandbFileError, read_wandb_file

LABEL_KEYS = ("method", "model", "target", "schedule", "budget")
LOSS_KEY = "train/loss"
# The x axis: what lmim.callbacks.PerfMonitor logs (defined here, so that this module imports
# neither Lightning nor torch).
DEVICE_HOURS = "perf/device_hours"
# Evaluation keys tried, in order, when --acc is not given.
ACC_PATTERN = re.compile(r"^(eval|val|test|probe|knn|linear)[^/]*/.*(top1|top-1|acc|accuracy)$")


class ReportError(ValueError):
    """An input that is not a run, or runs without the metrics to compare."""


@dataclass
class Run:
    """One training run, whatever it was read from.

    Attributes:
        name: the W&B run name (``<model>-<method>-<target>-<schedule>-<budget>``) or folder.
        labels: method, model, target, schedule and budget (``labels`` of the run config).
        group: the W&B group (the experiment, ``task_name``).
        history: logged rows in order; each maps metric name -> value.
        source: where it was read from.
        config: the run's config as logged (may be empty for a bare CSV).
    """

    name: str
    labels: dict[str, str]
    group: str
    history: list[dict[str, Any]]
    source: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.labels.get("method", "?")

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(device-hours, value) of every row logging ``key``; rows without device-hours use
        the last one logged before them (W&B's step_sync)."""
        xs, ys, hours = [], [], None
        for row in self.history:
            h = _number(row.get(DEVICE_HOURS))
            hours = h if h is not None else hours
            y = _number(row.get(key))
            if y is not None and hours is not None:
                xs.append(hours)
                ys.append(y)
        return xs, ys

    def last(self, key: str) -> float | None:
        for row in reversed(self.history):
            v = _number(row.get(key))
            if v is not None:
                return v
        return None

    def maximum(self, key: str) -> float | None:
        values = [v for v in (_number(r.get(key)) for r in self.history) if v is not None]
        return max(values) if values else None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _labels(config: dict[str, Any], tags: Iterable[str] = (), name: str = "") -> dict[str, str]:
    labels = config.get("labels")
    out = {k: str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    for tag in tags:  # "method:mae" tags, for runs whose config lacks labels
        key, _, value = tag.partition(":")
        if key in LABEL_KEYS and value:
            out.setdefault(key, value)
    if "method" not in out:
        out["method"] = name or "?"
    return out


# ---- readers ---------------------------------------------------------------------------------


def read_wandb_run_file(path: Path) -> Run:
    """A run from its ``.wandb`` transaction log (offline or online runs alike)."""
    rf = read_wandb_file(path)
    return Run(
        name=rf.name or rf.run_id,
        labels=_labels(rf.config, rf.tags, rf.name),
        group=rf.group,
        history=rf.history,
        source=str(path),
        config=rf.config,
    )


def read_csv_run(path: Path) -> Run:
    """A run from Lightning's ``metrics.csv``; labels from the ``hparams.yaml`` beside it."""
    with open(path, newline="") as f:
        rows = [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    for row in rows:  # Lightning's step column is what W&B logs as trainer/global_step
        if "step" in row:
            row.setdefault("trainer/global_step", row["step"])
    config: dict[str, Any] = {}
    hparams = path.parent / "hparams.yaml"
    if hparams.is_file():
        import yaml

        loaded = yaml.safe_load(hparams.read_text())
        config = loaded if isinstance(loaded, dict) else {}
    run_dir = path.parent.parent if path.parent.name == "csv" else path.parent
    name = str(config.get("run_name") or run_dir.name)
    return Run(
        name=name,
        labels=_labels(config, name=name),
        group=str(config.get("task_name", "")),
        history=rows,
        source=str(path),
        config=config,
    )


def read_wandb_api(path: str, group: str | None = None) -> list[Run]:
    """Runs through the W&B API: ``entity/project/run_id`` or ``entity/project``."""
    import wandb

    api = wandb.Api()
    parts = path.strip("/").split("/")
    if len(parts) == 3:
        remote = [api.run(path)]
    elif len(parts) == 2:
        remote = list(api.runs(path, filters={"group": group} if group else None))
    else:
        raise ReportError(f"{path}: a W&B path is entity/project or entity/project/run_id")
    runs = []
    for r in remote:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        runs.append(
            Run(
                name=r.name,
                labels=_labels(config, r.tags, r.name),
                group=r.group or "",
                history=list(r.scan_history()),
                source=f"wandb:{r.path if isinstance(r.path, str) else '/'.join(r.path)}",
                config=config,
            )
        )
    return runs


EVALS_FILE = "evals.csv"


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluations made after training, from ``<run>/evals.csv`` (one row per evaluated
    checkpoint, with its ``perf/device_hours``; written by ``benchmarks/budget.py``), in
    device-hour order. Empty when the file is absent."""
    path = run_dir / EVALS_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: _number(r.get(DEVICE_HOURS)) or 0.0)


def _run_root(path: Path) -> Path:
    """The run folder a log belongs to: ``<run>/wandb/<x>run-*/run-*.wandb`` or
    ``<run>/csv/metrics.csv`` -> ``<run>``."""
    if path.suffix == ".wandb" and path.parent.parent.name == "wandb":
        return path.parent.parent.parent
    if path.name == "metrics.csv" and path.parent.name == "csv":
        return path.parent.parent
    return path.parent


def find_run_files(folder: Path, source: str = "auto") -> list[Path]:
    """Every run below a folder, one log per run: its ``.wandb`` file(s), or else its
    ``metrics.csv`` (``source`` = auto, wandb or csv)."""
    wandb_files = sorted({p.resolve() for p in folder.rglob("run-*.wandb")})
    csv_files = sorted({p.resolve() for p in folder.rglob("metrics.csv")})
    if source == "wandb":
        return wandb_files
    if source == "csv":
        return csv_files
    with_wandb = {_run_root(p) for p in wandb_files}
    return wandb_files + [p for p in csv_files if _run_root(p) not in with_wandb]


def _looks_remote(item: str) -> bool:
    """``entity/project[/run_id]`` that is not a local path (nor under a local folder)."""
    path = Path(item)
    if path.exists() or item.startswith((".", "/", "~")) or item.count("/") not in (1, 2):
        return False
    return not Path(item.split("/")[0]).exists()


def load_runs(inputs: Sequence[str], source: str = "auto", group: str | None = None) -> list[Run]:
    """Read every run named by ``inputs`` (folders, files or W&B paths); see the module doc."""
    runs: list[Run] = []
    for item in inputs:
        path = Path(item)
        if item.startswith("wandb:") or _looks_remote(item):
            runs += read_wandb_api(item.removeprefix("wandb:"), group)
            continue
        if not path.exists():
            raise ReportError(f"{item}: no such file or folder (nor a W&B entity/project path)")
        files = [path] if path.is_file() else find_run_files(path, source)
        if not files:
            raise ReportError(
                f"{item}: no run below it (looked for wandb/*run-*/run-*.wandb and "
                "csv/metrics.csv); train with logger=wandb, csv or many"
            )
        for f in files:
            try:
                run = read_csv_run(f) if f.suffix == ".csv" else read_wandb_run_file(f)
            except WandbFileError as err:
                raise ReportError(f"{err}; read the run's csv/metrics.csv instead") from err
            run.history += read_evals(_run_root(f))
            runs.append(run)
    if group:
        runs = [r for r in runs if r.group == group]
    if not runs:
        raise ReportError("no runs to compare" + (f" in group {group}" if group else ""))
    return runs


# ---- the comparison --------------------------------------------------------------------------


def series_labels(runs: Sequence[Run]) -> list[str]:
    """One legend label per run: its method, plus the labels that tell apart runs of the same
    method (e.g. ``localmim · top_only``) and the model when several are compared."""
    keys = []
    if len({r.labels.get("model") for r in runs}) > 1:
        keys.append("model")
    for key in ("target", "schedule"):
        by_method: dict[str, set] = {}
        for r in runs:
            by_method.setdefault(r.method, set()).add(r.labels.get(key))
        if any(len(v) > 1 for v in by_method.values()):
            keys.append(key)
    return [" · ".join([r.method, *(str(r.labels.get(k, "?")) for k in keys)]) for r in runs]


def find_acc_key(runs: Sequence[Run]) -> str | None:
    """The first logged metric that looks like an evaluation accuracy (eval/top1, val/acc, ...)."""
    for run in runs:
        for row in run.history:
            for key in row:
                if ACC_PATTERN.match(key):
                    return key
    return None


def summary_rows(runs: Sequence[Run], acc_key: str | None) -> list[dict[str, Any]]:
    rows = []
    for label, run in sorted(
        zip(series_labels(runs), runs, strict=True),
        key=lambda lr: (lr[0], lr[1].maximum(DEVICE_HOURS) or 0.0),
    ):
        rows.append(
            {
                "method": label,
                "run": run.name,
                "budget": run.labels.get("budget", ""),
                "steps": run.maximum("trainer/global_step"),
                "images": run.maximum("perf/images_seen"),
                "device-hours": run.maximum(DEVICE_HOURS),
                "img/s/device": run.last("perf/images_per_sec_per_device")
                or run.last("perf/images_per_sec"),
                "loader wait": run.last("perf/data_wait_frac"),
                "MFU": run.last("perf/mfu"),
                "final loss": run.last(LOSS_KEY),
                "accuracy": run.last(acc_key) if acc_key else None,
            }
        )
    return rows


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key in ("steps", "images"):
        return f"{int(v):,}"
    if key == "device-hours":
        return f"{v:.4g}"
    if key in ("loader wait", "MFU"):
        return f"{v:.1%}"
    if key in ("img/s/device",):
        return f"{v:,.1f}"
    if key in ("final loss", "accuracy"):
        return f"{v:.4f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], acc_key: str | None) -> str:
    cols = [c for c in rows[0] if c != "accuracy" or acc_key]
    head = [c if c != "accuracy" else acc_key for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r[c]) for c in cols) + " |")
    return "\n".join(lines)


def mean_curve(
    curves: Sequence[tuple[list[float], list[float]]],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Repeats of one run (seeds) as one curve: over the points every repeat has, the mean
    x, and the mean, min and max of y."""
    n = min(len(xs) for xs, _ in curves)
    xs = [sum(c[0][i] for c in curves) / len(curves) for i in range(n)]
    ys = [[c[1][i] for c in curves] for i in range(n)]
    return xs, [sum(y) / len(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def loss_panels(runs: Sequence[Run]) -> dict[str, list[int]]:
    """The loss panels of the figure: target label -> indices of the runs drawn in it (HOG and
    pixel losses, or HOG-9 and HOG-18, are not on one scale)."""
    panels: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        panels.setdefault(run.labels.get("target", "?"), []).append(i)
    return dict(sorted(panels.items()))


def figure(runs: Sequence[Run], acc_key: str | None, smooth: int = 1):
    """The report's matplotlib figure: one loss panel per target (:func:`loss_panels`), then
    an accuracy panel when ``acc_key`` is logged; x = device-hours, one colour and legend entry
    per method (the same in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = series_labels(runs)
    order = sorted(set(labels))
    colours = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(order)}
    has_acc = acc_key is not None and any(r.series(acc_key)[0] for r in runs)
    panels = loss_panels(runs)
    n = len(panels) + int(has_acc)
    fig, axes = plt.subplots(1, n, figsize=(6.5 if n == 1 else 6 * n, 4.5), squeeze=False)
    axes = list(axes[0])
    for ax, (target, members) in zip(axes, panels.items(), strict=False):
        seen: set[str] = set()
        for i in members:
            label, run = labels[i], runs[i]
            xs, ys = run.series(LOSS_KEY)
            if smooth > 1 and len(ys) >= smooth:
                ys = [
                    sum(ys[max(0, j - smooth + 1) : j + 1])
                    / len(ys[max(0, j - smooth + 1) : j + 1])
                    for j in range(len(ys))
                ]
            ax.plot(xs, ys, color=colours[label], label=None if label in seen else label)
            seen.add(label)
        ax.set_xlabel("device-hours (wall-clock x devices)")
        ax.set_ylabel(f"{LOSS_KEY} ({target} target)")
        ax.set_title(f"pre-training loss, target {target}")
    if has_acc:
        ax = axes[-1]
        for label in order:
            group = [r for lab, r in zip(labels, runs, strict=True) if lab == label]
            curves = [r.series(acc_key) for r in group]
            if len(group) > 1 and all(len(xs) > 1 for xs, _ in curves):
                xs, mean, lo, hi = mean_curve(curves)
                ax.plot(
                    xs,
                    mean,
                    "o-",
                    color=colours[label],
                    label=f"{label} (mean of {len(group)}, range shaded)",
                )
                ax.fill_between(xs, lo, hi, color=colours[label], alpha=0.2)
                continue
            if len(group) > 1:  # a budget sweep: each run's final accuracy at its total cost
                pts = [(r.maximum(DEVICE_HOURS), r.last(acc_key)) for r in group]
            else:
                pts = list(zip(*curves[0], strict=True))
            pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colours[label], label=label)
        ax.set_xlabel("device-hours (wall-clock x devices)")
        ax.set_ylabel(acc_key)
        ax.set_title("accuracy against cost")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot(runs: Sequence[Run], path: Path, acc_key: str | None, smooth: int = 1) -> Path:
    """Save :func:`figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(runs, acc_key, smooth)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _no_loss_reason(run: Run) -> str:
    if run.last(LOSS_KEY) is None:
        return (
            f"no {LOSS_KEY} logged (a run shorter than trainer.log_every_n_steps, trained "
            "without callbacks.final_step)"
        )
    return f"{LOSS_KEY} without {DEVICE_HOURS} (trained without callbacks.perf)"


def report(
    inputs: Sequence[str],
    out: str | Path = "report",
    source: str = "auto",
    group: str | None = None,
    acc_key: str | None = None,
    smooth: int = 1,
) -> dict[str, Any]:
    """Read the runs and write ``<out>/budget.png`` and ``<out>/budget.md``.

    Runs without ``train/loss`` against ``perf/device_hours`` are left out and listed in
    ``skipped``; when no run is left, :class:`ReportError`.

    Returns:
        ``{"png": Path, "markdown": Path, "rows": [...], "runs": [Run, ...],
        "skipped": [(source, reason), ...]}``.
    """
    runs = load_runs(inputs, source, group)
    skipped = [(r.source, _no_loss_reason(r)) for r in runs if not r.series(LOSS_KEY)[0]]
    runs = [r for r in runs if r.series(LOSS_KEY)[0]]
    if not runs:
        raise ReportError(
            f"no {LOSS_KEY} against {DEVICE_HOURS} in {', '.join(s for s, _ in skipped)}: "
            "train with the default callbacks (callbacks.perf logs device-hours, "
            "callbacks.final_step the last step's loss)"
        )
    acc_key = acc_key or find_acc_key(runs)
    out = Path(out)
    png = plot(runs, out / "budget.png", acc_key, smooth)
    rows = summary_rows(runs, acc_key)
    groups = sorted({r.group for r in runs if r.group})
    text = [
        "# Methods against device-hours",
        "",
        f"Runs: {len(runs)}" + (f" (groups: {', '.join(groups)})" if groups else "") + ".",
        "Device-hours = wall-clock of the training job x devices (`perf/device_hours`);",
        "img/s/device and loader wait (share of time waiting for data) are the last logged window.",
        "",
        markdown_table(rows, acc_key),
        "",
        f"![loss against device-hours]({png.name})",
        "",
        "Sources: " + ", ".join(f"`{r.source}`" for r in runs),
        "",
    ]
    md = out / "budget.md"
    if skipped:
        text[-1:-1] = ["Skipped (no loss to draw): " + ", ".join(f"`{s}`" for s, _ in skipped)]
    md.write_text("\n".join(text))
    return {"png": png, "markdown": md, "rows": rows, "runs": runs, "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lmim.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "runs", nargs="+", help="run/sweep folders, .wandb or metrics.csv files, W&B paths"
    )
    p.add_argument("--out", default="report", help="folder for budget.png and budget.md")
    p.add_argument("--source", choices=["auto", "wandb", "csv"], default="auto")
    p.add_argument("--group", default=None, help="only runs of this W&B group (experiment)")
    p.add_argument("--acc", default=None, help="accuracy metric (default: eval/top1-like keys)")
    p.add_argument("--smooth", type=int, default=1, help="moving average of the loss, in rows")
    args = p.parse_args(argv)
    try:
        result = report(args.runs, args.out, args.source, args.group, args.acc, args.smooth)
    except ReportError as err:
        print(f"lmim.report: error: {err}", file=sys.stderr)
        return 2
    for where, reason in result["skipped"]:
        print(f"lmim.report: note: skipped {where}: {reason}", file=sys.stderr)
    print(Path(result["markdown"]).read_text())
    print(f"png: {result['png']}\nmarkdown: {result['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
