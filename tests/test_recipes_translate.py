"""recipes/translate.py: its data, tokenizer and baseline (one process), and the recipe under
`accelerate launch` with 2 CPU processes on a tiny slice of the embedded pairs.

The launched recipe runs twice with a tiny Transformer: once without interruption (checkpoints at
the midpoint and at the end, W&B offline), once resumed from the midpoint checkpoint. The resumed
run must continue exactly: the same losses, BLEU and final weights, bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from launch import accelerate_cmd, free_port, run
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "recipes"))

import common
import translate

SLICE = {"train": 160, "val": 20, "test": 20}  # Multi30k's file names on the Hub
STEPS, MIDDLE = 16, 8
TINY = [
    "recipes/translate.py",
    "--d_model",
    "32",
    "--layers",
    "1",
    "--attention_heads",
    "2",
    "--ffn_dim",
    "64",
    "--vocab_size",
    "400",
    "--max_steps",
    str(STEPS),
    "--save_steps",
    str(MIDDLE),
    "--logging_steps",
    "1",
    "--eval_steps",
    str(MIDDLE),
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "8",
    "--learning_rate",
    "1e-2",
    "--warmup_epochs",
    "0.8",
]  # 4 steps at K=2


def parse(argv):
    return common.parse_args(translate.TranslateArguments, argv, exit_on_error=False)


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _embedded(split: str) -> list[dict]:
    return _read_jsonl(os.path.join(translate.EMBEDDED, f"{split}.jsonl"))


def _write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tiny_slice(tmp_path_factory):
    """A local directory in bentrevett/multi30k's layout: train/val/test.jsonl with en, de."""
    root = tmp_path_factory.mktemp("multi30k_like")
    for name, n in SLICE.items():
        split = "validation" if name == "val" else name
        _write_jsonl(root / f"{name}.jsonl", _embedded(split)[:n])
    return root


# ---------------------------------------------------------------------------- data


def test_embedded_default_pairs():
    pairs = translate.get_pairs(parse([]))
    sizes = {s: len(p[0]) for s, p in pairs.items()}
    assert sizes == {"train": 800, "validation": 100, "test": 100}
    english = {s: set(p[0]) for s, p in pairs.items()}
    assert not english["test"] & english["train"] and not english["validation"] & english["train"]
    assert not english["test"] & english["validation"]
    src, tgt = pairs["train"]
    assert all(isinstance(s, str) and s.endswith(".") for s in src + tgt)
    assert any("ä" in t or "ö" in t or "ü" in t or "ß" in t for t in tgt)  # real German


