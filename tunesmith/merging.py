"""Merge a trained adapter into a 16/32-bit reload of its base, prove the merge is exact, save bf16
safetensors with the ORIGINAL chat template, a model card and sample generations.

QLoRA adapters are merged into a fresh unquantised load of the base, never into the 4-bit
weights they were trained against (merging into 4-bit would round the adapter away)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith import methods
from tunesmith.contract import end_of_turn_ids
from tunesmith.data.formatting import read_split
from tunesmith.data.tokens import switch_off_padding
from tunesmith.errors import TunesmithError
from tunesmith.fileio import replace_dir, write_json, write_text
from tunesmith.provenance import redact_credentials
from tunesmith.result import Result

log = logging.getLogger("tunesmith.merge")

class MergeCheckFailed(TunesmithError):
    """Merged logits differ from base+adapter logits by more than the tolerance."""


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train_info(trained: Path) -> dict[str, Any]:
    path = trained / "tunesmith_train.json"
    if not path.is_file():
        raise TunesmithError(f"{trained}: no tunesmith_train.json; is this the train rule's output?")
    return json.loads(path.read_text())


def _refuse_quantized_base(base: Path) -> None:
    """Merging into bitsandbytes weights re-quantizes the merged result: the logit check fails and
    saving in bf16 raises. The adapter belongs in the 16-bit original."""
    config = base / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if quant and str(quant.get("quant_method", "")).lower() == "bitsandbytes":
        raise TunesmithError(
            f"{base}: the base model is saved quantized by bitsandbytes ({'4' if quant.get('load_in_4bit') else '8'}"
            f"-bit); merging an adapter into it re-quantizes the result. Point model.base at the 16-bit original "
            f"of this model (e.g. unsloth/Llama-3.2-1B-Instruct for unsloth/Llama-3.2-1B-Instruct-bnb-4bit) and train "
            f"from that; qlora and unsloth quantize it themselves.")


def _load_base(base: Path, tokenizer: Any, grown: bool, trust: bool, dtype: Any):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, trust_remote_code=trust, use_safetensors=True)
    if grown:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return model


def check_inputs(tokenizer: Any, prompts: list[list[dict[str, str]]], completions: list[str], limit: int = 4):
    """Token batches for the logit comparison: prompt + reference answer, so the response part counts."""
    texts = []
    for messages, answer in list(zip(prompts, completions))[:limit]:
        convo = messages + ([{"role": "assistant", "content": answer}] if answer else [])
        texts.append(tokenizer.apply_chat_template(convo, tokenize=False))
    if not texts:
        texts = ["Hello there, how are you?"]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logits(model: Any, batch: Any):
    import torch

    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device)).logits.float()
    return out.masked_fill(~batch["attention_mask"].to(out.device).bool()[..., None], 0.0)


def generate(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int = 8) -> list[str]:
    """Greedy answers, batched with left padding (the pad token is distinct from EOS)."""
    import torch

    tokenizer.padding_side = "left"
    eos = end_of_turn_ids(tokenizer, model.generation_config)
    answers = []
    for i in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[i:i + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=sorted(eos),
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    tokenizer.padding_side = "right"
    return answers


def _report_rows(reports: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Rows kept after each data stage, from the row reports the merge rule declares as inputs
    (tunesmith.pipeline.rows_reports: in stage order)."""
    out = []
    for path in map(Path, reports):
        data = json.loads(path.read_text())
        figures = {k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)
                   and k.startswith("rows")}
        if figures:
            out.append((path.name.removesuffix(".json"), figures))
    return out


LINEAGE = "tunesmith_lineage.json"


