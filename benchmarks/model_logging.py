"""Logging a network to MLflow: the safe ``pt2`` format (torch.export) against pickle.

    python benchmarks/model_logging.py [--arch resnet101] [--size 32] [--keep]

Each side logs the same network (as ``conkd.tracking.log_model`` does at the end of a run) into
its own run of one local store, in alternating order; prints seconds per side, the artifact
sizes, whether the loaded ``pt2`` model reproduces the network's logits, and the time ratio last.
"""

from __future__ import annotations

import logging
import time

from _common import abba, parser, scratch_dir


def main() -> int:
    args = parser(
        __doc__, arch="resnet101", size=(32, "image size (px)"), rounds=2, keep=False
    ).parse_args()

    import mlflow
    import torch

    from conkd.models import Network
    from conkd.tracking import pt2_options

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    work = scratch_dir("conkd-model-logging-", args.keep)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment(
        experiment_id=mlflow.create_experiment("logging", (work / "artifacts").as_uri())
    )
    torch.manual_seed(0)
    net = Network(args.arch, num_classes=10, image_size=args.size).eval()
    options = {
        "pt2": pt2_options(net, (3, args.size, args.size)),  # as conkd.tracking.log_model
        "pickle": {"serialization_format": "pickle"},
    }
    seconds: dict[str, list[float]] = {k: [] for k in options}
    uris: dict[str, str] = {}
    for _, fmt in abba(options, args.rounds):
        with mlflow.start_run():
            start = time.perf_counter()
            info = mlflow.pytorch.log_model(net, name="model", **options[fmt])
            seconds[fmt].append(time.perf_counter() - start)
            uris[fmt] = info.model_uri
    x = torch.randn(5, 3, args.size, args.size)
    with torch.no_grad():
        same = torch.equal(mlflow.pytorch.load_model(uris["pt2"])(x)["logits"], net(x)["logits"])
    sizes = {
        fmt: sum(p.stat().st_size for p in work.rglob(name) if p.is_file()) / 2**20
        for fmt, name in (("pt2", "model.pt2"), ("pickle", "model.pth"))
    }
    for fmt in options:
        runs = ", ".join(f"{s:.1f}" for s in seconds[fmt])
        print(f"{fmt:6s} {args.arch} {args.size}px: {runs} s ({sizes[fmt] / args.rounds:.0f} MiB)")
    print(f"pt2 model reproduces the network's logits exactly: {same}")
    ratio = min(seconds["pt2"]) / min(seconds["pickle"])
    print(f"ratio pt2 / pickle (best of {args.rounds}): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
