"""Networks in MLflow: logged in the safe ``pt2`` format, registered, fetched back by URI."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from conkd.errors import ConKDError
from conkd.tracking.store import open_client, with_retry

log = logging.getLogger("conkd")


def export_signature(model: Any, example: Any) -> Any:
    """The MLflow signature of a network for the ``pt2`` format: one float image batch in (the
    batch dimension free), its named outputs (``logits``, ``embedding``, ``projection``; a
    ``None`` output is left out) out. MLflow infers signatures only for one output tensor."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    with torch.no_grad():
        out = model(example)
    f32 = np.dtype(np.float32)
    outputs = [
        TensorSpec(f32, (-1, *v.shape[1:]), name) for name, v in out.items() if v is not None
    ]
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, *example.shape[1:]))]), outputs=Schema(outputs)
    )


def pt2_options(model: Any, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """``mlflow.pytorch.log_model`` arguments for the ``pt2`` format: ``model`` (in eval mode)
    traced on a batch of two ``input_shape`` images, the batch size left free."""
    import torch

    example = torch.zeros(2, *input_shape)
    return {
        "serialization_format": "pt2",
        "input_example": example.numpy(),
        "signature": export_signature(model, example),
        # the pyfunc server's check wants one output tensor; the network returns a dict
        "validate_serving_input": False,
    }


def _log_as(model: Any, input_shape: tuple[int, int, int], common: dict[str, Any]) -> tuple:
    """Log ``model`` as ``pt2``; one that ``torch.export`` cannot trace as pickle, warned."""
    import mlflow

    try:
        options = pt2_options(model, input_shape)
        return with_retry(mlflow.pytorch.log_model, model, **options, **common), "pt2"
    except Exception as err:  # torch.export could not trace this network
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        log.warning("MLflow: the network did not export (%s); logged as pickle", first)
        info = with_retry(mlflow.pytorch.log_model, model, serialization_format="pickle", **common)
        return info, "pickle"


def log_network(
    model: Any, input_shape: tuple[int, int, int], register_name: str | None = None
) -> tuple[str, str, str | None]:
    """Log ``model`` into the active MLflow run with ``mlflow.pytorch`` (registered under
    ``register_name`` if given); returns its model URI, format and registered version.

    The network is exported with ``torch.export`` (MLflow's ``pt2`` format: a graph and its
    weights, no pickle, so loading it runs no code), in eval mode, traced on a batch of two
    ``input_shape`` images with the batch size left free. A network that does not export is
    logged in the pickle format instead, with a warning naming why.
    ``mlflow.pytorch.load_model`` gives back the network's dict of outputs either way.
    """
    import torch
    import torchvision

    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    common = {
        "name": "model",
        "code_paths": [str(Path(__file__).resolve().parents[1])],  # the conkd package
        "pip_requirements": requirements,
        "registered_model_name": register_name,
    }
    was_training = model.training
    model.eval()
    try:
        info, fmt = _log_as(model, input_shape, common)
    finally:
        model.train(was_training)
    version = getattr(info, "registered_model_version", None)
    return info.model_uri, fmt, None if version is None else str(version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/3`` -> (NAME, None, "3")."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, alias, None
    name, _, version = body.rpartition("/")
    if not name or not version:
        raise ConKDError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/N")
    return name, None, version


def fetch_registered_checkpoint(uri: str, tracking_uri: str, dest: Path) -> tuple[Path, str]:
    """Download the checkpoint behind a registered model version; returns (path, source run id).

    The registry points at the run that logged the model; that run's ``checkpoints/best.pt``
    carries the architecture spec, so the teacher is validated exactly like a local checkpoint.
    """
    import mlflow

    name, alias, version = parse_model_uri(uri)
    client = open_client(tracking_uri)
    try:
        if alias:
            mv = with_retry(client.get_model_version_by_alias, name, alias)
        else:
            mv = with_retry(client.get_model_version, name, version)
    except Exception as err:
        raise ConKDError(
            f"teacher {uri} is not in the model registry of {tracking_uri} "
            f"({str(err).splitlines()[0][:160]}); train one with `python train.py "
            "experiment=teacher` or pass a checkpoint path"
        ) from err
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path="checkpoints/best.pt",
            dst_path=str(dest),
            tracking_uri=tracking_uri,
        )
    except Exception as err:
        raise ConKDError(
            f"{uri} (run {mv.run_id}) has no checkpoints/best.pt artifact; "
            "register teachers from runs with mlflow.log_checkpoint=true"
        ) from err
    return Path(local), mv.run_id
