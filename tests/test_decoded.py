"""The decode-once pipeline: seeded per-sample views, loader order, on-disk arrays."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from conkd.data import DataModule
from conkd.decoded import ARRAY_FILE, META_FILE, DecodedArray, decode_key
from conkd.errors import ConKDError
from conkd.loaders import DecodedLoader, EpochSampler, keep_resident
from conkd.sources import ImageFolderSource, Split
from conkd.views import IMAGENET_MEAN, IMAGENET_STD, VERSION, ViewSpec, render


def make_dm(
    source: ImageFolderSource,
    cache: Path,
    *,
    size: int | None = None,
    augment: dict[str, Any] | None = None,
    **kwargs: Any,
) -> DataModule:
    options: dict[str, Any] = dict(
        image_size=24, batch_size=8, eval_batch_size=3, num_workers=0, seed=3, augment=augment
    )
    options.update(kwargs)
    decode = {"dir": str(cache), "size": size, "workers": 0, "progress": False,
              "resident": options.pop("resident", "auto")}  # fmt: skip
    return DataModule(source, decode=decode, **options)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ToDtype(scale) + Normalize of a uint8 batch, written out by hand."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def views(loader: Any) -> dict[int, torch.Tensor]:
    return {int(i): x[k] for x, _, index in loader for k, i in enumerate(index)}


@pytest.fixture(scope="module")
def source(image_folder: Path) -> ImageFolderSource:
    return ImageFolderSource(str(image_folder))


def test_view_depends_only_on_seed_epoch_index(source: ImageFolderSource, tmp_path: Path) -> None:
    dm = make_dm(source, tmp_path, size=40)
    torch.manual_seed(0)
    by_8 = views(dm.loaders().train(1))
    # other batch size (another composition), other global RNG state
    other = make_dm(source, tmp_path, size=40, batch_size=6)
    torch.manual_seed(12345)
    by_6 = views(other.loaders().train(1))
    common = sorted(set(by_8) & set(by_6))
    assert len(common) >= 20
    for i in common:
        assert torch.equal(by_8[i], by_6[i]), i
    # a hand-made batch in reverse order, straight through the transform
    spec = ViewSpec(24, train=True)
    rows = [dm.train.indices[i] for i in common[::-1]]
    x = torch.from_numpy(np.asarray(dm.decoded("train").array[rows]))
    direct = render(spec, x, spec.draw(3, 1, torch.tensor(common[::-1])))
    for k, i in enumerate(common[::-1]):
        assert torch.equal(direct[k], by_8[i]), i
    # another epoch: another view of every sample
    epoch2 = views(dm.loaders().train(2))
    for i in set(epoch2) & set(by_8):
        assert not torch.equal(epoch2[i], by_8[i]), i


def test_photometric_ops_are_seeded_per_sample(source: ImageFolderSource, tmp_path: Path) -> None:
    augment = {"randaugment_ops": 2, "color_jitter": 0.4}
    dm = make_dm(source, tmp_path, size=40, augment=augment)
    state = torch.get_rng_state()
    by_8 = views(dm.loaders().train(0))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    by_6 = views(
        make_dm(source, tmp_path, size=40, batch_size=6, augment=augment).loaders().train(0)
    )
    for i in set(by_8) & set(by_6):
        assert torch.equal(by_8[i], by_6[i]), i
    plain = views(make_dm(source, tmp_path, size=40).loaders().train(0))
    differ = [i for i in by_8 if not torch.equal(by_8[i], plain[i])]
    assert len(differ) == len(by_8)  # the photometric ops changed every view


def test_loader_order_is_the_epoch_samplers(source: ImageFolderSource, tmp_path: Path) -> None:
    dm = make_dm(source, tmp_path, size=40)
    loader = dm.loaders().train(4)
    assert isinstance(loader, DecodedLoader) and len(loader) == len(dm.train) // 8
    positions, labels = [], []
    for x, y, index in loader:
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32
        positions += index.tolist()
        labels += y.tolist()
    sampler = EpochSampler(len(dm.train), 3, shuffle=True)
    sampler.set_epoch(4)
    expected = [i for _, i in sampler][: len(loader) * 8]
    assert positions == expected
    assert labels == [dm.train.targets[i] for i in expected]
    # evaluation: every sample once, in dataset order, last batch short
    batches = list(dm.loaders().eval("val"))
    assert [len(b[2]) for b in batches] == [3, 1]
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(len(dm.val)))
    assert torch.cat([b[1] for b in batches]).tolist() == dm.val.targets


def test_resident_arrays_give_the_same_batches(source: ImageFolderSource, tmp_path: Path) -> None:
    """``resident=true`` with the CPU as the device: the arrays are copied into memory once and
    gathered by index; every batch (views, labels, positions) equals the memory-map path's."""
    augment = {"randaugment_ops": 1}
    mapped = make_dm(source, tmp_path, size=40, augment=augment, resident=False).loaders()
    resident = make_dm(source, tmp_path, size=40, augment=augment, resident=True).loaders()
    assert not mapped.train(0).resident and resident.train(0).resident
    assert isinstance(resident.arrays["train"], torch.Tensor)
    for a, b in zip(resident.arrays.values(), mapped.arrays.values(), strict=True):
        assert np.array_equal(a.numpy(), b)
    for ours, theirs in ((resident.train(2, 8), mapped.train(2, 8)),
                         (resident.eval("val"), mapped.eval("val"))):  # fmt: skip
        pairs = list(zip(ours, theirs, strict=True))
        assert len(pairs) == len(theirs)
        for (x, y, i), (x2, y2, i2) in pairs:
            assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
    assert not keep_resident("auto", torch.device("cpu"), 1)  # auto: the CPU path stays
    with pytest.raises(ConKDError, match="dataset.decode.resident must be auto, true or false"):
        make_dm(source, tmp_path, resident="yes")


