"""Attention analysis of frozen encoders, as in LocalMIM's section 5:
``python -m lmim.analyze checkpoints=[a.ckpt,b.ckpt] data=...``.

Per encoder (each checkpoint, each encoder exported by ``lmim.export`` with ``timm_model``, and
``init_model`` for a random-init baseline) and per layer: the normalised mutual information
between query and key patches and the mean attention distance (:mod:`lmim.analysis`), on
``num_images`` images of the data group's val split; and, for the first ``maps.images`` of them,
where chosen query patches attend at chosen layers. Writes ``analysis.json``, ``nmi.png`` and
``attention_distance.png`` (one line per encoder against depth) and ``attention_maps.png`` into
the run folder and prints their paths. ViT (global attention) and Swin (inside windows, averaged
over the windows of an image; see :mod:`lmim.analysis`) encoders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lmim.cli import hydra_entry
from lmim.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch, timm and the models are imported by the functions that use them: Hydra composes (and
# answers --help or a mistyped key) before any of them is loaded.

log = logging.getLogger("lmim")


def val_images(cfg: DictConfig) -> torch.Tensor:
    """The first ``num_images`` images of the data group's val split (eval transform)."""
    import torch

    from lmim.evaluation import labelled_datamodule

    dm = labelled_datamodule(cfg)
    batches, n = [], 0
    for images, _ in dm.eval_dataloader("val", limit=cfg.num_images):
        batches.append(images)
        n += len(images)
    if not n:
        raise ConfigError("the val split holds no image: check data.root (or data=demo)")
    return torch.cat(batches)[: cfg.num_images]


def load_export(path: str, timm_model: str | None, img_size: int) -> torch.nn.Module:
    """An encoder exported by ``lmim.export`` (a timm state dict), loaded strictly into
    ``timm.create_model(timm_model)`` at ``img_size``."""
    import timm
    import torch

    if not timm_model:
        raise ConfigError(
            f"exports=[{path}] needs timm_model=<the timm name lmim.export printed>, e.g. "
            "timm_model=vit_tiny_patch16_224 (or analyze the pre-training checkpoint instead)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"{path} is not a readable encoder file ({type(err).__name__}): pass a file "
            "written by python -m lmim.export"
        ) from err
    try:
        try:
            model = timm.create_model(
                timm_model, pretrained=False, num_classes=0, img_size=img_size
            )
        except TypeError:  # a model without an input size (a CNN)
            model = timm.create_model(timm_model, pretrained=False, num_classes=0)
        model.load_state_dict(state, strict=True)
    except Exception as err:
        raise ConfigError(
            f"{path} does not load into timm_model={timm_model} at data.img_size={img_size} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}): use the name and size "
            "lmim.export printed for it"
        ) from err
    return model.eval()


def analysable(net: torch.nn.Module) -> torch.nn.Module:
    """The encoder of a pre-training model as :mod:`lmim.analysis` reads it: as it is when its
    attention can be recorded (``MaskedViT``: timm blocks), else (``records_attention = False``:
    ``MaskedSwin``, whose masked forward computes windowed attention in fused kernels) the timm
    model its weights export to, loaded strictly, with the encoder's LayerNorm epsilon
    (``norm_eps``), so that it computes the same function."""
    from functools import partial

    import torch

    from lmim.export import encoder_state_dict, timm_model

    enc = net.encoder
    if not getattr(enc, "records_attention", True):
        eps = getattr(enc, "norm_eps", 1e-6)
        model = timm_model(enc, norm_layer=partial(torch.nn.LayerNorm, eps=eps))
        model.load_state_dict(encoder_state_dict(net), strict=True)
        return model.eval()
    return enc


