"""Run a recipe under accelerate's FSDP2 plugin on CPU ranks (tests only).

    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/fsdp2_bf16.yaml \\
        --num_processes 2 tests/distributed/recipe_fsdp2_worker.py recipes/vision.py ARGS...

accelerate (1.16) sets up DDP on CPU whatever the config says. Every Accelerator the recipe
creates gets the FSDP2 plugin built from the launch's config forced into accelerate's shared
state right after its creation (accelerate_fsdp2_worker.force_fsdp2), so the recipe runs
unchanged on accelerate's FSDP2 path (fully_shard, FSDP save_state/load_state/save_model).
"""

from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accelerate  # noqa: E402
from accelerate_fsdp2_worker import force_fsdp2  # noqa: E402


class FSDP2OnCPUAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        force_fsdp2(self)


accelerate.Accelerator = FSDP2OnCPUAccelerator

if __name__ == "__main__":
    recipe, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(recipe)))
    runpy.run_path(recipe, run_name="__main__")
