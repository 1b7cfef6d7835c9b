"""A DeepSpeed "optimizer" section naming an extrap_accel optimizer, resolved per route
(extrap_accel/integrations/optimizer_spec.py). The routes end to end: tests/test_deepspeed.py
(initialize; accelerate launch with DummyOptim) and tests/test_trainer.py (the Trainer)."""

from __future__ import annotations

import pytest

from extrap_accel.integrations.optimizer_spec import check_type, registry_name, resolve

AUTO = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
TRAINER = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.05}


def test_class_and_registry_names_are_ours_and_deepspeeds_stay_deepspeeds():
    assert registry_name("ExtrapSGD") == "extrap_sgd"
    assert registry_name("ExtrapAdam") == "extrap_adam"
    assert registry_name("extrap_sgd_gaussian") == "extrap_sgd_gaussian"
    for name in ("sgd", "adamw", "AdamW", "Adam", None, 3):
        assert registry_name(name) is None


def test_auto_resolves_as_each_route_fills_it():
    assert resolve({"type": "ExtrapAdam", "params": AUTO}, "trainer", TRAINER) == (
        "extrap_adam",
        TRAINER,
    )
    name, kwargs = resolve({"type": "ExtrapSGD", "params": AUTO}, "trainer", TRAINER)
    assert (name, kwargs) == ("extrap_sgd", {"lr": 3e-3, "weight_decay": 0.05})  # no betas/eps
    accelerate = {"lr": 0.05, "weight_decay": 1e-4}
    spec = {"type": "extrap_sgd_gaussian", "params": {"lr": "auto", "noise_scale": 1e-3}}
    assert resolve(spec, "accelerate", accelerate) == (
        "extrap_sgd_gaussian",
        {"lr": 0.05, "noise_scale": 1e-3},
    )
    with pytest.raises(ValueError, match=r'params.betas": "auto" cannot be resolved.*accelerate '
                                         r"fills lr, weight_decay"):  # fmt: skip
        resolve({"type": "ExtrapAdam", "params": AUTO}, "accelerate", accelerate)
    with pytest.raises(ValueError, match=r"deepspeed fills nothing\): give lr a value"):
        resolve({"type": "ExtrapSGD", "params": {"lr": "auto"}}, "deepspeed", {})
    assert resolve(
        {"type": "ExtrapAdam", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}}, "deepspeed", {}
    ) == ("extrap_adam", {"lr": 1e-3, "betas": (0.9, 0.95)})


def test_an_unknown_type_is_refused_with_the_names_there_are():
    check_type("ExtrapSGD", ["adamw"])
    check_type("AdamW", ["adamw"])  # DeepSpeed's own
    with pytest.raises(
        ValueError,
        match=r"unknown optimizer type 'ExtrapSDG'.*ExtrapSGD, "
        r"ExtrapAdam, extrap_adam.*DeepSpeed built-in \(adamw\)",
    ):
        check_type("ExtrapSDG", ["adamw"])  # fmt: skip
