"""Data: splits, reproducible augmentation, Imagenette download path (network faked)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from conkd.data import DataModule
from conkd.errors import ConKDError
from conkd.loaders import EpochSampler
from conkd.sources import DigitsSource, ImageFolderSource, ImagenetteSource
from tests.conftest import SHARED_IMAGENETTE

WNIDS = sorted(datasets.Imagenette._WNID_TO_CLASS)


def write_fake_imagenette(root: Path, size: str = "160px", per_class: int = 3) -> Path:
    """The folder layout torchvision's Imagenette expects, with tiny JPEGs."""
    base = root / Path(datasets.Imagenette._ARCHIVES[size][0]).stem
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in WNIDS:
            d = base / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{wnid}_{i}.JPEG")
    return root


def test_augmentation_is_a_function_of_seed_epoch_index(image_folder: Path) -> None:
    src = ImageFolderSource(str(image_folder))
    a = DataModule(src, image_size=24, batch_size=8, num_workers=0, seed=3)
    b = DataModule(src, image_size=24, batch_size=8, num_workers=0, seed=3)
    torch.manual_seed(123)  # global RNG state must not matter
    x1 = a.train[(2, 5)][0]
    torch.manual_seed(999)
    x2 = b.train[(2, 5)][0]
    torch.testing.assert_close(x1, x2)
    assert not torch.equal(a.train[(3, 5)][0], x1)  # another epoch, another view
    # the shuffled order is reproducible too, and differs between epochs
    sampler = EpochSampler(len(a.train), 3, shuffle=True)
    order = [[i for _, i in sampler.__iter__()] for _ in range(2)]
    assert order[0] == order[1]
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != order[0]
    # a loader keeps its own epoch's order, whichever loader was made after it
    first, second = a.loaders().train(0), a.loaders().train(1)
    assert [int(i) for b in first for i in b[2]] != [int(i) for b in second for i in b[2]]
    assert [int(i) for b in first for i in b[2]][:8] == order[0][:8]


def test_loader_workers_give_the_same_batches(image_folder: Path) -> None:
    src = ImageFolderSource(str(image_folder))
    batches = []
    for workers in (0, 2):
        dm = DataModule(src, image_size=24, batch_size=8, num_workers=workers, seed=1)
        batches.append(next(iter(dm.loaders().train(1))))
    torch.testing.assert_close(batches[0][0], batches[1][0])
    assert torch.equal(batches[0][1], batches[1][1])


def test_validation_split_is_fixed_and_disjoint(image_folder: Path) -> None:
    src = ImageFolderSource(str(image_folder))
    a = DataModule(src, image_size=24, batch_size=4, num_workers=0, val_fraction=0.25, seed=0)
    b = DataModule(src, image_size=24, batch_size=4, num_workers=0, val_fraction=0.25, seed=7)
    assert a.val.indices == b.val.indices  # split seed, not run seed
    assert not set(a.val.indices) & set(a.train.indices)
    assert len(a.val) == 9 and len(a.train) == 27 and len(a.test) == 12


def test_digits_source_ships_with_sklearn() -> None:
    src = DigitsSource()
    assert len(src.classes) == 10 and len(src.train) + len(src.test) == 1797
    img = src.train.load(src.train.items[0])
    assert img.mode == "RGB" and img.size == (8, 8)


def test_imagenette_offline_gives_clear_message(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ConKDError) as err:
        ImagenetteSource(str(tmp_path / "imagenette"), size="160px", download=True)
    msg = str(err.value)
    assert str(tmp_path / "imagenette") in msg and "imagenette2-160.tgz" in msg
    assert "dataset=imagefolder" in msg


def test_imagenette_faked_download_gives_loadable_dataset(tmp_path: Path, monkeypatch) -> None:
    staging = write_fake_imagenette(tmp_path / "staging", per_class=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(staging / "imagenette2-160", arcname="imagenette2-160")
    archive = buf.getvalue()
    url = datasets.Imagenette._ARCHIVES["160px"][0]
    monkeypatch.setitem(
        datasets.Imagenette._ARCHIVES, "160px", (url, hashlib.md5(archive).hexdigest())
    )
    requested = []

    class FakeResponse(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(request, *args, **kwargs):
        requested.append(request.full_url)
        response = FakeResponse(archive)
        response.url, response.length = request.full_url, len(archive)
        return response

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    src = ImagenetteSource(str(tmp_path / "data"), size="160px", download=True)
    assert requested and requested[0] == url
    assert len(src.classes) == 10 and src.classes[0] == "tench"
    assert len(src.train) == 20 and len(src.test) == 20
    dm = DataModule(src, image_size=16, batch_size=4, num_workers=0, val_fraction=0.5)
    x, y, _ = next(iter(dm.loaders().train(0)))
    assert x.shape == (4, 3, 16, 16)


@pytest.mark.skipif(not SHARED_IMAGENETTE.is_dir(), reason="no Imagenette copy in ../shared/data")
def test_shared_imagenette_as_imagefolder() -> None:
    src = ImageFolderSource(str(SHARED_IMAGENETTE), verify=False)
    assert len(src.classes) == 10
    assert len(src.train) == 9469 and len(src.test) == 3925
    dm = DataModule(src, image_size=32, batch_size=64, num_workers=0, val_fraction=0.1)
    assert len(dm.train) + len(dm.val) == 9469 and len(dm.test) == 3925
    x, y, _ = dm.train[(0, 0)]
    assert x.shape == (3, 32, 32)