def test_crop_none_is_resize_and_normalize(source: ImageFolderSource, tmp_path: Path) -> None:
    dm = make_dm(source, tmp_path, size=40, augment={"crop": "none", "flip": False})
    x, _, index = next(iter(dm.loaders().train(0)))
    rows = [dm.train.indices[i] for i in index.tolist()]
    decoded = torch.from_numpy(np.asarray(dm.decoded("train").array[rows]))
    expected = normalize(tvf.resize(decoded, [24, 24], antialias=True))
    torch.testing.assert_close(x, expected)


def test_flip_mirrors_an_asymmetric_image() -> None:
    ramp = torch.arange(16, dtype=torch.uint8).mul(15).expand(6, 3, 16, 16).contiguous()
    spec = ViewSpec(16, train=True, crop="none", flip=True)
    index = torch.arange(6)
    params = spec.draw(0, 0, index)
    flips = params.flip
    assert 0 < int(flips.sum()) < 6  # both cases occur in this batch
    out = render(spec, ramp, params)
    for k in range(6):
        expected = ramp[k].flip(-1) if flips[k] else ramp[k]
        torch.testing.assert_close(out[k], normalize(expected[None])[0])


@pytest.mark.parametrize("crop", ["pad", "none"])
def test_pad_and_none_equal_the_pil_path(source: ImageFolderSource, tmp_path, crop) -> None:
    """Decoded at image_size, the same draws give exactly the PIL path's batches."""
    augment = {"crop": crop, "padding": 3, "flip": True}
    dm = make_dm(source, tmp_path, augment=augment)
    assert dm.decoded("train").size == 24
    pil = DataModule(source, image_size=24, batch_size=8, num_workers=0, seed=3, augment=augment)
    for (xa, ya, ia), (xb, yb, ib) in zip(dm.loaders().train(1), pil.loaders().train(1)):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_resized_crop_is_one_definition(source: ImageFolderSource, tmp_path: Path) -> None:
    """Crop windows are drawn once, relative to the image (RandomResizedCrop's ranges), and
    both pipelines render the same window: decoded at the source's 40 px, views are equal."""
    spec = ViewSpec(24, scale_min=0.35)
    boxes = spec.draw(3, 1, torch.arange(500)).boxes
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes >= 0).all() and (boxes <= 1).all())
    assert bool(((w * h >= 0.35 - 1e-6) & (w * h <= 1 + 1e-6)).all())
    assert bool(((w / h >= 3 / 4 - 1e-6) & (w / h <= 4 / 3 + 1e-6)).all())
    assert torch.equal(spec.draw(3, 1, [7]).boxes[0], boxes[7])  # alone or in a batch
    dm = make_dm(source, tmp_path, size=40)
    pil = DataModule(source, image_size=24, batch_size=8, num_workers=0, seed=3)
    xa, _, ia = next(iter(dm.loaders().train(1)))
    xb, _, ib = next(iter(pil.loaders().train(1)))
    assert torch.equal(ia, ib)
    torch.testing.assert_close(xa, xb)
    assert (xa - xb.flip(-1)).abs().mean() > 0.2  # a mirrored view would be far off


