"""TRL DPOTrainer / GRPOTrainer throughput on a small model (LoRA r8 all-linear, bf16).

    python bench/gpu_trl.py dpo  --base DIR [--steps 30 --batch 8 --max-length 256]
    python bench/gpu_trl.py grpo --base DIR [--steps 10 --batch 8 --num-generations 8 --completion 64]

Data: data/demo/reverse_words.jsonl. DPO: chosen = the right answer, rejected = the words shuffled.
GRPO: reward 1.0 when the completion equals the answer exactly (0 otherwise; random weights
score 0, so advantages are 0 but every step still generates, scores and back-propagates).
tokens/s: state.num_input_tokens_seen over the steps after --warmup-steps (DPO: non-padding
chosen+rejected tokens; GRPO: prompt + generated completion tokens, as trl counts them);
VRAM: max_memory_allocated during train().
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["dpo", "grpo"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_check import steady_figures, step_timer

    rng = random.Random(0)
    raw = [json.loads(x) for x in open(REPO / "data/demo/reverse_words.jsonl")]
    tok = AutoTokenizer.from_pretrained(opts.base)
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        tok.pad_token = tok.unk_token or tok.pad_token
    model = AutoModelForCausalLM.from_pretrained(opts.base, dtype=torch.bfloat16)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    work = Path(f"/tmp/trl_{opts.which}")
    timing_file = work / "timing.json"
    work.mkdir(parents=True, exist_ok=True)
    common = dict(output_dir=str(work), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                  learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to="none", bf16=True,
                  disable_tqdm=True, gradient_checkpointing=False, include_num_input_tokens_seen="non_padding")
    if opts.which == "dpo":
        from trl import DPOConfig, DPOTrainer

        rows = []
        for r in raw:
            words = r["output"].split(", ")
            shuffled = words[:]
            while shuffled == words and len(words) > 1:
                rng.shuffle(shuffled)
            rows.append({"prompt": [{"role": "user", "content": r["instruction"]}],
                         "chosen": [{"role": "assistant", "content": r["output"]}],
                         "rejected": [{"role": "assistant", "content": ", ".join(shuffled)}]})
        args = DPOConfig(max_length=opts.max_length, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_config)
    else:
        from trl import GRPOConfig, GRPOTrainer

        rows = [{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["output"]} for r in raw]

        def exact(completions, answer, **kw):
            return [1.0 if c[0]["content"].strip() == a.strip() else 0.0 for c, a in zip(completions, answer)]

        args = GRPOConfig(num_generations=opts.num_generations, max_completion_length=opts.completion, **common)
        trainer = GRPOTrainer(model=model, args=args, reward_funcs=exact, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=peft_config)
    trainer.add_callback(step_timer(timing_file))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timing = json.loads(timing_file.read_text())
    res = {"trainer": opts.which, "steps": opts.steps, "batch": opts.batch, "train_seconds": wall,
           **steady_figures(timing, opts.warmup_steps),
           "peak_allocated_mb": timing["max_allocated_mb"], "peak_reserved_mb": timing["max_reserved_mb"],
           "last_log": {k: v for k, v in trainer.state.log_history[-2].items()
                        if isinstance(v, (int, float))} if len(trainer.state.log_history) > 1 else {}}
    print(json.dumps(res), flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
