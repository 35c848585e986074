"""The fast loader (crop before decode, uint8 batches) and LitData shards: same crops as the
reference pipeline, pixels within a level, device normalisation bit-exact, shards written and
trained from through the real command lines, killed and resumed, bad shards refused in one line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lmim.data import ImageFolderDataModule, ShardsDataModule
from lmim.data.decode import CropDecode, normalize_uint8
from lmim.data.images import EncodedImage, UnreadableImageError
from lmim.data.resumable import SampleKey
from lmim.data.shards import ChunkedSampler, write_shards
from lmim.errors import ConfigError
from lmim.seeding import AUGMENT, derive_seed
from tests.runs import (
    SMALL,
    assert_same_weights,
    assert_two_processes_match_one,
    cli,
    load,
    photo_folder,
    start_cli,
    wait_for,
)

# Big enough that a 32 px view of most of an image takes PIL's 1/2-scale decode (a crop of at
# least 2 x DRAFT_MARGIN x 32 = 128 px).
PHOTO_SIDE = 160


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A real ImageFolder: 6 photo classes x 6 JPEGs (q90) of 160 px, plus a greyscale JPEG."""
    root = photo_folder(tmp_path_factory.mktemp("photos"), {"train": 6}, size=PHOTO_SIDE)
    grey = Image.open(root / "train" / "camera" / "train_0.jpg").convert("L")
    grey.save(root / "train" / "camera" / "grey.jpg", quality=90)
    return root


def folder(root: Path, pipeline: str, img_size: int = 48, **kw) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=str(root), img_size=img_size, batch_size=4, num_workers=0, pipeline=pipeline, **kw
    )
    dm.setup("fit")
    return dm


def level_rms(fast: torch.Tensor, reference: torch.Tensor, dm) -> float:
    """RMS difference in 8-bit levels between a uint8 view and a normalised float view."""
    std = torch.tensor(dm.std).view(-1, 1, 1)
    diff = (normalize_uint8(fast[None], dm.mean, dm.std)[0] - reference) * std * 255
    return float(diff.pow(2).mean().sqrt())


def test_fast_pipeline_draws_the_reference_crops_and_flips():
    """CropDecode's (box, flip) for a seed are those of RandomResizedCrop + RandomHorizontalFlip
    (the pil pipeline's transforms) for the same seed."""
    tf = CropDecode(64, (0.2, 1.0), 0.5)
    rrc = T.RandomResizedCrop(64, scale=(0.2, 1.0))
    img = Image.new("RGB", (173, 131))
    flips = set()
    for seed in range(40):
        torch.manual_seed(seed)
        top, left, h, w, flip = tf.params(173, 131)
        torch.manual_seed(seed)
        expected = rrc.get_params(img, rrc.scale, rrc.ratio)
        expected_flip = bool(torch.rand(1) < 0.5)
        assert (top, left, h, w) == tuple(expected) and flip == expected_flip
        flips.add(flip)
    assert flips == {True, False}


