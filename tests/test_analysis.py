"""The attention analysis (lmim.analysis) by value: NMI and attention distance on matrices whose
answer is known, against a loop over the definition, and attention recorded from timm's own
blocks equal to the attention computed by hand from their weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from lmim import create_pretrainer
from lmim.analysis import (
    analyze_encoder,
    attention_distance,
    attention_layouts,
    attention_maps,
    attention_modules,
    attention_nmi,
    patch_layout,
    query_attention,
    recorded_attention,
    spread_layers,
    spread_queries,
    window_layout,
)
from tests import runs


def nmi_by_loops(attn: list[list[float]]) -> float:
    """The definition, one term at a time (p(q) uniform, p(k) = mean_q A[q, k])."""
    q, k = len(attn), len(attn[0])
    rows = [[a / sum(row) for a in row] for row in attn]
    p_k = [sum(rows[i][j] for i in range(q)) / q for j in range(k)]
    mutual = sum(
        rows[i][j] / q * math.log(rows[i][j] / p_k[j])
        for i in range(q)
        for j in range(k)
        if rows[i][j] > 0
    )
    h_k = -sum(p * math.log(p) for p in p_k if p > 0)
    return mutual / math.sqrt(math.log(q) * h_k)


def attend_uniformly(model: nn.Module) -> nn.Module:
    """Zero every attention's q and k projections (and Swin's relative-position bias): each
    query then attends uniformly over the keys it may see."""
    with torch.no_grad():
        for m in attention_modules(model):
            d = m.qkv.in_features
            m.qkv.weight[: 2 * d].zero_()
            m.qkv.bias[: 2 * d].zero_()
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.zero_()
    return model


def test_nmi_of_known_attention():
    """Uniform rows: 0; each query on a key of its own: 1; all queries on one key: 0 (H(K) = 0);
    two groups of two queries, each spread over its group's two keys: log 2 / log 4 = 0.5."""
    n = 6
    assert attention_nmi(torch.full((n, n), 1 / n)).item() == pytest.approx(0, abs=1e-12)
    assert attention_nmi(torch.eye(n)).item() == pytest.approx(1, abs=1e-12)
    perm = torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    assert attention_nmi(perm).item() == pytest.approx(1, abs=1e-12)
    one_key = torch.zeros(n, n)
    one_key[:, 2] = 1
    assert attention_nmi(one_key).item() == 0
    groups = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    assert attention_nmi(groups).item() == pytest.approx(0.5, abs=1e-12)


def test_nmi_equals_the_definition_and_drops_prefix_tokens():
    """Random softmax rows with a cls token: per image and head, the NMI over patches (cls row
    and column removed, rows renormalised) equals the loop over the definition."""
    g = torch.Generator().manual_seed(1)
    attn = (torch.randn(2, 3, 10, 10, generator=g) * 2).softmax(-1)
    got = attention_nmi(attn, num_prefix=1)
    assert got.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            patches = attn[b, h, 1:, 1:].double().tolist()
            assert got[b, h].item() == pytest.approx(nmi_by_loops(patches), rel=1e-9)
    assert got.min() > 0 and got.max() < 1


def test_attention_distance_by_value():
    """2x2 patches of 16 px: attending to itself is 0 px away; to the patch on its right
    (or left), 16 px; uniform attention, (0 + 16 + 16 + 16 sqrt 2) / 4 px."""
    assert attention_distance(torch.eye(4), (2, 2), 16).item() == 0
    right = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert attention_distance(right, (2, 2), 16).item() == pytest.approx(16)
    uniform = torch.full((4, 4), 0.25)
    expected = (0 + 16 + 16 + 16 * math.sqrt(2)) / 4
    assert attention_distance(uniform, (2, 2), 16).item() == pytest.approx(expected)
    with_cls = torch.zeros(5, 5)
    with_cls[:, 0] = 0.5
    with_cls[1:, 1:] = 0.125  # half on cls, the rest uniform over the patches
    got = attention_distance(with_cls, (2, 2), 16, num_prefix=1)
    assert got.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="num_prefix and grid"):
        attention_distance(with_cls, (2, 2), 16)