def lineage(base: Path, step: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps from the root base model to this merged model: the base folder's own lineage (a
    chained recipe starts from another recipe's merged model) plus this step."""
    path = base / LINEAGE
    return [*(json.loads(path.read_text()) if path.is_file() else []), step]


def upstream_tags(base: Path, steps: list[dict[str, Any]]) -> dict[str, str]:
    """MLflow tags linking a chained recipe's runs to the upstream merge run that made its base:
    results/<up>/<variant>/model/merged -> results/<up>/tracking/<variant>/merge.json."""
    if len(steps) < 2:
        return {}
    up = steps[-2]
    tags = {"tunesmith.upstream": f"{up['recipe']}/{up['variant']}"}
    record = base.parents[2] / "tracking" / up["variant"] / "merge.json"
    run_id = json.loads(record.read_text()).get("run_id") if record.is_file() else None
    if run_id:
        tags["tunesmith.upstream.merge_run_id"] = run_id
    return tags


def _redacted(source: Any) -> Any:
    return redact_credentials(source) if isinstance(source, str) else source


def _model_source(folder: Path) -> str:
    """What a prepared model folder was made from (hub id, GGUF, alias), else the folder itself."""
    info = folder / "tunesmith_source.json"
    return json.loads(info.read_text()).get("source", str(folder)) if info.is_file() else str(folder)


def model_card(*, recipe: str, base_source: str, method: str, section: dict[str, Any], card: dict[str, Any],
               train_metrics: dict[str, Any], check: dict[str, Any], reports: list[str],
               samples: list[tuple[str, str]], steps: list[dict[str, Any]] | None = None) -> str:
    import yaml

    lines = ["---", f"base_model: {base_source}", "library_name: transformers", "tags:", "- tunesmith",
             f"- {method}", "---", "", f"# {recipe}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    if steps and len(steps) > 1:
        lines += ["## Lineage", "", f"`{base_source}`, then, in order:", "",
                  "| recipe | objective / method | data | rows or pairs | loss first → last | held-out exact match |",
                  "|---|---|---|---|---|---|"]
        for st in steps:
            first, last = st.get("train_loss_first"), st.get("train_loss_last")
            loss = f"{first:.4g} → {last:.4g}" if first is not None and last is not None else "-"
            lines.append(f"| {st['recipe']}/{st['variant']} | {st['objective']} / {st['method']} | "
                         f"`{st.get('dataset')}` | {st.get('rows')} | {loss} | {st.get('heldout_exact_match')} |")
        lines.append("")
    lines += ["## Base model", "", f"`{base_source}`, fine-tuned with method `{method}` "
              f"({'adapter merged into the 16-bit base' if method != 'full' else 'full weights'}), "
              "saved as bf16 safetensors. The tokenizer carries the chat template the data was formatted with.", ""]
    lines += ["## Data", ""]
    if card.get("dataset"):
        lines += [f"Source: `{card['dataset'].get('source')}`", ""]
    rows = _report_rows(reports)
    if rows:
        lines += ["Rows after each curation stage:", "", "| stage | figures |", "|---|---|"]
        for name, figures in rows:
            lines.append(f"| {name} | {', '.join(f'{k}={v}' for k, v in figures.items())} |")
        lines.append("")
    else:
        lines += ["(no data reports)", ""]
    lines += ["## Training", "", "| metric | value |", "|---|---|"]
    for key in ("train_rows", "eval_rows", "steps", "epochs", "train_loss_first", "train_loss_last",
                "eval_loss_initial", "eval_loss", "tokens_per_second", "seconds_per_step", "train_seconds",
                "peak_memory_mb", "trainable_share", "device"):
        if key in train_metrics and train_metrics[key] is not None:
            value = train_metrics[key]
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", f"Merge check: max |logit diff| merged vs base+adapter = {check['max_abs_logit_diff']:.3g} "
              f"(tolerance {check['tolerance']:g}) on {check['inputs']} inputs.", ""]
    if samples:
        lines += ["## Samples (greedy)", ""]
        for prompt, answer in samples:
            lines += [f"- **{prompt}** → {answer}"]
        lines.append("")
    recipe_text = yaml.safe_dump({k: v for k, v in card.items() if k != "description"} | section,
                                 sort_keys=False, allow_unicode=True)
    lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _eval_rows(path: str | Path | None, limit: int) -> list[dict[str, Any]]:

    return read_split(path, limit) if path and Path(path).is_file() else []


def _system_prompt(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The system message the data was formatted with, so samples see what training saw."""
    if rows and rows[0]["prompt"] and rows[0]["prompt"][0]["role"] == "system":
        return [rows[0]["prompt"][0]]
    return []


def _diff_vs_4bit_base(method: str, base: Path, trained: Path, section: dict[str, Any], tokenizer: Any,
                       info: dict[str, Any], batch: Any, merged_logits: Any) -> float | None:
    """A method whose adapter trained against another form of the base (qlora: 4-bit; Method.trained_base):
    the merged 16-bit model against that base plus the adapter. It is the quantisation error the merge
    brings back (peft#2105), reported, not gated."""
    load_trained_base = methods.get(method).trained_base
    if load_trained_base is None:
        return None
    import torch
    from peft import PeftModel

    cuda = torch.cuda.is_available()
    quantized = load_trained_base(base, section, cuda, tokenizer, bool(info.get("vocab_grown")))
    model = PeftModel.from_pretrained(quantized, str(trained))
    model.eval()
    diff = float((_logits(model, batch).to(merged_logits.device) - merged_logits).abs().max())
    log.info("%s: merged vs the base it trained on + adapter: max |logit diff| %.3g (the rounding the merge "
             "removes)", method, diff)
    del model, quantized
    return diff


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def merge(*, trained: str | Path, base: str | Path, template: str | Path, merged: str | Path,
          samples_path: str | Path, check_path: str | Path, section: dict[str, Any],
          eval_path: str | Path | None = None, recipe: str = "", card: dict[str, Any] | None = None,
          train_metrics_path: str | Path | None = None, reports: list[str] | None = None,
          variant: str = "main") -> Result:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    trained, base, merged = Path(trained), Path(base), Path(merged)
    train_cfg, model_cfg = section["train"], section["model"]
    info = _train_info(trained)
    method = info["method"]
    _refuse_quantized_base(base)
    trust = bool(model_cfg["trust_remote_code"])
    device = _device()
    tolerance = float(train_cfg["merge_tolerance"])

    tokenizer = AutoTokenizer.from_pretrained(str(trained))
    original_template = Path(template).read_text(encoding="utf-8")
    tokenizer.chat_template = original_template
    eval_rows = _eval_rows(eval_path, max(int(train_cfg["sample_eval_rows"]), 4))
    batch = check_inputs(tokenizer, [r["prompt"] for r in eval_rows],
                         [r["completion"][0]["content"] for r in eval_rows])

    # fp32 for the comparison: the check is about the merge, not about bf16 rounding.
    merged_logits = None
    if not methods.get(method).adapter:
        model = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32, trust_remote_code=trust,
                                                     use_safetensors=True).to(device)
        model.eval()
        max_diff, adapter_effect = 0.0, None
    else:
        from peft import PeftModel

        base_model = _load_base(base, tokenizer, bool(info.get("vocab_grown")), trust, torch.float32).to(device)
        peft_model = PeftModel.from_pretrained(base_model, str(trained)).to(device)
        peft_model.eval()
        with peft_model.disable_adapter():
            base_logits = _logits(peft_model, batch)
        adapter_logits = _logits(peft_model, batch)
        model = peft_model.merge_and_unload()
        model.eval()
        merged_logits = _logits(model, batch)
        del peft_model, base_model  # the merged model is the same object; the names would keep no copy
        max_diff = float((merged_logits - adapter_logits).abs().max())
        adapter_effect = float((adapter_logits - base_logits).abs().max())
        log.info("merge check: max |merged - (base+adapter)| = %.3g (tolerance %g); adapter moves logits by up to %.3g",
                 max_diff, tolerance, adapter_effect)
    vs_4bit = _diff_vs_4bit_base(method, base, trained, section, tokenizer, info, batch, merged_logits)
    check = {"method": method, "inputs": int(batch["input_ids"].shape[0]), "dtype": "float32",
             "max_abs_logit_diff_vs_4bit_base": vs_4bit,
             "max_abs_logit_diff": max_diff, "tolerance": tolerance, "passed": max_diff <= tolerance,
             "adapter_effect_max_abs_logit_diff": adapter_effect}
    if not check["passed"]:
        raise MergeCheckFailed(f"merged model's logits differ from base+adapter by {max_diff:.3g} "
                               f"(> tolerance {tolerance:g}) on {check['inputs']} inputs; the merge is not exact")
    ref_logits = _logits(model, batch)

    # Save bf16 safetensors with the original template.
    tmp = merged.with_name(f".{merged.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
    gen = model.generation_config
    gen.eos_token_id = sorted(end_of_turn_ids(tokenizer, gen))
    if len(gen.eos_token_id) == 1:
        gen.eos_token_id = gen.eos_token_id[0]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(tmp))
    switch_off_padding(tokenizer)  # the batched generate calls above switched it on
    tokenizer.save_pretrained(str(tmp))
    (tmp / "chat_template.jinja").write_text(original_template, encoding="utf-8")
    del model

    # Reload what was written: the merged folder must load and generate on its own.
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, use_safetensors=True,
                                                    trust_remote_code=trust).to(device)
    reloaded.eval()
    reload_tok = AutoTokenizer.from_pretrained(str(tmp))
    if reload_tok.chat_template != original_template:
        raise TunesmithError("the saved tokenizer does not carry the original chat template")
    reload_logits = _logits(reloaded, batch)
    mask = batch["attention_mask"].bool()
    check["reload_bf16_max_abs_logit_diff"] = float((reload_logits - ref_logits).abs().max())
    check["reload_argmax_agreement"] = float(
        (reload_logits.argmax(-1)[mask] == ref_logits.argmax(-1)[mask]).float().mean())

    max_new = int(train_cfg["sample_max_new_tokens"])
    system = _system_prompt(eval_rows)
    prompts = list(train_cfg["sample_prompts"])
    answers = generate(reloaded, reload_tok, [system + [{"role": "user", "content": p}] for p in prompts], max_new)
    n_eval = int(train_cfg["sample_eval_rows"])
    held = [r for r in eval_rows[:n_eval] if r.get("completion")]
    held_answers = generate(reloaded, reload_tok, [r["prompt"] for r in held], max_new) if held else []
    base_held: list[str] = []
    base_answers: list[str] = []
    if prompts or held:
        base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, use_safetensors=True,
                                                          trust_remote_code=trust).to(device)
        base_model.eval()
        base_tok = AutoTokenizer.from_pretrained(str(trained))  # same pad/template as the tuned side
        base_tok.chat_template = original_template
        if len(base_tok) > base_model.get_input_embeddings().weight.shape[0]:
            base_model.resize_token_embeddings(len(base_tok), pad_to_multiple_of=64)
        base_answers = generate(base_model, base_tok, [system + [{"role": "user", "content": p}] for p in prompts], max_new)
        base_held = generate(base_model, base_tok, [r["prompt"] for r in held], max_new) if held else []
        del base_model

    def reference(row):
        return row.get("answer") or row["completion"][0]["content"]

    tuned_em = sum(_norm(a) == _norm(reference(r)) for a, r in zip(held_answers, held))
    base_em = sum(_norm(a) == _norm(reference(r)) for a, r in zip(base_held, held))
    lines = [f"# {recipe or 'samples'}: merged {method} model vs base, greedy, max_new_tokens={max_new}", ""]
    for i, (p, a) in enumerate(zip(prompts, answers)):
        lines += [f"## sample {i + 1}", f"prompt: {p}", f"tuned:  {a}", f"base:   {base_answers[i] if base_answers else ''}", ""]
    if held:
        lines += [f"## held-out rows ({len(held)} from eval.jsonl): exact match tuned {tuned_em}/{len(held)}, "
                  f"base {base_em}/{len(held)}", ""]
        for r, a, b in zip(held, held_answers, base_held):
            lines += [f"prompt: {r['prompt'][-1]['content']}", f"answer: {reference(r)}",
                      f"tuned:  {a}{'  [ok]' if _norm(a) == _norm(reference(r)) else ''}",
                      f"base:   {b}{'  [ok]' if _norm(b) == _norm(reference(r)) else ''}", ""]
    samples_text = "\n".join(lines)

    train_metrics = json.loads(Path(train_metrics_path).read_text()) if train_metrics_path else {}
    steps = lineage(base, {
        "recipe": recipe, "variant": variant, "objective": train_metrics.get("objective", "sft"), "method": method,
        "base": str(base), "dataset": _redacted((card or {}).get("dataset", {}).get("source")),
        "rows": train_metrics.get("train_pairs", train_metrics.get("train_prompts", train_metrics.get("train_rows"))),
        "train_loss_first": train_metrics.get("train_loss_first"), "train_loss_last": train_metrics.get("train_loss_last"),
        "heldout_exact_match": f"{tuned_em}/{len(held)}" if held else None})
    source = _model_source(Path(steps[0]["base"]))  # the root model of a chain (this base without one)
    card_text = model_card(recipe=recipe, base_source=source, method=method, section=section, card=card or {},
                           train_metrics=train_metrics, check=check, reports=list(reports or []),
                           samples=list(zip(prompts, answers)), steps=steps)
    card_text = redact_credentials(card_text)  # a dataset URL's user:token never reaches the card
    (tmp / "README.md").write_text(card_text, encoding="utf-8")
    (tmp / LINEAGE).write_text(json.dumps(steps, indent=1), encoding="utf-8")
    replace_dir(tmp, merged)
    check["heldout_rows"] = len(held)
    check["heldout_exact_match_tuned"] = tuned_em
    check["heldout_exact_match_base"] = base_em
    check["seconds"] = time.time() - started
    write_text(samples_path, samples_text + "\n")
    write_json(check_path, check)
    return Result(metrics={k: v for k, v in check.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                  tags={"tunesmith.merge.passed": str(check["passed"]),
                        "tunesmith.lineage": " > ".join([source] + [f"{st['recipe']}/{st['variant']}" for st in steps]),
                        **upstream_tags(base, steps)},
                  artifacts=[str(check_path), str(samples_path), str(merged / "README.md")],
                  summary=f"merged ({method}): max logit diff {max_diff:.3g}, held-out exact match tuned "
                          f"{tuned_em}/{len(held)} vs base {base_em}/{len(held)}")