def encoders(cfg: DictConfig) -> dict[str, torch.nn.Module]:
    """``{label: encoder}``: each checkpoint (labelled by its run folder), each export (by its
    file name), then ``init_model``; ``labels`` renames them in that order."""
    if not (cfg.checkpoints or cfg.get("exports") or cfg.init_model):
        raise ConfigError(
            "nothing to analyze: pass checkpoints=[path/to/last.ckpt,...] (from lmim.train), "
            "exports=[encoder.pth,...] with timm_model=<name> (from lmim.export), and/or "
            "init_model=<model name> for a random-init baseline"
        )
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    from lmim import create_pretrainer
    from lmim.linprobe import load_pretrainer_at
    from lmim.models.protocol import MaskedEncoder

    size = int(cfg.data.img_size)
    found: dict[str, torch.nn.Module] = {}
    for path in cfg.checkpoints or []:
        p = Path(str(path))
        run = p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name
        label = run if run and run not in found else str(p)
        found[label] = analysable(load_pretrainer_at(str(p), size))
    for path in cfg.get("exports") or []:
        found[Path(str(path)).name] = load_export(str(path), cfg.get("timm_model"), size)
    if cfg.init_model:
        net = create_pretrainer(cfg.init_model, img_size=size)
        found[f"{cfg.init_model} (random init)"] = analysable(net)
    names = list(cfg.get("labels") or [])
    if names:
        if len(names) != len(found) or len(set(map(str, names))) != len(names):
            raise ConfigError(
                f"labels={names} must name the {len(found)} encoders once each, in the order "
                "checkpoints, exports, init_model (or leave labels=[] for the run folders' names)"
            )
        found = dict(zip(map(str, names), found.values(), strict=True))
    from lmim.analysis import attention_layouts

    for label, enc in found.items():
        if not isinstance(enc, MaskedEncoder | VisionTransformer | SwinTransformer):
            raise ConfigError(
                f"{label}: lmim.analyze reads lmim encoders and timm ViT and Swin models, not "
                f"{type(enc).__name__}: it has no attention layers to analyse"
            )
        try:
            attention_layouts(enc)
        except ValueError as err:
            raise ConfigError(f"{label}: {err} (data.img_size={size})") from err
    return found


