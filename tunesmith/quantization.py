"""GGUF export with llama.cpp's own tools, and a check of every file it writes.

F16 comes from llama.cpp's convert_hf_to_gguf.py (run as a subprocess with its own gguf-py), the
other types from `llama_cpp.llama_model_quantize`. Each file is then loaded by llama.cpp and
compared with the HF model it came from: same token ids, same next-token distributions (top-1
agreement, KL), and a generation through the chat template embedded in the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith import fileio
from tunesmith.data.corpus import iter_corpus
from tunesmith.data.formatting import read_split
from tunesmith.errors import TunesmithError
from tunesmith.llamacpp import llama_cpp_dir, log_softmax, open_llama
from tunesmith.result import Result

log = logging.getLogger("tunesmith.quantize")

F16_NAME = "model-f16.gguf"
# ggml types of the K-quant family: anything else in a K-quant file's matrices is a fallback.
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
           "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"}
QK_K = 256


def gguf_name(qtype: str) -> str:
    return F16_NAME if qtype.upper() == "F16" else f"model-{qtype}.gguf"


def ftype_of(qtype: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if value is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
                       if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise TunesmithError(f"quantize.types: unknown llama.cpp type {qtype!r}; known: {', '.join(known)}")
    return int(value)


# ---------------------------------------------------------------- convert and quantize

def convert(model_dir: str | Path, out_file: str | Path, *, pre_tokenizer_fallback: str | None = "gpt-2",
            log_file: str | Path | None = None) -> dict[str, Any]:
    """HF folder -> F16 GGUF with llama.cpp's converter. Returns what the converter decided."""
    conv = llama_cpp_dir()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TunesmithError(f"{model_dir}: not a model folder (no config.json) to convert to GGUF")
    cmd = [sys.executable, "-m", "tunesmith._gguf_convert", str(conv), pre_tokenizer_fallback or "-", "--",
           str(model_dir), "--outfile", str(out_file), "--outtype", "f16"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    output = proc.stdout + proc.stderr
    if log_file:
        with open(log_file, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{output}\n")
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-12:])
        raise TunesmithError(f"llama.cpp's converter failed on {model_dir} (exit {proc.returncode}):\n{tail}")
    fallback_used = "BPE pre-tokenizer not recognized by llama.cpp" in output
    return {"seconds": round(time.time() - started, 1),
            "pre_tokenizer_fallback": pre_tokenizer_fallback if fallback_used else None}


def quantize_file(src: str | Path, dst: str | Path, qtype: str, threads: int = 2) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(qtype)
    params.nthread = threads
    started = time.time()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).is_file():
        raise TunesmithError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc})")
    return time.time() - started


def tensor_types(path: str | Path, qtype: str) -> dict[str, Any]:
    """Count tensor types; for K-quant files list the matrices that fell back to another type.

    llama.cpp quantizes a K-quant tensor in super-blocks of 256 values per row; a row of another
    length (SmolLM2's hidden size 576) gets a legacy type instead (q5_0, q5_1 or q8_0)."""
    from gguf import (
        GGUFReader,  # reading only: PyPI's gguf reads what the new converter writes
    )

    reader = GGUFReader(str(path))
    counts: Counter[str] = Counter()
    fallback = []
    is_k = "_K" in qtype.upper() or qtype.upper().startswith("IQ")
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] += 1
        shape = [int(x) for x in t.shape]
        if is_k and len(shape) >= 2 and name not in K_TYPES and name not in ("F32",):
            fallback.append({"tensor": t.name, "type": name, "row": shape[0],
                             "row_multiple_of_256": shape[0] % QK_K == 0})
    out: dict[str, Any] = {"tensor_types": dict(sorted(counts.items()))}
    if is_k:
        out["k_quant_fallback"] = {
            "count": len(fallback),
            "types": dict(Counter(f["type"] for f in fallback)),
            "tensors": fallback,
            "note": ("K-quants need rows that are a multiple of 256; these matrices got a legacy type"
                     if fallback else "every matrix is K-quantized"),
        }
    return out