def test_recorded_attention_is_the_blocks_own():
    """A timm Block inside recorded_attention: the recorded matrix is softmax(q k^T / sqrt(d))
    from the block's own qkv weights, the block's output is the fused path's, and afterwards
    the block is as before (fused_attn restored, no hook left)."""
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4).eval()
    attn = block.attn
    fused = attn.fused_attn
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        plain = block(x)
        with recorded_attention(block) as records:
            explicit = block(x)
        q, k, _ = attn.qkv(block.norm1(x)).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    (calls,) = records
    (recorded,) = calls
    by_hand = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    assert recorded.shape == (2, 4, 7, 7)
    torch.testing.assert_close(recorded, by_hand)
    torch.testing.assert_close(explicit, plain, atol=1e-5, rtol=1e-5)
    assert attn.fused_attn == fused and not attn.attn_drop._forward_hooks


def test_uniform_attention_encoder_scores_zero_nmi_and_the_mean_distance():
    """An lmim ViT whose q and k projections are zero attends uniformly at every block: NMI 0
    at each of its 8 layers and the mean pairwise distance of its 4x4 patch grid."""
    encoder = create_pretrainer("vit_test", img_size=64).encoder
    assert patch_layout(encoder) == (1, (4, 4), 16)
    attend_uniformly(encoder)
    out = analyze_encoder(encoder, torch.randn(3, 3, 64, 64))
    assert len(out["nmi"]) == encoder.depth == 8
    assert out["nmi"] == pytest.approx([0] * 8, abs=1e-9)
    centres = [(r * 16, c * 16) for r in range(4) for c in range(4)]
    mean = sum(math.dist(a, b) for a in centres for b in centres) / 16**2
    assert out["distance"] == pytest.approx([mean] * 8)
    assert all(len(h) == 2 for h in out["nmi_per_head"])  # vit_test: 2 heads
    assert encoder.training  # left as found


def test_trained_like_attention_differs_by_layer():
    """With random weights the layers' scores differ (the analysis reads each block), lie in
    [0, 1] and within the grid's largest distance."""
    torch.manual_seed(0)
    encoder = create_pretrainer("vit_test", img_size=64).encoder.eval()
    out = analyze_encoder(encoder, torch.randn(2, 3, 64, 64), 1, (4, 4), 16)
    assert len(set(out["nmi"])) == 8
    assert all(0 <= v <= 1 for v in out["nmi"])
    assert all(0 <= d <= 16 * 3 * math.sqrt(2) for d in out["distance"])


def test_a_model_without_attention_is_refused():
    """A module without timm attention, or without a patch grid, is refused naming the fix."""
    with (
        pytest.raises(ValueError, match="timm ViT/Swin or an lmim encoder"),
        recorded_attention(nn.Linear(2, 2)),
    ):
        pass
    with pytest.raises(ValueError, match="pass grid, patch_size and num_prefix"):
        analyze_encoder(Block(dim=8, num_heads=2), torch.randn(1, 5, 8))
    assert len(attention_modules(create_pretrainer("vit_test", img_size=64).encoder)) == 8


def test_query_attention_by_value():
    """With a cls token in front, the identity's query row is one-hot at the query patch; a row
    that puts half on cls is renormalised over the patches; heads are averaged."""
    eye = torch.eye(5).expand(1, 2, 5, 5)
    row = query_attention(eye, query=2, num_prefix=1)
    assert row.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    heads = torch.zeros(1, 2, 5, 5)
    heads[0, 0, 3, :] = torch.tensor([0.5, 0.5, 0, 0, 0])  # head 0: half on cls, half on patch 0
    heads[0, 1, 3, :] = torch.tensor([0.0, 0, 0, 0, 1])  # head 1: all on patch 3
    assert query_attention(heads, query=2, num_prefix=1).tolist() == [[0.5, 0.0, 0.0, 0.5]]


def test_attention_maps_of_a_uniform_encoder():
    """The zero-q/k ViT attends uniformly: every map of the default three diagonal queries at
    the default four layers (first to last) is 1/16 over its 4x4 grid."""
    assert spread_queries((4, 4)) == [(1, 1), (2, 2), (3, 3)]
    assert spread_layers(8) == [0, 2, 5, 7] and spread_layers(12) == [0, 4, 7, 11]
    assert spread_layers(3) == [0, 1, 2]
    encoder = create_pretrainer("vit_test", img_size=64).encoder
    attend_uniformly(encoder)
    out = attention_maps(encoder, torch.randn(2, 3, 64, 64))
    assert out["queries"] == [(1, 1), (2, 2), (3, 3)] and out["layers"] == [0, 2, 5, 7]
    assert out["maps"].shape == (4, 2, 3, 64, 64)  # on the pixels: each patch's weight on its own
    torch.testing.assert_close(out["maps"], torch.full((4, 2, 3, 64, 64), 1 / 16))
    with pytest.raises(ValueError, match=r"query \(4, 0\) is outside the 4x4 patch grid"):
        attention_maps(encoder, torch.randn(1, 3, 64, 64), queries=[(4, 0)])
    with pytest.raises(ValueError, match="layer 8 does not exist: the encoder has 8"):
        attention_maps(encoder, torch.randn(1, 3, 64, 64), layers=[8])


