"""extrap_accel: extrap-SGD and extrap-Adam (Lin, Kong, Stich, Jaggi, ICML 2020) for PyTorch.

``import extrap_accel`` needs only torch; integrations import their libraries lazily.
"""

from .attach import AttachHandle, attach
from .integrations.accelerate import prepare
from .lars import LARS
from .simulate import VirtualWorkers
from .integrations.post_local_sgd import PostLocalSGD, enable_post_local_sgd
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

__version__ = "0.2.0"

__all__ = [
    "AttachHandle",
    "Binding",
    "Core",
    "ExtrapAdam",
    "ExtrapOptimizer",
    "ExtrapSGD",
    "LARS",
    "PostLocalSGD",
    "attach",
    "create_optimizer",
    "enable_post_local_sgd",
    "get_optimizer_info",
    "list_optimizers",
    "prepare",
    "register_optimizer",
    "VirtualWorkers",
    "variant_info",
]