def test_device_normalisation_is_bit_exact():
    """uint8 -> float on the device gives exactly ToTensor + Normalize's floats."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(Image.fromarray(arr))
    ours = normalize_uint8(torch.from_numpy(arr).permute(2, 0, 1)[None], mean, std)[0]
    assert ours.dtype == torch.float32 and torch.equal(ours, reference)


def test_fast_views_match_the_reference_within_a_level(photos):
    """A view of the fast pipeline decoded at full scale is within 1 level RMS of the pil
    pipeline's view of the same sample (same box and flip; libjpeg-turbo decodes
    bit-identically; the resize is torch's uint8 bicubic). A view decoded at 1/2 scale (draft)
    differs more (the DCT's downscaling is not bicubic: docs/benchmarks.md) but is aligned with
    the reference: closer to it than to the reference moved by one pixel."""
    fast, ref = folder(photos, "fast", 32), folder(photos, "pil", 32)
    fast.train_set.seed = ref.train_set.seed = 5  # what train_dataloader sets
    tf = fast.train_set.transform
    drafted = 0
    for i in range(len(fast.train_set)):
        key = SampleKey(i, 1)
        a, label, skipped = fast.train_set[key]
        b, label_b, _ = ref.train_set[key]
        assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and label == label_b
        assert not skipped
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(5, AUGMENT, 1, i))
            _, _, h, w, _ = tf.params(PHOTO_SIDE, PHOTO_SIDE)
        if tf.draft_factor(h, w) == 1:
            assert level_rms(a, b, ref) < 1.0, (i, fast.train_set.source.samples[i][0])
            continue
        drafted += 1
        moved = [b.roll(d, dims) for d in (-1, 1) for dims in (1, 2)]
        assert level_rms(a, b, ref) < min(level_rms(a, m, ref) for m in moved)
        tf.draft_margin = 0  # the same sample decoded at full scale
        assert level_rms(fast.train_set[key][0], b, ref) < 1.0
        tf.draft_margin = 2.0
    assert 0 < drafted < len(fast.train_set)  # both decode paths were checked


def test_fast_pipeline_reads_what_load_rgb_reads(tmp_path):
    """PNG with alpha and CMYK JPEG go through PIL and to_rgb as before; non-images raise
    UnreadableImageError naming the file."""
    rng = np.random.default_rng(1)
    rgba = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(rgba)
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "CMYK").save(cmyk)
    tf = CropDecode(24, (1.0, 1.0), 0.0, ratio=(1.0, 1.0))  # the whole image, no flip
    for path in (rgba, cmyk):
        out = tf(EncodedImage(path))
        expected = tf(EncodedImage(path).decode())  # decoded by load_rgb's rules, then resized
        assert out.dtype == torch.uint8 and torch.equal(out, expected)
    text = tmp_path / "notes.jpg"
    text.write_text("<html>403</html>")
    with pytest.raises(UnreadableImageError, match="notes.jpg"):
        tf(EncodedImage(text))


def test_chunked_order_is_chunk_local_and_split_independent():
    """The shard order visits chunks whole, is a permutation, changes with the epoch, and two
    processes' batches interleave into exactly one process's global batches."""
    sizes = [5, 7, 3, 9]
    data = list(range(sum(sizes)))
    one = ChunkedSampler(data, sizes, 1, 0, seed=2)
    order = one.order()
    assert sorted(order) == data
    bounds = np.cumsum([0, *sizes])
    chunk_of = [int(np.searchsorted(bounds, i, side="right")) - 1 for i in order]
    assert sum(a != b for a, b in zip(chunk_of, chunk_of[1:], strict=False)) == len(sizes) - 1
    one.set_epoch(1)
    assert one.order() != order
    one.set_epoch(0)
    pair = [ChunkedSampler(data, sizes, 2, r, seed=2) for r in (0, 1)]
    single = [k.index for k in one]
    ranks = [[k.index for k in s] for s in pair]
    interleaved = [i for pairs in zip(*ranks, strict=True) for i in pairs]
    assert interleaved == single[: len(interleaved)]


def corrupt_record(chunk: Path, which: int = 1) -> None:
    """Zero the start (marker, tables, frame) of the ``which``-th image stored in a LitData chunk
    file, in place: the record stays where it is but no longer decodes."""
    raw = bytearray(chunk.read_bytes())
    at = -1
    for _ in range(which + 1):
        at = raw.index(b"\xff\xd8\xff", at + 1)
    raw[at : at + 500] = bytes(500)
    chunk.write_bytes(bytes(raw))


def test_shards_resume_mid_epoch_and_skip_bad_records(photos, tmp_path):
    """Shards written from the folder (one record's bytes corrupted inside its chunk): a loader
    restored from another's state hands out exactly the rest of the epoch, and the bad record
    is replaced, reported and counted like a bad file."""
    out = tmp_path / "shards"
    summary = write_shards(str(photos), str(out), chunk_bytes="200KB")
    index = json.loads((out / "index.json").read_text())
    assert summary["records"] == 37 and len(index["chunks"]) > 1
    corrupt_record(out / index["chunks"][0]["filename"])

    def make() -> ShardsDataModule:
        dm = ShardsDataModule(path=str(out), img_size=32, batch_size=4, num_workers=0, seed=3)
        dm.setup("fit")
        return dm

    first = make().train_dataloader()
    first.sampler.set_epoch(1)
    batches = iter(first)
    seen = [next(batches)[0] for _ in range(3)]
    state = first.state_dict()
    rest = [b[0] for b in batches]
    assert all(b.dtype == torch.uint8 and b.shape == (4, 3, 32, 32) for b in seen + rest)
    skipped = first.take_skipped()
    assert len(skipped) == 1 and " record " in skipped[0][0]
    resumed = make().train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    again = [b[0] for b in resumed]
    assert len(again) == len(rest) and all(
        torch.equal(a, b) for a, b in zip(again, rest, strict=True)
    )


def test_bad_shard_folders_are_refused_in_one_line(photos, tmp_path, monkeypatch):
    """An empty folder, a truncated index, a missing or truncated chunk, s3 without
    credentials, and a non-empty output folder for the writer: one ConfigError each, naming
    the fix; nothing written is touched."""
    out = tmp_path / "shards"
    write_shards(str(photos), str(out), chunk_bytes="200KB", limit=12)
    index = (out / "index.json").read_text()
    chunks = [c["filename"] for c in json.loads(index)["chunks"]]

    def refused(path) -> str:
        with pytest.raises(ConfigError) as err:
            ShardsDataModule(path=str(path)).validate()
        return str(err.value)

    (tmp_path / "empty").mkdir()
    assert "is empty" in refused(tmp_path / "empty") and "lmim.data.shards write" in refused(
        tmp_path / "empty"
    )
    assert "does not exist" in refused(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        write_shards(str(photos), str(out))
    assert (out / "index.json").read_text() == index  # the writer touched nothing

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in chunks:
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "index.json").write_text(index[: len(index) // 2])
    assert "truncated or not a LitData index" in refused(broken)
    (broken / "index.json").write_text(index)
    (broken / chunks[-1]).unlink()
    assert f"shard {chunks[-1]}" in refused(broken) and "missing" in refused(broken)
    (broken / chunks[-1]).write_bytes((out / chunks[-1]).read_bytes()[:100])
    assert "is truncated (100 of" in refused(broken)

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "no credentials for s3://" in refused("s3://bucket/imagenet-shards")


SHARD_RUN = [
    *[o for o in SMALL if not o.startswith("data")],
    "data=shards",
    "data.img_size=32",
    "data.batch_size=4",
    "data.num_workers=1",
    "trainer.max_epochs=1",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=4",
]


def test_shards_cli_write_train_kill_resume(photos, tmp_path):
    """The README's commands: `python -m lmim.data.shards write` converts the folder (leaving
    out a file that is no image, and saying so), `python -m lmim.train data=shards` trains on
    the shards with a loader worker; killed with SIGKILL mid-epoch and re-run, it ends with the
    weights of a run never stopped. A record corrupted inside its chunk is skipped and listed
    in skipped_images.tsv."""
    train = tmp_path / "data" / "train"
    shutil.copytree(photos / "train", train)
    (train / "camera" / "notes.jpg").write_text("<html>403 Forbidden</html>")
    wrote = cli(
        "write",
        f"data.root={tmp_path / 'data'}",
        "out=shards",
        "chunk_bytes=100KB",
        cwd=tmp_path,
        module="lmim.data.shards",
    )
    assert wrote.returncode == 0, wrote.stderr[-3000:]
    assert "wrote 37 records of 6 classes" in wrote.stdout
    assert "left out 1 unreadable files, e.g. ('camera/notes.jpg'" in wrote.stdout
    assert f"data.path={tmp_path / 'shards'}" in wrote.stdout
    # One record corrupted inside its chunk: skipped, listed and counted by both runs alike.
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    corrupt_record(tmp_path / "shards" / index["chunks"][0]["filename"])
    args = [*SHARD_RUN, f"data.path={tmp_path / 'shards'}", "data.max_skipped_share=0.2"]
    reference = start_cli(
        *args, f"hydra.run.dir={tmp_path}/ref", cwd=tmp_path, log=tmp_path / "ref.log"
    )
    run = [*args, f"hydra.run.dir={tmp_path}/run"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = start_cli(*run, cwd=tmp_path, log=tmp_path / "first.log")
    wait_for(last, proc, log=tmp_path / "first.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load(last)["global_step"]
    steps = 37 // 4  # one epoch
    assert 0 < killed_at < steps
    again = cli(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last} (step {killed_at})" in again.stdout + again.stderr
    assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert load(last)["global_step"] == steps
    assert_same_weights(last, tmp_path / "ref" / "checkpoints" / "last.ckpt")
    listed = (tmp_path / "ref" / "skipped_images.tsv").read_text().splitlines()
    assert listed and all(" record " in line for line in listed)


def test_shards_refusals_are_one_line(tmp_path, capsys):
    """Training on an empty shard folder through the command line, and the writer without
    data.root: exit status 2 and one line naming the fix, before anything is written."""
    from omegaconf import OmegaConf

    from lmim.data.shards import _write_task

    (tmp_path / "empty").mkdir()
    empty = cli(*SHARD_RUN, f"data.path={tmp_path / 'empty'}", cwd=tmp_path)
    assert empty.returncode == 2, empty.stderr[-2000:]
    line = [x for x in empty.stderr.splitlines() if x.startswith("lmim: error")]
    assert len(line) == 1 and "is empty" in line[0] and "lmim.data.shards write" in line[0]
    cfg = OmegaConf.create({"data": {"root": None, "split": "train"}, "out": str(tmp_path / "x")})
    with pytest.raises(SystemExit) as exit_:
        _write_task(cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "lmim: error: data.root is not set: pass data.root=/path/to/imagenet (a folder holding "
        "train/<class>/<images>)"
    )
    assert not (tmp_path / "x").exists()


def dali_batch(dm, keys):
    """A batch of ``dm``'s training samples as the dali pipeline's workers collate it."""
    from lmim.data.dali import collate_encoded

    return collate_encoded([dm.train_set[k] for k in keys])


def test_dali_views_match_the_reference(photos):
    """data.pipeline=dali on the CPU (DALI's CPU operators; nvJPEG on a GPU): the workers draw
    the reference crops and flips, DALI decodes the crop regions and resizes them; every view
    is within 2 levels RMS of the pil pipeline's view of the same sample, and no batch needed
    the CPU fallback."""
    from lmim.data.dali import DaliDecoder, EncodedBatch

    dali, ref = folder(photos, "dali", 32), folder(photos, "pil", 32)
    dali.train_set.seed = ref.train_set.seed = 5
    keys = [SampleKey(i, 1) for i in range(len(dali.train_set))]
    encoded, labels, skipped = dali_batch(dali, keys)
    assert isinstance(encoded, EncodedBatch) and not skipped
    decoder = DaliDecoder(32, len(keys), torch.device("cpu"))
    views, replaced = decoder(encoded)
    assert views.dtype == torch.uint8 and views.shape == (len(keys), 3, 32, 32)
    assert not replaced and decoder.fallbacks == 0
    for i, key in enumerate(keys):
        b, label, _ = ref.train_set[key]
        assert label == int(labels[i])
        assert level_rms(views[i], b, ref) < 2.0, (i, dali.train_set.source.samples[i][0])


def test_dali_bad_files_are_skipped_or_replaced(photos, tmp_path):
    """A truncated JPEG is replaced in the worker (no end-of-image marker), like in the other
    pipelines; a JPEG corrupted inside (it passes the worker's checks) makes DALI fail, and the
    batch is decoded on the CPU with that file replaced by another image and reported."""
    from lmim.data.dali import DaliDecoder

    root = tmp_path / "data"
    shutil.copytree(photos / "train" / "coffee", root / "train" / "coffee")
    good = sorted((root / "train" / "coffee").glob("*.jpg"))
    cut = root / "train" / "coffee" / "cut.jpg"
    cut.write_bytes(good[0].read_bytes()[:-400])
    dm = folder(root, "dali", 32, drop_last=False)
    names = [p for p, _ in dm.train_set.source.samples]
    _, _, skipped = dm.train_set[SampleKey(names.index(str(cut)), 0)]
    assert [p for p, _ in skipped] == [str(cut)] and "end-of-image" in skipped[0][1]

    keys = [SampleKey(i, 0) for i in range(len(names)) if names[i] != str(cut)]
    batch, _, _ = dali_batch(dm, keys)
    broken = bytearray(batch.data[1].tobytes())
    broken[600:-2] = bytes(len(broken) - 602)  # zeroed from the tables on: no scan left
    batch.data[1] = np.frombuffer(bytes(broken), dtype=np.uint8)
    decoder = DaliDecoder(32, len(keys), torch.device("cpu"))
    views, replaced = decoder(batch)
    assert views.shape == (len(keys), 3, 32, 32)
    assert decoder.fallbacks == 1 and [p for p, _ in replaced] == [batch.names[1]]
    # replaced by another view of the batch
    assert any(torch.equal(views[1], views[j]) for j in range(len(keys)) if j != 1)


def test_dali_batches_reach_the_model_normalised(photos):
    """What Lightning does with a dali batch: the loader yields undecoded files, the
    DataModule's on_after_batch_transfer decodes them (DALI) and normalises them."""
    from lmim.data.dali import EncodedBatch

    dm = folder(photos, "dali", 32)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch[0], EncodedBatch) and len(batch[0]) == 4
    images, labels = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32)
    assert torch.equal(labels, batch[1]) and -3 < float(images.mean()) < 3


@pytest.mark.slow
def test_dali_cli_trains(photos, tmp_path):
    """`python -m lmim.train data=imagefolder_dali` trains through Lightning on the CPU."""
    run = cli(
        *[o for o in SMALL if not o.startswith("data")],
        "data=imagefolder_dali",
        f"data.root={photos}",
        "data.img_size=32",
        "data.batch_size=4",
        "data.num_workers=1",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
def test_shards_ddp_two_processes_match_one_process(photos, tmp_path):
    """Real process groups on shards: 2 gloo processes x 4 images and 1 process x 8 images
    (same global batch) log the same global-batch losses over 4 steps, within 1e-5: the
    chunk-local order is split across processes like DistributedSampler."""
    write_shards(str(photos), str(tmp_path / "shards"), chunk_bytes="100KB")
    common = [
        *[o for o in SMALL if not o.startswith(("trainer=", "data"))],
        "data=shards",
        f"data.path={tmp_path / 'shards'}",
        "data.img_size=32",
        "data.num_workers=0",
        "trainer.max_steps=4",
        "trainer.max_epochs=-1",
    ]
    assert_two_processes_match_one(common, tmp_path, steps=4)
