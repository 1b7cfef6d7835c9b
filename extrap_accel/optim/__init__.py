from .adam import ExtrapAdam, extrap_adam
from .base import EXTRAPOLATIONS, ExtrapOptimizer
from .registry import (
    OptimizerInfo,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    register_optimizer,
)
from .sgd import ExtrapSGD, extrap_sgd

__all__ = [
    "EXTRAPOLATIONS",
    "ExtrapAdam",
    "ExtrapOptimizer",
    "ExtrapSGD",
    "OptimizerInfo",
    "create_optimizer",
    "extrap_adam",
    "extrap_sgd",
    "get_optimizer_info",
    "list_optimizers",
    "register_optimizer",
]
