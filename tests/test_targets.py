"""Tests of the reconstruction targets: HOG (section 3.2) and normalised pixels (section 3.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmim.errors import ConfigError
from lmim.targets import HOG, NormalizedPixels, patchify, unpatchify
from lmim.targets.base import Target

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CELLS = (4, 8, 16, 32)


def _cells(out: torch.Tensor, size: int, cell: int, nbins: int) -> torch.Tensor:
    """(1, N, 3 * nbins) cells in raster order -> (rows, cols, 3, nbins)."""
    n = size // cell
    return out.reshape(n, n, 3, nbins)


def _touches(index: int, cell: int, edge: int) -> bool:
    """Whether cell ``index`` holds pixel ``edge - 1`` or ``edge`` (the two that see a step)."""
    lo, hi = index * cell, (index + 1) * cell
    return lo <= edge - 1 < hi or lo <= edge < hi


def reference_hog(
    image: np.ndarray, nbins: int, cell: int, offsets: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Slow float64 HOG of one (C, H, W) image, written from the method description.

    Sobel responses come from explicit neighbour sums on the reflect-padded channel, plus the
    constant ``offsets`` (the hog_bias). Hard binning, mean over cells, L2 over the bins.

    Returns:
        (rows * cols, C * nbins) features, and a (C, H, W) bool map of pixels whose orientation
        lies within 1e-5 bin widths of a bin boundary (float32 rounding may bin those either way),
        except where g0 is exactly zero (theta 0 or +-pi: bin 0 whatever the rounding).
    """
    C, H, W = image.shape
    b0, b1 = offsets
    feats, ambiguous = [], []
    for c in range(C):
        p = np.pad(image[c].astype(np.float64), 1, mode="reflect")

        def at(dy: int, dx: int, p: np.ndarray = p) -> np.ndarray:
            return p[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]

        left = at(-1, -1) + 2 * at(0, -1) + at(1, -1)
        right = at(-1, 1) + 2 * at(0, 1) + at(1, 1)
        top = at(-1, -1) + 2 * at(-1, 0) + at(-1, 1)
        bottom = at(1, -1) + 2 * at(1, 0) + at(1, 1)
        g0, g1 = left - right + b0, top - bottom + b1
        mag = np.sqrt(g0**2 + g1**2)
        pos = np.arctan2(g0, g1) * nbins / math.pi
        # g0 == 0 exactly (left/right borders under reflect padding) is bin 0 either way.
        ambiguous.append((np.abs(pos - np.round(pos)) < 1e-5) & (g0 != 0))
        idx = np.mod(np.floor(pos).astype(np.int64), nbins)
        hist = np.zeros((nbins, H, W))
        for b in range(nbins):
            hist[b] = np.where(idx == b, mag, 0.0)
        rows, cols = H // cell, W // cell
        pooled = hist.reshape(nbins, rows, cell, cols, cell).mean(axis=(2, 4))
        norm = np.sqrt((pooled**2).sum(axis=0, keepdims=True))
        pooled = pooled / np.maximum(norm, 1e-12)
        feats.append(pooled.reshape(nbins, rows * cols).T)
    return np.concatenate(feats, axis=1), np.stack(ambiguous)


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("dark_left", [True, False])
def test_hog_vertical_edge_lands_in_middle_bin(nbins: int, dark_left: bool) -> None:
    """A vertical step has theta = -+pi/2, i.e. bin floor(nbins/2), in the edge cells only."""
    size, edge = 64, 20  # columns 19 and 20 see the step
    img = torch.zeros(1, 3, size, size)
    img[..., edge:] = 1.0
    if not dark_left:
        img = 1.0 - img
    outs = HOG(nbins=nbins, cell_sizes=CELLS)(img)
    for cell, out in zip(CELLS, outs, strict=True):
        got = _cells(out, size, cell, nbins)
        expected = torch.zeros_like(got)
        for j in range(size // cell):
            if _touches(j, cell, edge):
                expected[:, j, :, nbins // 2] = 1.0
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("nbins", [9, 18])
@pytest.mark.parametrize("dark_top", [True, False])
def test_hog_horizontal_edge_lands_in_bin_zero(nbins: int, dark_top: bool) -> None:
    """A horizontal step has g0 = 0, theta = 0 or +-pi, which wraps to bin 0."""
    size, edge = 64, 20
    img = torch.zeros(1, 3, size, size)
    img[..., edge:, :] = 1.0
    if not dark_top:
        img = 1.0 - img
    outs = HOG(nbins=nbins, cell_sizes=CELLS)(img)
    for cell, out in zip(CELLS, outs, strict=True):
        got = _cells(out, size, cell, nbins)
        expected = torch.zeros_like(got)
        for i in range(size // cell):
            if _touches(i, cell, edge):
                expected[i, :, :, 0] = 1.0
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_hog_constant_image_is_zero() -> None:
    """A constant image has no gradient, so every cell of every scale is exactly zero."""
    img = torch.full((2, 3, 64, 64), 0.3)
    img[1] = -1.2
    for out in HOG(cell_sizes=CELLS)(img):
        assert out.shape[-1] == 27
        assert out.abs().max().item() == 0.0


def test_hog_cells_have_unit_norm_per_channel() -> None:
    """Each non-empty cell's nbins vector has L2 norm 1 separately for R, G and B."""
    torch.manual_seed(0)
    img = torch.rand(2, 3, 64, 64)
    img[0, 1, :32, :32] = 0.5  # a flat green quadrant: its inner cells must stay zero
    outs = HOG(nbins=9, cell_sizes=CELLS)(img)
    for cell, out in zip(CELLS, outs, strict=True):
        norms = out.reshape(*out.shape[:2], 3, 9).norm(dim=-1)  # (B, N, 3)
        nonempty = norms > 0
        assert nonempty.float().mean() > 0.9
        torch.testing.assert_close(
            norms[nonempty], torch.ones_like(norms[nonempty]), atol=1e-5, rtol=0
        )
        inner = (32 - 1) // cell  # cells strictly inside the flat quadrant
        if inner:
            n = 64 // cell
            green = norms[0, :, 1].reshape(n, n)[:inner, :inner]
            assert green.abs().max().item() == 0.0
            red = norms[0, :, 0].reshape(n, n)[:inner, :inner]
            torch.testing.assert_close(red, torch.ones_like(red), atol=1e-5, rtol=0)


def test_hog_without_bias_is_invariant_to_normalisation() -> None:
    """Without bias, HOG of the ImageNet-normalised image equals HOG of the raw image.

    Per channel the affine map scales both Sobel responses by 1/std: the angle is unchanged and
    the L2 normalisation removes the scale. Float rounding can move a pixel whose angle lies
    exactly on a bin boundary to the neighbouring bin; on continuous random pixels this is
    vanishingly rare, so at most 0.1 % of the cell values may differ.
    """
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 224, 224)
    hog = HOG(nbins=9, cell_sizes=CELLS)
    for a, b in zip(hog(raw), hog((raw - MEAN) / STD), strict=True):
        close = torch.isclose(a, b, atol=1e-4, rtol=1e-4)
        assert close.float().mean().item() > 0.999


def test_hog_bias_buffer_and_no_invariance() -> None:
    """bias=True: a frozen (scales, 2) buffer in [-1/3, 1/3] per scale; normalisation matters."""
    torch.manual_seed(0)
    hog = HOG(nbins=9, cell_sizes=CELLS, bias=True)
    assert tuple(hog.bias.shape) == (4, 2)
    assert not hog.bias.requires_grad
    assert list(hog.parameters()) == []
    assert hog.bias.min() >= -1 / 3 and hog.bias.max() <= 1 / 3
    assert hog.bias.abs().max() > 0
    sd = hog.state_dict()
    assert "bias" in sd
    torch.testing.assert_close(sd["bias"], hog.bias)
    assert len({tuple(r) for r in hog.bias.tolist()}) == 4  # every scale has its own bias

    raw = torch.rand(1, 3, 64, 64)
    for a, b in zip(hog(raw), hog((raw - MEAN) / STD), strict=True):
        assert not torch.allclose(a, b, atol=1e-3)


def test_hog_bias_on_constant_image() -> None:
    """With bias a constant image's gradient is the bias itself: bin floor(atan2(b0, b1)...)."""
    torch.manual_seed(3)
    hog = HOG(nbins=9, cell_sizes=CELLS, bias=True)
    outs = hog(torch.full((1, 3, 64, 64), 0.7))
    for k, out in enumerate(outs):
        b0, b1 = hog.bias[k].tolist()
        expected = torch.zeros(out.shape[1], 3, 9)
        expected[..., math.floor(math.atan2(b0, b1) * 9 / math.pi) % 9] = 1.0
        torch.testing.assert_close(out[0].reshape(-1, 3, 9), expected)


def test_hog_shapes_at_224() -> None:
    """ViT cells 4, 8, 16, 32 on 224 px give 56^2, 28^2, 14^2, 7^2 cells of 27 dims."""
    hog = HOG(nbins=9, cell_sizes=CELLS)
    assert hog.dims == [27] * 4
    outs = hog(torch.rand(2, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(2, n, 27) for n in (3136, 784, 196, 49)]
    assert all(o.dtype == torch.float32 for o in outs)


@pytest.mark.parametrize("cells", [CELLS, (8, 16, 32, 32)], ids=["vit", "swin"])
@pytest.mark.parametrize("bias", [False, True])
def test_hog_matches_slow_reference(bias: bool, cells: tuple[int, ...]) -> None:
    """Every scale (shared nested pooling, or the per-scale biased path) equals a float64 reference.

    (cell, channel) blocks holding a pixel within 1e-5 bin widths of a bin boundary are skipped:
    there float32 and float64 may legitimately pick neighbouring bins.
    """
    torch.manual_seed(1)
    img = torch.randn(2, 3, 224, 224)
    hog = HOG(nbins=9, cell_sizes=cells, bias=bias)
    outs = hog(img)
    assert len(outs) == len(cells)
    for k, (cell, out) in enumerate(zip(cells, outs, strict=True)):
        offsets = tuple(hog.bias[k].double().tolist()) if bias else (0.0, 0.0)
        n = 224 // cell
        for b in range(img.shape[0]):
            ref, amb = reference_hog(img[b].double().numpy(), 9, cell, offsets)
            amb_cells = amb.reshape(3, n, cell, n, cell).any(axis=(2, 4)).reshape(3, n * n).T
            assert amb.mean() < 1e-4 and amb_cells.mean() < 0.05
            got = out[b].double().numpy().reshape(n * n, 3, 9)
            want = ref.reshape(n * n, 3, 9)
            np.testing.assert_allclose(got[~amb_cells], want[~amb_cells], atol=2e-5, rtol=1e-4)


def test_hog_non_integer_cell_grid() -> None:
    """A 3.5-px cell (ViT-H/14 at scale 4) tiles a 224 image with a 64 x 64 grid."""
    torch.manual_seed(0)
    hog = HOG(nbins=9, cell_sizes=(3.5, 7, 14, 28))
    outs = hog(torch.rand(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, n * n, 27) for n in (64, 32, 16, 8)]
    norms = outs[0].reshape(-1, 3, 9).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_hog_is_float32_under_autocast() -> None:
    """Under bfloat16 autocast the HOG is still computed in float32 and unchanged."""
    torch.manual_seed(0)
    img = torch.randn(1, 3, 64, 64)
    hog = HOG(nbins=9, cell_sizes=CELLS)
    plain = hog(img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = hog(img)
        from_bf16 = hog(img.bfloat16())
    upcast = hog(img.bfloat16().float())
    for a, b, c, d in zip(plain, auto, from_bf16, upcast, strict=True):
        assert b.dtype == torch.float32 and c.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=0, rtol=0)
        torch.testing.assert_close(c, d, atol=0, rtol=0)


@pytest.mark.parametrize("cell", [2, 4, 8])
def test_pixels_dims_and_feature_order(cell: int) -> None:
    """NormalizedPixels has 3 c^2 dims ordered (row-in-patch, col-in-patch, channel)."""
    B, H, W = 2, 8, 16
    b, c, y, x = torch.meshgrid(
        torch.arange(B), torch.arange(3), torch.arange(H), torch.arange(W), indexing="ij"
    )
    img = (1000 * b + 100 * c + 10 * y + x).float() / 1000.0  # every value distinct
    target = NormalizedPixels(cell_sizes=(cell,), normalize=False)
    assert target.dims == [3 * cell * cell]
    (out,) = target(img)
    rows, cols = H // cell, W // cell
    assert tuple(out.shape) == (B, rows * cols, 3 * cell * cell)
    for bi in range(B):
        for pr in range(rows):
            for pc in range(cols):
                expected = [
                    img[bi, ch, pr * cell + r, pc * cell + q].item()
                    for r in range(cell)
                    for q in range(cell)
                    for ch in range(3)
                ]
                torch.testing.assert_close(out[bi, pr * cols + pc], torch.tensor(expected))


def test_pixels_normalised_per_patch() -> None:
    """normalize=True gives every patch mean 0 and unbiased std ~1 (1e-6 inside the sqrt)."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 32) * 3 + 1
    target = NormalizedPixels(cell_sizes=(4, 8, 16, 32), normalize=True)
    assert target.dims == [48, 192, 768, 3072]
    for cell, out in zip((4, 8, 16, 32), target(img), strict=True):
        raw = patchify(img, cell)
        assert out.shape == raw.shape
        torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.std(-1), torch.ones(out.shape[:2]), atol=1e-4, rtol=0)
        # the normalisation is an increasing affine map of each patch
        expected = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, keepdim=True)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("p", [1, 4, 16])
def test_patchify_unpatchify_round_trip(p: int) -> None:
    """unpatchify(patchify(x)) returns x exactly."""
    torch.manual_seed(0)
    img = torch.randn(2, 3, 32, 48)
    x = patchify(img, p)
    assert tuple(x.shape) == (2, (32 // p) * (48 // p), p * p * 3)
    torch.testing.assert_close(unpatchify(x, p, (32 // p, 48 // p), chans=3), img, atol=0, rtol=0)


def test_pixels_non_integer_cell_raises() -> None:
    """Pixel targets need whole-pixel cells: 3.5 px raises ConfigError."""
    with pytest.raises(ConfigError, match="3.5"):
        NormalizedPixels(cell_sizes=(3.5, 7, 14, 28))


def released_hog(images: torch.Tensor, nbins: int, cell: int) -> torch.Tensor:
    """The released arithmetic, written from its description (LOCALMIM.md 3.2, no bias): per
    channel a reflect-padded 2-output-channel 3x3 ``conv2d`` with K0 (left - right) and
    K1 = K0^T, m = sqrt(g0^2 + g1^2), bin floor(atan2(g0, g1) nbins / pi) mod nbins, hard
    assignment, k x k average pooling, ``F.normalize`` (eps 1e-12) over the bins.

    Args:
        images: (1, C, H, W) normalised images.

    Returns:
        (H / cell * W / cell, C, nbins) cells in raster order.
    """
    import torch.nn.functional as F

    _, C, H, W = images.shape
    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    g = F.conv2d(
        F.pad(images.reshape(C, 1, H, W), (1, 1, 1, 1), mode="reflect"),
        torch.stack([k0, k0.T]).unsqueeze(1),
    )
    mag = torch.sqrt(g[:, 0] ** 2 + g[:, 1] ** 2)
    idx = torch.floor(torch.atan2(g[:, 0], g[:, 1]) * nbins / math.pi).long() % nbins
    hist = torch.zeros(C, nbins, H, W).scatter_(1, idx[:, None], mag[:, None])
    cells = F.normalize(F.avg_pool2d(hist, cell, cell), dim=1, eps=1e-12)
    return cells.reshape(C, nbins, -1).permute(2, 0, 1)


def integer_sobel(u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact left-right Sobel response g0 of an 8-bit (C, H, W) image, in integers
    (reflect padding), and where every neighbour difference behind g0 (index 0) and g1
    (index 1) is zero: (2, C, H, W)."""
    p = np.pad(u8.astype(np.int64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lr = p[:, :, :-2] - p[:, :, 2:]  # left - right, (C, H + 2, W)
    tb = p[:, :-2] - p[:, 2:]  # top - bottom, (C, H, W + 2)
    g0 = lr[:, :-2] + 2 * lr[:, 1:-1] + lr[:, 2:]
    equal0 = (lr[:, :-2] == 0) & (lr[:, 1:-1] == 0) & (lr[:, 2:] == 0)
    equal1 = (tb[..., :-2] == 0) & (tb[..., 1:-1] == 0) & (tb[..., 2:] == 0)
    return g0, np.stack([equal0, equal1])


def test_hog_departs_from_the_released_code_only_where_it_is_rounding_noise() -> None:
    """lmim's one numerical departure, pinned on a real 8-bit photo (scikit-image's astronaut,
    512 px: a flat black background and straight edges), HOG-9 without bias on the
    ImageNet-normalised image. lmim's separable Sobel differences of equal pixels are exactly
    0, where the released 2-D convolution may leave ~1e-7 of rounding:

    * (a) a cell with no gradient (every pixel's neighbours equal; 8.2% of the 4-px
      channel-cells here) is exactly 0 in lmim; in the released code the L2 normalisation
      turns the rounding into a unit vector in a noise-chosen direction (66% of them here);
    * (b) an exactly vertical gradient (g0 = 0, g1 != 0: equal left and right neighbours, or
      8-bit differences that cancel) puts all its magnitude in bin 0 in lmim; the released
      code puts it in bin 0 or nbins - 1 by the sign of the rounding (here 12% in nbins - 1).

    Everywhere else lmim equals a re-implementation of the released arithmetic: the gradients
    to 2e-6 at every pixel, and the targets to 5e-6 (measured: 3.4e-6) in every channel-cell
    holding no pixel whose exact, integer g0 is 0. Cells holding one are 36.7% of the 4-px,
    66.3% of the 8-px, 93.4% of the 16-px and all of the 32-px channel-cells here, and 9.8%,
    19.7%, 36.4% and 38.7% of all channel-cells differ by more than 1e-3 (this machine's
    rounding). Where 8-bit differences cancel, lmim's float32 g0 is not always 0 either (9% of
    the pixels whose exact g0 is 0, here): there both are rounding.
    """
    import skimage.data
    import torch.nn.functional as F

    nbins = 9
    u8 = np.ascontiguousarray(skimage.data.astronaut().transpose(2, 0, 1))  # (3, 512, 512)
    C, H, W = u8.shape
    x = (torch.from_numpy(u8)[None].float() / 255 - MEAN) / STD
    hog = HOG(nbins=nbins, cell_sizes=CELLS)
    outs = hog(x)
    g0, equal = integer_sobel(u8)
    flat_px = torch.from_numpy(equal.all(axis=0))  # no gradient: (C, H, W)

    grad = hog.gradients(x)  # (C, 2, H, W)
    assert grad[:, 0][torch.from_numpy(equal[0])].abs().max() == 0  # equal neighbours: exact
    vertical = (grad[:, 0] == 0) & (grad[:, 1] != 0)
    assert vertical.float().mean() == pytest.approx(0.0137, abs=1e-4)
    hist = hog.histogram(grad, 1).reshape(C, nbins, H, W)  # the per-pixel hard assignment
    torch.testing.assert_close(hist[:, 0][vertical], grad[:, 1][vertical].abs(), atol=0, rtol=0)
    assert hist[:, 1:].permute(1, 0, 2, 3)[:, vertical].abs().max() == 0  # (b): bin 0 only

    k0 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    conv = F.conv2d(
        F.pad(x.reshape(C, 1, H, W), (1, 1, 1, 1), mode="reflect"),
        torch.stack([k0, k0.T]).unsqueeze(1),
    )
    assert (conv - grad).abs().max() < 2e-6  # the same gradients up to rounding
    noisy_px = torch.from_numpy(g0 == 0)  # float32 g0 is 0 or rounding, in either arithmetic
    for cell, out in zip(CELLS, outs, strict=True):
        ours = out[0].reshape(-1, C, nbins)
        released = released_hog(x, nbins, cell)

        def holds(px: torch.Tensor, cell: int = cell) -> torch.Tensor:
            """(C, H, W) pixels -> (cells, C): whether the channel-cell holds one."""
            return F.max_pool2d(px.float()[:, None], cell, cell)[:, 0].reshape(C, -1).T.bool()

        flat, noisy = ~holds(~flat_px), holds(noisy_px)
        assert ours[flat].abs().max() == 0  # (a): exactly zero
        share = {4: (0.0815, 0.3665), 8: (0.0688, 0.6632), 16: (0.0423, 0.9342), 32: (0.0117, 1)}
        assert flat.float().mean() == pytest.approx(share[cell][0], abs=1e-4)
        assert noisy.float().mean() == pytest.approx(share[cell][1], abs=1e-4)
        if not noisy.all():
            diff = (ours - released).abs().amax(-1)
            assert diff[~noisy].max() < 5e-6, (cell, diff[~noisy].max())


# -- the target seam: LocalMIM calls the target's loss and precision, knows no target by name ----


class L1Pixels(NormalizedPixels):
    """Normalised pixels scored by a masked mean absolute error (a target with its own loss)."""

    def loss(self, pred, target, weight):
        err = (pred.float() - target.float()).abs().mean(dim=-1)
        return (err * weight).sum() / weight.sum()


def test_localmim_uses_the_targets_own_loss():
    """Each tap's loss is the target's ``loss`` of that tap's prediction, target and weights
    (here an L1), not a hard-wired MSE."""
    from lmim import create_pretrainer
    from lmim.losses import masked_mse

    net = create_pretrainer("vit_test", "pixel", img_size=32)
    net.target = L1Pixels(net.target.cell_sizes)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    out = net(images)
    for k, name in enumerate(net.tap_names):
        l1 = net.target.loss(out.preds[k], out.targets[k], out.weights[k])
        assert torch.equal(out.losses[name], l1)
        assert not torch.allclose(l1, masked_mse(out.preds[k], out.targets[k], out.weights[k]))


class LinearFeatures(Target):
    """A frozen linear map of each 8-px cell (a stand-in for a network target)."""

    def __init__(self, cell_sizes, precision="float32"):
        super().__init__(cell_sizes)
        self.precision = precision
        self.proj = torch.nn.Linear(3 * 64, 16)

    @property
    def dims(self):
        return [16] * len(self.cell_sizes)

    def compute(self, images):
        cells = images.unfold(2, 8, 8).unfold(3, 8, 8)  # B, 3, h, w, 8, 8
        cells = cells.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return [self.proj(cells)] * len(self.cell_sizes)


def test_target_precision_float32_or_the_runs():
    """``precision="float32"`` computes in float32 under bf16 autocast; ``"run"`` leaves the
    target under the run's autocast (bf16 out of a Linear), and neither tracks gradients."""
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = LinearFeatures([8])(images)[0]
        run = LinearFeatures([8], precision="run")(images)[0]
    assert exact.dtype == torch.float32 and run.dtype == torch.bfloat16
    assert not exact.requires_grad and not run.requires_grad


def test_a_target_without_a_picture_says_so():
    """The reconstruction picture is drawn by the target; one that has none raises
    NotImplementedError naming it (the callback turns it into a warning)."""
    from lmim import create_pretrainer
    from lmim.viz import reconstruction_figure

    net = create_pretrainer("vit_test", "pixel", img_size=32)
    images = torch.randn(1, 3, 32, 32)
    out = net(images)
    grid = tuple(net.encoder.mask_grid)
    with pytest.raises(NotImplementedError, match="LinearFeatures has no reconstruction"):
        reconstruction_figure(images, out, net.tap_names, grid, LinearFeatures([8]))


# -- target=codebook -----------------------------------------------------------------------------


def demo_hog_cells(cell: int = 8) -> torch.Tensor:
    """HOG cells (M, D) of a few bundled photos, ImageNet-normalised, at ``cell`` px."""
    from lmim.data import load_demo_images
    from lmim.data.transforms import eval_transform

    tf = eval_transform(64)
    images = torch.stack([tf(img) for img in load_demo_images(["astronaut", "coffee", "chelsea"])])
    return HOG(cell_sizes=[cell])(images)[0].flatten(0, 1)


def write_book(path, base="hog", cell_sizes=(8.0, 16.0), codes=6, dim=None):
    """A valid codebook file of random codes (what lmim.codebook writes)."""
    from lmim.targets.codebook import FORMAT, make_base

    b = make_base(base, list(cell_sizes))
    dims = b.dims if dim is None else [dim] * len(cell_sizes)
    torch.save(
        {
            "format": FORMAT,
            "base": base,
            "cell_sizes": [float(c) for c in cell_sizes],
            "codes": [torch.randn(codes, d) for d in dims],
            "base_state": b.state_dict(),
            "usage": [],
        },
        path,
    )
    return path


def test_codebook_bases_are_the_target_configs(make_cfg):
    """Each base a codebook quantises has the class and settings of target=<base>."""
    from lmim.targets.codebook import BASES, make_base

    for base, (name, params) in BASES.items():
        cfg = make_cfg([f"target={base}"]).target
        assert cfg._target_ == f"lmim.targets.{name}"
        assert params == {k: v for k, v in cfg.items() if not k.startswith("_")}, base
        assert type(make_base(base, [8, 16])).__name__ == name


def test_codebook_assignment_is_the_nearest_code():
    """assign() equals a brute-force search over all codes."""
    from lmim.targets.codebook import assign

    g = torch.Generator().manual_seed(0)
    feats, codes = torch.randn(3, 40, 7, generator=g), torch.randn(13, 7, generator=g)
    brute = torch.cdist(feats.reshape(-1, 7), codes).argmin(-1).reshape(3, 40)
    assert torch.equal(assign(feats, codes), brute)


def test_kmeans_reduces_its_objective_on_real_photos():
    """Mini-batch k-means on HOG cells of real photos lowers the mean squared distance to the
    nearest code well below that of its random initial codes, and uses most codes."""
    from lmim.codebook import kmeans
    from lmim.targets.codebook import assign, usage

    cells = demo_hog_cells()
    codes, obj = kmeans(cells, 16, iters=40, batch=256, seed=0)
    assert obj["objective"] < 0.9 * obj["objective_init"]
    perplexity, dead = usage(assign(cells, codes), 16)
    assert perplexity > 4 and dead < 8


def test_codebook_loss_ignores_visible_cells(tmp_path):
    """Cross-entropy on masked cells only: changing the logits of visible cells (weight 0)
    leaves the loss as it is, changing a masked cell's logits moves it."""
    from lmim.targets import Codebook

    book = Codebook([8, 16], path=str(write_book(tmp_path / "b.pt")))
    assert book.dims == [6, 6]
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 10, 6, generator=g), torch.randint(0, 6, (2, 10), generator=g)
    weight = (torch.arange(10) % 2).float().expand(2, 10)
    loss = book.loss(pred, target, weight)
    visible = pred.clone()
    visible[:, 0::2] += 5 * torch.randn(2, 5, 6, generator=g)
    assert torch.equal(book.loss(visible, target, weight), loss)
    masked = pred.clone()
    masked[:, 1, 0] += 5  # one logit (a shift of all of them would not change the softmax)
    assert not torch.allclose(book.loss(masked, target, weight), loss)
    expected = torch.nn.functional.cross_entropy(
        pred[:, 1::2].flatten(0, 1), target[:, 1::2].flatten()
    )
    assert torch.allclose(loss, expected)


def test_codebook_refusals_name_the_fix(tmp_path):
    """A missing file, a file that is none, a codebook fitted over another descriptor, for other
    cell sizes or with another number of codes: one ConfigError each, before training."""
    from lmim.targets import Codebook

    book = write_book(tmp_path / "b.pt")
    with pytest.raises(ConfigError, match="does not exist: fit one with `python -m lmim.codebook"):
        Codebook([8, 16], path=str(tmp_path / "none.pt"))
    (tmp_path / "x.pt").write_text("not a codebook")
    with pytest.raises(ConfigError, match="cannot be read as a codebook"):
        Codebook([8, 16], path=str(tmp_path / "x.pt"))
    with pytest.raises(
        ConfigError, match="fitted over hog, but this run asks for target.base=pixel"
    ):
        Codebook([8, 16], path=str(book), base="pixel")
    with pytest.raises(ConfigError, match=r"fitted for \[8.0, 16.0\]-px cells"):
        Codebook([4, 8], path=str(book))
    with pytest.raises(ConfigError, match="holds \\[6, 6\\] codes per scale"):
        Codebook([8, 16], path=str(book), codes=512)


def test_codebook_cli_fits_and_trains(tmp_path):
    """`python -m lmim.codebook` fits per-scale codes on the demo photos (printing usage and the
    k-means objective), and `python -m lmim.train target=codebook target.path=...` trains on
    them, logging the batch's code usage per scale; the codes travel in the checkpoint."""
    from tests.runs import SMALL, cli, load

    common = [o for o in SMALL if o.startswith(("model=", "data=", "data.images", "data.img"))]
    fit = cli(
        *common,
        "target.codes=8",
        "images=64",
        "iters=20",
        "batch=512",
        "out=book.pt",
        "hydra.run.dir=fit",
        cwd=tmp_path,
        module="lmim.codebook",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "perplexity" in fit.stdout and "k-means objective" in fit.stdout
    assert f"target.path={tmp_path / 'book.pt'}" in fit.stdout
    run = cli(
        *SMALL,
        "target=codebook",
        f"target.path={tmp_path / 'book.pt'}",
        "trainer.max_steps=3",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = load(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    book = torch.load(tmp_path / "book.pt", weights_only=True)
    for k, codes in enumerate(book["codes"]):
        assert torch.equal(state[f"net.target.codes_{k}"], codes)
    import csv

    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("codebook/perplexity_4px")]
    assert len(rows) == 3  # logged every step (log_every_n_steps=1), for every scale
    for r in rows:
        assert 1.0 <= float(r["codebook/perplexity_4px"]) <= 8.0
        assert 0 <= float(r["codebook/unused_32px"]) <= 8


# -- target=teacher ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A small timm ViT (2 blocks, 16-px tokens at 32 px) saved as a local weights file."""
    import timm

    torch.manual_seed(0)
    t = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(t.state_dict(), path)
    return path


def make_teacher(path, cell_sizes=(4, 8, 16, 32), **kw):
    from lmim.targets import Teacher

    kw.setdefault("model_kwargs", {"depth": 2})
    return Teacher(
        cell_sizes, model="vit_tiny_patch16_224", checkpoint_path=str(path), img_size=32, **kw
    )


def test_teacher_targets_are_its_features_resampled_and_normalised(teacher_file):
    """With the teacher's features known (2x2 tokens of 16 px), the targets at 4, 8, 16 and 32-px
    cells are those tokens repeated 4x and 2x, as they are, and averaged, each normalised per
    token (LayerNorm without affine)."""
    t = make_teacher(teacher_file)
    known = torch.randn(2, 192, 2, 2)
    t.features = lambda images: known  # the identity map on known features
    out = t(torch.zeros(2, 3, 32, 32))

    def tokens(x):
        return torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (192,))

    rep = lambda x, r: x.repeat_interleave(r, 2).repeat_interleave(r, 3)  # noqa: E731
    expected = [rep(known, 4), rep(known, 2), known, known.mean((2, 3), keepdim=True)]
    for got, want in zip(out, expected, strict=True):
        assert torch.allclose(got, tokens(want), atol=1e-5)


def test_teacher_is_frozen_outside_the_optimizer_and_checkpoint(make_cfg, teacher_file):
    """The teacher gets no gradient, is in none of the optimizer's groups and in no state dict
    (its file and SHA-256 are), and its forward is counted in the FLOPs per image."""
    from lmim.callbacks.perf import count_flops_per_image
    from lmim.module import param_groups
    from lmim.targets.teacher import file_digest
    from lmim.train import build
    from tests.runs import SMALL

    overrides = [
        *SMALL,
        "target=teacher",
        "target.model=vit_tiny_patch16_224",
        f"target.checkpoint_path={teacher_file}",
        "target.model_kwargs={depth: 2}",
    ]
    _, module = build(make_cfg(overrides))
    net = module.net
    teacher = list(net.target.teacher.parameters())
    assert teacher and all(not p.requires_grad for p in teacher)
    grouped = {id(p) for g in param_groups(net, 0.05) for p in g["params"]}
    assert grouped and not grouped & {id(p) for p in teacher}
    state = net.state_dict()
    assert not [k for k in state if "teacher" in k and not k.endswith("_extra_state")]
    assert state["target._extra_state"]["teacher_sha256"] == file_digest(teacher_file)
    net(torch.randn(2, 3, 32, 32)).loss.backward()
    assert all(p.grad is None for p in teacher)
    _, pixel = build(make_cfg([*SMALL, "target=pixel"]))
    with_teacher = count_flops_per_image(net, 2, (3, 32, 32))
    assert with_teacher > count_flops_per_image(pixel.net, 2, (3, 32, 32))


def test_teacher_refusals_name_the_fix(teacher_file, tmp_path):
    """A missing weights file, weights of another model (missing keys, other shapes), a layer
    whose tokens cannot be resampled to a tap's cells: one ConfigError each."""
    with pytest.raises(ConfigError, match="is not a file: the teacher's weights must be a local"):
        make_teacher(tmp_path / "none.pth")
    from lmim.targets import Teacher

    with pytest.raises(ConfigError, match="target.checkpoint_path is not set: pass target.check"):
        Teacher([16], model="vit_tiny_patch16_224", checkpoint_path="???", img_size=32)
    with pytest.raises(ConfigError, match="does not hold the weights of vit_tiny_patch16_224"):
        make_teacher(teacher_file, model_kwargs={"depth": 4})
    with pytest.raises(
        ConfigError, match=r"does not hold the weights of vit_tiny_patch16_224 built"
    ):
        make_teacher(teacher_file, model_kwargs={"depth": 2, "patch_size": 8})  # other shapes
    with pytest.raises(ConfigError, match="16-px tokens, which cannot be resampled to a tap's 12"):
        make_teacher(teacher_file, cell_sizes=(12,))


def test_teacher_run_trains(make_cfg, teacher_file, tmp_path):
    """A real Trainer run with target=teacher (in this process; the command line is the slow
    test below): 3 steps, a finite loss, no teacher weights in the checkpoint."""
    import math

    from lmim.train import train
    from tests.runs import SMALL, load

    cfg = make_cfg(
        [
            *SMALL,
            "target=teacher",
            "target.model=vit_tiny_patch16_224",
            f"target.checkpoint_path={teacher_file}",
            "target.model_kwargs={depth: 2}",
            "trainer.max_steps=3",
        ]
    )
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss"])
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert not [k for k in ckpt["state_dict"] if "teacher" in k and "_extra_state" not in k]


@pytest.mark.slow
def test_teacher_cli_trains(teacher_file, tmp_path):
    """`python -m lmim.train target=teacher target.model=... target.checkpoint_path=...`."""
    from tests.runs import SMALL, cli, load

    run = cli(
        *SMALL,
        "target=teacher",
        "target.model=vit_tiny_patch16_224",
        f"target.checkpoint_path={teacher_file}",
        "target.model_kwargs={depth: 2}",
        "trainer.max_steps=3",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert not [k for k in ckpt["state_dict"] if "target.teacher" in k or "_teacher" in k]


def test_codebook_is_scored_and_drawn_as_its_base_descriptor(tmp_path):
    """The reconstruction callback's R² and picture see a codebook's cells as code vectors:
    targets are their codes' vectors, confident logits the predicted code's vector; the picture
    is the base descriptor's (HOG glyphs)."""
    from lmim import create_pretrainer
    from lmim.targets import Codebook
    from lmim.viz import masked_cell_scores, reconstruction_figure

    path = write_book(tmp_path / "b.pt", cell_sizes=(4, 8, 16, 32))
    net = create_pretrainer("vit_test", "codebook", overrides=[f"target.path={path}"], img_size=32)
    assert isinstance(net.target, Codebook)
    images = torch.randn(2, 3, 32, 32)
    out = net(images)
    preds, targets = net.target.comparable(out.preds, out.targets)
    sure = [50 * torch.nn.functional.one_hot(t, 6).float() for t in out.targets]
    exact, _ = net.target.comparable(sure, out.targets)
    for k, codes in enumerate(net.target.codes):
        assert torch.equal(targets[k], codes[out.targets[k]])
        assert torch.allclose(exact[k], codes[out.targets[k]], atol=1e-4)
        assert preds[k].shape == targets[k].shape
    scores = masked_cell_scores(preds, targets, out.weights)
    assert all(math.isfinite(s.r2) for s in scores)
    fig = reconstruction_figure(
        images, out, net.tap_names, tuple(net.encoder.mask_grid), net.target
    )
    assert "HOG cells" in fig.axes[2].get_title()


# -- target=tokenizer ----------------------------------------------------------------------------


def test_a_codebook_file_as_tokenizer_gives_the_codebook_targets(tmp_path):
    """target=tokenizer with CodebookTokenizer over a codebook file (one grid per tap) gives
    exactly target=codebook's indices, widths and loss."""
    from lmim.targets import Codebook, CodebookTokenizer, Tokenizer

    path = write_book(tmp_path / "b.pt", cell_sizes=(4, 8, 16, 32))
    book = Codebook([4, 8, 16, 32], path=str(path))
    tok = Tokenizer([4, 8, 16, 32], CodebookTokenizer(path), img_size=32)
    assert tok.dims == book.dims == [6] * 4
    images = torch.randn(3, 3, 32, 32)
    for a, b in zip(tok(images), book(images), strict=True):
        assert torch.equal(a, b)
    # the tokenizer's weights are not the target's: no state beyond its digest
    assert set(tok.state_dict()) == {"_extra_state"}


def grid_tokenizer(codes: int = 5, side: int = 2, out=None):
    """A tokenizer returning a side x side grid of codes (or ``out(images)`` when given)."""

    def tokenize(images):
        if out is not None:
            return out(images)
        b = images.shape[0]
        return (torch.arange(side * side) % codes).view(1, side, side).expand(b, -1, -1)

    return tokenize


def test_one_tokenizer_grid_serves_its_cells_and_finer_ones():
    """One (B, 2, 2) grid of 16-px tokens at 32 px: the 16-px tap takes it as it is, the 4- and
    8-px taps repeat each token's code over its cells; a 32-px tap is refused."""
    from lmim.targets import Tokenizer

    tok = Tokenizer([4, 8, 16], grid_tokenizer(), codes=5, img_size=32)
    four, eight, sixteen = tok(torch.zeros(2, 3, 32, 32))
    codes = torch.tensor([[0, 1], [2, 3]])
    assert torch.equal(sixteen[0], codes.flatten())
    assert torch.equal(eight[0], codes.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten())
    assert torch.equal(four[1], codes.repeat_interleave(4, 0).repeat_interleave(4, 1).flatten())
    with pytest.raises(ConfigError, match="2x2 grid cannot give a tap's 32-px cells"):
        Tokenizer([4, 32], grid_tokenizer(), codes=5, img_size=32)


def test_tokenizer_refusals_name_the_fix():
    """A tokenizer returning the wrong shape, floats, codes out of range or too few grids, and
    a vocabulary size that is not given: one ConfigError each, on one image before training."""
    from lmim.targets import Tokenizer

    def make(out=None, codes=5, cells=(16,)):
        return Tokenizer(list(cells), grid_tokenizer(out=out), codes=codes, img_size=32)

    with pytest.raises(ConfigError, match=r"returned \(1, 4\) for 1 images: a tokenizer must"):
        make(lambda x: torch.zeros(x.shape[0], 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="returned torch.float32 values"):
        make(lambda x: torch.zeros(x.shape[0], 2, 2))
    with pytest.raises(ConfigError, match=r"returned code 7, outside 0..4: target.codes"):
        make(lambda x: torch.full((x.shape[0], 2, 2), 7))
    with pytest.raises(ConfigError, match="returned 1 grids for 2 taps"):
        make(lambda x: [torch.zeros(x.shape[0], 2, 2, dtype=torch.long)], cells=(8, 16))
    with pytest.raises(ConfigError, match="pass the tokenizer's vocabulary size as target.codes"):
        make(codes=None)
    with pytest.raises(ConfigError, match="set target.tokenizer._target_"):
        Tokenizer([16], None, codes=5)


def codebook_tokenizer(path) -> list[str]:
    """The README's overrides for ``target=tokenizer`` with an lmim codebook file as tokenizer."""
    return [
        "target=tokenizer",
        "target.tokenizer._target_=lmim.targets.CodebookTokenizer",
        f"+target.tokenizer.path={path}",
    ]


def test_tokenizer_config_refusals_name_the_setting(make_cfg, tmp_path):
    """target=tokenizer without its _target_, or a CodebookTokenizer without its file: one
    ConfigError naming the command-line setting."""
    from lmim.train import build
    from tests.runs import SMALL

    with pytest.raises(ConfigError, match=r"^target.tokenizer._target_ is not set: pass target"):
        build(make_cfg([*SMALL, "target=tokenizer"]))
    missing = [*SMALL, *codebook_tokenizer(tmp_path / "none.pt")]
    with pytest.raises(ConfigError, match=r"^target.tokenizer.path=\S+none.pt does not exist"):
        build(make_cfg(missing))


@pytest.mark.slow
def test_tokenizer_cli_trains(tmp_path):
    """The README's `python -m lmim.train target=tokenizer target.tokenizer._target_=
    lmim.targets.CodebookTokenizer +target.tokenizer.path=...` (the command line builds the
    tokenizer from target.tokenizer._target_); in the fast suite, the same config trains in
    process (test_tokenizer_run_from_the_config)."""
    from tests.runs import SMALL, cli, load

    book = write_book(tmp_path / "book.pt", cell_sizes=(4, 8, 16, 32))
    tok = cli(
        *SMALL,
        *codebook_tokenizer(book),
        "trainer.max_steps=2",
        "hydra.run.dir=tok",
        cwd=tmp_path,
    )
    assert tok.returncode == 0, tok.stderr[-3000:]
    assert load(tmp_path / "tok" / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_tokenizer_run_from_the_config(make_cfg, tmp_path):
    """target=tokenizer composed by Hydra, its tokenizer built from target.tokenizer._target_,
    trains in a real Trainer; the tokenizer is in no optimizer group and not in the checkpoint
    (its class and digest are)."""
    from lmim.train import train
    from tests.runs import SMALL, load

    path = write_book(tmp_path / "b.pt", cell_sizes=(4, 8, 16, 32))
    cfg = make_cfg([*SMALL, *codebook_tokenizer(path), "trainer.max_steps=2"])
    result = train(cfg)
    assert math.isfinite(result["metrics"]["train/loss"])
    state = load(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not [k for k in state if k.startswith("net.target.") and "_extra_state" not in k]
    extra = state["net.target._extra_state"]
    assert extra["tokenizer"] == "lmim.targets.tokenizer.CodebookTokenizer"
    assert len(extra["tokenizer_sha256"]) == 64


# -- Swin (pyramidal) with the new targets -------------------------------------------------------


def test_codebook_and_teacher_train_a_swin(tmp_path):
    """target=codebook and target=teacher on the tiny Swin at 64 px (cells 8, 16, 32, 32): the
    right widths, a finite loss, gradients in the encoder and none in the teacher."""
    import timm

    from lmim import create_pretrainer

    book = write_book(tmp_path / "b.pt", cell_sizes=(8, 16, 32, 32))
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, depth=1)
    torch.save(vit.state_dict(), tmp_path / "t.pth")
    teacher = [
        "target.model=vit_tiny_patch16_224",
        f"target.checkpoint_path={tmp_path / 't.pth'}",
        "target.model_kwargs={depth: 1}",
    ]
    images = torch.randn(2, 3, 64, 64)
    for target, overrides, dims in (
        ("codebook", [f"target.path={book}"], [6] * 4),
        ("teacher", teacher, [192] * 4),
    ):
        net = create_pretrainer("swin_test", target, overrides=overrides, img_size=64)
        assert net.cell_sizes == [8, 16, 32, 32] and net.target.dims == dims
        out = net(images)
        assert math.isfinite(out.loss.item())
        out.loss.backward()
        assert net.encoder.patch_embed.proj.weight.grad is not None
        if target == "teacher":
            assert all(p.grad is None for p in net.target.teacher.parameters())