# -- python -m lmim.analyze ----------------------------------------------------------------------


def test_readme_analysis_of_a_demo_checkpoint_its_export_and_a_random_baseline(make_cfg, tmp_path):
    """The README's ``python -m lmim.analyze checkpoints=[<demo last.ckpt>] exports=[encoder.pth]
    timm_model=vit_tiny_patch16_224 init_model=vit_tiny`` (the demo recipe cut to 2 steps; the
    export written by ``python -m lmim.export``): analysis.json holds, per encoder, 12 per-layer
    NMI and distance values; the checkpoint's equal those of its encoder analysed here on the
    same val images, and those of its timm export; both figures are written, their paths
    printed."""
    from lmim.analyze import val_images
    from lmim.export import load_pretrainer
    from lmim.train import train

    demo = ["experiment=demo", "trainer.max_steps=2", "~callbacks.reconstruction", "logger=wandb"]
    ckpt = Path(train(make_cfg([*demo, "data.num_workers=0"]))["checkpoint"])
    export = runs.cli(str(ckpt), "--out", "encoder.pth", cwd=tmp_path, module="lmim.export")
    assert export.returncode == 0, export.stderr[-3000:]
    assert "vit_tiny_patch16_224" in export.stdout
    run = tmp_path / "analysis"
    args = [
        f"checkpoints=[{ckpt}]", "exports=[encoder.pth]", "timm_model=vit_tiny_patch16_224",
        "init_model=vit_tiny",
    ]  # fmt: skip
    train_run = ckpt.parent.parent
    proc = runs.cli(
        *args, "logger=wandb", f"wandb_run={train_run}", f"hydra.run.dir={run}", cwd=tmp_path,
        module="lmim.analyze",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Logged into the pre-training run's W&B run (its id, its name kept), offline here.
    from lmim.wandb_file import read_wandb_file

    (logged,) = [read_wandb_file(f) for f in run.glob("wandb/offline-run-*/run-*.wandb")]
    assert logged.run_id == (train_run / "wandb_run_id").read_text().strip()
    assert logged.job_type != "analyze" and logged.name != "analyze"
    assert any(h.get("analysis/layers/nrows") == 36 for h in logged.history)  # 3 x 12 layers
    for name in ("analysis.json", "nmi.png", "attention_distance.png", "attention_maps.png"):
        assert f": {run / name}" in proc.stdout
    record = json.loads((run / "analysis.json").read_text())
    assert record["num_images"] == 32 and record["img_size"] == 96
    for r in record["encoders"].values():  # 6x6 patches at 96 px: three diagonal queries
        assert r["maps"] == {"queries": [[1, 1], [3, 3], [4, 4]], "layers": [0, 4, 7, 11]}
    # 3 encoders x 3 queries = 9 rows, the query and 4 layers = 5 columns (1.7 x 1.6 in, 110 dpi)
    assert matplotlib.image.imread(run / "attention_maps.png").shape[:2] == (1683, 880)
    label = ckpt.parent.parent.name
    assert list(record["encoders"]) == [label, "encoder.pth", "vit_tiny (random init)"]
    for r in record["encoders"].values():
        assert len(r["nmi"]) == len(r["distance"]) == 12
        assert len(r["nmi_per_head"][0]) == 3  # ViT-Ti: 3 heads
    images = val_images(make_cfg(args, config_name="analyze"))
    expected = analyze_encoder(load_pretrainer(ckpt).encoder, images)
    for key in ("nmi", "distance"):
        ours = record["encoders"][label][key]
        assert ours == pytest.approx(expected[key], rel=1e-6)
        assert record["encoders"]["encoder.pth"][key] == pytest.approx(ours, rel=1e-5)
    random = record["encoders"]["vit_tiny (random init)"]["nmi"]
    assert random != pytest.approx(record["encoders"][label]["nmi"], rel=1e-3)
    assert matplotlib.image.imread(run / "nmi.png").shape[1] > 300


def test_readme_analysis_of_a_random_baseline(tmp_path):
    """``python -m lmim.analyze init_model=vit_tiny data=demo``, as the README shows it."""
    run = tmp_path / "run"
    proc = runs.cli(
        "init_model=vit_tiny", "data=demo", f"hydra.run.dir={run}", cwd=tmp_path,
        module="lmim.analyze",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "analysis.json").read_text())
    (scores,) = record["encoders"].values()
    assert len(scores["nmi"]) == 12 and all(0 < v < 1 for v in scores["nmi"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Two of the four in the slow suite (the same one-line path), for the fast suite's time.
        pytest.param(
            [],
            "lmim: error: nothing to analyze: pass checkpoints=[path/to/last.ckpt,...]",
            marks=pytest.mark.slow,
        ),
        (["exports=[enc.pth]"], "lmim: error: exports=[enc.pth] needs timm_model=<the timm"),
        pytest.param(
            ["exports=[missing.pth]", "timm_model=vit_tiny_patch16_224"],
            "lmim: error: missing.pth is not a readable encoder file (FileNotFoundError)",
            marks=pytest.mark.slow,
        ),
        (
            ["init_model=vit_test", "data.img_size=64", "maps.queries=[[9,9]]"],
            "lmim: error: maps: vit_test (random init): query (9, 9) is outside the 4x4 patch grid",
        ),
    ],
)
def test_analyze_refuses_in_one_line(tmp_path, args, message):
    """Nothing to analyze, an export without its timm name or file, a query outside the patch
    grid: one line on stderr naming the fix, exit status 2."""
    proc = runs.cli(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, module="lmim.analyze")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["init_model=swin_test", "data.img_size=96"],
            "swin_test (random init): a 6x6 Swin stage grid is not tiled by its 4x4 windows "
            "(timm pads it with tokens outside the image)",
        ),
        (["init_model=vit_test", "labels=[a,b]"], "labels=['a', 'b'] must name the 1 encoders"),
        (
            ["init_model=vit_test", "wandb_run=3kz9x0qa"],
            "wandb_run=3kz9x0qa is only used with W&B logging: add logger=wandb",
        ),
        (
            ["init_model=vit_test", "logger=wandb", "wandb_run=no/such/run"],
            "wandb_run=no/such/run is neither a run folder nor a W&B run id",
        ),
        (
            ["init_model=vit_test", "logger=wandb", "wandb_run=."],
            "wandb_run=.: the folder has no wandb_run_id file",
        ),
    ],
)
def test_analyze_refuses_before_reading_images(make_cfg, args, message):
    """A Swin whose windows do not tile a stage, labels that do not match the encoders, a W&B
    run without W&B logging or that is neither a run folder nor an id: the ConfigError (which
    the command prints as its one ``lmim: error:`` line, as above) names the fix."""
    from lmim.analyze import analyze
    from lmim.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        analyze(make_cfg([*args, "data.num_workers=0"], config_name="analyze"))
    assert str(err.value).startswith(message)