def test_embedded_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location(
        "make_en_de", os.path.join(REPO, "recipes", "data", "make_en_de.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        generated = module.generate()
    finally:
        del sys.modules[spec.name]
    for split, rows in generated.items():
        assert rows == _embedded(split), split


def test_local_directory_in_the_hub_schema(tiny_slice):
    pairs = translate.get_pairs(parse(["--dataset_name", str(tiny_slice)]))
    assert {s: len(p[0]) for s, p in pairs.items()} == {"train": 160, "validation": 20, "test": 20}
    rows = _embedded("validation")[:20]
    assert pairs["validation"] == ([r["en"] for r in rows], [r["de"] for r in rows])
    # de -> en from the same files
    back = translate.get_pairs(
        parse(["--dataset_name", str(tiny_slice), "--source_lang", "de", "--target_lang", "en"])
    )
    assert back["test"][0][0] == _embedded("test")[0]["de"]


def test_malformed_data_errors_name_the_schema(tmp_path, monkeypatch):
    def load(name):
        return translate.get_pairs(parse(["--dataset_name", name]))

    expected = "expected a directory of files with columns 'en' and 'de'"
    with pytest.raises(common.DataError, match=f"is not a directory; {expected}"):
        load(str(tmp_path / "missing"))
    bad = tmp_path / "bad_columns"
    bad.mkdir()
    for split in ("train", "test"):
        _write_jsonl(bad / f"{split}.jsonl", [{"english": "A dog.", "german": "Ein Hund."}])
    message = r"columns \['english', 'german'\], missing \['en', 'de'\]; expected files with"
    with pytest.raises(common.DataError, match=message):
        load(str(bad))
    numbers = tmp_path / "numbers"
    numbers.mkdir()
    for split in ("train", "test"):
        _write_jsonl(numbers / f"{split}.jsonl", [{"en": "A dog.", "de": 7}])
    with pytest.raises(common.DataError, match="must hold strings, got 'A dog.' and 7"):
        load(str(numbers))
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    _write_jsonl(train_only / "train.jsonl", [{"en": "A dog.", "de": "Ein Hund."}])
    with pytest.raises(common.DataError, match=r"missing \['test'\]; expected files with"):
        load(str(train_only))
    # The Hub path itself: unreachable here, so it must fail with a message saying what to do.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        common.DataError, match="Hub dataset 'bentrevett/multi30k'.*--dataset_name default"
    ):
        load("bentrevett/multi30k")


# ---------------------------------------------------------------------------- tokenizer, batches


def test_tokenizer_is_shared_and_round_trips():
    src, tgt = translate.get_pairs(parse([]))["train"]
    tokenizer = translate.train_tokenizer(src + tgt, vocab_size=2000, max_length=64)
    again = translate.train_tokenizer(src + tgt, vocab_size=2000, max_length=64)
    assert tokenizer.to_str() == again.to_str()  # deterministic: every rank trains the same one
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<unk>", "</s>")] == [0, 1, 2]
    vocab = tokenizer.get_vocab()
    assert {"▁dog", "▁Hund", "▁große", "▁Straße", "."} <= set(vocab)  # one vocabulary for both
    sentences = [src[0], tgt[0], "Der große Hund läuft heute am See.", "A cat and two dogs."]
    ids = translate.encode(tokenizer, sentences)
    assert all(row[-1] == 2 and 2 not in row[:-1] for row in ids)  # </s> appended once
    assert translate.decode(tokenizer, ids) == sentences  # spacing restored exactly
    assert translate.decode(tokenizer, [[*ids[0][:-1], 2, 5, 6]]) == [sentences[0]]  # stops at </s>
    assert tokenizer.encode("€").ids[-2:] == [1, 2]  # an unseen character -> <unk>
    short = translate.train_tokenizer(src + tgt, vocab_size=2000, max_length=4)
    assert len(short.encode(src[0]).ids) == 4


def test_collate_shifts_the_labels():
    batch = translate.collate([(3, [5, 6, 2], [7, 8, 9, 2]), (4, [5, 2], [7, 2])], pad_id=0)
    assert batch["index"].tolist() == [3, 4]
    assert batch["input_ids"].tolist() == [[5, 6, 2], [5, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 8, 9, 2], [7, 2, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 8, 9], [0, 7, 2, 0]]


def test_source_copy_baseline():
    same = translate.source_copy_bleu(["Ein Hund läuft."], ["Ein Hund läuft."])
    assert same == pytest.approx(100.0)
    rows = _embedded("test")
    src, ref = [r["en"] for r in rows], [r["de"] for r in rows]
    import sacrebleu

    baseline = translate.source_copy_bleu(src, ref)
    assert baseline == sacrebleu.corpus_bleu(src, [ref]).score
    assert 0.0 < baseline < 1.0  # names and a few shared words only


def test_label_smoothing_and_model():
    args = parse(["--d_model", "32", "--layers", "1", "--attention_heads", "2", "--ffn_dim", "64"])
    src, tgt = translate.get_pairs(parse([]))["train"]
    tokenizer = translate.train_tokenizer(src + tgt, 400)
    model = translate.build_model(args, tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    batch = translate.collate([(0, [5, 6, 2], [7, 8, 2])], pad_id=0)
    out = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    logits = out.logits
    assert logits.shape == (1, 3, tokenizer.get_vocab_size())
    plain = translate.smoothed_loss(logits, batch["labels"], 0.0)
    smooth = translate.smoothed_loss(logits, batch["labels"], 0.1)
    uniform = -torch.log_softmax(logits, -1).mean(-1).mean()
    assert torch.allclose(smooth, 0.9 * plain + 0.1 * uniform, atol=1e-5)


# ---------------------------------------------------------------------------- configuration


def test_quick_config_is_the_defaults_and_multi30k_parses():
    configs = os.path.join(REPO, "recipes", "configs")
    assert parse(["--config", os.path.join(configs, "translate_quick.yaml")]) == (
        translate.TranslateArguments()
    )
    args = parse(["--config", os.path.join(configs, "translate_multi30k.yaml")])
    assert args.dataset_name == "bentrevett/multi30k" and args.lr_scheduler_type == "inverse_sqrt"
    with pytest.raises(common.ConfigError, match="divisible by attention_heads"):
        parse(["--d_model", "30", "--attention_heads", "4"])
    with pytest.raises(common.ConfigError, match="lr_scaling.*invalid choice: .cubic"):
        parse(["--lr_scaling", "cubic"])


def test_warmup_is_scaled_down_by_the_global_batch():
    """warmup_epochs counts samples: its steps shrink as K·b grows; the peak scales by √."""
    args = translate.TranslateArguments()
    warmups = []
    for k in (1, 2, 8):
        steps_per_epoch = 800 // (args.per_device_train_batch_size * k)  # drop_last
        lr = common.lr_schedule(
            args, num_processes=k, total_steps=1000, steps_per_epoch=steps_per_epoch
        )
        warmup = common.resolve_warmup_steps(args, steps_per_epoch)
        warmups.append(warmup)
        peak = 2e-3 * math.sqrt(32 * k / 64)
        assert lr(0) == 0.0 and lr(warmup) == pytest.approx(peak)
        assert lr(4 * warmup) == pytest.approx(peak / 2)
    assert warmups == [100, 48, 12]  # 4 epochs = 3200 samples at every K


# ---------------------------------------------------------------------------- one process


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_dataset_without_a_validation_split_evaluates_on_test(tmp_path, tiny_slice, one_thread):
    """The validation split is optional: evaluations during training then use the test split,
    and the final scores are still the test ones."""
    data = tmp_path / "no_validation"
    data.mkdir()
    for name in ("train", "test"):
        (data / f"{name}.jsonl").write_text((tiny_slice / f"{name}.jsonl").read_text())
    argv = [
        *TINY[1:],
        "--dataset_name",
        str(data),
        "--max_steps",
        "2",
        "--save_steps",
        "0",
        "--eval_steps",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    results = translate.main(argv)
    assert 0.0 <= results["test_bleu"] <= 100.0 and math.isfinite(results["test_loss"])
    assert results["eval_bleu"] == results["test_bleu"]  # the same split, the same anchor


@pytest.mark.parametrize("name", ["adamw", "extrap_sgd_fresh"])
def test_single_process_runs_with_registry_entries(tmp_path, tiny_slice, name, one_thread):
    """`python recipes/translate.py` (one process) with the baseline and with a closure entry."""
    argv = [
        *TINY[1:],
        "--dataset_name",
        str(tiny_slice),
        "--optim",
        name,
        "--max_steps",
        "3",
        "--save_steps",
        "0",
        "--eval_steps",
        "0",
        "--output_dir",
        str(tmp_path),
    ]
    results = translate.main(argv)
    assert results["step"] == 3 and 0.0 <= results["test_bleu"] <= 100.0
    assert math.isfinite(results["test_loss"]) and 0.0 <= results["eval_bleu"] <= 100.0
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "curves.png").exists()
    if name == "adamw":
        _assert_from_pretrained_reproduces(tmp_path, batch_size=8)


def _assert_from_pretrained_reproduces(output_dir, batch_size: int) -> None:
    """AutoModelForSeq2SeqLM + AutoTokenizer from the output folder translate the test split
    exactly as the recipe did (greedy, fp32, the recipe's batches of the test split)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rows = _read_jsonl(output_dir / "test_translations.jsonl")
    sources = [r["source"] for r in rows]
    translations = []
    for i in range(0, len(sources), batch_size):
        batch = tokenizer(sources[i : i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch)
        translations += tokenizer.batch_decode(out, skip_special_tokens=True)
    assert translations == [r["translation"] for r in rows]
    assert len(set(translations)) > 1 or translations[0]  # something was translated


# ---------------------------------------------------------------------------- 2 processes


def _launch(*args: str) -> None:
    run([accelerate_cmd("cpu_2proc.yaml", "--main_process_port", str(free_port()), *args)])


def _records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_slice):
    full = tmp_path_factory.mktemp("translate_full")
    resumed = tmp_path_factory.mktemp("translate_resumed")
    argv = [*TINY, "--dataset_name", str(tiny_slice)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setenv("WANDB_SILENT", "true")
        _launch(*argv, "--output_dir", str(full), "--report_to", "wandb")
        _launch(
            *argv,
            "--output_dir",
            str(resumed),
            "--report_to",
            "wandb",
            "--resume_from_checkpoint",
            str(full / f"checkpoint-{MIDDLE}"),
        )
    return full, resumed


@pytest.mark.slow
def test_translate_trains_and_reports_bleu(runs, tiny_slice):
    full, _ = runs
    records = _records(full)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    peak = 1e-2 * math.sqrt(32 / 64)  # sqrt scaling from 64 to the global batch 2·16
    for r in records:
        if "lr" in r:  # the rate of the step just taken: inverse square root after 4 warmup steps
            assert r["lr"] == pytest.approx(
                common.inverse_sqrt_lr(r["step"] - 1, peak_lr=peak, warmup_steps=4)
            )
    assert [r["step"] for r in records if "eval_bleu" in r] == [MIDDLE, STEPS]
    results = json.loads((full / "results.json").read_text())
    for key in ("eval_bleu", "test_bleu"):
        assert 0.0 <= results[key] <= 100.0
    test = _read_jsonl(tiny_slice / "test.jsonl")
    src, ref = [r["en"] for r in test], [r["de"] for r in test]
    assert results["test_source_copy_bleu"] == pytest.approx(translate.source_copy_bleu(src, ref))
    translations = _read_jsonl(full / "test_translations.jsonl")
    assert [t["source"] for t in translations] == src  # every test pair once, in order
    hyps = [t["translation"] for t in translations]
    assert results["test_bleu"] == pytest.approx(translate.corpus_bleu(hyps, ref))
    for name in (
        "curves.png",
        "config.yaml",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
    ):
        assert (full / name).exists(), name


@pytest.mark.slow
def test_checkpoint_weights_are_the_anchor(runs):
    """model.safetensors holds the anchor x of the optimizer, not rank 0's x̃."""
    full, _ = runs
    for step in (MIDDLE, STEPS):
        checkpoint = full / f"checkpoint-{step}"
        weights = load_file(str(checkpoint / "model.safetensors"))
        optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
        entries = [e for e in optimizer["state"].values() if "anchor" in e]
        assert len(entries) == sum(len(g["params"]) for g in optimizer["param_groups"])
        displaced = 0
        for entry in entries:
            anchor, point = entry["anchor"], entry["extrapolated"]
            same_shape = [w for w in weights.values() if w.shape == anchor.shape]
            assert any(torch.equal(w, anchor) for w in same_shape)
            if not torch.equal(anchor, point):
                displaced += 1
                assert not any(torch.equal(w, point) for w in same_shape)
        assert displaced == len(entries)  # extrap-Adam moved every tensor off the anchor
        for rank in (0, 1):
            assert (checkpoint / f"extrap_accel_rank{rank}.pt").exists()
    final = load_file(str(full / "model.safetensors"))
    last = load_file(str(full / f"checkpoint-{STEPS}" / "model.safetensors"))
    # save_pretrained leaves out the fixed sinusoidal position tables (rebuilt from the config)
    assert {k for k in last.keys() - final.keys() if "embed_positions" not in k} == set()
    assert final.keys() <= last.keys() and all(torch.equal(final[k], last[k]) for k in final)


@pytest.mark.slow
def test_wandb_offline_run_is_written_and_continued_on_resume(runs):
    """W&B offline (no key): the run's id is stored in the checkpoint, and the resumed launch
    (another output_dir) continues that run (resume="allow") instead of starting a new one."""
    full, resumed = runs
    ids = []
    for out in (full, resumed):
        offline = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
        assert len(offline) == 1
        assert any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / offline[0]))
        ids.append(offline[0].rsplit("-", 1)[1])
    assert ids[0] == ids[1] and len(ids[0]) >= 8
    # the run record (protobuf, uncompressed) carries the run name (the output folder's name),
    # the project and the resolved options as the run's config
    [record] = [f for f in (full / "wandb").glob("offline-run-*/*.wandb")]
    data = record.read_bytes()
    for text in (full.name, "extrap_accel_translate", "lr_scheduler_type", "inverse_sqrt"):
        assert text.encode() in data, text


