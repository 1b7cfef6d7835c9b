"""Checks a user can run on their own setup."""

from __future__ import annotations

from collections.abc import Callable


def count_collectives(fn: Callable[[], object]) -> dict[str, int]:
    """Run ``fn`` under the profiler and count the gloo collectives it issued, and their elements.

    DDP's reducer calls gloo from C++, so patching ``torch.distributed.all_reduce`` counts
    nothing; the profiler's ``gloo:*`` events see every call (CPU / gloo process groups).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    calls, elements = 0, 0
    for event in prof.events():
        if event.name.startswith("gloo:"):
            calls += 1
            for shape in event.input_shapes or []:
                if shape:
                    n = 1
                    for s in shape:
                        n *= s
                    elements += n
    return {"calls": calls, "elements": elements}
