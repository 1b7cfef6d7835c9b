"""FSDP2 (``fully_shard``) on 2 real CPU processes (gloo).

One ``torchrun`` launch runs every check (tests/distributed/fsdp2_worker.py) and writes JSON per
rank; these tests assert on it. The expectations of x̃ come from tests/reference.py in float64,
fed with every rank's local gradients (gathered by the worker). Sharding configurations:
"root" (fully_shard on the root only), "blocks" (per block and the root), "keep" (per block
with reshard_after_forward=False).
"""

from __future__ import annotations

import os
import types

import pytest

from launch import CONFIGS, accelerate_cmd, free_port, load_results, run

pytestmark = pytest.mark.slow

WORKER = "tests/distributed/fsdp2_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    import sys

    run([[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(free_port()), WORKER, "--out", str(out)]], timeout=300)
    ranks = load_results(str(out), "fsdp2", 2)
    for r in ranks:
        for check, value in r.items():
            assert "error" not in value, f"{check}:\n{value['error']}"
    return ranks


SEMANTICS = ["semantics_sgd_blocks", "semantics_sgd_root", "semantics_sgd_keep",
             "semantics_sgd_accum", "semantics_sgd_accum_nosync", "semantics_stochastic", "semantics_adam", "semantics_sgd_bf16",
             "semantics_sgd_bf16_small_lr"]


@pytest.mark.parametrize("check", SEMANTICS)
def test_each_rank_displaces_its_own_shard_with_its_own_local_gradient(results, check):
    """The anchor follows torch's update of the averaged gradient, and the mixed point is, shard
    by shard, the owner's x̃ = x − γ̃·dᵏ from its own local gradients (float64 reference over
    every rank's gathered gradients; extrap_max_norm in "keep"); I6 holds (gᵏ sums the
    micro-steps of gradient accumulation, also without gradient sync on the first)."""
    for r in results:
        e = r[check]
        assert len(e["anchor_err"]) >= 4
        assert max(e["anchor_err"]) < 1e-6
        assert max(e["point_err"]) < 1e-6
        assert max(e["i6_err"]) < 1e-6
        assert max(e["own_rows_err"]) < 1e-6
        assert e["displaced_any"]


@pytest.mark.parametrize("check", SEMANTICS)
def test_extra_state_is_shard_sized(results, check):
    """The adapter's own state per rank (anchor copy, local moments, the captured rows of gᵏ;
    not the base optimizer's state) in bytes per element of this rank's shard: 3 fp32 buffers
    for extrap-SGD (12 bytes), 4 for extrap-Adam; nothing whole-sized (the capture keeps only
    this rank's rows; extrap_max_norm adds one scalar norm per parameter until the step)."""
    limit = 16.0 if check == "semantics_adam" else 12.0
    for r in results:
        e = r[check]
        assert 0 < e["extra_bytes_per_element"] <= limit


@pytest.mark.parametrize("check", SEMANTICS)
def test_all_ranks_compute_at_one_mixed_point(results, check):
    """What the forward reads (the unsharded weights) is identical on every rank and equals the
    reference's mixed point, cast to the policy's param_dtype under bf16."""
    for r in results:
        e = r[check]
        assert e["same_point"] and all(e["same_point"])
        assert max(e["seen_err"]) < 1e-6


@pytest.mark.parametrize("check", SEMANTICS)
def test_frozen_unused_and_empty_shards(results, check):
    """A frozen layer and a parameter the forward never uses stay as they were; the head's
    weight (dim 0 = 1 < K) leaves rank 1 an empty shard (the checks above cover it)."""
    for r in results:
        assert r[check]["frozen_unused_unchanged"]


def test_bf16_rounded_to_zero_fraction(results):
    """MixedPrecisionPolicy(bf16, fp32): x̃ is formed in fp32 on the shard and cast by FSDP2's
    all-gather; the adapter's rounded-to-zero fraction equals the one the worker counts, and it
    grows when γ̃·d shrinks."""
    for r in results:
        big, small = r["semantics_sgd_bf16"], r["semantics_sgd_bf16_small_lr"]
        for e in (big, small):
            assert e["rounded_to_zero_fraction"] == pytest.approx(
                e["rounded_to_zero_fraction_counted"], abs=1e-12)
        assert 0.0 < big["rounded_to_zero_fraction"] < small["rounded_to_zero_fraction"] < 1.0
        assert r["semantics_sgd_blocks"]["rounded_to_zero_fraction"] == 0.0  # fp32: none


@pytest.mark.parametrize("check", ["noise_gaussian", "noise_uniform", "noise_filterwise"])
def test_noise_variants_on_shards(results, check):
    for r in results:
        e = r[check]
        assert e["within_bounds"] and e["moved"] and e["ranks_draw_differently"]


