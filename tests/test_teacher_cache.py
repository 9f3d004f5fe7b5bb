"""Teacher-output cache: replayed outputs equal the online teacher's on the same views, keys,
reuse without a teacher, corruption and interrupted builds, unfilled lookups, parallel builds.

Heavy imports (conkd.data, conkd.models) stay inside fixtures so that the spawned processes of
the concurrency test import only torch and conkd.teacher_cache.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from conkd.engine import autocast, online_teacher
from conkd.errors import ConKDError
from conkd.teacher_cache import (
    FILLED_FILE,
    META_FILE,
    InvalidTeacherCache,
    TeacherCache,
    TeacherCacheError,
    cache_key,
    ensure,
    state_dict_digest,
)

EPOCHS = 2
MAX_STEPS = 2  # of the 4 batches per epoch: half of each epoch stays unfilled
OUTPUTS = ("logits", "projection")
#: fp16 keeps 11 significant bits: relative rounding error <= 2**-11 ~ 4.9e-4.
TOL = {"atol": 1e-3, "rtol": 1e-3}


class ExplodingTeacher(nn.Module):
    """A teacher that must never run (a reused cache loads no teacher)."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raise AssertionError("the teacher ran although the cache should have been reused")


class TinyTeacher(nn.Module):
    """A small deterministic network with the :class:`conkd.models.Network` output dict."""

    def __init__(self, projection: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.proj = nn.Linear(4, 3) if projection else None

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        embedding = self.conv(x).relu().mean(dim=(2, 3))
        projection = None
        if self.proj is not None:
            projection = nn.functional.normalize(self.proj(embedding), dim=-1)
        return {"logits": self.fc(embedding), "embedding": embedding, "projection": projection}


class SyntheticData:
    """Seeded per-epoch batches ``(x, y, i)`` over 8 train and 4 validation samples."""

    n_train, n_val, batch = 8, 4, 4

    def train_loader(self, epoch: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        g = torch.Generator().manual_seed(100 + epoch)
        order = torch.randperm(self.n_train, generator=g)
        x = torch.randn(self.n_train, 3, 8, 8, generator=g)
        return [
            (x[s : s + self.batch], torch.zeros(self.batch), order[s : s + self.batch])
            for s in range(0, self.n_train, self.batch)
        ]

    def val_loader(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        x = torch.randn(self.n_val, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        # out of order, so rows must land by position, not by arrival
        return [(x[s : s + 2], torch.zeros(2), torch.arange(s, s + 2)) for s in (2, 0)]


def synthetic_build(
    teacher: Callable[[Tensor], Any], fields: dict[str, Any] | None, **kwargs: Any
) -> Callable[[Path], TeacherCache]:
    data = SyntheticData()
    options = {"epochs": 2, "max_steps": None, "outputs": OUTPUTS, **kwargs}

    def build(directory: Path) -> TeacherCache:
        return TeacherCache.build(
            directory,
            teacher,
            data.train_loader,
            data.val_loader(),
            n_train=data.n_train,
            n_val=data.n_val,
            device="cpu",
            fields=fields,
            progress=False,
            **options,
        )

    return build


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the test networks are tiny, and on a shared 2-core machine a second
    spinning OpenMP thread costs far more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The real pipeline: DataModule views and a ResNet-18 teacher
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(image_folder: Path) -> Any:
    from conkd.data import DataModule
    from conkd.sources import ImageFolderSource

    source = ImageFolderSource(str(image_folder))
    return DataModule(source, image_size=32, batch_size=8, num_workers=0, seed=11)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    from conkd.models import Network

    torch.manual_seed(0)
    network = Network("resnet18", 3, image_size=32, small_stem=False)
    return network.eval().requires_grad_(False)


def fields_for(data: Any, teacher: nn.Module, **changes: Any) -> dict[str, Any]:
    """Key fields of the shapes a run passes (conkd.teacher.cache_fields)."""
    fields = {
        "teacher_weights": state_dict_digest(teacher),
        "data": data.fingerprint()["digest"],
        "pipeline": data.pipeline(),
        "augment": dataclasses.asdict(data.spec),
        "image_size": data.image_size,
        "seed": data.seed,
        "epochs": EPOCHS,
        "max_steps_per_epoch": MAX_STEPS,
        "batch_size": data.batch_size,
        "precision": "32",
        "channels_last": False,
        "outputs": list(OUTPUTS),
    }
    fields.update(changes)
    return fields


def counting_build(
    data: Any, teacher: nn.Module, fields: dict[str, Any], calls: list[Path]
) -> Callable[[Path], TeacherCache]:
    def build(directory: Path) -> TeacherCache:
        calls.append(directory)
        return TeacherCache.build(
            directory,
            teacher,
            data.loaders().train,
            data.loaders().eval("val"),
            epochs=fields["epochs"],
            max_steps=fields["max_steps_per_epoch"],
            outputs=fields["outputs"],
            n_train=len(data.train),
            n_val=len(data.val),
            device=torch.device("cpu"),
            precision=fields["precision"],
            channels_last=fields["channels_last"],
            fields=fields,
            progress=False,
        )

    return build


@pytest.fixture(scope="module")
def built(data: Any, teacher: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One cache built through ``ensure``: (cache, root, fields, build calls)."""
    root = tmp_path_factory.mktemp("teacher_cache")
    fields = fields_for(data, teacher)
    calls: list[Path] = []
    # handed over in train mode: the build must run it in eval mode (BatchNorm running
    # statistics, not batch statistics, and no update of them) and restore the mode afterwards
    training = copy.deepcopy(teacher).train()
    cache, was_built = ensure(root, fields, counting_build(data, training, fields, calls))
    assert was_built and calls == [root / cache_key(fields)]
    assert training.training
    assert state_dict_digest(training) == fields["teacher_weights"]
    return cache, root, fields


def entries(root: Path) -> list[str]:
    """What a cache root holds besides lock files (filelock may or may not delete them)."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def student_batches(data: Any, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The batches the training loop sees in ``epoch`` (the first MAX_STEPS)."""
    for step, batch in enumerate(data.loaders().train(epoch)):
        if step >= MAX_STEPS:
            return
        yield batch


def test_cached_outputs_equal_the_online_teacher(data: Any, teacher: nn.Module, built) -> None:
    cache, _, _ = built
    online = online_teacher(copy.deepcopy(teacher))
    for epoch in range(EPOCHS):
        for x, _, index in student_batches(data, epoch):
            expected = online(x, epoch, index)
            got = cache(x, epoch, index)
            assert sorted(got) == sorted(OUTPUTS)
            for name in OUTPUTS:
                assert got[name].dtype == torch.float32 and got[name].device == x.device
                torch.testing.assert_close(got[name], expected[name], **TOL)
    # rows are per (epoch, i): a sample seen in both epochs has two different views
    both = np.flatnonzero(cache.filled[0] & cache.filled[1])
    assert both.size > 0
    x = torch.zeros(1)
    first, second = cache(x, 0, both)["logits"], cache(x, 1, both)["logits"]
    assert (first - second).abs().max() > 1e-2


def test_validation_lookups_equal_the_online_teacher(data: Any, teacher: nn.Module, built) -> None:
    cache, _, _ = built
    seen = 0
    for x, _, index in data.loaders().eval("val"):
        with torch.no_grad():
            expected = teacher(x)
        got = cache(x, None, index)
        for name in OUTPUTS:
            torch.testing.assert_close(got[name], expected[name], **TOL)
        seen += len(index)
    assert seen == cache.n_val == len(data.val)


def test_only_the_seen_batches_are_filled_and_others_raise(data: Any, built) -> None:
    cache, _, _ = built
    for epoch in range(EPOCHS):
        seen = torch.cat([i for _, _, i in student_batches(data, epoch)]).numpy()
        expected = np.zeros(len(data.train), dtype=bool)
        expected[seen] = True
        np.testing.assert_array_equal(cache.filled[epoch], expected)
    assert int(cache.filled.sum()) == EPOCHS * MAX_STEPS * data.batch_size < cache.filled.size
    unfilled = int(np.flatnonzero(~cache.filled[0])[0])
    with pytest.raises(TeacherCacheError, match="no outputs for epoch 0"):
        cache(torch.zeros(1), 0, torch.tensor([unfilled]))
    with pytest.raises(TeacherCacheError, match="not epoch 2"):
        cache(torch.zeros(1), EPOCHS, torch.tensor([0]))
    with pytest.raises(TeacherCacheError, match="out of range"):
        cache(torch.zeros(1), None, torch.tensor([cache.n_val]))


def test_meta_records_shapes_sizes_checksums_and_time(data: Any, built) -> None:
    cache, root, fields = built
    meta = json.loads((cache.directory / META_FILE).read_text())
    assert meta["key"] == cache_key(fields) == cache.directory.name
    assert meta["fields"] == json.loads(json.dumps(fields))
    names = {FILLED_FILE, *(f"{s}_{o}.npy" for s in ("train", "val") for o in OUTPUTS)}
    assert set(meta["files"]) == names
    total = 0
    for name, info in meta["files"].items():
        path = cache.directory / name
        assert info["bytes"] == path.stat().st_size
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        total += info["bytes"]
    assert cache.size_bytes == meta["size_bytes"] == total
    assert cache.build_seconds == meta["build_seconds"] > 0
    assert cache.train["logits"].shape == (EPOCHS, len(data.train), 3)
    assert cache.train["projection"].shape == (EPOCHS, len(data.train), 128)
    assert cache.val["logits"].shape == (len(data.val), 3)
    assert cache.train["logits"].dtype == np.float16 and cache.filled.dtype == np.bool_
    assert (
        isinstance(cache.train["logits"], np.memmap) and not cache.train["logits"].flags.writeable
    )
    # nothing but the cache, its lock and no build leftovers under the root
    assert entries(root) == [cache.key]


def test_second_ensure_reuses_without_running_the_teacher(data: Any, built) -> None:
    cache, root, fields = built
    calls: list[Path] = []
    again, was_built = ensure(root, fields, counting_build(data, ExplodingTeacher(), fields, calls))
    assert not was_built and calls == []
    assert again.directory == cache.directory
    np.testing.assert_array_equal(again.train["logits"], cache.train["logits"])


def test_keys(data: Any, teacher: nn.Module) -> None:
    fields = fields_for(data, teacher)
    assert cache_key(fields) == cache_key(dict(reversed(list(fields.items()))))
    assert len(cache_key(fields)) == 20
    changed = [
        fields_for(data, teacher, seed=data.seed + 1),
        fields_for(data, teacher, epochs=EPOCHS + 1),
        fields_for(data, teacher, max_steps_per_epoch=None),
        fields_for(data, teacher, precision="bf16"),
        fields_for(data, teacher, outputs=["logits"]),
        fields_for(data, teacher, augment={**dataclasses.asdict(data.spec), "flip": False}),
    ]
    keys = {cache_key(f) for f in changed}
    assert len(keys) == len(changed) and cache_key(fields) not in keys
    with pytest.raises(TypeError, match="teacher-cache key"):
        cache_key({"teacher": object()})
    # the teacher-weights digest: stable over copies, sensitive to one changed weight
    twin = copy.deepcopy(teacher)
    assert state_dict_digest(twin) == state_dict_digest(teacher.state_dict())
    with torch.no_grad():
        twin.fc.weight[0, 0] += 1e-3
    assert state_dict_digest(twin) != state_dict_digest(teacher)


def test_another_key_field_builds_another_cache(tmp_path: Path) -> None:
    teacher = TinyTeacher()
    first, built_first = ensure(tmp_path, {"seed": 0}, synthetic_build(teacher, {"seed": 0}))
    second, built_second = ensure(tmp_path, {"seed": 1}, synthetic_build(teacher, {"seed": 1}))
    assert built_first and built_second
    assert first.directory != second.directory
    assert {first.directory.name, second.directory.name} == {
        cache_key({"seed": 0}),
        cache_key({"seed": 1}),
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[TeacherCache, dict[str, Any]]:
    """A cache of :class:`TinyTeacher` on :class:`SyntheticData` (cheap to rebuild)."""
    fields = {"run": "small"}
    root = tmp_path_factory.mktemp("small")
    cache, was_built = ensure(root, fields, synthetic_build(TinyTeacher(), fields))
    assert was_built
    return cache, fields


def test_without_max_steps_every_view_is_cached_by_position(small) -> None:
    cache, _ = small
    assert cache.filled.all()  # max_steps=None: every batch of every epoch
    teacher, data = TinyTeacher().eval(), SyntheticData()
    batches = [(epoch, b) for epoch in range(cache.epochs) for b in data.train_loader(epoch)]
    batches += [(None, b) for b in data.val_loader()]
    for epoch, (x, _, index) in batches:
        with torch.no_grad():
            expected = teacher(x)
        got = cache(x, epoch, index)
        for name in OUTPUTS:
            torch.testing.assert_close(got[name], expected[name], **TOL)


@pytest.mark.parametrize(
    "damage", ["truncate", "append", "delete_meta", "delete_array", "flip_byte"]
)
def test_damaged_cache_is_detected_and_rebuilt(damage: str, small, tmp_path: Path) -> None:
    cache, fields = small
    directory = tmp_path / cache.directory.name
    shutil.copytree(cache.directory, directory)
    assert TeacherCache.open(directory) is not None  # the copy is valid before the damage
    target = directory / "train_logits.npy"
    if damage == "truncate":
        os.truncate(target, target.stat().st_size - 16)
    elif damage == "append":  # e.g. two writers: the array still loads, the size gives it away
        with open(target, "ab") as f:
            f.write(b"\0" * 64)
    elif damage == "delete_meta":
        (directory / META_FILE).unlink()
    elif damage == "delete_array":
        (directory / "val_projection.npy").unlink()
    else:
        raw = bytearray(target.read_bytes())
        raw[-3] ^= 0x40
        target.write_bytes(bytes(raw))
    with pytest.raises(InvalidTeacherCache):
        TeacherCache.open(directory)
    if damage == "flip_byte":  # the documented policy: sizes alone cannot see a flipped byte
        assert TeacherCache.open(directory, verify=False) is not None
    else:  # ... but missing and truncated files are caught without checksums too
        with pytest.raises(InvalidTeacherCache):
            TeacherCache.open(directory, verify=False)
    calls: list[Path] = []
    inner = synthetic_build(TinyTeacher(), fields)

    def build(path: Path) -> TeacherCache:
        calls.append(path)
        return inner(path)

    rebuilt, was_built = ensure(tmp_path, fields, build)
    assert was_built and calls == [directory]
    assert TeacherCache.open(directory) is not None
    for name in OUTPUTS:
        np.testing.assert_array_equal(rebuilt.train[name], cache.train[name])
        np.testing.assert_array_equal(rebuilt.val[name], cache.val[name])
    np.testing.assert_array_equal(rebuilt.filled, cache.filled)
    assert entries(tmp_path) == [directory.name]


def test_missing_directory_opens_as_none(tmp_path: Path) -> None:
    assert TeacherCache.open(tmp_path / "nothing") is None


class FailingTeacher(TinyTeacher):
    """Dies on its third batch, like a build killed midway."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("killed")
        return super().forward(x)


def test_interrupted_build_never_looks_complete(tmp_path: Path) -> None:
    fields = {"run": "interrupted"}
    key = cache_key(fields)
    failing = FailingTeacher()
    with pytest.raises(RuntimeError, match="killed"):
        ensure(tmp_path, fields, synthetic_build(failing, fields))
    assert failing.calls == 3
    assert TeacherCache.open(tmp_path / key) is None
    assert entries(tmp_path) == []  # no half-built folder, hidden or not
    # what a SIGKILLed build leaves: a hidden folder with arrays but no meta.json
    leftover = tmp_path / f".{key}.building-999-dead"
    leftover.mkdir()
    np.save(leftover / FILLED_FILE, np.zeros((2, 8), dtype=bool))
    cache, was_built = ensure(tmp_path, fields, synthetic_build(TinyTeacher(), fields))
    assert was_built and cache.directory == tmp_path / key
    assert not leftover.exists()


def test_missing_output_and_mismatched_fields_are_errors(tmp_path: Path) -> None:
    no_projection = TinyTeacher(projection=False)
    with pytest.raises(ConKDError, match="no 'projection' output"):
        ensure(tmp_path, {"a": 1}, synthetic_build(no_projection, {"a": 1}))
    with pytest.raises(TeacherCacheError, match="pass ensure's fields"):
        ensure(tmp_path, {"a": 2}, synthetic_build(TinyTeacher(), {"a": 3}))


def test_bf16_build_matches_the_online_teacher_under_autocast(tmp_path: Path) -> None:
    teacher = TinyTeacher()
    fields = {"precision": "bf16"}
    cache, _ = ensure(tmp_path, fields, synthetic_build(teacher, fields, precision="bf16"))
    data = SyntheticData()
    for x, _, index in data.train_loader(1):
        with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
            expected = teacher(x)
        got = cache(x, 1, index)
        for name in OUTPUTS:
            torch.testing.assert_close(got[name], expected[name].float(), **TOL)


# --------------------------------------------------------------------------------------------
# Two processes, one build
# --------------------------------------------------------------------------------------------


def _slow_counted_build(root: Path, fields: dict[str, Any]) -> Callable[[Path], TeacherCache]:
    inner = synthetic_build(TinyTeacher(), fields)

    def build(directory: Path) -> TeacherCache:
        with open(root / "builds.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # hold the lock long enough for the other process to find it taken
        return inner(directory)

    return build


def _ensure_in_process(root: str, fields: dict[str, Any], barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)
        cache, was_built = ensure(Path(root), fields, _slow_counted_build(Path(root), fields))
        rows = {k: v.numpy() for k, v in cache(torch.zeros(1), 0, [0, 1]).items()}
        results.put((os.getpid(), was_built, str(cache.directory), rows))
    except BaseException as err:  # report instead of leaving the parent waiting on the queue
        results.put((os.getpid(), None, f"{err.__class__.__name__}: {err}", {}))
        raise


def test_parallel_ensure_builds_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    fields = {"run": "parallel"}
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_ensure_in_process, args=(str(tmp_path), fields, barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [message for _, was_built, message, _ in got if was_built is None]
    assert not errors
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(was_built for _, was_built, _, _ in got) == [False, True]
    assert {directory for _, _, directory, _ in got} == {str(tmp_path / cache_key(fields))}
    builders = (tmp_path / "builds.txt").read_text().split()
    assert len(builders) == 1
    assert builders[0] == str(next(pid for pid, was_built, _, _ in got if was_built))
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[0][3][name], got[1][3][name])
