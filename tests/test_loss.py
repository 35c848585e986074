"""Tests of the masked multi-scale loss (section 4)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import lmim
from lmim.losses import masked_mse, scale_mask


def test_losses_imports_first() -> None:
    """``import lmim.losses`` works in a fresh interpreter (nothing else imported before)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import lmim.losses"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-500:]


def explicit_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> float:
    """sum_{b,i} w_{b,i} * mean_d (p - t)^2 / sum_{b,i} w_{b,i}, with Python loops in float64."""
    num = den = 0.0
    B, N, D = pred.shape
    p, t, w = pred.double().tolist(), target.double().tolist(), weight.double().tolist()
    for b in range(B):
        for i in range(N):
            err = sum((p[b][i][d] - t[b][i][d]) ** 2 for d in range(D)) / D
            num += w[b][i] * err
            den += w[b][i]
    return num / den


def reference_weights(mask: torch.Tensor, grid: tuple[int, int], scale: float) -> np.ndarray:
    """Cell weights from the patch mask: kron up-sampling or block means, in numpy."""
    m = mask.double().numpy().reshape(mask.shape[0], *grid)
    if scale >= 1:
        s = int(scale)
        out = np.stack([np.kron(x, np.ones((s, s))) for x in m])
    else:
        f = int(round(1 / scale))
        out = m.reshape(m.shape[0], grid[0] // f, f, grid[1] // f, f).mean(axis=(2, 4))
    return out.reshape(mask.shape[0], -1)


def test_scale_mask_up_sampling_repeats_patches() -> None:
    """Scale 2 repeats every patch's value over its 2 x 2 sub-cells; scale 1 is the mask."""
    mask = torch.tensor([[1, 0, 0, 1, 1, 0]], dtype=torch.bool)  # 2 x 3 grid
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
        ],
        dtype=torch.float32,
    ).reshape(1, -1)
    got = scale_mask(mask, (2, 3), 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(scale_mask(mask, (2, 3), 1), mask.float())
    x4 = scale_mask(mask, (2, 3), 4).reshape(8, 12)
    assert x4[:4, :4].eq(1).all() and x4[:4, 4:].eq(0).all() and x4[4:, 8:].eq(0).all()


def test_scale_mask_down_sampling_gives_fractions() -> None:
    """Scale 0.5 averages 2 x 2 patch groups: weights 0, .25, .5, .75 and 1."""
    grid = torch.tensor(
        [
            [0, 0, 1, 0, 1, 1],
            [0, 0, 0, 0, 0, 1],
            [1, 1, 1, 1, 0, 1],
            [0, 1, 1, 1, 0, 0],
        ]
    )
    mask = grid.reshape(1, -1).bool()
    expected = torch.tensor([[0.0, 0.25, 0.75, 0.75, 1.0, 0.25]])
    got = scale_mask(mask, (4, 6), 0.5)
    torch.testing.assert_close(got, expected)
    # 0/1 integer masks mean the same as bool ones
    torch.testing.assert_close(scale_mask(grid.reshape(1, -1), (4, 6), 0.5), expected)


@pytest.mark.parametrize("scale", [4, 2, 1, 0.5, 0.25])
def test_scale_mask_matches_reference(scale: float) -> None:
    """Random batched masks agree with a numpy kron / block-mean reference."""
    torch.manual_seed(0)
    mask = torch.rand(3, 64) < 0.75
    got = scale_mask(mask, (8, 8), scale)
    np.testing.assert_allclose(got.numpy(), reference_weights(mask, (8, 8), scale), atol=1e-7)


def test_masked_mse_matches_formula() -> None:
    """masked_mse = sum(w * mean_D err^2) / sum(w) over the whole batch (not per sample)."""
    torch.manual_seed(0)
    pred, target = torch.randn(3, 10, 7), torch.randn(3, 10, 7)
    weight = torch.randint(0, 5, (3, 10)).float() / 4  # 0, .25, ..., 1
    weight[0] = 0.0  # a fully visible sample contributes nothing
    got = masked_mse(pred, target, weight)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(explicit_mse(pred, target, weight), rel=1e-5)
    # batch-level, not a mean of per-sample losses
    per_sample = [
        explicit_mse(pred[b : b + 1], target[b : b + 1], weight[b : b + 1]) for b in (1, 2)
    ]
    assert got.item() != pytest.approx(sum(per_sample) / 2, rel=1e-3)


def test_masked_mse_bfloat16_inputs_computed_in_float32() -> None:
    """Half-precision predictions are compared in float32."""
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 4).bfloat16(), torch.randn(2, 5, 4)
    weight = torch.ones(2, 5)
    got = masked_mse(pred, target, weight)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(explicit_mse(pred.float(), target, weight), rel=1e-5)