@pytest.mark.parametrize("check", ["i1_sgd_root", "i1_sgd_keep", "i1_adamw_blocks",
                                   "i1_sgd_bf16"])
def test_i1_extrap_scale_zero_is_torch_bit_for_bit(results, check):
    for r in results:
        assert r[check]["bit_identical"]


@pytest.mark.parametrize("check", ["i1_sgd_root", "i1_sgd_keep", "i1_adamw_blocks",
                                   "i1_sgd_bf16"])
def test_i3_collectives_per_step_equal_torch(results, check):
    for r in results:
        e = r[check]
        assert e["collectives_ours"] == e["collectives_torch"]
        assert e["collectives_ours"]["calls"] > 0


def test_i3_collectives_while_extrapolating(results):
    """γ̃ > 0 and extrap_max_norm (this rank's whole local-gradient norm): no extra collective."""
    for r in results:
        e = r["collectives_extrapolating"]
        assert e["ours"] == e["torch"] and e["ours"]["calls"] > 0


@pytest.mark.parametrize("check", ["saves_blocks", "saves_root"])
def test_only_the_anchor_is_evaluated_or_saved(results, check):
    for r in results:
        e = r[check]
        assert e["displaced"]  # x̃ ≠ x, so the checks below can fail
        for key in ("state_dict", "dcp_sharded", "dcp_full", "no_grad_forward_at_anchor",
                    "second_no_grad_forward_at_anchor", "shards_hold_points_after",
                    "training_forward_after_sees_point", "eval_mode_shards_are_anchor",
                    "eval_mode_forward", "train_mode_shards_are_points"):
            assert e[key], key


@pytest.mark.parametrize("check", ["resume_sgd", "resume_adam"])
def test_dcp_resume_is_exact(results, check):
    """DCP (sharded model and optimizer state) + each rank's extrap_accel_rank<r>.pt: a fresh
    run from another initialisation continues bit for bit; DCP's dummy step (lr 0, zero
    gradients) on a fresh optimizer changes nothing, Adam's counters included."""
    for r in results:
        e = r[check]
        assert e["decision"] == "load"
        assert e["bit_identical"]
        assert e["dcp_dummy_step_changes_nothing"]
        if check == "resume_adam":
            assert e["adam_counters_after_3_steps"] == [3]


def test_loading_weights_moves_the_anchor(results):
    """model.load_state_dict of its own state dict changes nothing (bit for bit); DCP's
    set_model_state_dict with another model's full state dict makes it the anchor and keeps
    each shard's x̃ − x (to fp32 rounding); a folder without per-rank files restarts x̃ = x."""
    for r in results:
        e = r["loads"]
        assert e["displaced"]
        assert e["own_state_dict_changes_nothing"]
        assert e["full_load_moves_anchor"] and e["shards_hold_points"]
        assert e["full_load_keeps_displacement"] < 1e-6
        assert e["decision_without_files"] == "restart" and e["restarted"]


def test_max_norm_with_gradient_accumulation_is_refused(results):
    for r in results:
        for sync in (True, False):
            msg = r["max_norm_accumulation"][f"sync={sync}"]
            assert "extrap_max_norm under FSDP2 with gradient accumulation" in msg, msg


def test_refusals_name_the_fix(results):
    for r in results:
        e = r["refusals"]
        assert "not supported under FSDP2" in e["fresh"] and "'past'" in e["fresh"]
        assert "extrap_accel.attach(model, optimizer)" in e["unattached_step"]
        assert "model.parameters() after fully_shard" in e["plain_params"]
        assert e["attach_after_no_grad_forward"] == "ok"


# ------------------------------------------------------------------ accelerate's FSDP2 plugin
ACCELERATE_WORKER = "tests/distributed/accelerate_fsdp2_worker.py"


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory):
    """One `accelerate launch` with accelerate_configs/fsdp2_bf16.yaml on 2 CPU ranks. On CPU
    accelerate falls back to DDP; the worker forces the FSDP2 plugin built from the yaml
    (DESIGN.md's workaround, both shared states) so that prepare applies fully_shard."""
    out = tmp_path_factory.mktemp("accelerate_fsdp2")
    run([accelerate_cmd("fsdp2_bf16.yaml", "--num_processes", "2", "--main_process_port",
                        str(free_port()), ACCELERATE_WORKER, "--out", str(out))], timeout=300)
    ranks = load_results(str(out), "accelerate_fsdp2", 2)
    for r in ranks:
        for check, value in r.items():
            assert not (isinstance(value, dict) and "error" in value), f"{check}:\n{value['error']}"
    return ranks


