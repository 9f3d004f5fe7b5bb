"""The GPU issue's one device call, checked without a GPU: what experiments/gpu_prepare.py
carries (the wheels' set, the data's quality and packing), and how gpu_check.sh and
gpu_protocol.sh share out the command's time limit (a fake Python and nvidia-smi stand in)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location(
    "gpu_prepare", ROOT / "experiments" / "gpu_prepare.py"
)
gpu_prepare = importlib.util.module_from_spec(spec)
sys.modules["gpu_prepare"] = gpu_prepare
spec.loader.exec_module(gpu_prepare)


def test_closure_follows_markers_for_the_device_python_and_stops_at_the_image() -> None:
    requires = {
        "a": [
            "B>=1",
            "c; python_version < '3.11'",
            "d; extra == 'ui'",
            "e; sys_platform == 'win32'",
        ],
        "b": ["a", "f"],  # a cycle ends where it began
        "c": [],
        "d": [],
        "e": [],
        "f": [],
    }
    versions = {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}

    def closure(python: str, present: frozenset[str] = frozenset()) -> dict[str, str]:
        return gpu_prepare.closure(["A"], python, present, requires=requires, versions=versions)

    assert closure("3.12") == {"a": "1", "b": "2", "f": "6"}
    assert closure("3.10") == {"a": "1", "b": "2", "c": "3", "f": "6"}
    # what the image holds is neither carried nor followed (f is b's need, and b is there)
    assert closure("3.12", frozenset({"b"})) == {"a": "1"}


def test_device_roots_leave_servers_out_and_take_mlflow_without_its_ui() -> None:
    roots = gpu_prepare.device_roots()
    assert {"hydra-core", "hydra-optuna-sweeper", "optuna", "lion-pytorch", "mlflow-skinny"} <= set(
        roots
    )
    assert not {"mlflow", "optuna-dashboard", "psycopg2-binary", "pytest"} & set(roots)


def test_image_package_list_is_read_by_canonical_name(tmp_path: Path) -> None:
    listing = tmp_path / "image.txt"
    listing.write_text("# the image\nTyping_Extensions\n\ntorch  # bundled\n")
    assert gpu_prepare.image_packages(listing) == {"typing-extensions", "torch"}
    shipped = gpu_prepare.image_packages()
    assert "torch" in shipped and "hydra-core" not in shipped


def noise_images(root: Path, n: int = 4) -> list[Path]:
    """``n`` 40 x 40 noise PNGs in one class folder (noise: quality changes their size)."""
    rng = np.random.default_rng(0)
    folder = root / "train" / "c0"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return gpu_prepare.images(root)


def test_quality_is_the_highest_that_fits(tmp_path: Path) -> None:
    paths = noise_images(tmp_path / "data")

    def total(q: int) -> int:
        return sum(len(gpu_prepare.encode(p, 32, q)) for p in paths)

    assert total(90) > total(50) > total(10)
    budget = int(total(50) / 0.98) + 1
    assert gpu_prepare.estimate_quality(paths, 32, budget, [90, 50, 10]) == 50
    assert gpu_prepare.estimate_quality(paths, 32, 10 * total(90), [50, 90, 10]) == 90
    with pytest.raises(SystemExit, match="quality 10 does not fit"):
        gpu_prepare.estimate_quality(paths, 32, total(10) // 2, [90, 50, 10])


def test_pack_keeps_files_and_order_as_webp(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "d.tar.gz"
    paths = gpu_prepare.images(image_folder)
    size = gpu_prepare.pack(image_folder, paths, out, side=16, quality=80)
    assert size == out.stat().st_size
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    unpacked = tmp_path / "x" / image_folder.name
    again = gpu_prepare.images(unpacked)
    assert [p.relative_to(unpacked).with_suffix("") for p in again] == [
        p.relative_to(image_folder).with_suffix("") for p in paths
    ]
    with Image.open(again[0]) as im:
        assert (im.format, im.size) == ("WEBP", (16, 16))


def test_pack_refuses_two_files_that_would_share_a_name(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "train" / "c0"
    folder.mkdir(parents=True)
    for suffix in ("png", "jpg"):
        Image.new("RGB", (8, 8)).save(folder / f"a.{suffix}")
    root = tmp_path / "data"
    with pytest.raises(SystemExit, match="different suffixes"):
        gpu_prepare.pack(root, gpu_prepare.images(root), tmp_path / "o.tar.gz", 8, 80)


# --- the scripts' time limit and what comes back ---------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "${*//$'\n'/ }" >> "$FAKE_LOG"
case "$*" in
  -c*) for last; do :; done
       [[ $last == sqlite:///* ]] && touch "${last#sqlite:///}"
       exit 0 ;;
  *gpu_throughput.py*) echo "teacher resnet101 CE, compile=false  1 img/s"; sleep 30 ;;
  *gpu_workers.py*) echo "1 worker(s): 4 trials"; sleep "${FAKE_WORKERS_S:-0}" ;;
  *checkpoint_write.py*) for who in teacher ${FAKE_CKPT_ONLY:-student}; do
                           echo "$who: background last.pt holds what a direct write holds"
                         done ;;
  *"protocol.py run"*) mkdir -p outputs/protocol/gpu128/ce
                       echo "a run's log" > outputs/protocol/gpu128/ce/seed0.log
                       sleep "${FAKE_RUN_S:-0}" ;;
  *"protocol.py table"*) args=("$@")  # the section goes where --section-out names
                         for i in "${!args[@]}"; do
                           [[ ${args[i]} == --section-out ]] || continue
                           printf '%s\n' '<!-- protocol:gpu128:start -->' 'fresh table' \
                             '<!-- protocol:gpu128:end -->' > "${args[i+1]}"
                         done ;;
esac
"""


