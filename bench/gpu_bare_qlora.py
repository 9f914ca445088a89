"""Bare training loops, the references for the train stage's rows in bench/gpu_check.py: plain
transformers + peft (+ bitsandbytes) forward / backward / step, no Trainer, no trl, on the same data,
tokenisation, LoRA and 4-bit settings, attention kernel and loss kernel as the stage.

    python bench/gpu_bare_qlora.py --base DIR [--mode qlora|lora|full] [--packed] [--batch 16]
                                   [--max-length 1024 --steps 20 --data f.jsonl --out r.json]

qlora: 4-bit nf4 + double quant, bf16 compute, prepare_model_for_kbit_training, bnb PagedAdamW8bit
(the stage's qlora default). lora: bf16 base, fused AdamW. full: fp32 master weights under bf16
autocast, fused AdamW (as the stage's full method). LoRA r8/alpha16/dropout .05 all-linear, lr 2e-4,
grad clip 1.0. Padded: batches of shuffled examples right-padded to the longest. --packed: the
examples of a batch (up to batch x max-length tokens, trl's bfd packing fills rows about that
full) flattened padding-free with restarting position ids by trl's collator, padded to one length
where the kernel is flex attention, as tunesmith.speed does. The model section (dtype,
trust_remote_code, attention, ...) comes from the recipe schema's defaults, as the stage's does.
tokens/s counts non-padding tokens over the steps after --warmup-steps (device-synchronised);
memory is max_memory_allocated. --device cpu runs the same loop on CPU (the suite's --tiny smoke).
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
    ap.add_argument("--mode", choices=["qlora", "lora", "full"], default="qlora")
    ap.add_argument("--no-4bit", action="store_true", help="old spelling of --mode lora")
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--random-order", action="store_true",
                    help="padded batches drawn at random (default: length-grouped, as the stage's train.args.group_by_length)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--data", default=None)
    ap.add_argument("--fused-ce", choices=["auto", "on", "off"], default="auto",
                    help="Liger's fused linear cross-entropy, chosen as the stage's train.args.fused_cross_entropy")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--workdir", default="/tmp/bare_loop")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()
    mode = "lora" if opts.no_4bit else opts.mode

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunesmith import attention, contract, fused_loss
    from tunesmith.contract import load_tokenizer
    from tunesmith.schema import section_defaults

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import write_data

    cuda = opts.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    work = Path(opts.workdir)
    data = write_data(work / "data", source=opts.data, base=opts.base, max_length=opts.max_length)
    rows = [json.loads(x) for x in open(data["train"])]
    model_cfg = section_defaults("model", {"max_length": max(2048, opts.max_length)})
    tok, grow = load_tokenizer(opts.base, None, model_cfg)
    examples = contract.tokenize_rows(tok, rows, opts.max_length)
    attn = attention.choose(model_cfg["attn_implementation"], packing=opts.packed, cuda=cuda)
    half = torch.bfloat16 if cuda else torch.float32
    kwargs = dict(dtype=torch.float32 if mode == "full" else half, attn_implementation=attn.implementation,
                  device_map={"": 0} if cuda else {"": "cpu"})
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(opts.base, **kwargs)
    if grow:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if mode != "full":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    args = {**section_defaults("train")["args"], "per_device_train_batch_size": opts.batch,
            "max_length": opts.max_length, "fused_cross_entropy": opts.fused_ce}
    loss = fused_loss.choose(args, cuda=cuda, objective="sft", method=mode, vocab=model.get_input_embeddings().num_embeddings)
    fused_loss.apply_now(model, loss.config)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    if mode == "qlora" and cuda:
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=cuda)
    pad = tok.pad_token_id
    budget = opts.batch * opts.max_length
    collate = DataCollatorForLanguageModeling(
        pad_token_id=pad, padding_free=opts.packed,
        pad_to_multiple_of=budget if (opts.packed and attn.static_row) else None)
    rng = random.Random(42)
    order: list[int] = []

    grouped = not opts.packed and not opts.random_order
    epoch = 0

    def take() -> int:
        nonlocal order, epoch
        if not order:
            if grouped:  # transformers' own sampler, as the stage's group_by_length uses it
                from transformers.trainer_pt_utils import LengthGroupedSampler

                sampler = LengthGroupedSampler(opts.batch, lengths=[len(e["input_ids"]) for e in examples],
                                               generator=torch.Generator().manual_seed(42 + epoch))
                order = list(sampler)[::-1]  # pop() takes from the end
            else:
                order = list(range(len(examples)))
                rng.shuffle(order)
            epoch += 1
        return order.pop()

    def batch():
        if opts.packed:
            chosen, used = [], 0
            while True:
                i = take()
                if used + len(examples[i]["input_ids"]) > budget and chosen:
                    order.append(i)  # starts the next batch
                    break
                chosen.append(examples[i])
                used += len(examples[i]["input_ids"])
        else:
            chosen = [examples[take()] for _ in range(opts.batch)]
        b = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in chosen])
        real = sum(len(e["input_ids"]) for e in chosen)
        keys = ("input_ids", "labels", "attention_mask", "position_ids") if not opts.packed or attn.implementation != "flash_attention_2" \
            else ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        return {k: (v.to(dev, non_blocking=True) if hasattr(v, "to") else v) for k, v in b.items() if k in keys}, real

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t_start = time.perf_counter()
    marks, tokens, losses = [], 0, []
    for step in range(1, opts.steps + 1):
        inputs, ntok = batch()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(**inputs, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ntok
        if step % 5 == 0 or step == 1:
            losses.append((step, float(out.loss)))
        sync()
        marks.append((step, time.perf_counter(), tokens))
    w = min(opts.warmup_steps, len(marks) - 1)
    s0, t0, k0 = marks[w - 1] if w else (0, t_start, 0)
    s1, t1, k1 = marks[-1]
    res = {"config": f"bare transformers+peft {mode}" + (" packed" if opts.packed else " padded")
           + (", length-grouped" if grouped else ""),
           "mode": mode, "packed": opts.packed, "batch": opts.batch, "attn_implementation": attn.implementation,
           "loss_kernel": loss.kernel, "device": str(dev),
           "tokens_per_second": (k1 - k0) / (t1 - t0), "seconds_per_step": (t1 - t0) / (s1 - s0),
           "tokens_per_step": (k1 - k0) / (s1 - s0), "all_steps_tokens_per_second": k1 / (t1 - t_start),
           "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
           "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
           "total_params": int(total), "trainable_params": int(trainable), "loss": losses}
    print(json.dumps(res), flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
