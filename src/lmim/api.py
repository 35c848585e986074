"""Python API: build the pre-training model from the same Hydra configs as the command line."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lmim.errors import ConfigError
from lmim.utils import config_dir, instantiate_checked

# Where a keyword of create_pretrainer is looked up, in order.
_SECTIONS = ("model", "model.encoder", "target", "schedule", "data")


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the packaged Hydra config with command-line style overrides.

    ``${hydra:...}`` interpolations (run names, output folders) are left unresolved; the model,
    target, schedule and data nodes resolve fully.
    """
    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def check_choice(group: str, name: str) -> None:
    """Raise :class:`ConfigError` listing the options unless ``conf/<group>/<name>.yaml`` exists."""
    options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
    if name not in options:
        raise ConfigError(f"unknown {group} '{name}': choose one of {', '.join(options)}")


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    for section in _SECTIONS:
        node = OmegaConf.select(cfg, section)
        if isinstance(node, DictConfig) and key in node:
            # A value that refers to another (model.encoder.img_size: ${data.img_size}) is set
            # at its source, so every other reference (a target's img_size) follows it.
            raw = OmegaConf.to_container(node, resolve=False)[key]
            ref = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
            path = ref.group(1) if ref else f"{section}.{key}"
            OmegaConf.update(cfg, path, value, merge=False)
            return
    known = sorted(
        {k for s in _SECTIONS for k in (OmegaConf.select(cfg, s) or {}) if not k.startswith("_")}
    )
    raise ConfigError(f"create_pretrainer got an unknown option '{key}'; known: {', '.join(known)}")


def create_pretrainer(
    model: str = "vit_b",
    target: str | None = None,
    schedule: str | None = None,
    overrides: Sequence[str] = (),
    method: str = "localmim",
    **options: Any,
):
    """Build a pre-training model as a plain ``nn.Module``.

    Args:
        model: a config of ``conf/model`` (vit_tiny, vit_s, vit_b, vit_l, vit_h, vit_test,
            swin_t, swin_b, swin_b_w14, swin_l, swin_test).
        target: a config of ``conf/target`` (hog, hog18, pixel, codebook, teacher, tokenizer;
            the last three need their files, e.g. ``overrides=["target.path=book.pt"]``);
            None = the method's and model's (LocalMIM: hog for ViTs, hog18 for Swin; MAE: pixel).
        schedule: a config of ``conf/schedule`` (localmim, isolated, top_only, single_scale);
            None = the method's (LocalMIM: localmim, MAE: top_only).
        overrides: Hydra override strings, e.g. ``["model.decoder_dim=128"]``.
        method: a config of ``conf/method``: ``localmim`` or ``mae`` (top tap only, normalised
            pixels, 8 x 512 x 16-head decoder).
        **options: single values by leaf name, looked up in model, model.encoder, target,
            schedule and data, e.g. ``img_size=192, mask_ratio=0.6, nbins=18, bias=True,
            isolate_gradients=True``.

    Raises:
        ConfigError: an unknown model, target or schedule name (the message lists the valid
            ones), an unknown option, or a value that cannot work.

    Returns:
        :class:`lmim.models.LocalMIM`; ``model(images, mask=None)`` returns a
        :class:`lmim.models.LocalMIMOutput` (loss, per-tap losses, predictions, targets, mask).

    Example:
        >>> net = create_pretrainer("vit_tiny", "hog", img_size=96)
        >>> out = net(torch.randn(2, 3, 96, 96))
        >>> mae = create_pretrainer("vit_b", method="mae")  # MAE ViT-B, 111,655,680 parameters
    """
    for group, name in (
        ("model", model),
        ("method", method),
        ("target", target),
        ("schedule", schedule),
    ):
        if name:
            check_choice(group, name)
    choices = [f"model={model}", f"method={method}"]
    choices += [f"target={target}"] if target is not None else []
    choices += [f"schedule={schedule}"] if schedule is not None else []
    cfg = compose_config([*choices, *overrides])
    with open_dict(cfg):
        for key, value in options.items():
            _set(cfg, key, value)
    return instantiate_checked(cfg.model)
