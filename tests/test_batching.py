"""Batches that fill the card (tunesmith.batching, tunesmith.speed): the micro-batch search backs off
on out-of-memory and keeps the effective batch, length-grouped sampling keeps padding under 10% on
GSM8K-like lengths, torch.compile trains to the same loss as eager, and the train stage records its
speed choices and padding share in metrics.json."""

from __future__ import annotations

import json
import random
import tempfile

import pytest
import torch

from tunesmith import batching
from tunesmith.errors import TunesmithError


def oom_above(limit: int, calls: list[int]):
    def fits(n: int) -> None:
        calls.append(n)
        if n > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: tried micro-batch {n}")
    return fits


@pytest.mark.parametrize("start", [1, 4, 16])
@pytest.mark.parametrize("effective,limit,micro", [(64, 24, 16), (48, 24, 24), (16, 100, 16), (12, 1, 1), (96, 40, 32)])
def test_the_largest_micro_batch_that_fits_keeps_the_effective_batch(effective, limit, micro, start):
    calls: list[int] = []
    found = batching.find_micro_batch(oom_above(limit, calls), effective, start=start)
    assert found.micro_batch == micro
    assert found.micro_batch * found.gradient_accumulation_steps == effective
    assert len(calls) == len(set(calls))  # no size is probed twice
    assert all(ok == (n <= limit) for n, ok in found.tried)


def test_nothing_fits_is_a_clear_error():
    for start in (1, 8):
        with pytest.raises(TunesmithError, match="train.args.auto_batch: even a micro-batch of 1"):
            batching.find_micro_batch(oom_above(0, []), 16, start=start)


def test_the_search_starts_at_the_recipes_micro_batch():
    """Each size probed is a new shape (a compiled kernel compiles again): from the recipe's 16, a
    card that takes 64 is found in three probes."""
    calls: list[int] = []
    assert batching.find_micro_batch(oom_above(64, calls), 64, start=16).micro_batch == 64
    assert calls == [16, 32, 64]


def gsm8k_like(n: int = 2000) -> list[int]:
    """Token lengths shaped like GSM8K train rows with a chat template: the first 2,000 rows measured
    183 +- 57 tokens, 83 to 467 (all-MiniLM's WordPiece + 25 template tokens)."""
    rng = random.Random(0)
    return [min(467, max(83, int(rng.gauss(183, 57)))) for _ in range(n)]


def padding_share(group: bool) -> float:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    lengths = gsm8k_like()
    ds = Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "labels": [[5] * n for n in lengths]})
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, use_cpu=True,
                             report_to="none", seed=42, data_seed=42, **batching.sampler_kwargs(TrainingArguments, group))
    counter = batching.PaddingCount(DataCollatorForLanguageModeling(pad_token_id=0))
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counter)
    for _ in trainer.get_train_dataloader():
        pass
    figures = counter.figures()
    assert figures["real_tokens"] == sum(lengths) and figures["batches_counted"] == 125
    return figures["padding_share"]


def test_length_grouped_batches_pad_less_than_a_tenth():
    grouped, shuffled = padding_share(True), padding_share(False)
    assert grouped < 0.10 < shuffled


def test_compiled_training_has_the_eager_loss(section_factory):
    """train.args.torch_compile reaches transformers' torch_compile; three steps of a tiny Llama
    give the same losses compiled (inductor, CPU) as eager, to 1e-4."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from tunesmith import speed
    from tunesmith.objectives import causal_lm
    from tunesmith.trainer import training_arguments

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 512, (16, 32), generator=g).tolist()
    losses = {}
    for compiled in (False, True):
        args = section_factory("full", torch_compile=compiled, max_steps=3, logging_steps=1, learning_rate=5e-4)["train"]["args"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        plan = speed.plan(args, model, cuda=False, objective="causal-lm", method="full", config_cls=TrainingArguments)
        config = training_arguments(TrainingArguments, args, optim="adamw_torch", gradient_checkpointing=False,
                                    output_dir=tempfile.mkdtemp(), cuda=False, has_eval=False, overrides=plan.config)
        assert config.torch_compile is compiled
        trainer = causal_lm.build_trainer(model, None, config, causal_lm.dataset(blocks), None, [])
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert (type(trainer.model_wrapped).__name__ == "OptimizedModule") is compiled
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_the_stage_records_its_speed_choices(tiny_llama_dir, sft_data, tmp_path, section_factory):
    from tunesmith.training import TrainPaths, train

    for packing in (False, True):
        out = tmp_path / ("packed" if packing else "padded")
        paths = TrainPaths(base=str(tiny_llama_dir), model=str(out / "model"), metrics=str(out / "metrics.json"),
                         loss=str(out / "loss.png"), **sft_data)
        train(paths, section_factory("lora", packing=packing, max_steps=2, auto_batch=True, group_by_length=True))
        m = json.loads((out / "metrics.json").read_text())
        assert m["attn_implementation"] == "sdpa" and "CPU" in (m["attn_reason"] if packing else "CPU")
        assert m["loss_kernel"] == "logits + cross-entropy" and m["loss_kernel_reason"].startswith("CPU")
        assert m["micro_batch"] == 4 and m["gradient_accumulation_steps"] == 1
        assert m["auto_batch"].startswith("not probed")
        assert 0 <= m["padding_share"] < 1 and m["real_tokens"] > 0
        assert m["group_by_length"] is (not packing)
        if packing:
            assert m["packing_isolation_max_diff"] < 1e-4


@pytest.mark.parametrize("packing", [False, True])
def test_the_probe_trains_the_longest_rows_as_the_trainer_collates_them(tiny_llama_dir, section_factory, tmp_path,
                                                                         packing):
    """batching.probe on a real SFTTrainer (CPU: nothing runs out of memory, so the search takes the
    whole effective batch): the longest rows go through the trainer's collator, forward and
    backward, and leave no gradients behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.objectives import sft
    from tunesmith.trainer import training_arguments

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(10, 400) for _ in range(rng.randint(5, 40))]} for _ in range(24)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    args = section_factory("full", packing=packing, max_length=64)["train"]["args"]
    config = training_arguments(sft.config_class(), args, optim="adamw_torch", gradient_checkpointing=False,
                                output_dir=tmp_path, cuda=False, has_eval=False, **sft.config_kwargs(args, {}))
    trainer = sft.build_trainer(model, tok, config, sft.dataset(rows), None, [])
    seen = []

    def fits(n):
        seen.append(n)
        batching.probe(trainer, optimizer_state_bytes)(n)

    optimizer_state_bytes = batching.optimizer_state_bytes(model, "adamw_torch")
    assert optimizer_state_bytes == 8 * sum(p.numel() for p in model.parameters())
    found = batching.find_micro_batch(fits, 8)
    assert found.micro_batch == 8 and found.gradient_accumulation_steps == 1 and seen == [1, 2, 8]  # galloping: 1, 2, then 8
    assert all(p.grad is None for p in model.parameters())