def test_a_checkpoint_and_its_timm_export_give_the_same_analysis():
    """The lmim encoder and the timm VisionTransformer its weights export to (strict load) have
    the same layout and the same NMI and attention distance at every layer."""
    from lmim.export import encoder_state_dict, timm_model

    torch.manual_seed(0)
    net = create_pretrainer("vit_test", img_size=64)
    exported = timm_model(net.encoder)
    exported.load_state_dict(encoder_state_dict(net), strict=True)
    assert patch_layout(exported) == patch_layout(net.encoder) == (1, (4, 4), 16)
    images = torch.randn(3, 3, 64, 64)
    ours, theirs = analyze_encoder(net.encoder, images), analyze_encoder(exported, images)
    assert ours["nmi"] == pytest.approx(theirs["nmi"], rel=1e-5)
    assert ours["distance"] == pytest.approx(theirs["distance"], rel=1e-5)


def test_analyze_refuses_a_cnn_an_empty_folder_and_a_wrong_size(tmp_path):
    """A timm CNN exported as a state dict (no attention), an ImageFolder without images, and a
    ViT export at a size its position embeddings do not take: one ``lmim:`` line each, naming
    the fix, exit status 2, no traceback."""
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "cnn.pth")
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)  # 4x4 patches
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    cmds = runs.Commands(tmp_path)
    cases = {
        "cnn": (
            ["exports=[cnn.pth]", "timm_model=resnet18"],
            "lmim: error: cnn.pth: lmim.analyze reads lmim encoders and timm ViT and Swin "
            "models, not ResNet: it has no attention layers to analyse",
        ),
        "empty": (
            ["init_model=vit_test", "data=imagefolder", f"data.root={tmp_path}/empty"],
            f"lmim: error: data.root={tmp_path}/empty: {tmp_path}/empty/train holds no images",
        ),
        "size": (
            ["exports=[vit.pth]", "timm_model=vit_tiny_patch16_224", "data.img_size=96"],
            "lmim: error: vit.pth does not load into timm_model=vit_tiny_patch16_224 at "
            "data.img_size=96",
        ),
    }
    for key, (args, _) in cases.items():
        cmds.add(key, "lmim.analyze", *args, f"hydra.run.dir={tmp_path}/{key}", cwd=tmp_path)
    cmds.start_all()
    try:
        for key, (_, message) in cases.items():
            proc = cmds.result(key)
            assert proc.returncode == 2, (key, proc.stderr[-3000:])
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmim:")]
            assert len(lines) == 1 and lines[0].startswith(message), (key, proc.stderr[-2000:])
            assert "Traceback" not in proc.stderr
    finally:
        cmds.stop()


