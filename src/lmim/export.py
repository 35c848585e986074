"""Export a pre-trained encoder as a timm VisionTransformer / SwinTransformer state dict.

    python -m lmim.export outputs/.../checkpoints/last.ckpt --out vit_b_localmim.pth

(``last.ckpt`` is a file, or a folder of shards under ``trainer=fsdp``; both are read.)

then ``timm.create_model("vit_base_patch16_224", num_classes=0).load_state_dict(torch.load(...))``
loads it with ``strict=True``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lmim.errors import ConfigError


def encoder_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm names (``VisionTransformer`` / ``SwinTransformer``).

    timm's models end with a LayerNorm (``norm``) that LocalMIM does not have; each tap has its
    own LayerNorm instead. When the top layer is tapped (the default schedule), its tap norm is
    exported as ``norm``, since it is the norm trained on the final features; otherwise ``norm``
    is the identity (weight 1, bias 0).
    """
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


def timm_model(encoder: nn.Module, **kwargs) -> nn.Module:
    """The timm model that :func:`encoder_state_dict` loads into (no head unless ``kwargs``
    ask for ``num_classes``; other timm keyword arguments pass through)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {"num_classes": 0, **kwargs}
    if encoder.timm_name:
        return timm.create_model(
            encoder.timm_name, pretrained=False, img_size=encoder.img_size, **kwargs
        )
    common = dict(
        img_size=encoder.img_size,
        patch_size=encoder.patch_size,
        embed_dim=encoder.embed_dim,
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_ratio,
        qkv_bias=encoder.qkv_bias,
        **kwargs,
    )
    if hasattr(encoder, "depths"):  # pyramid
        return SwinTransformer(depths=encoder.depths, window_size=encoder.window_size, **common)
    return VisionTransformer(depth=encoder.depth, **common)


def load_pretrainer(checkpoint: str | Path) -> nn.Module:
    """Rebuild the pre-training model of a Lightning checkpoint written by ``lmim.train``: a
    single file, or a folder of shards (``trainer=fsdp``), read without a process group."""
    path = Path(checkpoint)
    if path.is_dir():
        return _load_sharded_pretrainer(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "lmim_config" not in ckpt:
        raise ConfigError(f"{path} was not written by lmim.train (no 'lmim_config' entry)")
    net = instantiate(OmegaConf.create(ckpt["lmim_config"]["model"]))
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net


def _load_sharded_pretrainer(path: Path) -> nn.Module:
    """The model of a ``torch.distributed.checkpoint`` folder (``state_dict.net.*`` entries plus
    ``meta.pt``), its shards assembled into full tensors; the optimizer state is not read."""
    import torch.distributed.checkpoint as dcp

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
        print(f"lmim.export: error: {err}", file=sys.stderr)
        sys.exit(2)
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
    name = net.encoder.timm_name or type(timm_model(net.encoder)).__name__ + "(...)"
    print(
        f"wrote {out} ({len(sd)} tensors); load with timm.create_model('{name}', "
        f"num_classes=0, img_size={net.encoder.img_size}).load_state_dict(torch.load('{out}'))"
    )
    return out


if __name__ == "__main__":
    main()
