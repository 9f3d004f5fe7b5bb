"""Which constructors a config or a checkpoint may name, and building objects from config.

Hydra 1.4 asks trusted code for an *execution whitelist*: ``instantiate`` without one warns that a
config's ``_target_`` can run arbitrary code (Hydra 1.5 refuses). ConKD's configs name only the
packages below, so every ``instantiate`` in the project passes one of these lists, and
``train.py`` / ``eval.py`` hand :data:`CONFIG_TARGETS` to ``hydra.main`` for what Hydra builds
itself (the sweeper's sampler and pruner, callbacks). A checkpoint may build only networks.

Your own classes (``model._target_=mypkg.MyNet``): name their packages in the environment variable
``CONKD_EXTRA_TARGETS`` (comma-separated, ``mypkg.*``); the environment is set by you, a config
file cannot extend its own whitelist.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conkd.errors import ConKDError

#: What a checkpoint's model spec may build: ConKD's networks and the torch layers its head
#: factories return (Hydra also checks what a factory returns). ``weights_only=True`` already
#: keeps pickles out; this keeps a crafted ``_target_`` (``os.system``) from being called on load.
CHECKPOINT_TARGETS: tuple[str, ...] = ("conkd.models.*", "torch.nn.modules.*")

#: Everything ConKD's configs construct: its own modules (and the torch layers they return),
#: optimizers, Optuna's samplers, pruners and storages, the sweeper's NSGA-II/III factories.
CONFIG_TARGETS: tuple[str, ...] = (
    "conkd.*",
    "torch.nn.modules.*",
    "torch.optim.*",
    "lion_pytorch.*",
    "optuna.samplers.*",
    "optuna.pruners.*",
    "optuna.storages.*",
    "hydra_plugins.hydra_optuna_sweeper.*",
)


def config_targets() -> tuple[str, ...]:
    """:data:`CONFIG_TARGETS` plus the user's ``CONKD_EXTRA_TARGETS``."""
    extra = os.environ.get("CONKD_EXTRA_TARGETS", "")
    return CONFIG_TARGETS + tuple(t.strip() for t in extra.split(",") if t.strip())


def build(node: Any, what: str, targets: tuple[str, ...] | None = None, **kwargs: Any) -> Any:
    """``instantiate(node)`` limited to ``targets`` (default :func:`config_targets`), with a
    target off the list, or a constructor rejecting its arguments, turned into one line that
    names the config key (Hydra 1.4 re-raises a constructor's own error with the key as a note).
    """
    try:
        return instantiate(
            node,
            _convert_="all",
            _execution_whitelist_=config_targets() if targets is None else targets,
            **kwargs,
        )
    except ConKDError:
        raise
    except Exception as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        text = " ".join(str(cause).split()) or type(cause).__name__
        key = next((n for n in getattr(err, "__notes__", ()) if n.startswith("full_key:")), "")
        where = f" ({key})" if key and key not in text else ""
        raise ConKDError(f"invalid {what}: {text}{where}") from err