def test_drawn_views_keep_their_values() -> None:
    """Views are part of the teacher cache's key and of every checkpoint through
    ``views.VERSION``: a change of any drawn value must bump it. Pinned here, for a small seed
    (entropy passed as uint32 words) and one past 32 bits (passed as a list), per-sample epochs."""
    p = ViewSpec(24).draw(3, 1, [0, 7])
    torch.testing.assert_close(p.boxes, torch.tensor([
        [0.10293333977460861, 0.11251373589038849, 0.8014010787010193, 0.8492900729179382],
        [0.2434735894203186, 0.38734471797943115, 0.8396321535110474, 0.9829239845275879],
    ]), rtol=0, atol=0)  # fmt: skip
    assert p.flip.tolist() == [False, False] and VERSION == 2
    q = ViewSpec(32, crop="pad", randaugment_ops=2).draw(2**40, torch.tensor([0, 5]), [1, 2])
    assert q.offsets.tolist() == [[8, 3], [8, 6]] and q.flip.tolist() == [True, True]
    assert q.photometric.tolist() == [3547881824305829139, 3329208627349970334]


def test_resized_crops_are_distributed_as_torchvisions() -> None:
    """On a square image the drawn windows follow RandomResizedCrop's distribution: the same
    mean and spread of area fraction and log aspect ratio (2000 draws each, ~5 sigma)."""
    n, side = 2000, 1000
    boxes = ViewSpec(24, scale_min=0.35).draw(0, 0, torch.arange(n)).boxes
    ours_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    ours_aspect = torch.log((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1]))
    crop = v2.RandomResizedCrop(24, scale=(0.35, 1.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = [crop.make_params([torch.zeros(3, side, side)]) for _ in range(n)]
    their_area = torch.tensor([p["height"] * p["width"] / side**2 for p in theirs])
    their_aspect = torch.tensor([math.log(p["width"] / p["height"]) for p in theirs])
    for ours, their in ((ours_area, their_area), (ours_aspect, their_aspect)):
        assert abs(float(ours.mean() - their.mean())) < 0.02
        assert abs(float(ours.std() - their.std())) < 0.02


def test_second_datamodule_reuses_the_array(source: ImageFolderSource, tmp_path: Path) -> None:
    first = make_dm(source, tmp_path, size=40)
    folders = first.prepare()
    assert first.decoded("train").built
    mtime = (folders["train"] / ARRAY_FILE).stat().st_mtime_ns
    second = make_dm(source, tmp_path, size=40)
    assert second.prepare() == folders
    assert not second.decoded("train").built
    assert (folders["train"] / ARRAY_FILE).stat().st_mtime_ns == mtime
    meta = json.loads((folders["train"] / META_FILE).read_text())
    assert meta["shape"] == [36, 3, 40, 40] and meta["size"] == 40


def test_truncated_or_partial_array_is_rebuilt(source: ImageFolderSource, tmp_path: Path) -> None:
    digest = source.item_digest(source.train)
    first = DecodedArray.open(source.train, 32, tmp_path, digest, "train", workers=0)
    original = np.array(first.array)
    path = first.path / ARRAY_FILE
    del first
    os.truncate(path, path.stat().st_size // 2)
    again = DecodedArray.open(source.train, 32, tmp_path, digest, "train", workers=0)
    assert again.built and path.stat().st_size > original.nbytes
    assert np.array_equal(np.asarray(again.array), original)
    (again.path / META_FILE).unlink()  # a build that died before its meta.json
    assert DecodedArray.open(source.train, 32, tmp_path, digest, "train", workers=0).built
    # same size, one byte changed: only the sha256 check notices
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert not DecodedArray.open(source.train, 32, tmp_path, digest, "train", workers=0).built
    fixed = DecodedArray.open(source.train, 32, tmp_path, digest, "train", 0, verify_hash=True)
    assert fixed.built and np.array_equal(np.asarray(fixed.array), original)


def test_concurrent_builders_decode_once(source: ImageFolderSource, tmp_path: Path) -> None:
    def slow_load(item: Any) -> Any:
        time.sleep(0.005)  # keep the first build running while the second one arrives
        return source.train.load(item)

    split = Split(source.train.items, source.train.targets, slow_load)
    digest = source.item_digest(split)
    results: list[DecodedArray] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                DecodedArray.open(split, 20, tmp_path, digest, "train", 0, progress=False)
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert np.array_equal(np.asarray(results[0].array), np.asarray(results[1].array))


def test_key_changes_with_the_file_list(image_folder: Path, tmp_path: Path) -> None:
    root = shutil.copytree(image_folder, tmp_path / "data")
    before = ImageFolderSource(str(root))
    key = decode_key(before.item_digest(before.train), 24)
    assert key == decode_key(before.item_digest(before.train), 24)
    assert key != decode_key(before.item_digest(before.train), 25)
    (root / "train" / "class_0" / "0.png").unlink()
    after = ImageFolderSource(str(root))
    assert decode_key(after.item_digest(after.train), 24) != key
    cache = tmp_path / "cache"
    a = make_dm(before, cache, size=24).decoded("test").path
    b_dm = make_dm(after, cache, size=24)
    assert b_dm.decoded("test").path == a  # the test split did not change
    assert b_dm.decoded("train").array.shape[0] == 35


def test_decode_options(source: ImageFolderSource, tmp_path: Path) -> None:
    plain = DataModule(source, image_size=24, batch_size=8, num_workers=0)
    assert plain.decode is None and isinstance(plain.loaders().train(0), DataLoader)
    default = make_dm(source, tmp_path)
    off_cfg = {"enabled": False, "dir": str(tmp_path)}
    assert DataModule(source, image_size=24, batch_size=8, decode=off_cfg).decode is None
    assert default.decode["size"] == 28  # round(24 * 1.15): resized crops get a margin
    assert plain.pipeline()["kind"] == "pil" and plain.prepare() == {}
    assert default.pipeline()["kind"] == "decoded" and default.pipeline()["decode_size"] == 28
    assert make_dm(source, tmp_path, augment={"crop": "pad"}).decode["size"] == 24
    with pytest.raises(ConKDError, match="unknown dataset.decode keys"):
        DataModule(source, image_size=24, batch_size=8, decode={"sise": 32})
    assert not list(tmp_path.iterdir())  # nothing is decoded before a loader asks


def test_prefetch_thread_stops_and_reports_errors(source: ImageFolderSource, tmp_path) -> None:
    dm = make_dm(source, tmp_path, size=40)
    batches = iter(dm.loaders().train(0))
    next(batches)
    assert any(t.name == "decoded-prefetch" for t in threading.enumerate())
    batches.close()  # what breaking out of the loop (max_steps) and dropping it does
    assert not any(t.name == "decoded-prefetch" for t in threading.enumerate())
    array = dm.decoded("train").array
    sampler = EpochSampler(3, seed=0, shuffle=False)
    bad = DecodedLoader(array, [0, 1, 99], [0, 0, 0], ViewSpec(24, False), 0, sampler, 2, False)
    with pytest.raises(IndexError):
        list(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views(source: ImageFolderSource, tmp_path: Path) -> None:
    dm = make_dm(source, tmp_path, size=40)
    cpu = views(dm.loaders().train(1))
    gpu = views(dm.loaders(torch.device("cuda")).train(1))
    assert all(x.is_cuda for x in gpu.values())
    for i in cpu:
        torch.testing.assert_close(gpu[i].cpu(), cpu[i], atol=1e-4, rtol=1e-4)
