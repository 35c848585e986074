"""Export a pre-trained encoder as a timm VisionTransformer / SwinTransformer state dict.

    python -m lmim.export outputs/.../checkpoints/last.ckpt --out vit_b_localmim.pth

prints one line of Python that loads it into timm with ``strict=True``: the registered model when
the encoder has its architecture (``timm.create_model('vit_base_patch16_224', num_classes=0,
img_size=224)`` for ``model=vit_b``), else timm's ``VisionTransformer`` / ``SwinTransformer``
with the encoder's settings (``timm.models.VisionTransformer(img_size=32, patch_size=4, ...)``).

(``last.ckpt`` is a file, or a folder of shards under ``trainer=fsdp``; both are read.)
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmim.cli import fail
from lmim.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, timm and the models are imported by the functions that use them: --help and a
# missing checkpoint answer before any of them is loaded.


def encoder_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm names (``VisionTransformer`` / ``SwinTransformer``).

    timm's models end with a LayerNorm (``norm``) that LocalMIM does not have; each tap has its
    own LayerNorm instead. When the top layer is tapped (the default schedule), its tap norm is
    exported as ``norm``, since it is the norm trained on the final features; otherwise ``norm``
    is the identity (weight 1, bias 0).
    """
    import torch

    enc = net.encoder
    sd = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    width = enc.feature_info[-1]["num_chs"]
    top = enc.depth - 1
    if top in net.taps:
        norm = net.norms[net.taps.index(top)]
        sd["norm.weight"] = norm.weight.detach().clone()
        sd["norm.bias"] = norm.bias.detach().clone()
    else:
        sd["norm.weight"], sd["norm.bias"] = torch.ones(width), torch.zeros(width)
    return sd


def timm_architecture(encoder: nn.Module) -> tuple[type[nn.Module], dict[str, Any]]:
    """The timm class and keyword arguments that build a model of the encoder's architecture:
    the encoder's own :meth:`~lmim.models.MaskedEncoder.timm_architecture`.

    Args:
        encoder: a :class:`lmim.models.MaskedViT`, ``MaskedSwin`` or any other
            :class:`~lmim.models.MaskedEncoder`.

    Returns:
        e.g. ``(VisionTransformer, {"img_size", "patch_size", "embed_dim", "depth", ...})`` or
        ``(SwinTransformer, {..., "depths", "window_size", ...})``.
    """
    return encoder.timm_architecture()


def _signature(model: nn.Module) -> dict[str, Any]:
    """What a strict load depends on: every state-dict entry's shape, and every attention's
    head count (which no shape shows in a ViT)."""
    sig: dict[str, Any] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if hasattr(module, "num_heads"):
            sig[f"{name}#heads"] = module.num_heads
    return sig


@functools.lru_cache(maxsize=32)
def _same_architecture(name: str, cls: type, frozen: tuple) -> bool:
    import timm
    import torch

    kwargs = dict(frozen)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        registered = timm.create_model(
            name, pretrained=False, num_classes=0, img_size=kwargs["img_size"]
        )
        own = cls(num_classes=0, **kwargs)
    return _signature(registered) == _signature(own)


def registered_name(encoder: nn.Module) -> str | None:
    """The encoder's ``timm_name`` if that registered timm model has exactly the encoder's
    architecture (same weights, shapes and heads), else None.

    A model config names its timm model (``vit_tiny_patch16_224`` for ``model=vit_tiny``); a
    setting changed on the command line (``model.encoder.patch_size=4``, ``depth``, widths,
    heads, MLP ratio, qkv bias, Swin window or depths) makes it another architecture, which
    :func:`timm_model` then builds from the timm class itself.
    """
    import timm

    name = getattr(encoder, "timm_name", None)
    if not name or not timm.is_model(name):
        return None
    cls, kwargs = timm_architecture(encoder)
    return name if _same_architecture(name, cls, tuple(sorted(kwargs.items()))) else None


def timm_model(encoder: nn.Module, **kwargs) -> nn.Module:
    """The timm model that :func:`encoder_state_dict` loads into with ``strict=True``: the
    registered model when it has the encoder's architecture (:func:`registered_name`), else
    timm's ``VisionTransformer`` / ``SwinTransformer`` built with the encoder's settings.

    No head unless ``kwargs`` ask for ``num_classes``; other timm keyword arguments
    (``global_pool``, ``drop_path_rate``, ...) pass through.
    """
    import timm

    kwargs = {"num_classes": 0, **kwargs}
    name = registered_name(encoder)
    if name:
        return timm.create_model(name, pretrained=False, img_size=encoder.img_size, **kwargs)
    cls, arch = timm_architecture(encoder)
    return cls(**arch, **kwargs)