def test_prepare_attaches_the_fsdp2_adapter(accelerate_results):
    """extrap_accel.prepare under the FSDP2 plugin: accelerate's fully_shard (per block from the
    yaml's TRANSFORMER_BASED_WRAP and _no_split_modules, and the root), bf16 param_dtype from
    mixed_precision, then the adapter on the prepared model: x̃ ≠ x after a step."""
    for r in accelerate_results:
        assert r["world_size"] == 2 and r["mixed_precision"] == "bf16"
        e = r["prepare"]
        assert e["adapter"] == "FSDP2Extrapolation" and e["fsdp_units"] == 3
        assert e["params_are_dtensors"] and e["displaced"]
        assert e["param_dtype"] == "torch.bfloat16"
        assert e["state_dict_type"] == "StateDictType.SHARDED_STATE_DICT"


@pytest.mark.parametrize("check, model_file", [("resume", "pytorch_model_fsdp_0"),
                                               ("resume_full", "pytorch_model_fsdp.bin")])
def test_save_state_load_state_resume_is_bit_identical(accelerate_results, check, model_file):
    """accelerator.save_state / load_state (SHARDED_STATE_DICT: DCP; FULL_STATE_DICT: rank 0's
    files) with each rank's extrap_accel_rank<r>.pt: a run from other weights continues bit
    for bit on every rank (shards of x̃ and anchors, 3 steps)."""
    for r in accelerate_results:
        e = r[check]
        assert e["bit_identical"] and e["local_file"]
        assert model_file in e["files"]
        assert {"extrap_accel_rank0.pt", "extrap_accel_rank1.pt"} <= set(e["files"])


def test_load_state_without_local_files_restarts_from_the_anchor(accelerate_results):
    for r in accelerate_results:
        e = r["resume_without_local_files"]
        assert e["warned"] and e["at_anchor"]


def test_get_state_dict_and_save_model_hold_the_anchor(accelerate_results):
    """get_state_dict and save_model (safetensors and pytorch_model.bin; rank 0 writes) hold
    the anchor; the shards keep x̃."""
    for rank, r in enumerate(accelerate_results):
        e = r["saving"]
        assert e["displaced"] and e["params_still_points"]
        if rank == 0:
            assert e["get_state_dict_is_anchor"]
            assert e["save_model_is_anchor"] and e["save_model_bin_is_anchor"]


def test_i1_through_accelerate_fsdp2(accelerate_results):
    """extrap_scale=0 via extrap_accel.prepare equals torch SGD via accelerator.prepare."""
    for r in accelerate_results:
        assert r["i1"]["bit_identical"]


def test_accelerate_fsdp1_is_refused_in_a_launch(accelerate_results):
    for r in accelerate_results:
        assert "fsdp_version: 2" in r["fsdp1"]


@pytest.fixture(scope="module")
def multinode_results(tmp_path_factory):
    """accelerate_configs/fsdp2_bf16_multinode.yaml: two launches (machine_rank 0 and 1, one
    process each) on 127.0.0.1, FSDP2 forced as above; the prepare, resume and I1 checks."""
    out = tmp_path_factory.mktemp("accelerate_fsdp2_multinode")
    port = str(free_port())
    run([accelerate_cmd("fsdp2_bf16_multinode.yaml", "--machine_rank", str(rank),
                        "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                        "--main_process_port", port, ACCELERATE_WORKER, "--out", str(out),
                        "--checks", "prepare,resume,i1", "--name", "multinode")
         for rank in (0, 1)], timeout=300)  # fmt: skip
    return load_results(str(out), "multinode", 2)


def test_fsdp2_multinode_config_runs(multinode_results):
    for r in multinode_results:
        assert r["world_size"] == 2 and r["mixed_precision"] == "bf16"
        for check in ("prepare", "resume", "i1"):
            assert "error" not in r[check], r[check]["error"]
        assert r["prepare"]["adapter"] == "FSDP2Extrapolation" and r["prepare"]["displaced"]
        assert r["resume"]["bit_identical"] and r["resume_without_local_files"]["warned"]
        assert r["i1"]["bit_identical"]


@pytest.mark.parametrize("name, machines, processes", [("fsdp2_bf16.yaml", 1, 8),
                                                        ("fsdp2_bf16_multinode.yaml", 2, 16)])
