"""DeepSpeed ZeRO-0/1/2/3 with fp32, bf16 and fp16 on 2 real CPU processes (gloo).

One `deepspeed` launch runs every engine configuration (tests/distributed/deepspeed_worker.py)
and writes JSON per rank and configuration; these tests assert on it. fp16 runs on the CPU
through DeepSpeed's accelerator switch (DESIGN.md); a GPU run of the same worker is in
test_deepspeed_gpu below.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from launch import accelerate_cmd, free_port, load_results, run

pytestmark = pytest.mark.slow

WORKER = "tests/distributed/deepspeed_worker.py"
CONFIGS = ["z0-fp32", "z0-bf16", "z1-fp32", "z1-bf16", "z1-fp16", "z2-fp32", "z2-bf16",
           "z2-fp16", "z3-fp32", "z3-bf16", "z3-fp16", "z3-bf16-default"]


def _deepspeed_cmd(out, configs):
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable),
                                                          "deepspeed")
    return [launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
            WORKER, "--configs", *configs, "--out", str(out)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    run([_deepspeed_cmd(out, CONFIGS + ["extras"])], timeout=900)
    loaded = {c: load_results(str(out), f"deepspeed_{c}", 2) for c in CONFIGS + ["extras"]}
    for config, ranks in loaded.items():
        for r in ranks:
            assert "error" not in r, f"{config}:\n{r['error']}"
    return loaded


def _stage(config):
    return int(config.split("-")[0][1:])


@pytest.mark.parametrize("config", CONFIGS)
def test_each_rank_extrapolates_from_its_own_gradient(results, config):
    """x̃ = round(x − γ̃·d) with d from this rank's own local gradients (within 1 ulp), I4
    across ranks at ZeRO-0/1/2, I6, and anchors (DeepSpeed's fp32 master) equal on all ranks."""
    for r in results[config]:
        e = r["extrapolation"]
        applied = [i for i, s in enumerate(e["skipped"]) if not s]
        assert len(applied) >= 4
        assert max(e["own_err_ulps"]) <= 1.0
        assert max(e["i4_err_ulps"]) <= 1.0
        assert all(e["anchors_equal"])
        tol = {"fp32": 1e-6, "bf16": 1e-2, "fp16": 1e-3}[r["precision"]]
        assert max(e["i6_err"]) <= tol  # relative; the average is reduced in bit16 (DeepSpeed)


@pytest.mark.parametrize("config", [c for c in CONFIGS if _stage(c) < 3])
def test_ranks_sit_at_different_points_below_zero3(results, config):
    for r in results[config]:
        assert all(r["extrapolation"]["points_differ"])


@pytest.mark.parametrize("config", ["z3-fp32", "z3-bf16", "z3-fp16", "z3-bf16-default"])
def test_zero3_all_ranks_compute_at_one_mixed_point(results, config):
    """ZeRO-3: each rank perturbs the shard it owns; the gathered weights are the same on every
    rank and equal, shard by shard, to the owners' x̃ (persistent parameters included)."""
    for r in results[config]:
        e = r["extrapolation"]
        assert not any(e["points_differ"])
        assert e["mixed_point_consistent"] and all(e["mixed_point_consistent"])
        # the full copies of persistent parameters are refreshed after every swap and load:
        # after a no-grad forward, after save_checkpoint, after load_checkpoint
        assert r["saving"]["persistent_is_mixed_point"] == [True, True, True]


@pytest.mark.parametrize("config", [c for c in CONFIGS if "fp16" not in c])
def test_i1_extrap_scale_zero_is_deepspeed_with_torch_sgd(results, config):
    for r in results[config]:
        assert r["i1_sgd"] is True
        if "i1_adam" in r:
            assert r["i1_adam"] is True


@pytest.mark.parametrize("config", CONFIGS)
def test_i3_no_extra_communication(results, config):
    """A training step issues the collectives DeepSpeed + torch SGD issues, no more."""
    for r in results[config]:
        theirs, ours = r["i3"]["torch_sgd"], r["i3"]["extrap_sgd"]
        assert theirs["calls"] > 0 and ours == theirs, r["i3"]


@pytest.mark.parametrize("config", CONFIGS)
def test_no_grad_forward_between_micro_steps_changes_nothing(results, config):
    for r in results[config]:
        assert r["no_grad_forward_changes_nothing"]


@pytest.mark.parametrize("config", CONFIGS)
def test_load_checkpoint_with_incomplete_local_state_is_refused_on_every_rank(results, config):
    """engine.load_checkpoint: rank 1's file missing, or files saved by 4 processes, raises on
    both ranks (one raising alone would leave the other on rank 0's x̃ or in a collective); no
    file at all (saved without extrap_accel, universal checkpoints) warns and starts at the
    anchor."""
    for r in results[config]:
        c = r["saving"]["incomplete_local_state"]
        assert "per-rank state for 1 of 2 ranks" in c["rank1_file_missing"]
        assert "saved with 4 processes" in c["other_world_size"]
        assert c["no_files"] == {"warned": True, "at_anchor": True}
        if _stage(config) < 3:
            assert "found the checkpoint in" in c["rank1_finds_nothing"]
            assert "on 1 of 2 ranks only" in c["rank1_finds_nothing"]


@pytest.mark.parametrize("config", CONFIGS)
def test_param_groups_one_empty_and_a_frozen_parameter(results, config):
    """DeepSpeed drops an empty param group: the others keep their own rates (x̃ and anchors
    as without it); a frozen parameter, which has no master, never moves."""
    for r in results[config]:
        assert r["groups"] == {"frozen_unchanged": True, "empty_group_changes_nothing": True}


@pytest.mark.parametrize("config", CONFIGS)
def test_noise_variants_start_at_x0_and_draw_per_rank_after_each_step(results, config):
    """No variant perturbs at t = 0: the weights and the anchor (master) are rank 0's x₀, also
    when the optimizer was built before the process group; after a step each rank holds its
    own noise."""
    for r in results[config]:
        for case in ("after_process_group", "before_process_group"):
            assert r["initial_noise"][case] == {"anchor_is_x0": True, "x0_at_t0": True,
                                                "displaced": True, "ranks_differ": True}, case


@pytest.mark.parametrize("config", CONFIGS)
def test_loads_that_bring_no_optimizer_state_restore_no_x_tilde(results, config):
    """load_module_only=True leaves x̃ = anchor (no saved x̃ over an anchor it did not load),
    for the noise variants too (they draw after the next step); a load that finds no
    checkpoint changes nothing (resume_bit_identical covers it: it runs one before the
    reference trace)."""
    for r in results[config]:
        assert r["saving"]["module_only_load_at_anchor"]
        assert r["saving"]["noise_after_load_module_only"]  # x̃ = x
        assert r["saving"]["noise_after_load_optimizer_states"]
        assert r["saving"]["resume_bit_identical"]


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "z0-fp32"])
def test_a_parameter_left_out_of_the_forward_moves_as_with_a_zero_gradient(results, config):
    """DeepSpeed's flat partitions feed it a zero gradient (weight decay and momentum still
    apply): its x̃ is displaced like that, from the first step. (ZeRO-0 fp32 steps torch's
    SGD on the module, which skips it; no displacement there either.)"""
    for r in results[config]:
        assert r["unused_parameter"] == {"same_as_zero_gradient": True,
                                         "branch_displaced_while_unused": True}


