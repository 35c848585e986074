"""Tests of the encoder, masking, position embeddings, local decoders and the LocalMIM model."""

from __future__ import annotations

import math
from functools import partial

import pytest
import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

import lmim
from lmim.errors import ConfigError
from lmim.export import encoder_state_dict, timm_model
from lmim.models import LocalMIM, MaskedViT, ViTLocalDecoder
from lmim.models.masking import mask_indices, random_mask
from lmim.models.pos_embed import sincos_2d
from lmim.targets import HOG
from tests.conftest import assert_loss_by_hand

HOG9 = partial(HOG, nbins=9)


def small_vit(**kwargs) -> MaskedViT:
    """A tiny MaskedViT (64 px, 16-px patches, width 64, 4 blocks)."""
    cfg = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, timm_name=None)
    cfg.update(kwargs)
    return MaskedViT(**cfg)


def small_localmim(**kwargs) -> LocalMIM:
    """LocalMIM on :func:`small_vit` tapping every block at scales 4, 2, 1, 0.5."""
    torch.manual_seed(0)
    cfg = dict(taps=(0, 1, 2, 3), scales=(4, 2, 1, 0.5), decoder_dim=32, decoder_heads=2)
    cfg.update(kwargs)
    return LocalMIM(small_vit(), HOG9, **cfg)


@pytest.fixture(scope="module")
def vit_b() -> LocalMIM:
    torch.manual_seed(0)
    return lmim.create_pretrainer("vit_b", "hog")


@pytest.fixture(scope="module")
def vit_test() -> LocalMIM:
    torch.manual_seed(0)
    return lmim.create_pretrainer("vit_test", "hog", img_size=64)


# ---------------------------------------------------------------------------------------------
# ViT-B/16 pretrainer
# ---------------------------------------------------------------------------------------------


