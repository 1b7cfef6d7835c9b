"""extrap_accel: extrap-SGD and extrap-Adam (Lin, Kong, Stich, Jaggi, ICML 2020) for PyTorch.

``import extrap_accel`` needs only torch; integrations import their libraries lazily.
"""

from .attach import AttachHandle, attach
from .integrations.accelerate import prepare
from .integrations.optimizer_spec import trainer_optimizer
from .integrations.post_local_sgd import PostLocalSGD, enable_post_local_sgd
from .lars import LARS
from .optim import (
    Binding,
    Core,
    ExtrapAdam,
    ExtrapOptimizer,
    ExtrapSGD,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    register_optimizer,
    variant_info,
)
from .safety import manual_mode
from .simulate import VirtualWorkers

__version__ = "0.2.0"

# transformers is imported only when these are used
_LAZY = {
    "ExtrapTrainer": "extrap_accel.integrations.transformers",
    "ExtrapTrainerMixin": "extrap_accel.integrations.transformers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'extrap_accel' has no attribute {name!r}")


__all__ = [
    "LARS",
    "AttachHandle",
    "Binding",
    "Core",
    "ExtrapAdam",
    "ExtrapOptimizer",
    "ExtrapSGD",
    "ExtrapTrainer",
    "ExtrapTrainerMixin",
    "PostLocalSGD",
    "VirtualWorkers",
    "attach",
    "create_optimizer",
    "enable_post_local_sgd",
    "get_optimizer_info",
    "list_optimizers",
    "manual_mode",
    "prepare",
    "register_optimizer",
    "trainer_optimizer",
    "variant_info",
]
