"""The user's commands as typed: the mission command finds the dataset's registered teacher,
``eval.py`` evaluates on the dataset stored in the checkpoint, and runs record their data as an
MLflow dataset input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from conkd.data import DataModule
from conkd.errors import ConKDError
from conkd.run import run
from conkd.sources import ImageFolderSource
from conkd.teacher import registry_name
from tests.conftest import run_cli, tiny_overrides


def renamed_classes(image_folder: Path, dest: Path) -> Path:
    """A copy of the tiny dataset with the same images and class count, other class names
    (an "Imagewoof" next to an "Imagenette")."""
    shutil.copytree(image_folder, dest)
    for split in ("train", "val"):
        for c in (dest / split).iterdir():
            c.rename(c.with_name(c.name.replace("class_", "kind_")))
    return dest


@pytest.fixture(scope="module")
def registered(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ResNet-18 teacher run with the `teacher` preset: registered under its dataset."""
    base = tmp_path_factory.mktemp("registered")
    store = base / "mlruns"
    res = run_cli(
        "train.py",
        "experiment=teacher",
        "model=resnet18",
        "trainer.epochs=1",
        *tiny_overrides(image_folder, base / "teacher", store),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    identity = ImageFolderSource(str(image_folder)).identity
    return {"store": store, "identity": identity, "teacher": base / "teacher", "base": base}


def test_dataset_identity_names_the_data_not_the_loader(image_folder: Path, tmp_path: Path):
    same = ImageFolderSource(str(image_folder)).identity
    other = ImageFolderSource(str(renamed_classes(image_folder, tmp_path / "data"))).identity
    # same folder name and class count, other class names: another dataset
    assert same.startswith("data-") and other.startswith("data-") and same != other
    assert registry_name(same) == f"conkd-teacher-{same}"


def test_mission_command_uses_the_registered_teacher(registered: dict, image_folder: Path):
    store, base = registered["store"], registered["base"]
    name = registry_name(registered["identity"])
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    version = client.get_model_version_by_alias(name, "current")
    res = run_cli(
        "train.py",
        "loss=lsd+supcon",
        "optimizer=lion",
        "model@teacher=resnet18",
        *tiny_overrides(image_folder, base / "student", store),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"teacher: models:/{name}@current (teacher_ckpt=auto)" in res.stdout + res.stderr
    exp = client.get_experiment_by_name("conkd-imagefolder")
    student = client.search_runs([exp.experiment_id], "tags.stage = 'student'")[0]
    assert student.info.status == "FINISHED"
    assert student.data.tags["teacher"] == f"models:/{name}@current"
    assert student.data.tags["teacher.auto"] == "true"
    assert student.data.tags["teacher.run_id"] == version.run_id
    # the runs table's Dataset column: the data as an MLflow dataset input
    teacher = client.get_run(version.run_id)
    for r in (student, teacher):
        inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
        assert len(inputs) == 1
        ds = inputs[0].dataset
        assert ds.name == registered["identity"]
        assert json.loads(ds.source) == {"uri": str(image_folder.resolve())}
        assert json.loads(ds.profile) == {"train": 28, "val": 8, "test": 12}
        assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}
    digests = {
        client.get_run(r.info.run_id).inputs.dataset_inputs[0].dataset.digest
        for r in (student, teacher)
    }
    assert len(digests) == 1  # same files, same split: same digest


def test_dataset_digest_follows_files_and_split(image_folder: Path, tmp_path: Path) -> None:
    def digest(root: Path, split_seed: int = 0) -> str:
        dm = DataModule(
            ImageFolderSource(str(root)), image_size=32, batch_size=4, split_seed=split_seed
        )
        return dm.fingerprint()["digest"]

    copy = tmp_path / "elsewhere" / "data"  # same folder name: same identity
    shutil.copytree(image_folder, copy)
    assert digest(copy) == digest(image_folder)  # content, not location
    assert digest(copy, split_seed=1) != digest(copy)
    (copy / "train" / "class_0" / "0.png").unlink()
    assert digest(copy) != digest(image_folder)


def test_auto_teacher_of_another_dataset_is_not_used(
    registered: dict, image_folder: Path, tmp_path: Path, compose_cfg
) -> None:
    """Same class count, other class names: `auto` finds no teacher, and an explicit
    checkpoint is refused because its class names differ."""
    other = renamed_classes(image_folder, tmp_path / "data")
    common = ["loss=lsd", "model@teacher=resnet18"]
    tiny = tiny_overrides(other, tmp_path / "run", registered["store"])
    with pytest.raises(ConKDError, match="no teacher is registered for dataset 'data-"):
        run(compose_cfg([*common, *tiny]))
    ckpt = registered["teacher"] / "checkpoints" / "best.pt"
    with pytest.raises(
        ConKDError, match=r"other classes than this dataset's \('class_0'!='kind_0'"
    ):
        run(compose_cfg([*common, f"teacher_ckpt={ckpt}", *tiny]))


def test_auto_teacher_of_another_architecture(
    registered: dict, image_folder: Path, tmp_path, compose_cfg
):
    cfg = compose_cfg(
        ["loss=lsd", *tiny_overrides(image_folder, tmp_path / "run", registered["store"])]
    )
    with pytest.raises(ConKDError, match=r"arch='resnet18'.*arch='resnet101'.*experiment=teacher"):
        run(cfg)


def test_eval_uses_the_dataset_stored_in_the_checkpoint(registered: dict, tmp_path: Path) -> None:
    ckpt = registered["teacher"] / "checkpoints" / "best.pt"
    res = run_cli(
        "eval.py",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        "trainer.progress=false",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "imagefolder test:" in res.stdout and "(12 images)" in res.stdout
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    trained = json.loads((registered["teacher"] / "metrics.json").read_text())
    assert result["test/top1"] == pytest.approx(trained["test/top1"])
    # still overridable: the digits have 10 classes, the checkpoint predicts 3
    res = run_cli(
        "eval.py", f"ckpt_path={ckpt}", "dataset=digits", f"hydra.run.dir={tmp_path / 'e2'}"
    )
    assert res.returncode == 1 and "predicts 3 classes but dataset digits has 10" in res.stderr
