"""A bare transformers + peft + bitsandbytes QLoRA loop, as the reference for the qlora/unsloth
stages (no Trainer, no trl): same data, tokenisation, LoRA and 4-bit settings as bench/gpu_check.py.

    python bench/gpu_bare_qlora.py --base DIR [--steps 40 --batch 8 --max-length 256 --data f.jsonl]

4-bit nf4 + double quant, bf16 compute, prepare_model_for_kbit_training, LoRA r8/alpha16/dropout .05
all-linear, bnb PagedAdamW8bit lr 2e-4 (the stage's qlora default optimiser), bf16 autocast, grad
clip 1.0, batches of shuffled examples right-padded to the longest. tokens/s counts non-padding
tokens over the steps after --warmup-steps (CUDA-synchronised); VRAM is max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--data", default=None)
    ap.add_argument("--no-4bit", action="store_true", help="bf16 base (bare LoRA) instead of 4-bit")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunesmith import contract
    from tunesmith.contract import load_tokenizer

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import write_data

    work = Path("/tmp/bare_qlora")
    data = write_data(work / "data", source=opts.data, base=opts.base, max_length=opts.max_length)
    rows = [json.loads(x) for x in open(data["train"])]
    tok, grow = load_tokenizer(opts.base, None, {"max_length": 2048})
    examples = contract.tokenize_rows(tok, rows, opts.max_length)
    kwargs = dict(dtype=torch.bfloat16, device_map={"": 0})
    if not opts.no_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(opts.base, **kwargs)
    if grow:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    if not opts.no_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.no_4bit:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    rng = random.Random(42)
    order = []
    pad = tok.pad_token_id

    def batch():
        nonlocal order
        if len(order) < opts.batch:
            order = list(range(len(examples)))
            rng.shuffle(order)
        idx, order = order[:opts.batch], order[opts.batch:]
        ex = [examples[i] for i in idx]
        n = max(len(e["input_ids"]) for e in ex)
        ids = torch.full((len(ex), n), pad, dtype=torch.long)
        lab = torch.full((len(ex), n), -100, dtype=torch.long)
        att = torch.zeros((len(ex), n), dtype=torch.long)
        for r, e in enumerate(ex):
            L = len(e["input_ids"])
            ids[r, :L] = torch.tensor(e["input_ids"])
            lab[r, :L] = torch.tensor(e["labels"])
            att[r, :L] = 1
        return ids.cuda(non_blocking=True), lab.cuda(non_blocking=True), att.cuda(non_blocking=True), int(att.sum())

    model.train()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    marks, tokens, losses = [], 0, []
    for step in range(1, opts.steps + 1):
        ids, lab, att, ntok = batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ntok
        if step % 5 == 0 or step == 1:
            losses.append((step, float(loss)))
        torch.cuda.synchronize()
        marks.append((step, time.perf_counter(), tokens))
    w = opts.warmup_steps
    s0, t0, k0 = marks[w - 1] if w else (0, t_start, 0)
    s1, t1, k1 = marks[-1]
    res = {"config": "bare HF+peft+bnb " + ("LoRA bf16" if opts.no_4bit else "QLoRA"),
           "tokens_per_second": (k1 - k0) / (t1 - t0), "seconds_per_step": (t1 - t0) / (s1 - s0),
           "tokens_per_step": (k1 - k0) / (s1 - s0), "all_steps_tokens_per_second": k1 / (t1 - t_start),
           "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
           "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
           "total_params": int(total), "trainable_params": int(trainable), "loss": losses}
    print(json.dumps(res), flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