@pytest.mark.parametrize("config", [c for c in CONFIGS if "fp16" in c])
def test_fp16_overflow_changes_nothing_and_leaves_no_displacement(results, config):
    for r in results[config]:
        e = r["extrapolation"]
        assert e["skipped"].count(True) == 1 and e["unchanged_after_skip"] == [True]


@pytest.mark.parametrize("config", CONFIGS)
def test_only_the_anchor_is_saved_or_evaluated(results, config):
    for r in results[config]:
        s = r["saving"]
        assert s["weights_still_extrapolated"] and s["unchanged_by_save"] and s["local_file"]
        assert s.get("module_state_dict_is_anchor", s.get("consolidated_is_anchor")) is True
        assert s["no_grad_forward_is_anchor"]


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_from_checkpoint_is_bit_identical(results, config):
    for r in results[config]:
        assert r["saving"]["resume_bit_identical"], r["saving"]["resume_mismatches"]


def test_bf16_rounding_of_the_displacement_is_measured(results):
    """Half an ulp of bf16 near 0.1 is ~2.4e-4: part of γ̃·d rounds away (reported, README)."""
    for config in ("z1-bf16", "z2-bf16"):
        frac = results[config][0]["extrapolation"]["rounded_to_zero_fraction"]
        assert 0.0 < frac < 0.5
    assert results["z2-fp32"][0]["extrapolation"]["rounded_to_zero_fraction"] == 0.0


def test_extra_memory_per_parameter(results):
    """Full-size per-rank buffers at ZeRO-0/1/2 (x̃ is per rank, so nothing is sharded):
    extrap-SGD = bit16 anchor copy + fp32 local momentum + fp32 captured gradient."""
    expect = {"fp32": 12, "bf16": 10, "fp16": 10}
    for config in CONFIGS:
        r = results[config][0]
        got = r["extrapolation"]["extra_bytes_per_param"]
        if _stage(config) < 3:
            assert got == expect[r["precision"]], (config, got)
        else:  # shard-sized anchor copy and momentum, full-size captured gradient
            assert 4 < got < expect[r["precision"]], (config, got)
    for config in ("z0-bf16", "z2-bf16"):  # extrap-Adam: + two fp32 local moments
        assert results[config][0]["adam_extra_bytes_per_param"] == 2 + 4 + 4 + 4