def test_batches_give_the_scores_of_one_pass():
    """Scored in batches of 2 (one batch's attention in memory at a time) or all at once: the
    same per-layer NMI and distance."""
    torch.manual_seed(0)
    encoder = create_pretrainer("vit_test", img_size=64).encoder
    images = torch.randn(5, 3, 64, 64)
    whole = analyze_encoder(encoder, images, batch_size=5)
    parts = analyze_encoder(encoder, images, batch_size=2)
    for key in ("nmi", "distance"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-6), key
    for got, want in zip(parts["nmi_per_head"], whole["nmi_per_head"], strict=True):
        assert got == pytest.approx(want, rel=1e-6)


# -- Swin: attention inside (shifted) windows ----------------------------------------------------


def tiny_swin(**kw):
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                window_size=4, num_classes=0)  # fmt: skip
    return SwinTransformer(**{**args, **kw}).eval()


def test_window_layout_is_timms_roll_and_partition():
    """The layout's cells are the coordinates timm's own roll and window_partition put in each
    window (a coordinate grid pushed through them); a grid the window does not tile is refused."""
    from timm.models.swin_transformer import window_partition

    h, w, ws, shift = 8, 12, 4, 2
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    rolled = torch.roll(coords[None], shifts=(-shift, -shift), dims=(1, 2))
    expected = window_partition(rolled, (ws, ws)).reshape(-1, ws * ws, 2)
    layout = window_layout((h, w), (ws, ws), (shift, shift), stride=8)
    assert torch.equal(layout.cells, expected) and layout.windows == 6
    assert layout.cells[0, :2].tolist() == [[2, 2], [2, 3]]
    with pytest.raises(ValueError, match="6x6 Swin stage grid is not tiled by its 4x4 windows"):
        window_layout((6, 6), (4, 4), (0, 0), 8)
    swin = tiny_swin()
    found = [(lay.grid, lay.windows, lay.stride) for lay in attention_layouts(swin)]
    assert found == [((8, 8), 4, 4), ((8, 8), 4, 4), ((4, 4), 1, 8), ((4, 4), 1, 8)]


def test_swin_scores_by_value():
    """A timm Swin with zero q/k and zero relative-position bias attends uniformly within each
    region Swin's mask allows: the unshifted blocks score NMI 0, the shifted one the NMI of its
    region-uniform windows (the definition on softmax(timm's mask), window by window, averaged);
    the distances are those of the true token positions (timm's roll applied to a coordinate
    grid) averaged over each query's region."""
    from timm.models.swin_transformer import window_partition

    swin = attend_uniformly(tiny_swin())
    out = analyze_encoder(swin, torch.randn(2, 3, 32, 32))
    blocks = [b for layer in swin.layers for b in layer.blocks]
    assert [tuple(b.shift_size) for b in blocks] == [(0, 0), (2, 2), (0, 0), (0, 0)]
    for i, blk in enumerate(blocks):
        n = blk.window_size[0] * blk.window_size[1]
        res = blk.input_resolution
        stride = 32 // res[0]
        mask = blk.attn_mask if blk.attn_mask is not None else torch.zeros(1, n, n)
        attn = mask.softmax(-1)  # (windows, n, n): uniform over each query's region
        coords = torch.stack(
            torch.meshgrid(torch.arange(res[0]), torch.arange(res[1]), indexing="ij"), -1
        )
        rolled = torch.roll(coords[None], shifts=tuple(-s for s in blk.shift_size), dims=(1, 2))
        pos = window_partition(rolled, blk.window_size).reshape(-1, n, 2).double() * stride
        nmi = sum(nmi_by_loops(a.tolist()) for a in attn) / len(attn)
        dist = float((attn.double() * torch.cdist(pos, pos)).sum(-1).mean())
        assert out["nmi"][i] == pytest.approx(nmi, abs=1e-6), i
        assert out["distance"][i] == pytest.approx(dist, rel=1e-5), i
    assert out["nmi"][0] == pytest.approx(0, abs=1e-9) and out["nmi"][1] > 0.1
    # The shifted windows hold tokens from the far side of the grid, which attend only within
    # their own region: the distance stays within one window.
    assert out["distance"][1] < out["distance"][0] * 1.5


