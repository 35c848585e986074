"""Export a pre-trained encoder as a timm VisionTransformer / SwinTransformer state dict.

    python -m lmim.export outputs/.../checkpoints/last.ckpt --out vit_b_localmim.pth

then ``timm.create_model("vit_base_patch16_224", num_classes=0).load_state_dict(torch.load(...))``
loads it with ``strict=True``.
"""

from __future__ import annotations

import argparse
import sys
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
    """Rebuild the pre-training model of a Lightning checkpoint written by ``lmim.train``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "lmim_config" not in ckpt:
        raise ConfigError(f"{path} was not written by lmim.train (no 'lmim_config' entry)")
    net = instantiate(OmegaConf.create(ckpt["lmim_config"]["model"]))
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m lmim.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint written by lmim.train")
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
