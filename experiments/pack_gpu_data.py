"""Pack a class-folder dataset for the GPU machine: every image re-encoded as JPEG at the side
length decode-once stores anyway (``round(1.15 * image_size)``: 147 px for 128 px training), in
one uncompressed tar under a folder git ignores, so that it fits the device tool's 64 MiB
transfer (Imagenette at 147 px, quality 85: about 60 MiB; its 224 px originals are about 4x that).
Only the JPEG re-encoding differs from the CPU runs' input: the files, their split and their
labels are the same.

    python experiments/pack_gpu_data.py ../shared/data/imagenette .gpu/imagenette.tar
    # on the GPU machine (experiments/gpu_check.sh does this):
    tar -xf .gpu/imagenette.tar -C /tmp     # -> /tmp/imagenette/{train,val}/<class>/*.JPEG
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from conkd.decoded import default_decode_size

SUFFIXES = {".jpeg", ".jpg", ".png"}


def images(root: Path) -> list[Path]:
    """The ``train/`` and ``val/`` images of the class folders at ``root``, sorted."""
    found = [p for split in ("train", "val") for p in sorted((root / split).rglob("*"))
             if p.suffix.lower() in SUFFIXES]  # fmt: skip
    if not found:
        raise SystemExit(f"no train/ or val/ images under {root}")
    return found


def pack(root: Path, out: Path, side: int, quality: int = 85) -> int:
    """Write ``out`` (a tar of ``<root name>/<split>/<class>/<file>``, each image resized to
    ``side`` x ``side`` and saved as JPEG); returns its size in bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        for path in tqdm(images(root), desc=f"pack {side}px", unit="img"):
            with Image.open(path) as im:
                small = im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=quality)
            info = tarfile.TarInfo(f"{root.name}/{path.relative_to(root)}")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return out.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("root", type=Path, help="class folders: ROOT/train/<class>/*, ROOT/val/...")
    ap.add_argument("out", type=Path, help="the tar to write (under a folder git ignores)")
    ap.add_argument("--image-size", type=int, default=128, help="the training side length")
    ap.add_argument("--quality", type=int, default=85)
    args = ap.parse_args()
    side = default_decode_size(args.image_size, "resized")
    size = pack(args.root, args.out, side, args.quality)
    print(f"{args.out}: {size / 2**20:.1f} MiB at {side} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