def load_hint(encoder: nn.Module, path: str | Path) -> str:
    """One line of Python that builds the timm model of :func:`timm_model` and loads the
    exported file into it with ``strict=True``."""
    name = registered_name(encoder)
    if name:
        build = f"timm.create_model({name!r}, num_classes=0, img_size={int(encoder.img_size)})"
    else:
        cls, arch = timm_architecture(encoder)
        args = ", ".join(f"{k}={v!r}" for k, v in arch.items())
        build = f"timm.models.{cls.__name__}({args}, num_classes=0)"
    return (
        f"import timm, torch; model = {build}; "
        f"model.load_state_dict(torch.load({str(path)!r}), strict=True)"
    )


def load_pretrainer(checkpoint: str | Path) -> nn.Module:
    """Rebuild the pre-training model of a Lightning checkpoint written by ``lmim.train``: a
    single file, or a folder of shards (``trainer=fsdp``), read without a process group.

    Raises:
        ConfigError: the file is missing, unreadable (truncated, not a checkpoint) or not
            written by ``lmim.train``.
    """
    path = Path(checkpoint)
    if path.is_dir():  # a folder of shards (trainer=fsdp)
        return _load_sharded_pretrainer(path)
    fix = "pass a .ckpt written by python -m lmim.train (e.g. outputs/.../checkpoints/last.ckpt)"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: {fix}")
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"checkpoint {path} is not a readable checkpoint ({type(err).__name__}: {reason}); "
            f"it may be truncated (copy it again) or another kind of file: {fix}"
        ) from err
    if not isinstance(ckpt, dict) or "lmim_config" not in ckpt or "state_dict" not in ckpt:
        what = "an exported encoder (no 'state_dict')" if _looks_exported(ckpt) else "not"
        raise ConfigError(
            f"checkpoint {path} is {what} written by lmim.train (no 'lmim_config' entry): {fix}"
        )
    net = instantiate(OmegaConf.create(ckpt["lmim_config"]["model"]))
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net


def _load_sharded_pretrainer(path: Path) -> nn.Module:
    """The model of a ``torch.distributed.checkpoint`` folder (``state_dict.net.*`` entries plus
    ``meta.pt``), its shards assembled into full tensors; the optimizer state is not read."""
    import torch
    import torch.distributed.checkpoint as dcp
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lmim.resume import META_FILE

    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception as err:
        raise ConfigError(
            f"{path} is not a complete sharded checkpoint ({type(err).__name__}: {err}): pass "
            "another checkpoint (e.g. an epoch_XXXX.ckpt next to it)"
        ) from err
    if "lmim_config" not in meta:
        raise ConfigError(f"{path} was not written by lmim.train (no 'lmim_config' entry)")
    net = instantiate(OmegaConf.create(meta["lmim_config"]["model"]))
    state = net.state_dict()
    prefix = "state_dict.net."
    missing = sorted(k for k in state if prefix + k not in saved)
    unexpected = sorted(k[len(prefix) :] for k in saved if k.startswith(prefix))
    unexpected = [k for k in unexpected if k not in state]
    if missing or unexpected:
        raise ConfigError(
            f"{path} does not match the model of its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): it was written by another version of lmim"
        )
    # Loaded in place into the model's own tensors, in this process alone (no process group,
    # which dcp would otherwise warn about).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            {"state_dict": {f"net.{k}": v for k, v in state.items()}},
            checkpoint_id=path,
            no_dist=True,
        )
    net.load_state_dict(state, strict=True)
    return net


def _looks_exported(obj: Any) -> bool:
    return isinstance(obj, dict) and "patch_embed.proj.weight" in obj


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m lmim.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="Lightning checkpoint written by lmim.train (a file or a shard folder)"
    )
    parser.add_argument("--out", help="output .pth (default: <checkpoint>_timm.pth)")
    parser.add_argument("--no-verify", action="store_true", help="skip the strict timm load")
    args = parser.parse_args(argv)
    try:
        net = load_pretrainer(args.checkpoint)
    except ConfigError as err:
        fail(str(err))
    import torch

    sd = encoder_state_dict(net)
    out = (
        Path(args.out)
        if args.out
        else Path(args.checkpoint).with_name(Path(args.checkpoint).stem + "_timm.pth")
    )
    if not args.no_verify:
        timm_model(net.encoder).load_state_dict(sd, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    print(f"wrote {out} ({len(sd)} tensors); load it into timm with:")
    print(load_hint(net.encoder, out))
    return out


if __name__ == "__main__":
    main()
