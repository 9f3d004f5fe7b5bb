"""Prepare the GPU issue's one device call (``experiments/gpu_check.sh``) so that it fits the
device tool's 64 MiB transfer (the working tree and the carried folders together):

- ``.whl/``: wheels, for the device's Python, of every package a run, a sweep and MLflow logging
  import that the GPU machine's image lacks (``experiments/gpu_image.txt``). The set is derived
  from conkd's own requirements as installed here, without the server-only ones (the MLflow UI,
  the Optuna dashboard, PostgreSQL's driver, the joblib / submitit launchers): about 20 MiB.
- ``.gpu/imagenette.tar.gz``: the class folders re-encoded as WebP at the side length decode-once
  stores anyway (``round(1.15 * image_size)``: 147 px for 128 px training), at the highest
  quality that fits what the tree and the wheels leave. Only the re-encoding differs from the CPU
  runs' input: the files (suffix ``.webp``), their order, their split and labels are the same.

Why WebP: at 147 px the 13,394 official-split images take (measured with tar headers) 98 MiB as
JPEG quality 85 and 61 MiB even at JPEG 50, but 43-52 MiB as WebP 50-70 (a 400-image sample),
which gzip packs further: WebP 55 is 39.3 MiB packed. Only WebP leaves room for the wheels.

    python experiments/gpu_prepare.py ../shared/data/imagenette
    # then one device call:  bash experiments/gpu_check.sh     (carry: .gpu, .whl)
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image
from tqdm import tqdm

from conkd.decoded import default_decode_size
from conkd.sources import IMAGE_EXTENSIONS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRANSFER_LIMIT = 64 * 2**20  # the device tool's working-tree limit, carried folders included
#: conkd requirements a device run never imports: servers, dashboards, other launchers.
SERVER_ONLY = frozenset({"optuna-dashboard", "psycopg2-binary", "hydra-joblib-launcher",
                         "hydra-submitit-launcher"})  # fmt: skip
#: Requirements replaced by their smaller part: mlflow's wheel adds only the UI to mlflow-skinny.
SMALLER = {"mlflow": "mlflow-skinny"}
#: manylinux tags pip must be told one by one (the device is x86-64, glibc 2.39).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def device_roots(project: str = "conkd") -> list[str]:
    """The names of ``project``'s requirements that a device run imports."""
    names = [canonicalize_name(Requirement(r).name) for r in distribution(project).requires or []
             if "extra ==" not in r]  # fmt: skip
    return [SMALLER.get(n, n) for n in names if n not in SERVER_ONLY]


def closure(roots: Iterable[str], python_version: str, present: frozenset[str] = frozenset(),
            requires: Mapping[str, list[str]] | None = None,
            versions: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Every distribution ``roots`` need on ``python_version`` (their requirements' markers
    evaluated for it, extras left out) that is not ``present`` already, name -> the version
    installed here. What ``present`` packages need is theirs: torch's CUDA libraries, say, are
    the image's business, and need not even be installed here.

    ``requires`` / ``versions`` stand in for this environment's metadata (tests)."""
    env = {**default_environment(), "python_version": python_version,
           "python_full_version": f"{python_version}.0", "extra": ""}  # fmt: skip
    found: dict[str, str] = {}
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in present:
            continue
        if requires is None:
            try:
                dist = distribution(name)
            except PackageNotFoundError as err:
                raise SystemExit(f"{name} is needed but not installed here: make install") from err
            found[name], reqs = dist.version, dist.requires or []
        else:
            found[name], reqs = versions[name], requires[name]
        for req in map(Requirement, reqs):
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return found


def image_packages(path: Path = HERE / "gpu_image.txt") -> frozenset[str]:
    """The distribution names in ``path`` (one per line, ``#`` comments)."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return frozenset(canonicalize_name(line) for line in lines if line)


def download_wheels(pins: Mapping[str, str], dest: Path, python_version: str) -> int:
    """Fetch one wheel per pin into a fresh ``dest`` (two versions of one package would stop the
    install there); returns their total size in bytes."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest),
           *(f"--platform={p}" for p in PLATFORMS),
           *(f"{n}=={v}" for n, v in sorted(pins.items()))]  # fmt: skip
    subprocess.run(cmd, check=True)
    return sum(p.stat().st_size for p in dest.glob("*.whl"))


