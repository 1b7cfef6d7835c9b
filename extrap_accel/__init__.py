"""extrap_accel: extrap-SGD and extrap-Adam (Lin, Kong, Stich, Jaggi, ICML 2020) for PyTorch.

``import extrap_accel`` needs only torch; integrations import their libraries lazily.
"""

from .attach import AttachHandle, attach
from .integrations.accelerate import prepare
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

__all__ = [
    "LARS",
    "AttachHandle",
    "Binding",
    "Core",
    "ExtrapAdam",
    "ExtrapOptimizer",
    "ExtrapSGD",
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
    "variant_info",
]
