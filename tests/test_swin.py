"""Pyramidal LocalMIM: the visible-only Swin encoder, its decoders, shapes and configs."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from torch import nn

import lmim
from lmim.errors import ConfigError
from lmim.export import encoder_state_dict, timm_model
from lmim.models import LocalMIM, MaskedSwin, SwinLocalDecoder
from lmim.models.masking import mask_indices
from lmim.targets import HOG, NormalizedPixels
from lmim.train import train
from tests.conftest import TINY, assert_loss_by_hand

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))


def unit_major_to_grid(x: torch.Tensor, units: tuple[int, int], side: int) -> torch.Tensor:
    """(B, U * s^2, C) unit-major tokens of all units -> (B, gh * s, gw * s, C) raster grid."""
    B, _, C = x.shape
    gh, gw = units
    return (
        x.reshape(B, gh, gw, side, side, C)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(B, gh * side, gw * side, C)
    )


def timm_twin(enc: MaskedSwin) -> SwinTransformer:
    """timm's SwinTransformer with the encoder's weights (the exported state dict)."""
    net = LocalMIM(enc, partial(HOG), decoder=SwinLocalDecoder, decoder_heads=2)
    ref = timm_model(enc, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ref.load_state_dict(encoder_state_dict(net), strict=True)
    return ref.eval()


def test_unmasked_equals_timm():
    """With nothing masked, every stage output equals timm's SwinTransformer (same weights)."""
    torch.manual_seed(0)
    enc = MaskedSwin(img_size=224, window_size=7, **TINY_SWIN).eval()
    ref = timm_twin(enc)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        outs = enc(x, taps=[0, 1, 2, 3])
        h = ref.patch_embed(x)
        expected = []
        for i, layer in enumerate(ref.layers):
            if i:
                h = layer.downsample(h)
                expected.append(h)
            h = layer.blocks(h)
        expected.append(h)  # = forward_features before the final norm
    assert torch.allclose(ref.layers(ref.patch_embed(x)), expected[-1])
    for out, exp, side in zip(outs, expected, enc.tap_unit_sides, strict=True):
        got = unit_major_to_grid(out, enc.mask_grid, side)
        assert got.shape == exp.shape
        assert (got - exp).abs().max() < 1e-5