def test_vit_b_prediction_shapes(vit_b: LocalMIM) -> None:
    """ViT-B/16 + HOG-9 at 224 predicts 56^2, 28^2, 14^2, 7^2 cells of 27 dims."""
    torch.manual_seed(0)
    assert vit_b.taps == [1, 3, 9, 11]
    assert vit_b.cell_sizes == [4, 8, 16, 32]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = vit_b(x)
        targets = vit_b.target(x)
    shapes = [(1, n, 27) for n in (3136, 784, 196, 49)]
    assert [tuple(p.shape) for p in out.preds] == shapes
    assert [tuple(t.shape) for t in out.targets] == shapes
    assert [tuple(w.shape) for w in out.weights] == [s[:2] for s in shapes]
    assert int(out.mask.sum()) == 196 - 49
    for got, expected in zip(out.targets, targets, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the loss: per tap the masked MSE (7^2 cells weigh their masked share), summed
    assert_loss_by_hand(out, (14, 14))


def test_vit_b_trainable_parameter_count(vit_b: LocalMIM) -> None:
    """ViT-B/16 LocalMIM with HOG-9 has exactly 89,916,140 trainable parameters."""
    assert sum(p.numel() for p in vit_b.parameters() if p.requires_grad) == 89_916_140
    # the fixed sin-cos embeddings and HOG kernels are buffers, not parameters
    names = {n for n, _ in vit_b.named_parameters()}
    assert "encoder.pos_embed" not in names
    assert not any(n.startswith("target.") for n in names)


def test_vit_b_export_loads_into_timm(vit_b: LocalMIM) -> None:
    """encoder_state_dict loads strictly into timm's vit_base_patch16_224; norm = top tap's LN."""
    torch.manual_seed(0)
    with torch.no_grad():  # make every tap norm distinct from the identity and from each other
        for norm in vit_b.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    sd = encoder_state_dict(vit_b)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model.load_state_dict(sd, strict=True)
    top = vit_b.taps.index(11)
    torch.testing.assert_close(model.norm.weight, vit_b.norms[top].weight)
    torch.testing.assert_close(model.norm.bias, vit_b.norms[top].bias)
    assert not torch.allclose(model.norm.weight, vit_b.norms[0].weight)
    torch.testing.assert_close(model.pos_embed, vit_b.encoder.pos_embed)
    torch.testing.assert_close(
        model.blocks[5].mlp.fc1.weight, vit_b.encoder.blocks[5].mlp.fc1.weight
    )


# ---------------------------------------------------------------------------------------------
# Position embedding
# ---------------------------------------------------------------------------------------------


def test_sincos_2d_layout() -> None:
    """Columns in the first half, rows in the second, each [sin..., cos...]; zero cls row."""
    dim, rows, cols = 16, 3, 5
    emb = sincos_2d(dim, (rows, cols), cls_token=True)
    assert tuple(emb.shape) == (1, 1 + rows * cols, dim)
    assert emb.dtype == torch.float32
    assert emb[0, 0].abs().max().item() == 0.0
    quarter = dim // 4  # E' = dim / 2 per axis, E'/2 frequencies
    for r in range(rows):
        for c in range(cols):
            expected = []
            for pos in (c, r):
                omegas = [10000 ** (-i / quarter) for i in range(quarter)]
                expected += [math.sin(pos * w) for w in omegas]
                expected += [math.cos(pos * w) for w in omegas]
            torch.testing.assert_close(emb[0, 1 + r * cols + c], torch.tensor(expected))
    no_cls = sincos_2d(dim, (rows, cols))
    torch.testing.assert_close(no_cls, emb[:, 1:])


def test_sincos_2d_spot_values() -> None:
    """Two hand-computed entries of the 256-wide decoder embedding on a 14 x 14 grid."""
    emb = sincos_2d(256, (14, 14))
    token = 2 * 14 + 5  # row 2, column 5
    # channel 1: sin(col * 10000^(-1/64)); channel 128 + 64 + 3: cos(row * 10000^(-3/64))
    assert emb[0, token, 1].item() == pytest.approx(math.sin(5 * 10000 ** (-1 / 64)), abs=1e-6)
    assert emb[0, token, 195].item() == pytest.approx(math.cos(2 * 10000 ** (-3 / 64)), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


def test_random_mask_counts_and_variety() -> None:
    """Each row keeps exactly int(L (1 - r)) patches and rows differ."""
    torch.manual_seed(0)
    for L, r in [(196, 0.75), (16, 0.6), (49, 0.5)]:
        mask = random_mask(8, L, r)
        assert mask.dtype == torch.bool and tuple(mask.shape) == (8, L)
        assert ((~mask).sum(1) == int(L * (1 - r))).all()
        assert len({tuple(row.tolist()) for row in mask}) == 8


def test_mask_indices_round_trip() -> None:
    """Gathering with ids_keep then restoring with ids_restore gives raster order back."""
    torch.manual_seed(0)
    B, L, D = 4, 16, 3
    mask = random_mask(B, L, 0.75)
    ids_keep, ids_restore = mask_indices(mask)
    for b in range(B):
        assert ids_keep[b].tolist() == [i for i in range(L) if not mask[b, i]]
    tokens = torch.arange(B * L * D, dtype=torch.float32).reshape(B, L, D)
    visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    seq = torch.cat([visible, torch.full((B, L - visible.shape[1], D), -1.0)], dim=1)
    restored = seq.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    expected = torch.where(mask.unsqueeze(-1), torch.full_like(tokens, -1.0), tokens)
    torch.testing.assert_close(restored, expected)
    # an integer 0/1 mask means the same
    keep2, restore2 = mask_indices(mask.long())
    assert torch.equal(keep2, ids_keep) and torch.equal(restore2, ids_restore)


def test_given_mask_is_used_as_is() -> None:
    """A given mask comes back unchanged; predictions ignore pixels of masked patches only."""
    net = small_localmim().eval()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 1, 2, 5, 7, 8, 9, 10, 11, 12, 14, 15]] = True
    mask[1, [1, 2, 3, 4, 5, 6, 8, 9, 10, 13, 14, 15]] = True
    with torch.no_grad():
        out = net(images, mask)
        assert torch.equal(out.mask, mask)
        torch.testing.assert_close(out.weights[2], mask.float())  # the x1 tap
        # patch 0 is masked in sample 0: changing its pixels leaves every prediction unchanged
        edited = images.clone()
        edited[0, :, :16, :16] += 5.0
        same = net(edited, mask)
        for a, b in zip(out.preds, same.preds, strict=True):
            torch.testing.assert_close(a, b)
        # patch 3 is visible in sample 0: changing it changes sample 0's predictions
        edited = images.clone()
        edited[0, :, :16, 48:] += 5.0
        other = net(edited, mask)
        for a, b in zip(out.preds, other.preds, strict=True):
            assert not torch.allclose(a[0], b[0])
            torch.testing.assert_close(a[1], b[1])


