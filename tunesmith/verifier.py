"""Preference pairs built by a verifier: a model answers each prompt several times, a verifiable
reward (tunesmith.rewards) scores every answer against the prompt's reference, and a correct
answer is paired as chosen with a wrong one as rejected. When every answer is wrong the reference
itself can be the chosen one; when every answer is right the prompt teaches nothing and gives no
pair. This is how a user without a preference dataset gets one from their own SFT model.

The report adds up: prompts = all_correct + all_wrong + mixed, samples = prompts x samples per
prompt = correct + wrong, pairs = pairs_from_samples + pairs_from_reference.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tunesmith import rewards
from tunesmith.contract import end_of_turn_ids, load_tokenizer
from tunesmith.data.preference import load_prompts, write_rows
from tunesmith.errors import DataError
from tunesmith.fileio import write_json
from tunesmith.methods import resolve_dtype
from tunesmith.result import Result

log = logging.getLogger("tunesmith.verifier")


def sample(model: Any, tokenizer: Any, prompt: list[dict[str, str]], *, n: int, max_new_tokens: int,
           temperature: float, top_p: float, seed: int, eos_ids: list[int]) -> list[str]:
    """n sampled answers to one prompt (transformers generate, do_sample, seeded for this prompt)."""
    import torch

    enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos_ids,
                             pad_token_id=tokenizer.pad_token_id)
    start = enc["input_ids"].shape[1]
    return [tokenizer.decode(seq[start:], skip_special_tokens=True).strip() for seq in out]


def pairs_from_samples(prompts: list[dict[str, Any]], answers: list[list[str]], scores: list[list[float]], *,
                       correct_at: float, use_reference: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Given each prompt's sampled answers and their rewards: canonical pairs and the accounting."""
    pairs: list[dict[str, Any]] = []
    counts = {"all_correct": 0, "all_wrong": 0, "mixed": 0, "pairs_from_samples": 0, "pairs_from_reference": 0,
              "correct_samples": 0, "wrong_samples": 0}
    examples: dict[str, list[str]] = {"all_correct": [], "all_wrong": []}
    for row, texts, values in zip(prompts, answers, scores):
        right = [t for t, v in zip(texts, values) if v >= correct_at]
        wrong = [t for t, v in zip(texts, values) if not v >= correct_at]  # NaN (unscorable) counts as wrong
        counts["correct_samples"] += len(right)
        counts["wrong_samples"] += len(wrong)
        if not wrong:
            counts["all_correct"] += 1
            examples["all_correct"].append(str(row["id"]))
            continue
        if right:
            counts["mixed"] += 1
            chosen, origin = right[0], "samples"
        else:
            counts["all_wrong"] += 1
            examples["all_wrong"].append(str(row["id"]))
            if not use_reference:
                continue
            chosen, origin = row["answer"], "reference"
        counts[f"pairs_from_{origin}"] += 1
        pairs.append({"id": str(row["id"]), "prompt": row["prompt"],
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": wrong[0]}],
                      "chosen_from": "sample" if origin == "samples" else origin})
    n_samples = sum(len(a) for a in answers)
    report = {"prompts": len(prompts), "samples": n_samples, "pairs": len(pairs), **counts,
              "sample_accuracy": counts["correct_samples"] / n_samples if n_samples else 0.0,
              "examples": {k: v[:10] for k, v in examples.items()}}
    assert report["prompts"] == report["all_correct"] + report["all_wrong"] + report["mixed"]
    assert report["samples"] == report["correct_samples"] + report["wrong_samples"]
    assert report["pairs"] == report["pairs_from_samples"] + report["pairs_from_reference"]
    return pairs, report


def build_pairs(model_dir: str | Path, prompts: list[dict[str, Any]], section: dict[str, Any],
                template: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample, score and pair: prompts are {id, prompt, answer} rows (tunesmith.data.preference.
    load_prompts); section holds the recipe's resolved preference and model sections."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = section["preference"]["verifier"]
    reward = rewards.resolve([cfg["reward"]], cfg["format_pattern"])[0]
    if cfg["limit"] is not None:
        prompts = prompts[:cfg["limit"]]
    cuda = bool(torch.cuda.is_available())
    tokenizer, grow_vocab = load_tokenizer(model_dir, template, section["model"])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=resolve_dtype(section["model"]["dtype"], cuda),
                                                 use_safetensors=True,
                                                 trust_remote_code=bool(section["model"]["trust_remote_code"]))
    if grow_vocab:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.to("cuda" if cuda else "cpu").eval()
    eos_ids = sorted(end_of_turn_ids(tokenizer, model.generation_config))
    n = cfg["samples"]
    started = time.time()
    answers, scores = [], []
    for i, row in enumerate(prompts):
        texts = sample(model, tokenizer, row["prompt"], n=n, max_new_tokens=cfg["max_new_tokens"],
                       temperature=cfg["temperature"], top_p=cfg["top_p"], seed=cfg["seed"] + i, eos_ids=eos_ids)
        answers.append(texts)
        scores.append(rewards.score(reward, [row["prompt"]] * n, [[{"role": "assistant", "content": t}] for t in texts],
                                    [row["answer"]] * n))
        if (i + 1) % 50 == 0:
            log.info("verifier: %d/%d prompts sampled (%.1f s)", i + 1, len(prompts), time.time() - started)
    pairs, report = pairs_from_samples(prompts, answers, scores, correct_at=cfg["correct_at"],
                                       use_reference=cfg["use_reference"])
    report.update(model=str(model_dir), reward=cfg["reward"], samples_per_prompt=n, seconds=time.time() - started)
    return pairs, report


def build_stage(model_dir: str, prompts_path: str, template: str, section: dict[str, Any], pairs_out: str,
                report_path: str) -> Result:
    """Script-shaped: a model folder + prompt rows with references -> pairs JSONL and report.json."""

    prompts = load_prompts(prompts_path)
    pairs, report = build_pairs(model_dir, prompts, section, template or None)
    if not pairs:
        raise DataError(f"the verifier built no pair from {report['prompts']} prompts: {report['all_correct']} had "
                        f"every sample right, {report['all_wrong']} every sample wrong (use_reference "
                        f"{section['preference']['verifier']['use_reference']})")
    write_rows(pairs_out, pairs)
    write_json(report_path, report)
    keys = ("prompts", "samples", "pairs", "all_correct", "all_wrong", "mixed", "pairs_from_samples",
            "pairs_from_reference", "sample_accuracy", "seconds")
    return Result(metrics={k: report[k] for k in keys}, artifacts=[report_path],
                  summary=f"verifier: {report['prompts']} prompts x {report['samples_per_prompt']} samples -> "
                          f"{report['pairs']} pairs ({report['all_correct']} all right, {report['all_wrong']} all "
                          f"wrong, sample accuracy {report['sample_accuracy']:.2f})")
