"""Every test module starts without an accelerate ``Accelerator`` left by an earlier one.

An extrap_accel optimizer that no backend attached refuses to step while an Accelerator exists
in the process (extrap_accel/safety.py); modules that run a recipe or a Trainer in this process
leave accelerate's process-wide state behind, which a later module's plain optimizer would see.
"""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="module", autouse=True)
def _no_accelerator_left_behind():
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