@pytest.fixture
def scripts(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the scripts (no carried wheels, no .venv) with the committed section and figure
    (old: they must not come back as this call's), and an environment whose Python and
    nvidia-smi only log their arguments and fake their files."""
    repo = tmp_path / "repo"
    (repo / "experiments" / "figures").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_protocol.sh", "README.md", "figures/gpu128_val_curves.png"):
        shutil.copy2(ROOT / "experiments" / name, repo / "experiments" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "tmp").mkdir()
    smi = "#!/bin/sh\n[ -z \"$FAKE_NO_GPU\" ] || exit 9\necho 'name\nFake'\n"
    for name, body in (("python", FAKE_PYTHON), ("nvidia-smi", smi)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": str(bin_dir / "python"),
           "FAKE_LOG": str(tmp_path / "calls.log"), "OUT": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    return repo, env


def calls(env: dict[str, str]) -> list[str]:
    """The fake Python's command lines, in order."""
    return Path(env["FAKE_LOG"]).read_text().splitlines()


def run_script(
    repo: Path, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``bash *args`` in ``repo`` with ``env``, its output captured."""
    return subprocess.run(["bash", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120, check=check)  # fmt: skip


def brought_back(env: dict[str, str]) -> list[str]:
    return sorted(p.name for p in Path(env["OUT"]).iterdir())


def test_protocol_passes_go_by_priority_without_a_limit(scripts) -> None:
    repo, env = scripts
    run_script(repo, env, "experiments/gpu_protocol.sh", "/data", "--set", "a.b=1")
    runs = [c for c in calls(env) if "protocol.py run" in c]
    assert [r.split(" --set a.b=1 ")[1] for r in runs] == [
        "--rows teacher,ce,kd,lsd,conkd_lion --seeds 0",
        "--rows ce,kd,lsd,conkd_lion",
        "--rows sweep,sweep_best",
    ]
    assert "--data /data" in runs[0] and "--seeds 0,1" in runs[1]
    shared = runs[1].split(" run ")[1].split(" --rows")[0]
    assert calls(env)[-1].endswith(f"protocol.py table {shared}")


def test_a_later_seeds_option_wins() -> None:
    from tests.test_protocol import protocol

    assert protocol.parse(["run", "--seeds", "0,1", "--seeds", "0"]).seeds == "0"


def test_protocol_stops_at_its_limit_and_still_writes_the_table(scripts) -> None:
    repo, env = scripts
    env = {**env, "RUN_S": "4", "FAKE_RUN_S": "30"}
    out = run_script(repo, env, "experiments/gpu_protocol.sh", "/data").stdout
    assert "--seeds 0: stopped at the time limit" in out
    assert "no time left for: --rows ce,kd,lsd,conkd_lion" in out
    assert "no time left for: --rows sweep,sweep_best" in out
    assert sum("protocol.py run" in c for c in calls(env)) == 1
    assert "protocol.py table" in calls(env)[-1]


def test_gpu_check_unpacks_cuts_the_benchmark_and_brings_back_this_calls_files(
    scripts, tmp_path: Path, image_folder: Path
) -> None:
    repo, env = scripts
    paths = gpu_prepare.images(image_folder)
    gpu_prepare.pack(image_folder, paths, repo / ".gpu" / "d.tar.gz", side=8, quality=50)
    out = run_script(repo, {**env, "BENCH_S": "2"}, "experiments/gpu_check.sh").stdout
    assert "gpu_throughput.log: stopped at its 2 s" in out
    store = tmp_path / "tmp" / "conkd-gpu" / "mlflow.db"
    first, bench = calls(env)[:2]
    assert "prepare_store" in first and first.endswith(f"sqlite:///{store}")
    assert f"--data {tmp_path}/tmp/conkd-gpu/data/{image_folder.name} " in bench
    assert bench.endswith(" --compile false")
    assert sum("protocol.py run" in c for c in calls(env)) == 3
    # no model export: nothing logged as an artifact comes back, and the students name the
    # teacher's checkpoint rather than its registered model
    skip = ("--set mlflow.log_model=false --set mlflow.log_checkpoint=false "
            "--set mlflow.register=null")  # fmt: skip
    assert all(skip in c for c in calls(env) if "protocol.py" in c)
    assert brought_back(env) == [
        "checkpoint_write.log", "gpu.txt", "gpu128_files.tar.gz", "gpu128_section.md",
        "gpu_protocol.log", "gpu_throughput.log", "mlflow.db"]  # fmt: skip
    # the background writer confirmed for both networks: the protocol keeps it
    assert "checkpoint_write.py --device cuda" in calls(env)[2]
    assert not any("checkpoint_background" in c for c in calls(env))
    back = Path(env["OUT"])
    assert "compile=false" in (back / "gpu_throughput.log").read_text()
    section = (back / "gpu128_section.md").read_text().splitlines()
    assert section[:2] == ["<!-- protocol:gpu128:start -->", "fresh table"]
    assert section[-1] == "<!-- protocol:gpu128:end -->"
    with tarfile.open(back / "gpu128_files.tar.gz") as tar:
        assert tar.getnames() == ["outputs/protocol/gpu128/ce/seed0.log"]  # not the old figure


def test_gpu_check_writes_checkpoints_directly_where_the_background_is_not_confirmed(
    scripts, image_folder: Path
) -> None:
    repo, env = scripts
    env = {**env, "FAKE_CKPT_ONLY": " ", "BENCH_S": "1"}  # no student line: not confirmed
    out = run_script(repo, env, "experiments/gpu_check.sh", str(image_folder)).stdout
    assert "background checkpoints not confirmed: the protocol writes directly" in out
    runs = [c for c in calls(env) if "protocol.py" in c]
    assert len(runs) == 4 and all("--set trainer.checkpoint_background=false" in c for c in runs)


def test_gpu_check_brings_back_what_it_has_when_a_step_fails(scripts, image_folder: Path) -> None:
    repo, env = scripts
    done = run_script(repo, {**env, "FAKE_NO_GPU": "1"}, "experiments/gpu_check.sh",
                      str(image_folder), check=False)  # fmt: skip
    assert done.returncode == 9
    assert brought_back(env) == ["gpu.txt", "mlflow.db"]  # no section: the table never ran
    assert not any("protocol.py" in c for c in calls(env))


def test_gpu_check_refuses_data_without_a_train_folder(scripts, tmp_path: Path) -> None:
    repo, env = scripts
    done = run_script(repo, env, "experiments/gpu_check.sh", str(tmp_path), check=False)
    assert done.returncode == 1
    assert f"no train/ folder in the data: {tmp_path}" in done.stderr


def test_gpu_check_scaling_part_times_compile_modes_then_workers_in_what_is_left(
    scripts, image_folder: Path
) -> None:
    repo, env = scripts
    env = {**env, "PART": "scaling", "BENCH_S": "2", "BUDGET_S": "3", "FAKE_WORKERS_S": "30"}
    out = run_script(repo, env, "experiments/gpu_check.sh", str(image_folder)).stdout
    assert "gpu_throughput.log: stopped at its 2 s" in out
    assert "gpu_workers.log: stopped at its 1 s" in out  # the budget's rest, at least 1 s
    bench, workers = calls(env)[1:]
    assert bench.endswith(" --only-ce --compile false,default,reduce-overhead")
    assert f"gpu_workers.py --data {image_folder} --workers 1,2,4" in workers
    assert (Path(env["OUT"]) / "gpu_workers.log").read_text() == "1 worker(s): 4 trials\n"
    assert "gpu128_section.md" not in brought_back(env)


def test_gpu_check_names_an_unknown_part(scripts) -> None:
    repo, env = scripts
    done = run_script(repo, {**env, "PART": "all"}, "experiments/gpu_check.sh", "/data",
                      check=False)  # fmt: skip
    assert done.returncode == 2
    assert "PART must be protocol or scaling, not all" in done.stderr
    assert not Path(env["FAKE_LOG"]).exists()  # refused before anything ran