def _crafted_mask() -> torch.Tensor:
    """(2, 64) masks on an 8 x 8 grid, 16 visible each: one fully visible 2 x 2 group, and one
    visible patch in 12 other groups, so the x0.5 tap has weights 0, .75 and 1."""
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    for b, (gi, gj) in enumerate([(0, 0), (2, 3)]):
        mask[b, 2 * gi : 2 * gi + 2, 2 * gj : 2 * gj + 2] = False
        others = [(i, j) for i in range(4) for j in range(4) if (i, j) != (gi, gj)][:12]
        for i, j in others:
            mask[b, 2 * i + b, 2 * j] = False
    assert ((~mask).sum(dim=(1, 2)) == 16).all()
    return mask.reshape(2, 64)


@pytest.fixture(scope="module")
def weighted_net():
    torch.manual_seed(0)
    return lmim.create_pretrainer("vit_test", "hog", img_size=128, weights=[1, 2, 0.5, 1]).eval()


def test_loss_ignores_visible_cells(weighted_net) -> None:
    """Editing predictions at weight-0 cells keeps each tap's loss; at weighted cells it changes."""
    torch.manual_seed(1)
    mask = _crafted_mask()
    with torch.no_grad():
        out = weighted_net(torch.randn(2, 3, 128, 128), mask)
    for k, name in enumerate(weighted_net.tap_names):
        pred, target, w = out.preds[k], out.targets[k], out.weights[k]
        np.testing.assert_allclose(
            w.numpy(), reference_weights(mask, (8, 8), weighted_net.scales[k]), atol=1e-7
        )
        visible = (w == 0).unsqueeze(-1)
        assert visible.any() and (~visible).any()
        assert out.losses[name].item() == pytest.approx(explicit_mse(pred, target, w), rel=1e-5)
        edited = masked_mse(torch.where(visible, pred + 100.0, pred), target, w)
        torch.testing.assert_close(edited, out.losses[name])
        # every weighted cell now errs by exactly 1 per dim: the loss becomes 1
        changed = masked_mse(torch.where(visible, pred, target + 1.0), target, w)
        assert changed.item() == pytest.approx(1.0, rel=1e-6)
        assert out.losses[name].item() != pytest.approx(1.0, rel=1e-2)
    assert set(out.weights[3].unique().tolist()) == {0.0, 0.75, 1.0}


def test_total_loss_is_weighted_sum(weighted_net) -> None:
    """LocalMIM's loss = sum_k schedule weight_k x tap loss_k (weights 1, 2, 0.5, 1)."""
    assert weighted_net.loss_weights == [1.0, 2.0, 0.5, 1.0]
    torch.manual_seed(2)
    with torch.no_grad():
        out = weighted_net(torch.randn(2, 3, 128, 128))
    assert list(out.losses) == weighted_net.tap_names and len(out.losses) == 4
    per_tap = [
        explicit_mse(p, t, w) for p, t, w in zip(out.preds, out.targets, out.weights, strict=True)
    ]
    expected = 1 * per_tap[0] + 2 * per_tap[1] + 0.5 * per_tap[2] + 1 * per_tap[3]
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() != pytest.approx(sum(per_tap), rel=1e-3)
