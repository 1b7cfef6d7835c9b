"""benchmarks/gpu_check.py in its CPU mode (``--device cpu --tiny``): the same code paths as on
a GPU, so that the one-command GPU proof cannot rot; and a planted fault must fail the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def run(out, *extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--output_dir",
                           str(out), *extra], env=env, check=False, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    with open(os.path.join(out, "gpu_check.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "gpu_check.md")) as f:
        return proc, report, f.read()


def test_tiny_cpu_run_passes_and_reports_every_section(tmp_path):
    proc, report, md = run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == [
        "optimizers",
        "amp",
        "deepspeed",
        "fsdp2",
        "two_process",
        "performance",
    ]
    for name, s in sections.items():
        assert s["status"] == "finished", (name, s["status"])
        assert all(c["ok"] for c in s["checks"]), [c for c in s["checks"] if not c["ok"]]
    names = {name: " / ".join(c["name"] for c in s["checks"]) for name, s in sections.items()}
    assert names["optimizers"].count("vs float64 oracle") == 8  # 2 optimizers × 2 dtypes × 2
    assert names["optimizers"].count("I1 bitwise") == 8
    assert "injected overflow skipped" in names["amp"]
    assert "ZeRO-3 bf16: resume bit identical" in names["deepspeed"]
    # one process on a CPU: the consolidated dict aliases the shards (fixed in 0.2.0)
    assert "ZeRO-3 bf16: consolidated is anchor" in names["deepspeed"]
    assert "FSDP2 I1" in names["fsdp2"]
    assert "I4" in names["two_process"] and "I3" in names["two_process"]
    assert report["checks"] >= 35 and report["checks_failed"] == 0 and not report["failed"]
    # what CPU mode leaves out is said, with a reason
    skipped = {sk["what"]: sk["reason"] for s in report["sections"] for sk in s["skipped"]}
    assert "CUDA-only" in skipped["extra peak memory (torch.cuda.max_memory_allocated)"]
    assert "one DeepSpeed configuration" in skipped["ZeRO-0/1/2 and fp16"]
    # performance reports ratios for both parameter sets and both training steps
    perf = {m["name"]: m for m in sections["performance"]["measurements"]}
    for name in ("step transformer SGD", "step resnet20 AdamW"):
        assert perf[name]["ratio_foreach"] > 0 and perf[name]["ratio_fused"] > 0
    assert perf["step resnet20 SGD"]["tensors"] == 59
    assert perf["step resnet20 SGD"]["extra_state_bytes_per_param"] == 8.0
    for task in ("resnet20", "translate"):
        assert perf[f"train step {task}"]["ratio"] > 0
    assert "**PASSED**: 0 of" in md and "| optimizers (finished" in md
    assert (
        "I1 bitwise: SGD extrap_scale=0 foreach=True == torch SGD(foreach=True) float32 | ok" in md
    )


def test_a_failed_check_fails_the_run(tmp_path):
    proc, report, md = run(tmp_path, "--sections", "optimizers", "--inject_fault")
    assert proc.returncode == 1, proc.stdout[-3000:]
    checks = report["sections"][0]["checks"]
    failed = [c["name"] for c in checks if not c["ok"]]
    assert failed and all(name.startswith("I1 bitwise") for name in failed)
    assert any("oracle" in c["name"] and c["ok"] for c in checks)  # the rest still passes
    assert report["failed"] and "**FAILED**" in md