def plot(results: dict[str, dict[str, Any]], key: str, ylabel: str, path: Path) -> None:
    """One line per encoder: ``results[label][key]`` against the layer (1 = lowest block)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for label, r in results.items():
        ax.plot(range(1, len(r[key]) + 1), r[key], marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def attention_maps_figure(pictures: torch.Tensor, found: dict[str, dict[str, Any]]):
    """One row per (encoder, image, query): the image with the query patch marked, then the
    query's head-averaged attention at each layer over the image (each panel scaled to its
    maximum).

    Args:
        pictures: (B, 3, H, W) images in [0, 1].
        found: per encoder label, the output of :func:`lmim.analysis.attention_maps`.

    Returns:
        A ``matplotlib.figure.Figure`` (no pyplot state touched).
    """
    from matplotlib.figure import Figure

    rows = [
        (label, b, q)
        for label, m in found.items()
        for b in range(m["maps"].shape[1])
        for q in range(len(m["queries"]))
    ]
    cols = 1 + max(len(m["layers"]) for m in found.values())
    fig = Figure(figsize=(1.6 * cols, 1.7 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for i, (label, b, q) in enumerate(rows):
        m = found[label]
        p = m["patch_size"]
        r, c = m["queries"][q]
        image = pictures[b].permute(1, 2, 0).numpy()
        panels = [("query", None)] + [
            (f"layer {layer + 1}", m["maps"][k, b, q].numpy())
            for k, layer in enumerate(m["layers"])
        ]
        for j, ax in enumerate(axes[i]):
            ax.set_axis_off()
            if j >= len(panels):
                continue
            name, amap = panels[j]
            ax.imshow(image)
            if amap is not None:
                ax.imshow(amap / amap.max(), cmap="inferno", alpha=0.6)
            ax.plot(c * p + p / 2 - 0.5, r * p + p / 2 - 0.5, "x", color="cyan", ms=6, mew=2)
            title = f"{label}\nquery ({r}, {c})" if j == 0 else name
            ax.set_title(title, fontsize=6)
    return fig


def wandb_target(cfg: DictConfig) -> tuple[DictConfig | None, str | None]:
    """The ``logger.wandb`` node (None without ``logger=wandb``) and the W&B run id to add the
    analysis to: ``wandb_run`` as a run id, or the id an lmim.train run folder recorded in its
    ``wandb_run_id`` file (None: a new run)."""
    from lmim.utils import WANDB_ID_FILE

    node = (cfg.get("logger") or {}).get("wandb")
    ref = cfg.get("wandb_run")
    if not ref:
        return node, None
    if node is None:
        raise ConfigError(
            f"wandb_run={ref} is only used with W&B logging: add logger=wandb to the command"
        )
    path = Path(str(ref))
    if path.is_dir():
        file = path / WANDB_ID_FILE
        if not file.is_file() or not file.read_text().strip():
            raise ConfigError(
                f"wandb_run={ref}: the folder has no {WANDB_ID_FILE} file: pass the run folder "
                "of an lmim.train run that logged to W&B (logger=wandb), or a W&B run id"
            )
        return node, file.read_text().strip()
    if "/" in str(ref) or not str(ref).isalnum():
        raise ConfigError(
            f"wandb_run={ref} is neither a run folder nor a W&B run id (letters and digits, "
            "e.g. wandb_run=3kz9x0qa)"
        )
    return node, str(ref)


def log_to_wandb(
    node: DictConfig, run_id: str | None, record: dict[str, Any], paths: dict[str, Path]
) -> str:
    """Log the analysis to W&B (offline without an API key): the per-layer table, the NMI and
    attention-distance line plots and the three figures in one row, each encoder's mean NMI in
    the summary. Returns the run id."""
    from omegaconf import OmegaConf

    from lmim.utils import build_loggers, finish_wandb

    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    if run_id:  # an existing run keeps its own name, group, tags and job type
        node = OmegaConf.merge(node, {"name": None, "group": None, "tags": None, "job_type": None})
    (logger,) = build_loggers(OmegaConf.create({"wandb": node}), run_id)
    try:
        import wandb

        run = logger.experiment
        results = record["encoders"]
        rows = [
            [label, layer + 1, r["nmi"][layer], r["distance"][layer]]
            for label, r in results.items()
            for layer in range(len(r["nmi"]))
        ]
        table = wandb.Table(columns=["encoder", "layer", "nmi", "attention_distance_px"], data=rows)
        labels = list(results)
        xs = [list(range(1, len(results[k]["nmi"]) + 1)) for k in labels]

        def lines(key: str, title: str):
            return wandb.plot.line_series(
                xs=xs, ys=[results[k][key] for k in labels], keys=labels, title=title,
                xname="layer",
            )  # fmt: skip

        run.log(
            {
                "analysis/layers": table,
                "analysis/nmi": lines("nmi", "NMI (query; key) per layer"),
                "analysis/attention_distance": lines("distance", "attention distance (px)"),
                "analysis/nmi_png": wandb.Image(str(paths["nmi"])),
                "analysis/attention_distance_png": wandb.Image(str(paths["attention_distance"])),
                "analysis/attention_maps_png": wandb.Image(str(paths["attention_maps"])),
            }
        )
        for label, r in results.items():
            run.summary[f"analysis/{label}/nmi_mean"] = sum(r["nmi"]) / len(r["nmi"])
            run.summary[f"analysis/{label}/nmi_first"] = r["nmi"][0]
            run.summary[f"analysis/{label}/nmi_last"] = r["nmi"][-1]
        run.summary["analysis/num_images"] = record["num_images"]
        return run.id
    finally:
        finish_wandb()


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Score every encoder; write the JSON and the figures (and log them to W&B with
    ``logger=wandb``); return their paths."""
    from lmim.analysis import analyze_encoder, attention_maps, map_settings
    from lmim.data.transforms import denormalize

    wandb_node, wandb_id = wandb_target(cfg)  # checked before anything is computed
    nets = encoders(cfg)
    maps_cfg = cfg.get("maps") or {}
    queries, layers = maps_cfg.get("queries"), maps_cfg.get("layers")
    settings = {}
    for label, enc in nets.items():  # checked before any image is read
        try:
            settings[label] = map_settings(
                enc,
                None if queries is None else [tuple(q) for q in queries],
                None if layers is None else list(layers),
            )
        except ValueError as err:
            raise ConfigError(f"maps: {label}: {err}: change maps.queries / maps.layers") from err
    images = val_images(cfg)
    n_maps = min(int(maps_cfg.get("images", 1)), len(images))
    results, maps = {}, {}
    for label, enc in nets.items():
        results[label] = analyze_encoder(enc, images, progress=True)
        log.info("%s: NMI per layer %s", label, [round(v, 3) for v in results[label]["nmi"]])
        maps[label] = attention_maps(enc, images[:n_maps], *settings[label])
        results[label]["maps"] = {
            "queries": maps[label]["queries"],
            "layers": maps[label]["layers"],
        }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "analysis": out / "analysis.json",
        "nmi": out / "nmi.png",
        "attention_distance": out / "attention_distance.png",
        "attention_maps": out / "attention_maps.png",
    }
    record = {"num_images": len(images), "img_size": cfg.data.img_size, "encoders": results}
    paths["analysis"].write_text(json.dumps(record, indent=1))
    plot(results, "nmi", "NMI (query; key)", paths["nmi"])
    plot(results, "distance", "mean attention distance (px)", paths["attention_distance"])
    mean, std = cfg.data.get("mean"), cfg.data.get("std")
    stats = {} if mean is None or std is None else {"mean": list(mean), "std": list(std)}
    figure = attention_maps_figure(denormalize(images[:n_maps], **stats), maps)
    figure.savefig(paths["attention_maps"], dpi=110)
    if wandb_node is not None:
        run_id = log_to_wandb(wandb_node, wandb_id, record, paths)
        log.info("logged the analysis to W&B run %s", run_id)
    return paths


@hydra_entry("analyze")
def main(cfg: DictConfig) -> None:
    from lmim.cli import fail

    try:
        paths = analyze(cfg)
    except ConfigError as err:
        fail(str(err))
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
