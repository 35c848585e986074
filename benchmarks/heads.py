"""The decoders' rescale heads, forward + backward: channels-last on the tokens (what lmim runs,
``lmim.models.decoders.rescale_tokens``) against the heads' own NCHW modules (what lmim ran
before issue 13: the tokens transposed to a map, each transposed conv fed a contiguous input,
the map transposed back for the 1x1 projection). The heads are those of a pre-training model
(its taps' scales, decoder width and target width); the same modules and weights run both
ways. Prints the median time per call and the largest difference of the outputs. Examples:

    python benchmarks/heads.py                                   # CPU, ViT-B's heads, batch 8
    python benchmarks/heads.py --batch 256 --precision bf16      # GPU

``--json`` writes the rows to a file; ``benchmarks/gpu.py`` collects them for one GPU session.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lmim import create_pretrainer
from lmim.models.decoders import ViTLocalDecoder, rescale_tokens


def nchw_predict(dec: ViTLocalDecoder, x: torch.Tensor) -> torch.Tensor:
    """The head as it ran before: (B, L, dim) tokens -> NCHW map -> modules -> cells -> 1x1."""
    B = x.shape[0]
    if not isinstance(dec.rescale, nn.Identity):
        h, w = dec.grid_size
        x = x.transpose(1, 2).reshape(B, -1, h, w)
        for layer in dec.rescale if isinstance(dec.rescale, nn.Sequential) else [dec.rescale]:
            x = layer(x.contiguous() if isinstance(layer, nn.ConvTranspose2d) else x)
        x = x.flatten(2).transpose(1, 2)
    return F.linear(x, dec.proj.weight.flatten(1), dec.proj.bias)


def tokens_predict(dec: ViTLocalDecoder, x: torch.Tensor) -> torch.Tensor:
    """What :meth:`ViTLocalDecoder.predict` runs."""
    h, w = dec.grid_size
    x = rescale_tokens(dec.rescale, x.unflatten(1, (h, w))).flatten(1, 2)
    return F.linear(x, dec.proj.weight.flatten(1), dec.proj.bias)


def step(predict, dec: ViTLocalDecoder, x: torch.Tensor, dtype: torch.dtype | None):
    """One forward (under autocast to ``dtype``, if any) and backward of a head."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        y = predict(dec, x)
    y.float().square().mean().backward()
    return y


def median_ms(fn, steps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_b", help="a ViT config of conf/model")
    p.add_argument("--target", default="hog")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    net = create_pretrainer(args.model, args.target).to(device)
    rows = []
    for dec in net.decoders:
        if isinstance(dec.rescale, nn.Identity):  # nothing to rescale at x1
            continue
        tokens = dec.grid_size[0] * dec.grid_size[1]
        x = torch.randn(args.batch, tokens, dec.embed.out_features, device=device)
        x.requires_grad_(True)
        out, times = {}, {}
        for name, predict in (("nchw", nchw_predict), ("tokens", tokens_predict)):
            call = partial(step, predict, dec, x, dtype)
            out[name] = call().detach().float()
            times[name] = median_ms(call, args.steps, device)
        rows.append(
            {
                "scale": dec.scale,
                "batch": args.batch,
                "precision": args.precision,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "nchw ms": times["nchw"],
                "tokens ms": times["tokens"],
                "speed-up": times["nchw"] / times["tokens"],
                "max |diff|": (out["nchw"] - out["tokens"]).abs().max().item(),
            }
        )
    print("scale | batch | precision | device | NCHW ms | tokens ms | speed-up | max |diff|")
    for r in rows:
        print(
            f"x{r['scale']:g} | {r['batch']} | {r['precision']} | {r['device']} | "
            f"{r['nchw ms']:.2f} | {r['tokens ms']:.2f} | {r['speed-up']:.2f} | "
            f"{r['max |diff|']:.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