def tree_bytes(repo: Path = REPO) -> int:
    """Size of what the device tool sends besides carried folders: tracked files and untracked
    ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, check=True, capture_output=True).stdout  # fmt: skip
    paths = (repo / p for p in out.decode().split("\0") if p)
    return sum(p.stat().st_size for p in paths if p.is_file())


def images(root: Path) -> list[Path]:
    """The ``train/`` and ``val/`` images of the class folders at ``root``, sorted."""
    found = [p for split in ("train", "val") for p in sorted((root / split).rglob("*"))
             if p.suffix.lower() in IMAGE_EXTENSIONS]  # fmt: skip
    if not found:
        raise SystemExit(f"no train/ or val/ images under {root}")
    return found


def encode(path: Path, side: int, quality: int) -> bytes:
    """``path`` resized to ``side`` x ``side`` (bicubic) and encoded as WebP."""
    with Image.open(path) as im:
        small = im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def estimate_quality(paths: list[Path], side: int, budget: int, qualities: Iterable[int],
                     sample: int = 300, seed: int = 0) -> int:  # fmt: skip
    """The highest of ``qualities`` whose packed size, extrapolated from ``sample`` images, stays
    within ``budget`` bytes (2 % kept back for the estimate's error)."""
    picked = random.Random(seed).sample(paths, min(sample, len(paths)))
    for quality in sorted(qualities, reverse=True):
        mean = sum(len(encode(p, side, quality)) for p in picked) / len(picked)
        if mean * len(paths) <= 0.98 * budget:
            return quality
    raise SystemExit(f"even WebP quality {min(qualities)} does not fit {budget / 2**20:.1f} MiB")


def pack(root: Path, paths: list[Path], out: Path, side: int, quality: int) -> int:
    """Write ``out``: a gzipped tar of ``<root name>/<split>/<class>/<stem>.webp`` (gzip only
    squeezes the tar's headers and padding); returns its size in bytes."""
    names = [f"{root.name}/{p.relative_to(root).with_suffix('.webp')}" for p in paths]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise SystemExit(f"two images of one name but different suffixes: {twice[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz", compresslevel=6) as tar:
        for path, name in tqdm(zip(paths, names), total=len(paths),
                               desc=f"pack {side}px webp q{quality}", unit="img"):  # fmt: skip
            data = encode(path, side, quality)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("root", type=Path, help="class folders: ROOT/train/<class>/*, ROOT/val/...")
    ap.add_argument("--image-size", type=int, default=128, help="the training side length")
    ap.add_argument("--python-version", default="3.12", help="the device's Python (its image)")
    ap.add_argument("--quality", type=int, help="WebP quality (default: the highest that fits)")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl")
    ap.add_argument("--out", type=Path, default=REPO / ".gpu" / "imagenette.tar.gz")
    args = ap.parse_args()

    pins = closure(device_roots(), args.python_version, image_packages())
    wheels = download_wheels(pins, args.wheels, args.python_version)
    tree = tree_bytes()
    budget = TRANSFER_LIMIT - tree - wheels - 2**20  # 1 MiB for what is written meanwhile
    print(f"tree {tree / 2**20:.1f} MiB + {len(pins)} wheels {wheels / 2**20:.1f} MiB: "
          f"{budget / 2**20:.1f} MiB left for the data")  # fmt: skip
    paths = images(args.root)
    side = default_decode_size(args.image_size, "resized")
    quality = args.quality or estimate_quality(paths, side, budget, range(90, 19, -5))
    size = pack(args.root, paths, args.out, side, quality)
    total = tree + wheels + size
    print(f"{args.out}: {len(paths)} images, {size / 2**20:.1f} MiB at {side} px, WebP q{quality};"
          f" the call sends {total / 2**20:.1f} of {TRANSFER_LIMIT / 2**20:.0f} MiB")  # fmt: skip
    if total > TRANSFER_LIMIT:
        raise SystemExit(f"over the transfer limit: rerun with --quality {quality - 5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