def test_unequal_mask_rows_raise() -> None:
    """A mask hiding a different number of patches per sample raises ConfigError."""
    net = small_localmim()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, :11] = True
    with pytest.raises(ConfigError, match="same number"):
        net(torch.randn(2, 3, 64, 64), mask)
    with pytest.raises(ConfigError):
        mask_indices(mask)


# ---------------------------------------------------------------------------------------------
# Encoder vs timm
# ---------------------------------------------------------------------------------------------


def _timm_copy(net: LocalMIM) -> nn.Module:
    model = timm_model(net.encoder)
    model.load_state_dict(encoder_state_dict(net), strict=True)
    return model.eval()


def test_encoder_equals_timm_without_mask() -> None:
    """With mask=None the last block's output equals timm's blocks output (before its norm)."""
    net = small_localmim().eval()
    model = _timm_copy(net)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (ours,) = net.encoder(images)
        x = model._pos_embed(model.patch_embed(images))
        ref = model.blocks(model.norm_pre(model.patch_drop(x)))
        taps = net.encoder(images, None, [0, 2])
        ref0 = model.blocks[0](model.norm_pre(model.patch_drop(x)))
    assert tuple(ours.shape) == (2, 17, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(taps[0], ref0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(taps[1], model.blocks[:3](x), atol=1e-5, rtol=1e-5)


def test_encoder_with_mask_equals_timm_on_visible_tokens() -> None:
    """With a mask the encoder equals timm's blocks on [cls, visible tokens] (pos added first)."""
    net = small_localmim().eval()
    model = _timm_copy(net)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 16, 0.75)
    with torch.no_grad():
        (ours,) = net.encoder(images, mask)
        tokens = model.patch_embed(images) + model.pos_embed[:, 1:]
        ref = []
        for b in range(2):
            vis = tokens[b, ~mask[b]]  # raster order
            cls = model.cls_token[0] + model.pos_embed[0, :1]
            ref.append(model.blocks(torch.cat([cls, vis])[None])[0])
    torch.testing.assert_close(ours, torch.stack(ref), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Decoder heads
# ---------------------------------------------------------------------------------------------


def test_decoder_heads_structure() -> None:
    """x4: ConvT-LN2d-GELU-ConvT; x2: one ConvT; x1: identity; x0.5: AvgPool(2); then 1x1 conv."""
    kw = dict(in_dim=64, out_dim=27, grid_size=(14, 14), dim=256, num_heads=8)
    d4 = ViTLocalDecoder(scale=4, **kw)
    types = [type(m) for m in d4.rescale]
    assert types == [nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert (d4.rescale[0].in_channels, d4.rescale[0].out_channels) == (256, 128)
    assert (d4.rescale[3].in_channels, d4.rescale[3].out_channels) == (128, 64)
    assert d4.rescale[0].kernel_size == (2, 2) and d4.rescale[0].stride == (2, 2)
    assert d4.rescale[1].normalized_shape == (128,) and d4.rescale[1].eps == 1e-6

    d2 = ViTLocalDecoder(scale=2, **kw)
    assert [type(m) for m in d2.rescale] == [nn.ConvTranspose2d]
    assert (d2.rescale[0].in_channels, d2.rescale[0].out_channels) == (256, 128)

    d1 = ViTLocalDecoder(scale=1, **kw)
    assert isinstance(d1.rescale, nn.Identity)

    dh = ViTLocalDecoder(scale=0.5, **kw)
    assert isinstance(dh.rescale, nn.AvgPool2d)
    assert dh.rescale.kernel_size == 2 and dh.rescale.stride == 2

    for dec, ch, grid in [(d4, 64, 56), (d2, 128, 28), (d1, 256, 14), (dh, 256, 7)]:
        assert isinstance(dec.proj, nn.Conv2d)
        assert dec.proj.kernel_size == (1, 1)
        assert (dec.proj.in_channels, dec.proj.out_channels) == (ch, 27)
        assert dec.out_grid == (grid, grid)
        assert len(dec.blocks) == 1 and dec.blocks[0].attn.qkv.bias is not None
        assert dec.blocks[0].attn.num_heads == 8


@pytest.mark.parametrize("scale", [8, 4, 2, 1, 0.5, 0.25])
def test_rescale_heads_run_channels_last_as_their_modules_compute(scale: float) -> None:
    """``rescale_tokens`` (the decoders' channels-last head: Linear + pixel shuffle for each
    transposed conv) computes what the head's own NCHW modules compute, and the same gradients
    for the input and every weight, to float32 rounding."""
    from lmim.models.decoders import rescale_head, rescale_tokens

    torch.manual_seed(0)
    head, _ = rescale_head(32, scale)
    with torch.no_grad():  # norms off their init
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 8, 8, 32, requires_grad=True)  # (B, h, w, C)
    got = rescale_tokens(head, x)
    want = head(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = [x, *head.parameters()]
    cot = torch.randn_like(want)
    (want * cot).sum().backward()
    grads = [w.grad for w in weights]
    for w in weights:
        w.grad = None
    (got * cot).sum().backward()
    for g, w in zip(grads, weights, strict=True):
        torch.testing.assert_close(w.grad, g, rtol=1e-4, atol=1e-5)
        assert w.grad.stride() == w.stride()  # the weight's own layout


def test_decoder_forward_shape() -> None:
    """A decoder maps (B, 1 + V, in_dim) to (B, grid^2 * s^2, out_dim)."""
    torch.manual_seed(0)
    dec = ViTLocalDecoder(in_dim=64, out_dim=27, grid_size=(4, 4), scale=4, dim=32, num_heads=2)
    mask = random_mask(3, 16, 0.75)
    _, ids_restore = mask_indices(mask)
    out = dec(torch.randn(3, 1 + 4, 64), ids_restore)
    assert tuple(out.shape) == (3, 16 * 16, 27)


def test_decoder_puts_tokens_back_in_raster_order() -> None:
    """With the transformer, norm and head made identities, visible tokens land at their raster
    positions and every masked position holds the mask token (pos-embed removed)."""
    torch.manual_seed(0)
    dim, grid = 8, (3, 4)
    dec = ViTLocalDecoder(in_dim=dim, out_dim=dim, grid_size=grid, scale=1, dim=dim, num_heads=2)
    with torch.no_grad():
        dec.embed.weight.copy_(torch.eye(dim))
        dec.embed.bias.zero_()
        dec.proj.weight.copy_(torch.eye(dim).view(dim, dim, 1, 1))
        dec.proj.bias.zero_()
    dec.blocks = nn.Sequential()
    dec.norm = nn.Identity()
    mask = torch.tensor(
        [[1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]]
    )
    _, ids_restore = mask_indices(mask)
    visible = [[i for i in range(12) if not mask[b, i]] for b in range(2)]
    tokens = torch.randn(2, 1 + 3, dim)
    with torch.no_grad():
        out = dec(tokens, ids_restore) - sincos_2d(dim, grid)
    for b in range(2):
        for i in range(12):
            want = tokens[b, 1 + visible[b].index(i)] if i in visible[b] else dec.mask_token[0, 0]
            torch.testing.assert_close(out[b, i], want, atol=1e-6, rtol=0)


def test_export_without_top_tap_uses_identity_norm() -> None:
    """When the top block is not tapped, the exported norm is the identity (1, 0)."""
    net = LocalMIM(small_vit(), HOG9, taps=(0, 1), scales=(2, 1), decoder_dim=32, decoder_heads=2)
    with torch.no_grad():
        for norm in net.norms:
            norm.weight.fill_(2.0)
    sd = encoder_state_dict(net)
    assert torch.equal(sd["norm.weight"], torch.ones(64))
    assert torch.equal(sd["norm.bias"], torch.zeros(64))
    timm_model(net.encoder).load_state_dict(sd, strict=True)


def test_patch14_grids_and_shapes() -> None:
    """A patch-14 encoder at 224 (ViT-H/14 geometry) gives grids 64, 32, 16, 8 matching targets."""
    torch.manual_seed(0)
    enc = small_vit(img_size=224, patch_size=14)
    net = LocalMIM(enc, HOG9, taps=(0, 1, 2, 3), decoder_dim=32, decoder_heads=2)
    assert net.grids == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert net.cell_sizes == [3.5, 7, 14, 28]
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    shapes = [(1, n * n, 27) for n in (64, 32, 16, 8)]
    assert [tuple(t.shape) for t in out.targets] == shapes
    assert [tuple(p.shape) for p in out.preds] == shapes
    assert int(out.mask.sum()) == 256 - 64


# ---------------------------------------------------------------------------------------------
# Gradient isolation
# ---------------------------------------------------------------------------------------------


def _grad_blocks(net: LocalMIM) -> set[int]:
    """Encoder blocks with a non-zero gradient."""
    out = set()
    for i, block in enumerate(net.encoder.blocks):
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if grads and any(g.abs().sum() > 0 for g in grads):
            out.add(i)
    return out


def _stem_has_grad(net: LocalMIM) -> bool:
    enc = net.encoder
    params = [enc.cls_token, *enc.patch_embed.parameters()]
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("how", ["schedule", "option"])
def test_isolated_gradients(how: str) -> None:
    """Isolated: tap k's loss trains only the blocks between tap k-1 and tap k (+ stem for k=0)."""
    torch.manual_seed(0)
    if how == "schedule":
        net = lmim.create_pretrainer("vit_test", "hog", schedule="isolated", img_size=64)
    else:
        net = lmim.create_pretrainer("vit_test", "hog", isolate_gradients=True, img_size=64)
    assert net.isolate_gradients and net.taps == [1, 3, 5, 7]
    images = torch.randn(2, 3, 64, 64)
    names = net.tap_names
    out = net(images)
    out.losses[names[0]].backward()
    assert _grad_blocks(net) == {0, 1}
    assert _stem_has_grad(net)
    net.zero_grad(set_to_none=True)
    out = net(images)
    out.losses[names[1]].backward()
    assert _grad_blocks(net) == {2, 3}
    assert not _stem_has_grad(net)
    net.zero_grad(set_to_none=True)
    out = net(images)
    out.losses[names[3]].backward()
    assert _grad_blocks(net) == {6, 7}


def test_grad_checkpointing_gives_the_same_step() -> None:
    """Activation checkpointing (``model.encoder.grad_checkpointing``) recomputes the blocks in
    the backward, drop-path draws included: the same loss and the same gradients, bitwise."""

    def step(checkpointing: bool):
        torch.manual_seed(0)
        net = LocalMIM(
            small_vit(drop_path_rate=0.3),
            HOG9,
            taps=(0, 1, 2, 3),
            decoder_dim=32,
            decoder_heads=2,
            scales=(4, 2, 1, 0.5),
        )
        net.encoder.set_grad_checkpointing(checkpointing)
        net.train()
        torch.manual_seed(1)
        out = net(torch.randn(2, 3, 64, 64))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    loss, grads = step(False)
    loss_ckpt, grads_ckpt = step(True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    assert all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


@pytest.mark.parametrize(
    "options",
    [{}, {"share_mask": True, "decoder_depth": 2}, {"autocast": True}],
    ids=["per-sample-masks", "shared-mask-2-blocks", "bf16-autocast"],
)
def test_batched_decoders_compute_the_per_tap_step(options: dict) -> None:
    """``model.batch_decoders``: the decoders' blocks run as one batched block over the taps,
    on the decoders' own parameters (one state dict for both paths). The predictions, the loss
    and every gradient are the per-tap path's to rounding, on per-sample and shared masks, with
    two blocks per decoder and under bf16 autocast (every parameter moved off its init, so
    that each tap's norms and biases differ)."""
    options = dict(options)
    autocast = options.pop("autocast", False)
    runs = {}
    for batched in (False, True):
        net = small_localmim(batch_decoders=batched, **options)
        with torch.no_grad():  # norms and biases off their init, so that each tap's own count
            noise = torch.Generator().manual_seed(3)
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=noise))
        torch.manual_seed(1)
        images = torch.randn(3, 3, 64, 64)
        mask = net.random_mask(3, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(images, mask)
        out.loss.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        runs[batched] = (net.state_dict(), out, grads)
    (state, ref, ref_grads), (state_b, got, grads) = runs[False], runs[True]
    assert state.keys() == state_b.keys()
    assert all(torch.equal(state[k], state_b[k]) for k in state)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(ref.preds, got.preds, strict=True):
        torch.testing.assert_close(b, a, **tol)
    torch.testing.assert_close(got.loss, ref.loss, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(net.parameters()))
    for n, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert ((grads[n] - g).abs().max() / scale) < (3e-2 if autocast else 1e-4), n


def test_batched_decoders_refused_where_they_are_not_alike() -> None:
    """``model.batch_decoders=true`` on decoders of different widths, on one decoder (MAE) or
    on Swin's decoders: a ConfigError naming the key and the fix."""
    with pytest.raises(ConfigError, match=r"model.decoder_dim is 16 at tap 1 and 32 at tap 0"):
        small_localmim(batch_decoders=True, decoder_dim=[32, 16, 32, 32])
    with pytest.raises(ConfigError, match="this model has 1: use model.batch_decoders=false"):
        lmim.create_pretrainer("vit_test", method="mae", batch_decoders=True)
    with pytest.raises(ConfigError, match="this model's are SwinLocalDecoder"):
        lmim.create_pretrainer("swin_test", img_size=64, batch_decoders=True)


def test_swin_grad_checkpointing_gives_the_same_step() -> None:
    """The same for Swin's blocks (window plans passed through the recomputation)."""

    def step(checkpointing: bool):
        torch.manual_seed(0)
        net = lmim.create_pretrainer("swin_test", "hog", img_size=64, drop_path_rate=0.2)
        net.encoder.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = net(torch.randn(2, 3, 64, 64))
        out.loss.backward()
        return out.loss.detach(), {
            n: p.grad for n, p in net.named_parameters() if p.grad is not None
        }

    loss, grads = step(False)
    loss_ckpt, grads_ckpt = step(True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and grads
    assert all(torch.equal(grads[n], grads_ckpt[n]) for n in grads)


def test_non_isolated_top_loss_reaches_block_0(vit_test: LocalMIM) -> None:
    """Without isolation the top tap's loss back-propagates through every block to the stem."""
    torch.manual_seed(0)
    assert not vit_test.isolate_gradients
    vit_test.zero_grad(set_to_none=True)
    out = vit_test(torch.randn(2, 3, 64, 64))
    out.losses[vit_test.tap_names[-1]].backward()
    assert _grad_blocks(vit_test) == set(range(8))
    assert _stem_has_grad(vit_test)
    vit_test.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


def test_img_size_not_divisible_by_patch() -> None:
    """img_size 100 with 16-px patches names data.img_size."""
    with pytest.raises(ConfigError, match=r"data\.img_size"):
        MaskedViT(img_size=100, patch_size=16, embed_dim=64, depth=2, num_heads=2)


@pytest.mark.parametrize("taps", [(1, 4), (-5, 3), (1, 1), (3, 1)])
def test_bad_taps(taps: tuple[int, ...]) -> None:
    """Taps outside the 4 blocks, repeated or descending name schedule.taps."""
    with pytest.raises(ConfigError, match=r"schedule\.taps"):
        LocalMIM(small_vit(), HOG9, taps=taps, scales=(1, 1))


@pytest.mark.parametrize("scales", [(1, 0.25), (3, 1), (1, 0), (1.5, 1)])
def test_bad_scales(scales: tuple[float, ...]) -> None:
    """0.25 on a 6x6 grid (non-integer grid) and non-powers of two name schedule.scales."""
    enc = small_vit(img_size=96)  # 6 x 6 patches
    with pytest.raises(ConfigError, match=r"schedule\.scales"):
        LocalMIM(enc, HOG9, taps=(1, 3), scales=scales)


def test_quarter_scale_on_divisible_grid_is_fine() -> None:
    """Scale 0.25 is accepted where the grid divides (8 x 8 patches -> 2 x 2)."""
    net = LocalMIM(small_vit(img_size=128), HOG9, taps=(1, 3), scales=(1, 0.25), decoder_dim=32)
    assert net.grids == [(8, 8), (2, 2)]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_bad_mask_ratio(ratio: float) -> None:
    """Mask ratios outside (0, 1) name model.mask_ratio, also through create_pretrainer."""
    with pytest.raises(ConfigError, match=r"model\.mask_ratio"):
        LocalMIM(small_vit(), HOG9, taps=(1, 3), scales=(1, 0.5), mask_ratio=ratio)
    if ratio == 1.0:
        with pytest.raises(ConfigError, match=r"model\.mask_ratio"):
            lmim.create_pretrainer("vit_test", "hog", img_size=64, mask_ratio=ratio)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_init(vit_test: LocalMIM) -> None:
    """Mask tokens N(0, .02); Linear biases 0; patch embed xavier; convs keep PyTorch's init."""
    tokens = torch.cat([d.mask_token.flatten() for d in vit_test.decoders])
    assert tokens.numel() == 4 * 256
    assert 0.017 < tokens.std().item() < 0.023
    assert abs(tokens.mean().item()) < 0.003

    linears = [m for m in vit_test.modules() if isinstance(m, nn.Linear)]
    assert len(linears) > 20
    for m in linears:
        assert m.bias is None or m.bias.abs().max().item() == 0.0
        fan_out, fan_in = m.weight.shape
        assert m.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-6

    w = vit_test.encoder.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert 0.95 * bound < w.abs().max().item() <= bound + 1e-6

    convs = [
        m for m in vit_test.decoders.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convs) == 3
    for m in convs:
        # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias; fan_in uses
        # weight dim 1 (in channels for Conv2d, out channels for ConvTranspose2d).
        fan_in = m.weight[0].numel()
        default = 1 / math.sqrt(fan_in)
        assert 0.9 * default < m.weight.abs().max().item() <= default + 1e-6
        assert m.bias.abs().max().item() > 0
        assert m.bias.abs().max().item() <= default + 1e-6
        # xavier would reach sqrt(6 / (fan_in + fan_out)), well above the default bound here
        fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
        assert default < 0.9 * math.sqrt(6 / (fan_in + fan_out))


def test_encoders_follow_the_masked_encoder_protocol():
    """MaskedViT and MaskedSwin provide every member lmim reads (lmim.models.protocol); an
    encoder without them is refused by LocalMIM in one line naming what it lacks."""
    import torch.nn as nn

    from lmim import create_pretrainer
    from lmim.errors import ConfigError
    from lmim.models import LocalMIM, MaskedEncoder
    from lmim.targets import HOG

    for name, size in (("vit_test", 64), ("swin_test", 128)):
        assert isinstance(create_pretrainer(name, img_size=size).encoder, MaskedEncoder), name

    class Half(nn.Module):
        img_size, patch_size, depth = 32, 16, 2

        def forward(self, images, mask=None, taps=None, isolate_gradients=False, ids_keep=None):
            return [images]

    assert not isinstance(Half(), MaskedEncoder)
    with pytest.raises(ConfigError, match="lacks mask_grid, mask_unit, feature_info, paper_taps"):
        LocalMIM(Half(), HOG)