def test_swin_attention_maps_stay_in_the_querys_window():
    """Each map is the query token's attention over its window's keys on the pixels: 0 outside
    the window, each key's weight on its stride x stride pixels (so a map sums to stride^2); a
    uniform unshifted window gives 1/16 on each of its pixels."""
    swin = attend_uniformly(tiny_swin())
    out = attention_maps(swin, torch.randn(1, 3, 32, 32), queries=[(1, 6)], layers=[0, 1, 2])
    maps = out["maps"]
    assert maps.shape == (3, 1, 1, 32, 32)
    first = maps[0, 0, 0]  # query patch (1, 6): the top-right 16x16 window of block 1
    torch.testing.assert_close(first[:16, 16:], torch.full((16, 16), 1 / 16))
    assert float(first.sum() - first[:16, 16:].sum()) == 0
    for k, stride in enumerate((4, 4, 8)):
        assert float(maps[k, 0, 0].sum()) == pytest.approx(stride**2, rel=1e-5)


def test_a_swin_pretrainer_is_analysed_as_its_timm_export():
    """lmim's MaskedSwin has no attention matrix to record (fused kernels); lmim.analyze reads
    the timm SwinTransformer its weights export to, which computes the same stage outputs."""
    from lmim.analyze import analysable

    torch.manual_seed(0)
    net = create_pretrainer("swin_test", img_size=64)
    with pytest.raises(
        ValueError,
        match="MaskedSwin computes its attention in fused kernels: analyse the timm model",
    ):
        attention_layouts(net.encoder)
    swin = analysable(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = net.encoder(x)[-1]  # (B, 4, C): the last stage, 2x2 tokens (one per unit)
        theirs = swin.layers(swin.patch_embed(x)).reshape(2, 4, -1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    out = analyze_encoder(swin, x)
    assert len(out["nmi"]) == 8 and all(0 <= v <= 1 for v in out["nmi"])


def test_readme_swin_analysis_logged_to_wandb(tmp_path):
    """``python -m lmim.analyze init_model=swin_test data.img_size=64 logger=wandb``: the Swin's
    8 blocks scored, the figures written, and an offline W&B run (job type analyze) whose
    per-layer table holds the numbers of analysis.json."""
    from lmim.wandb_file import read_wandb_file

    run = tmp_path / "run"
    proc = runs.cli(
        "init_model=swin_test", "data.img_size=64", "logger=wandb",
        f"hydra.run.dir={run}", cwd=tmp_path, module="lmim.analyze",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "analysis.json").read_text())
    (scores,) = record["encoders"].values()
    assert len(scores["nmi"]) == 8 and all(0 < v < 1 for v in scores["nmi"])
    assert scores["maps"] == {"queries": [[4, 4], [8, 8], [12, 12]], "layers": [0, 2, 5, 7]}
    (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_wandb_file(file)
    assert logged.job_type == "analyze" and logged.exit_code == 0
    (row,) = [h for h in logged.history if "analysis/layers/path" in h]
    assert row["analysis/layers/nrows"] == 8 and "analysis/attention_maps_png/path" in row
    table = json.loads((file.parent / "files" / row["analysis/layers/path"]).read_text())
    assert table["columns"] == ["encoder", "layer", "nmi", "attention_distance_px"]
    assert [r[2] for r in table["data"]] == pytest.approx(scores["nmi"])
    assert [r[3] for r in table["data"]] == pytest.approx(scores["distance"])
    label = "swin_test (random init)"
    assert logged.summary[f"analysis/{label}/nmi_first"] == pytest.approx(scores["nmi"][0])
