from .adam import ExtrapAdam, extrap_adam
from .base import Binding, ExtrapOptimizer
from .core import Core
from .directions import EXTRAPOLATIONS
from .registry import (
    VARIANTS,
    OptimizerInfo,
    VariantInfo,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    register_optimizer,
    variant_info,
)
from .sgd import ExtrapSGD, extrap_sgd

__all__ = [
    "Binding",
    "Core",
    "EXTRAPOLATIONS",
    "VARIANTS",
    "VariantInfo",
    "variant_info",
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