def test_fsdp2_accelerate_configs(name, machines, processes):
    """The FSDP2 configs have what `accelerate launch` needs for FSDP2 with bf16, and accelerate
    reads them (its own config class loads each one)."""
    import os

    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    path = os.path.join(CONFIGS, name)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert cfg["distributed_type"] == "FSDP"
    assert cfg["fsdp_config"]["fsdp_version"] == 2
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["num_machines"] == machines and cfg["num_processes"] == processes
    assert cfg["fsdp_config"]["fsdp_state_dict_type"] in ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
    assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] in (
        "TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
    if machines > 1:
        assert {"main_process_ip", "main_process_port", "machine_rank"} <= set(cfg)
    loaded = ClusterConfig.from_yaml_file(path)
    assert loaded.fsdp_config["fsdp_version"] == 2 and loaded.num_machines == machines
    with open(path) as f:  # commented line by line, like the other configs
        lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    assert all("#" in ln for ln in lines if ln.startswith("  ")), "fsdp_config lines need comments"


# ------------------------------------------------------------------ a recipe under FSDP2
RECIPE_WORKER = "tests/distributed/recipe_fsdp2_worker.py"
VISION = ["recipes/vision.py", "--width", "0.25", "--max_steps", "6", "--save_steps", "3",
          "--logging_steps", "1", "--eval_steps", "3", "--per_device_train_batch_size", "32",
          "--learning_rate", "0.4", "--lr_scheduler_type", "constant", "--warmup_epochs", "0"]


@pytest.fixture(scope="module")
def vision_fsdp2_runs(tmp_path_factory):
    """recipes/vision.py unchanged, with its usual flags, under accelerate_configs/fsdp2_bf16.yaml
    on 2 CPU ranks (FSDP2 forced as above; fp32: --mixed_precision no, see the README on bf16
    and BatchNorm on CPU): 6 steps, then a second launch resuming from checkpoint-3."""
    full, resumed = (tmp_path_factory.mktemp(n) for n in ("vision_fsdp2", "vision_fsdp2_resumed"))
    for out, extra in ((full, []), (resumed, ["--resume_from_checkpoint",
                                              str(full / "checkpoint-3")])):
        run([accelerate_cmd("fsdp2_bf16.yaml", "--num_processes", "2", "--mixed_precision", "no",
                            "--main_process_port", str(free_port()), RECIPE_WORKER, *VISION,
                            "--output_dir", str(out), *extra)], timeout=300)
    return full, resumed


def _records(output_dir):
    import json

    with open(output_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_recipe_trains_saves_and_resumes_exactly_under_fsdp2(vision_fsdp2_runs):
    """The recipe's checkpoints are accelerate's FSDP layout (DCP shards) with every rank's
    extrap_accel_rank<r>.pt; resuming from step 3 reproduces every logged loss and evaluation
    and the final model (the anchor, saved by save_model) and per-rank state bit for bit."""
    import torch
    from safetensors.torch import load_file

    full, resumed = vision_fsdp2_runs
    files = set(os.listdir(full / "checkpoint-3"))
    assert {"pytorch_model_fsdp_0", "optimizer_0", "extrap_accel_rank0.pt",
            "extrap_accel_rank1.pt", "checkpoint_complete.json"} <= files
    records = _records(full)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("eval_accuracy" in r for r in records)
    assert _records(resumed) == [r for r in records if r["step"] > 3]
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):
        name = f"checkpoint-6/extrap_accel_rank{rank}.pt"
        la = torch.load(full / name, weights_only=True)["optimizers"][0]
        lb = torch.load(resumed / name, weights_only=True)["optimizers"][0]
        assert la["layout"] == "fsdp2-shard0"
        for idx, entry in la["state"].items():
            assert all(torch.equal(v, lb["state"][idx][k]) for k, v in entry.items())


# ------------------------------------------------------------------ without a launch
def test_support_table():
    from extrap_accel.optim import VARIANTS

    assert {n for n, v in VARIANTS.items() if v.fsdp2} == {
        "past", "gaussian", "uniform", "filterwise", "stochastic"}
    assert not VARIANTS["fresh"].fsdp2


def test_fsdp1_is_refused_naming_fsdp2():
    import torch
    from torch import nn

    import extrap_accel

    class FullyShardedDataParallel(nn.Module):
        pass

    model = FullyShardedDataParallel()
    model.w = nn.Parameter(torch.zeros(2))
    with pytest.raises(NotImplementedError, match="fully_shard"):
        extrap_accel.attach(model, extrap_accel.ExtrapSGD(model.parameters(), lr=0.1))


def test_accelerate_fsdp1_plugin_is_refused_naming_fsdp_version_2():
    from accelerate.utils import DistributedType

    import extrap_accel

    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=1)))
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        extrap_accel.prepare(accelerator)


def test_trainer_fsdp_is_refused_naming_attach():
    from extrap_accel.integrations.transformers import _check_backend

    trainer = types.SimpleNamespace(args=types.SimpleNamespace(), is_fsdp_enabled=True)
    with pytest.raises(NotImplementedError, match=r"fully_shard.*attach\(model, optimizer\)"):
        _check_backend(trainer)