@pytest.mark.slow
def test_translate_resumes_exactly(runs):
    full, resumed = runs
    after = [r for r in _records(full) if r["step"] > MIDDLE]
    assert len(after) >= STEPS - MIDDLE
    assert _records(resumed) == after  # every logged loss, rate, BLEU and eval loss, bit for bit
    a = load_file(str(full / f"checkpoint-{STEPS}" / "model.safetensors"))
    b = load_file(str(resumed / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):  # each rank's x̃ and local moments
        name = f"extrap_accel_rank{rank}.pt"
        la = torch.load(full / f"checkpoint-{STEPS}" / name, weights_only=True)
        lb = torch.load(resumed / f"checkpoint-{STEPS}" / name, weights_only=True)
        assert la["world_size"] == 2 and la["rank"] == rank
        la, lb = la["optimizers"][0], lb["optimizers"][0]
        for idx, entry in la["state"].items():
            assert all(torch.equal(v, lb["state"][idx][k]) for k, v in entry.items())
    assert (
        json.loads((full / "results.json").read_text())["test_bleu"]
        == (json.loads((resumed / "results.json").read_text())["test_bleu"])
    )


@pytest.mark.slow
def test_translate_under_deepspeed_resumes_exactly(tmp_path, tiny_slice):
    """accelerate_configs/cpu_2proc_deepspeed.yaml (ZeRO-2, bf16, 2 CPU processes): the recipe
    trains through the DeepSpeed adapter, each rank saves its own file with the checkpoint,
    and a run resumed from the middle ends with the same saved (anchor) weights, bit for bit."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = [*TINY, "--dataset_name", str(tiny_slice), "--eval_steps", "0"]

    def launch(*args):
        run(
            [
                accelerate_cmd(
                    "cpu_2proc_deepspeed.yaml",
                    "--main_process_port",
                    str(free_port()),
                    *argv,
                    *args,
                )
            ],
            accelerate_use_cpu=False,
        )

    launch("--output_dir", str(full))
    launch(
        "--output_dir", str(resumed), "--resume_from_checkpoint", str(full / f"checkpoint-{MIDDLE}")
    )
    for rank in (0, 1):
        assert (
            full / f"checkpoint-{MIDDLE}" / "pytorch_model" / f"extrap_accel_rank{rank}.pt"
        ).exists()
    results = json.loads((full / "results.json").read_text())
    assert math.isfinite(results["test_loss"]) and 0.0 <= results["test_bleu"] <= 100.0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["train_loss"] for r in _records(full) if "train_loss" in r]
    assert losses[MIDDLE:] == [r["train_loss"] for r in _records(resumed) if "train_loss" in r]