def test_config_named_optimizer_and_unknown_type(results):
    for r in results["extras"]:
        assert r["config_named"] == {"type": "ExtrapSGD", "lr": 0.05}
        assert "unknown optimizer type 'NoSuchOptimizer'" in r["config_unknown_error"]
        assert "ExtrapSGD" in r["config_unknown_error"]


def test_construction_step_does_not_count_and_unattached_engines_refuse(results):
    for r in results["extras"]:
        assert r["steps_after_construction"] == []
        assert "extrap_accel.attach(engine, optimizer)" in r["unattached_error"]


def test_unsupported_combinations_fail_at_setup(results):
    for r in results["extras"]:
        refusals = r["refusals"]
        assert "broken upstream" in refusals["z0_fp16"]
        assert "stochastic" in refusals["z2_stochastic"]
        assert "only at ZeRO-0 in fp32" in refusals["z0_bf16_stochastic"]
        assert "not correct at DeepSpeed ZeRO stage 3" in refusals["z3_filterwise"]
        assert "'fresh'" in refusals["fresh"]
        assert "LARS under DeepSpeed" in refusals["lars_engine_optimizer"]
        assert "LARS under DeepSpeed" in refusals["lars_optimizer"]


def test_accelerate_launch_with_a_deepspeed_config(tmp_path):
    """extrap_accel.prepare under `accelerate launch` with accelerate_configs/ds_zero2_bf16.json."""
    run([accelerate_cmd("cpu_2proc_deepspeed.yaml", "--main_process_port", str(free_port()),
                        "tests/distributed/accelerate_deepspeed_worker.py", "--out",
                        str(tmp_path))], accelerate_use_cpu=False)
    for r in load_results(str(tmp_path), "accelerate_deepspeed", 2):
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["stage"] == 2
        assert r["points_differ"] and r["get_state_dict_is_anchor"]
        assert r["resume_bit_identical"]
        assert "LARS under DeepSpeed" in r["lars_refused"]
        named = r["config_named"]  # the config names ExtrapSGD; the script passes DummyOptim
        assert named["built"] == ["ExtrapSGD", 0.05, 1e-4, 0.9, True]
        assert named["displaced"] and named["config_kept"]
        assert "pass exactly one accelerate.utils.DummyOptim" in named["real_optimizer_error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL, fp16 kernels)")
def test_deepspeed_gpu(tmp_path):  # pragma: no cover - run on a GPU machine
    """The same worker on CUDA devices (NCCL) when a GPU machine is available."""
    n = min(2, torch.cuda.device_count())
    launcher = shutil.which("deepspeed")
    run([[launcher, "--num_gpus", str(n), "--no_local_rank", "--master_port",
          str(free_port()), WORKER, "--configs", "z2-bf16", "z2-fp16", "--out", str(tmp_path)]])
    for config in ("z2-bf16", "z2-fp16"):
        for r in load_results(str(tmp_path), f"deepspeed_{config}", n):
            assert "error" not in r and r["saving"]["resume_bit_identical"]


def test_setup_checks_on_config_options_a_two_rank_cpu_launch_cannot_build():
    """hpZ needs more ranks than 2 and offload a real offload device, so these run on a
    stand-in engine: offload sections with device "none" (accelerate's plugin writes them)
    pass, real offload and hpZ are refused, and a ZeRO-3 inference engine is refused."""
    import types

    import extrap_accel
    from extrap_accel.integrations.deepspeed import check_supported

    def engine(hpz=1, offload=None, param_offload=None, training=True):
        return types.SimpleNamespace(
            zero_optimization_stage=lambda: 3, zero_offload_optimizer=lambda: offload,
            zero_offload_param=lambda: param_offload, fp16_enabled=lambda: False,
            bfloat16_enabled=lambda: True, zero_hpz_partition_size=lambda: hpz,
            optimizer=types.SimpleNamespace(_post_step=None) if training else object(),
        )  # fmt: skip

    optimizer = extrap_accel.ExtrapSGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    check_supported(engine(), optimizer)
    check_supported(engine(offload={"device": "none"}, param_offload={"device": "none"}),
                    optimizer)  # fmt: skip
    with pytest.raises(NotImplementedError, match='device of offload_param to "none"'):
        check_supported(engine(offload={"device": "none"}, param_offload={"device": "cpu"}),
                        optimizer)  # fmt: skip
    with pytest.raises(NotImplementedError, match="offload_optimizer to"):
        check_supported(engine(offload=types.SimpleNamespace(device="nvme")), optimizer)
    with pytest.raises(NotImplementedError, match="zero_hpz_partition_size=8.*set .* to 1"):
        check_supported(engine(hpz=8), optimizer)
    with pytest.raises(RuntimeError, match=r"without a training optimizer.*call train\(\) first"):
        check_supported(engine(training=False), optimizer)