# ---------------------------------------------------------------- texts to compare on

def eval_texts(eval_jsonl: str | Path, tokenizer: Any, n: int) -> list[str]:
    """Full training-format conversations (prompt + completion) from the held-out split."""

    texts = []
    for row in read_split(eval_jsonl, limit=n):
        messages = list(row["prompt"]) + list(row["completion"])
        if tokenizer.chat_template:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append("\n".join(m["content"] for m in messages))
    return texts


def corpus_texts(corpus: dict[str, Any] | None, n: int) -> list[str]:
    """Pretrain-only recipes have no eval split: the first documents of the corpus stand in.
    corpus: the resolved pretrain.corpus section, read as pretraining reads it."""
    import itertools

    if not corpus or not corpus["source"]:
        raise TunesmithError("pretrain.corpus.source is empty: no texts to compare the GGUF files on")
    return list(itertools.islice(iter_corpus(corpus), n))


# ---------------------------------------------------------------- checking one file


def hf_reference(model_dir: str | Path, tokenizer: Any, texts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """HF token ids and fp32 log-probs per text, computed once and shared by every GGUF check."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    refs = []
    with torch.no_grad():
        for text in texts:
            full = tokenizer(text).input_ids
            ids = full[:max_tokens]
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            refs.append({"text": text, "full_ids": full, "ids": ids, "logprobs": log_softmax(logits)})
    del model
    return refs


def check_gguf(path: str | Path, refs: list[dict[str, Any]], *, smoke_prompt: str, training_template: str | None,
               threads: int = 2, smoke_tokens: int = 48, n_ctx: int = 1024) -> dict[str, Any]:
    """Load one GGUF in llama.cpp; compare it with the HF reference; generate via its own template."""

    llm = open_llama(path, n_ctx=n_ctx, threads=threads, logits_all=True)
    try:
        meta = llm.metadata
        embedded = meta.get("tokenizer.chat_template")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        tok_equal, first_mismatch = 0, None
        top1 = kl = nll_gguf = nll_hf = 0.0
        positions = 0
        for ref in refs:
            ids = llm.tokenize(ref["text"].encode("utf-8"), add_bos=add_bos, special=True)
            full = ref["full_ids"]
            if ids == full:
                tok_equal += 1
            elif first_mismatch is None:
                at = next((i for i, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
                first_mismatch = {"text": ref["text"][:200], "position": at,
                                  "hf": full[max(0, at - 2): at + 3], "gguf": ids[max(0, at - 2): at + 3]}
            hf_ids = ref["ids"]
            # Same ids into both models, so the logits line up position by position.
            llm.reset()
            llm.eval(hf_ids)
            vocab = min(ref["logprobs"].shape[-1], llm.n_vocab())
            g = log_softmax(np.asarray(llm.scores[: len(hf_ids), :vocab]))
            h = ref["logprobs"][:, :vocab]
            top1 += float((g.argmax(-1) == h.argmax(-1)).sum())
            kl += float((np.exp(h) * (h - g)).sum())
            targets = np.asarray(hf_ids[1:])
            rows = np.arange(len(hf_ids) - 1)
            nll_gguf += float(-g[rows, targets].sum())
            nll_hf += float(-h[rows, targets].sum())
            positions += len(hf_ids)
        n_pred = max(1, positions - len(refs))
        result: dict[str, Any] = {
            "tokenization_agreement": tok_equal / len(refs),
            "tokenization_first_mismatch": first_mismatch,
            "top1_agreement": top1 / max(1, positions),
            "mean_kl": kl / max(1, positions),
            "perplexity": float(np.exp(nll_gguf / n_pred)),
            "perplexity_hf": float(np.exp(nll_hf / n_pred)),
            "positions": positions,
            "chat_template_embedded": embedded is not None,
            "chat_template_matches_training": (embedded == training_template) if training_template else None,
        }
        llm.reset()
        started = time.time()
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": smoke_prompt}],
                                           max_tokens=smoke_tokens, temperature=0.0, seed=0)
        text = reply["choices"][0]["message"]["content"] or ""
        result["smoke_text"] = text
        result["smoke"] = {"chat_format": llm.chat_format, "prompt": smoke_prompt, "reply": text,
                           "tokens": reply["usage"]["completion_tokens"],
                           "tokens_per_s": reply["usage"]["completion_tokens"] / max(1e-6, time.time() - started)}
        return result
    finally:
        llm.close()


# ---------------------------------------------------------------- Ollama

def end_of_turn_tokens(model_dir: str | Path, tokenizer: Any) -> list[str]:
    """The strings that end a turn: the tokenizer's EOS and every eos_token_id of the generation
    config (chat models often list the end-of-turn token there, beside the plain EOS)."""
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    found = [tokenizer.eos_token] if tokenizer.eos_token else []
    found += [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return [t for t in dict.fromkeys(found) if t]


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TunesmithError(f'an Ollama Modelfile cannot hold a text with three double quotes: {text[:80]!r}')
    return f'"""{text}"""'


def modelfile(gguf: str, *, stops: list[str], system: str | None, template: str | None, name: str) -> str:
    """An Ollama Modelfile for one GGUF. Without TEMPLATE, Ollama takes the chat template embedded
    in the GGUF (the one training used); the stops are the model's end-of-turn tokens."""
    lines = [f"# ollama create {name} -f {Path(gguf).stem}.Modelfile   then: ollama run {name}",
             f"FROM ./{Path(gguf).name}"]
    if template:
        lines.append(f"TEMPLATE {_quoted(template)}")
    # Ollama reads a quoted PARAMETER value as a JSON string.
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage

def export(model_dir: str | Path, out_dir: str | Path, *, types: list[str], smoke_prompt: str,
           n_texts: int, max_tokens: int, pre_tokenizer_fallback: str | None,
           eval_jsonl: str | None = None, corpus: dict[str, Any] | None = None,
           threads: int = 2, log_file: str | None = None, system: str | None = None,
           ollama_template: str | None = None, name: str = "model") -> dict[str, Any]:
    """Write model-f16.gguf + each type into out_dir (built in a temp folder, then renamed) with report.json.

    types, smoke_prompt, n_texts (check_texts), max_tokens (check_max_tokens): the recipe's quantize
    section; pre_tokenizer_fallback: pretrain.tokenizer.gguf_pre_tokenizer. Texts come from eval_jsonl,
    else from corpus (the resolved pretrain.corpus section). Beside each GGUF an Ollama Modelfile:
    system (format.system_prompt) as SYSTEM, ollama_template (quantize.ollama_template) as TEMPLATE."""
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    qtypes = [t for t in dict.fromkeys(types) if t.upper() != "F16"]
    for t in qtypes:
        ftype_of(t)  # unknown names fail before minutes of conversion
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    training_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if eval_jsonl:
        texts, text_source = eval_texts(eval_jsonl, tokenizer, n_texts), str(eval_jsonl)
    else:
        texts, text_source = corpus_texts(corpus, n_texts), str(corpus["source"])

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        conv = convert(model_dir, tmp / F16_NAME, pre_tokenizer_fallback=pre_tokenizer_fallback, log_file=log_file)
        log.info("converted %s to F16 in %.1f s", model_dir, conv["seconds"])
        seconds = {"F16": conv["seconds"]}
        for t in qtypes:
            seconds[t] = round(quantize_file(tmp / F16_NAME, tmp / gguf_name(t), t, threads), 1)
            log.info("quantized to %s in %.1f s", t, seconds[t])

        refs = hf_reference(model_dir, tokenizer, texts, max_tokens)
        files: dict[str, Any] = {}
        for t in ["F16", *qtypes]:
            path = tmp / gguf_name(t)
            entry: dict[str, Any] = {"file": path.name, "size_bytes": path.stat().st_size,
                                     "sha256": fileio.sha256(path), "seconds_to_make": seconds[t]}
            entry.update(tensor_types(path, t))
            entry.update(check_gguf(path, refs, smoke_prompt=smoke_prompt, training_template=training_template,
                                    threads=threads))
            files[t] = entry
            log.info("%s: %.1f MB, top-1 %.3f, KL %.4f, tokenization %.2f, smoke %r", t,
                     entry["size_bytes"] / 1e6, entry["top1_agreement"], entry["mean_kl"],
                     entry["tokenization_agreement"], entry["smoke"]["reply"][:80])
            if not entry["chat_template_embedded"] and training_template:
                raise TunesmithError(f"{path.name}: the converter did not embed the chat template of {model_dir}")
        stops = end_of_turn_tokens(model_dir, tokenizer)
        for t, entry in files.items():
            entry["modelfile"] = f"{Path(entry['file']).stem}.Modelfile"
            fileio.write_text(tmp / entry["modelfile"], modelfile(entry["file"], stops=stops, system=system,
                                                                  template=ollama_template, name=name))
        report = {
            "model": str(model_dir),
            "converter": {"dir": str(llama_cpp_dir()), "pre_tokenizer_fallback": conv["pre_tokenizer_fallback"]},
            "texts": {"source": text_source, "count": len(texts), "max_tokens": max_tokens},
            "files": files,
        }
        fileio.write_json(tmp / "report.json", report)
        fileio.write_text(tmp / "smoke.txt", "".join(
            f"== {t} ({e['smoke']['chat_format']})\n> {smoke_prompt}\n{e['smoke']['reply']}\n\n" for t, e in files.items()))
        fileio.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def stage(model_dir: str | Path, out_dir: str | Path, section: dict[str, Any], *, eval_jsonl: str | None,
          threads: int = 2, log_file: str | None = None, name: str = "model"):
    """The quantize stage: export() with the recipe's quantize and pretrain sections; figures per GGUF type."""

    q, pre = section["quantize"], section["pretrain"]
    report = export(model_dir, out_dir, types=q["types"], smoke_prompt=q["smoke_prompt"], eval_jsonl=eval_jsonl,
                    corpus=pre["corpus"] if pre["corpus"]["source"] else None,
                    pre_tokenizer_fallback=pre["tokenizer"]["gguf_pre_tokenizer"], n_texts=q["check_texts"],
                    max_tokens=q["check_max_tokens"], threads=threads, log_file=log_file,
                    system=(section.get("format") or {}).get("system_prompt"), ollama_template=q["ollama_template"],
                    name=name)
    gguf = {qtype: {"size_bytes": e["size_bytes"], "top1_agreement": e["top1_agreement"], "mean_kl": e["mean_kl"],
                    "perplexity": e["perplexity"], "tokenization_agreement": e["tokenization_agreement"],
                    "k_quant_fallback_tensors": (e.get("k_quant_fallback") or {}).get("count", 0)}
            for qtype, e in report["files"].items()}
    # The GGUFs themselves are too big for the artifact store: path, size and sha256 go in as tags.
    tags = {}
    for qtype, e in report["files"].items():
        tags.update({f"gguf.{qtype}.path": str(Path(out_dir, e["file"]).resolve()),
                     f"gguf.{qtype}.size_bytes": str(e["size_bytes"]), f"gguf.{qtype}.sha256": e["sha256"]})
    tags["gguf.pre_tokenizer_fallback"] = report["converter"]["pre_tokenizer_fallback"] or ""
    return Result(figures={"gguf": gguf}, tags=tags,
                  artifacts=[str(Path(out_dir) / "report.json"), str(Path(out_dir) / "smoke.txt"),
                             *(str(Path(out_dir) / e["modelfile"]) for e in report["files"].values())],
                  summary="; ".join(f"{t} {g['size_bytes'] / 1e6:.1f} MB top-1 {g['top1_agreement']:.3f}"
                                    for t, g in gguf.items()))