def dense_reference(enc: MaskedSwin, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Slow reference on the full grid: timm's own windows, shifts, region masks and relative
    positions, with masked tokens excluded as keys through the attention mask. Returns every
    stage output (after merging) as a (B, H, W, C) grid."""
    twin = timm_twin(enc)  # timm's blocks: their region masks of shifted windows
    h = enc.patch_embed(x)
    B, H, W, _ = h.shape
    gh, gw = enc.mask_grid
    outs = []
    for i, (layer, timm_layer) in enumerate(zip(enc.layers, twin.layers, strict=True)):
        if i:
            h = layer.downsample(h)
            outs.append(h)
        B, H, W, C = h.shape
        visible = (~mask).float().reshape(B, 1, gh, gw)
        visible = F.interpolate(visible, size=(H, W), mode="nearest")[:, 0, :, :, None]
        for blk, timm_blk in zip(layer.blocks, timm_layer.blocks, strict=True):
            ws, sh = blk.window_size, blk.shift_size
            a = blk.attn
            y = torch.roll(blk.norm1(h), (-sh[0], -sh[1]), dims=(1, 2))
            vis = torch.roll(visible, (-sh[0], -sh[1]), dims=(1, 2))
            yw = window_partition(y, ws).reshape(-1, ws[0] * ws[1], C)
            vw = window_partition(vis, ws).reshape(-1, 1, 1, ws[0] * ws[1])
            n_win = yw.shape[0] // B
            qkv = a.qkv(yw).reshape(yw.shape[0], -1, 3, a.num_heads, C // a.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            logits = (q * a.scale) @ k.transpose(-2, -1) + a._get_rel_pos_bias()
            if timm_blk.attn_mask is not None:  # timm's region mask of shifted windows
                logits = logits + timm_blk.attn_mask.repeat(B, 1, 1).unsqueeze(1)
            logits = logits.masked_fill(vw == 0, -1e4)  # masked tokens are no keys
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(yw.shape[0], -1, C)
            o = window_reverse(a.proj(o).reshape(-1, *ws, C), ws, H, W)
            assert n_win * B == yw.shape[0]
            h = h + torch.roll(o, sh, dims=(1, 2))
            h = h + blk.mlp(blk.norm2(h))
    outs.append(h)
    return outs


@pytest.mark.parametrize(("img_size", "window"), [(64, 4), (128, 4)])
@pytest.mark.parametrize("share", [True, False])
def test_masked_equals_dense_reference(img_size, window, share):
    """Each visible token's output at every stage equals the full-grid reference in which the
    masked tokens are excluded from attention (windows, shifts, merges, relative positions)."""
    torch.manual_seed(1)
    enc = MaskedSwin(img_size=img_size, window_size=window, **TINY_SWIN).eval()
    net = LocalMIM(
        enc,
        partial(HOG),
        decoder=SwinLocalDecoder,
        decoder_heads=2,
        mask_ratio=0.5,
        share_mask=share,
    )
    x = torch.randn(3, 3, img_size, img_size)
    mask = net.random_mask(3)
    ids_keep, _ = mask_indices(mask[:1] if share else mask)
    with torch.no_grad():
        outs = enc(x, mask, taps=[0, 1, 2, 3], ids_keep=ids_keep)
        ref = dense_reference(enc, x, mask)
    gh, gw = enc.mask_grid
    for out, grid, side in zip(outs, ref, enc.tap_unit_sides, strict=True):
        B, _, _, C = grid.shape
        units = grid.reshape(B, gh, side, gw, side, C).permute(0, 1, 3, 2, 4, 5)
        units = units.reshape(B, gh * gw, side * side, C)
        keep = mask_indices(mask)[0]
        expected = units.gather(1, keep[:, :, None, None].expand(-1, -1, side * side, C))
        assert (out.reshape_as(expected) - expected).abs().max() < 1e-4


@pytest.fixture(scope="module")
def swin_b() -> LocalMIM:
    """model=swin_b with its paper target (HOG-18 + bias), built once for this module."""
    torch.manual_seed(0)
    return lmim.create_pretrainer("swin_b")


def test_released_parameter_counts(swin_b):
    """Swin-B window 7: 87,761,872 trainable parameters with HOG-18 + bias, 88,641,592 with
    pixel targets, as the released models."""
    assert sum(p.numel() for p in swin_b.parameters() if p.requires_grad) == 87_761_872
    with torch.device("meta"):  # counting needs no weights
        pixel = lmim.create_pretrainer("swin_b", "pixel")
    assert sum(p.numel() for p in pixel.parameters() if p.requires_grad) == 88_641_592


def test_swin_defaults_are_the_papers(swin_b):
    """model=swin_b: HOG-18 with bias, stage taps at 8/16/32/32-px cells, 37 of 49 units
    masked, decoders 64/128/128/128 wide with 4 heads."""
    net = swin_b
    assert isinstance(net.target, HOG) and net.target.nbins == 18 and net.target.bias is not None
    assert net.taps == [0, 1, 2, 3] and net.cell_sizes == [8, 16, 32, 32]
    assert net.grids == [(28, 28), (14, 14), (7, 7), (7, 7)]
    assert [d.embed.out_features for d in net.decoders] == [64, 128, 128, 128]
    assert all(d.blocks[0].attn.num_heads == 4 for d in net.decoders)
    mask = net.random_mask(4)
    assert (mask.sum(1) == 37).all() and (~mask).sum(1).eq(12).all()
    assert (mask == mask[:1]).all()  # one mask for the batch (share_mask: true)
    assert [b.window_size for b in net.encoder.layers[3].blocks] == [(7, 7), (7, 7)]
    assert [b.shift_size for b in net.encoder.layers[2].blocks[:2]] == [(0, 0), (3, 3)]


@pytest.mark.parametrize("img_size", [192, 224, 256])
@pytest.mark.parametrize("target", ["hog18", "pixel"])
def test_tap_shapes(img_size, target):
    """Every tap's prediction matches its target at 192, 224 and 256 (grids from the encoder):
    the targets are the target module's on the same images, and the loss is the masked MSE
    between the two, weighted by the unit mask."""
    torch.manual_seed(0)
    net = lmim.create_pretrainer("swin_test", target, img_size=img_size)
    g = img_size // 32
    x = torch.randn(2, 3, img_size, img_size)
    out = net(x)
    grids = [4 * g, 2 * g, g, g]
    dims = [54] * 4 if target == "hog18" else [192, 768, 3072, 3072]
    for pred, tgt, side, dim in zip(out.preds, out.targets, grids, dims, strict=True):
        assert pred.shape == tgt.shape == (2, side * side, dim)
    for got, expected in zip(out.targets, net.target(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert out.grids == [(s, s) for s in grids]
    assert_loss_by_hand(out, (g, g))


def test_per_sample_masks():
    """share_mask=false draws one mask per sample, and the forward uses each: every sample's
    cell weights follow its own mask, and the loss is the masked MSE under those weights."""
    net = lmim.create_pretrainer("swin_test", img_size=128, share_mask=False)
    mask = net.random_mask(6)
    assert (mask.sum(1) == 12).all() and not (mask == mask[:1]).all()
    torch.manual_seed(3)
    out = net(torch.randn(6, 3, 128, 128))
    assert (out.mask.sum(1) == 12).all() and len({tuple(m.tolist()) for m in out.mask}) > 1
    assert_loss_by_hand(out, (4, 4))


def test_isolated_stages():
    """With gradient isolation, stage 1's loss reaches only stage 1 (and its merge)."""
    net = lmim.create_pretrainer("swin_test", schedule="isolated", img_size=64)
    out = net(torch.randn(2, 3, 64, 64))
    out.losses["stage1"].backward()
    reached = {
        ".".join(n.split(".")[1:3])
        for n, p in net.encoder.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0 and n.startswith("layers.")
    }
    assert reached == {"0.blocks", "1.downsample"}  # stage-1 blocks + the merge that ends it
    assert all(
        p.grad is None
        for n, p in net.encoder.named_parameters()
        if n.startswith("layers.1.blocks") or n.startswith("layers.2")
    )


def test_bad_swin_inputs():
    """Image sizes off the 32-px unit grid and scales off the stage grids are refused."""
    with pytest.raises(ConfigError, match="data.img_size=200"):
        MaskedSwin(img_size=200, **TINY_SWIN)
    with pytest.raises(ConfigError, match="schedule.scales"):
        LocalMIM(
            MaskedSwin(img_size=64, **TINY_SWIN),
            partial(NormalizedPixels),
            decoder=SwinLocalDecoder,
            scales=[4, 2, 1, 0.5],
            decoder_heads=2,
        )


def test_export_loads_into_timm(swin_b):
    """The Swin-B encoder loads into timm's swin_base_patch4_window7_224 with strict=True."""
    import timm

    model = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0)
    model.load_state_dict(encoder_state_dict(swin_b), strict=True)
    torch.testing.assert_close(
        model.layers[2].blocks[5].mlp.fc1.weight, swin_b.encoder.layers[2].blocks[5].mlp.fc1.weight
    )


def test_fast_dev_run_swin(make_cfg):
    """One batch through the composed config with a tiny Swin."""
    cfg = make_cfg(
        [*[o for o in TINY if not o.startswith("model=")], "model=swin_test", "debug=fdr"]
    )
    result = train(cfg)
    stages = [result["metrics"][f"train/loss_stage{i}"] for i in (1, 2, 3, 4)]
    assert result["metrics"]["train/loss"] == pytest.approx(sum(stages), rel=1e-6)


def test_given_per_sample_mask_with_share_mask():
    """A per-sample mask passed explicitly is used as is, even when the model shares its own
    random masks across the batch."""
    net = lmim.create_pretrainer("swin_test", img_size=64).eval()
    assert net.share_mask
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    with torch.no_grad():
        both = net(x, mask)
        first = net(x[:1], mask[:1])
        second = net(x[1:], mask[1:])
    for k in range(4):
        assert torch.allclose(both.preds[k][:1], first.preds[k], atol=1e-5)
        assert torch.allclose(both.preds[k][1:], second.preds[k], atol=1e-5)
