"""lm-eval on the base model, the tuned model and its GGUF files, with tasks that run offline.

Task names in a recipe:
- `heldout`: generated here over the recipe's eval.jsonl. Each prompt is rendered with the chat
  template the model was trained with (chat_template.jinja from the format stage), so the model
  sees exactly the training format; generate_until, greedy, exact match on `answer` after
  stripping surrounding whitespace. Exact match is 0 for any long answer (code, chat), so the task
  also reports chrF of the greedy answer against the reference (lm-eval's own `chrf` metric, i.e.
  sacrebleu's corpus chrF, 0-100) and the reference answer's mean log-likelihood per token and
  perplexity under the model (lm-eval's loglikelihood requests, on the same rows, for base,
  tuned and every GGUF).
- `gsm8k_local`: lm-eval's own gsm8k task (`include:` of its YAML: prompts, few-shot, filters,
  metric) with the data read from a local JSONL; scored on the number after `####`.
- anything else: an lm-eval built-in task, which downloads its dataset from the hub.

Generated task YAMLs hold absolute paths: lm-eval resolves relative `data_files` against the
working directory, not the YAML's folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from tunesmith import fileio
from tunesmith.data.formatting import read_split
from tunesmith.errors import TunesmithError
from tunesmith.schema import section_defaults
from tunesmith.tasks import PRIMARY_METRIC, TURN_ENDS, default_gsm8k_file, short_metric, task_specs

log = logging.getLogger("tunesmith.evaluate")


# ---------------------------------------------------------------- local task files


def render_heldout(eval_jsonl: str | Path, template_path: str | Path, tokenizer: Any) -> list[dict[str, Any]]:
    """eval.jsonl rows -> {id, prompt_text, answer}, the prompt rendered with the training template."""

    template = Path(template_path).read_text(encoding="utf-8")
    rows = []
    for i, row in enumerate(read_split(eval_jsonl), 1):
        text = tokenizer.apply_chat_template(row["prompt"], chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        rows.append({"id": row.get("id", i), "prompt_text": text,
                     "answer": row.get("answer") or row["completion"][-1]["content"]})
    return rows


def write_heldout_task(rows: list[dict[str, Any]], task_dir: str | Path, *, max_gen_toks: int,
                       stop: list[str]) -> Path:
    task_dir = Path(task_dir).resolve()
    data = task_dir / "heldout.jsonl"
    fileio.write_jsonl(data, rows)
    config = {
        "task": "heldout",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt_text}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": stop, "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         # exact match after stripping surrounding whitespace on both sides
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]},
                        # lm-eval's registered chrf: a passthrough scored by sacrebleu.corpus_chrf
                        {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    path = task_dir / "heldout.yaml"
    fileio.write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def write_gsm8k_task(task_dir: str | Path, *, data_files: str | Path | None = None, max_gen_toks: int = 256,
                     num_fewshot: int | None = None) -> Path:
    """lm-eval's gsm8k over a local test file; few-shot examples come from train.jsonl beside it, if any."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    test = Path(data_files or default_gsm8k_file()).resolve()
    if not test.is_file():
        raise TunesmithError(
            f"gsm8k_local: test file {test} not found. Give the task a local GSM8K JSONL "
            f"(rows with 'question' and 'answer' ending in '#### <number>'): "
            f"evaluate.tasks: [{{name: gsm8k_local, data_files: /path/to/test.jsonl}}]")
    files = {"test": str(test)}
    train = test.with_name("train.jsonl")
    if train.is_file() and train != test:
        files["train"] = str(train)
    config: dict[str, Any] = {
        "include": str(builtin),
        "task": "gsm8k_local",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "training_split": "train" if "train" in files else None,
        "fewshot_split": "train" if "train" in files else "test",
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                              "temperature": 0.0, "max_gen_toks": max_gen_toks},
    }
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
    elif "train" not in files:
        config["num_fewshot"] = 0  # no train split: few-shot examples would leak test answers
    path = Path(task_dir).resolve() / "gsm8k_local.yaml"
    fileio.write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def stop_strings(tokenizer: Any) -> list[str]:
    vocab = tokenizer.get_vocab()
    stops = [t for t in TURN_ENDS if t in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def prepare_tasks(specs: list[dict[str, Any]], task_dir: str | Path, *, tokenizer: Any,
                  eval_jsonl: str | None = None, template: str | None = None) -> None:
    """Write the YAML (and data) of every local task into task_dir."""
    Path(task_dir).mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec["name"] == "heldout":
            if not eval_jsonl or not template:
                raise TunesmithError("task 'heldout' needs the recipe's eval.jsonl and chat_template.jinja "
                                     "(a recipe without an SFT dataset has no held-out split)")
            rows = render_heldout(eval_jsonl, template, tokenizer)
            write_heldout_task(rows, task_dir, max_gen_toks=spec["max_gen_toks"], stop=stop_strings(tokenizer))
        elif spec["name"] == "gsm8k_local":
            write_gsm8k_task(task_dir, data_files=spec.get("data_files"), max_gen_toks=spec["max_gen_toks"],
                             num_fewshot=spec.get("num_fewshot"))


# ---------------------------------------------------------------- running lm-eval

def hf_lm(model_dir: str | Path, *, batch_size: int, trust_remote_code: bool = False) -> Any:
    import torch
    from lm_eval.models.huggingface import HFLM

    if not (Path(model_dir) / "config.json").is_file():
        raise TunesmithError(f"{model_dir}: not a model folder (no config.json) to evaluate")
    cuda = torch.cuda.is_available()
    # bf16 matmuls are slow on CPU; float32 there is both faster and exact.
    return HFLM(pretrained=str(model_dir), backend="causal", dtype="auto" if cuda else "float32",
                device="cuda" if cuda else "cpu", batch_size=batch_size, trust_remote_code=trust_remote_code)


def _offline_error(name: str, exc: BaseException, offline: bool) -> TunesmithError:
    why = "this run is offline" if offline else "the hub could not be reached"
    return TunesmithError(
        f"task '{name}' is an lm-eval built-in task whose dataset comes from the Hugging Face hub, and "
        f"{why} ({type(exc).__name__}). Point it at local data instead: use a local task "
        f"('heldout' for the recipe's held-out split, or {{name: gsm8k_local, data_files: /path/test.jsonl}} "
        f"for lm-eval's gsm8k over a local file), or set offline: false in config.yaml where the hub is reachable.")


def _is_network_error(exc: BaseException) -> bool:
    names = ("OfflineModeIsEnabled", "ConnectionError", "ConnectError", "LocalEntryNotFoundError",
             "DatasetNotFoundError", "HfHubHTTPError", "MaxRetryError")
    seen: BaseException | None = exc
    while seen is not None:
        if any(n in type(c).__name__ for c in type(seen).__mro__ for n in names):
            return True
        text = str(seen)
        if "offline" in text.lower() or "Couldn't reach" in text or "HF_HUB_OFFLINE" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_task(lm: Any, spec: dict[str, Any], task_manager: Any, out_dir: str | Path, *, label: str,
             log_samples: bool = False) -> dict[str, Any]:
    """One lm-eval task on one model; keeps lm-eval's result JSON (and samples) under out_dir/lm_eval/."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    name = spec["name"]
    if name not in task_manager.all_tasks:
        raise TunesmithError(f"evaluate.tasks: unknown task {name!r}: use 'heldout', 'gsm8k_local' or an "
                             f"lm-eval task name (python -m lm_eval ls tasks)")
    started = time.time()
    try:
        results = simple_evaluate(model=lm, tasks=[name], task_manager=task_manager, limit=spec["limit"],
                                  num_fewshot=spec.get("num_fewshot"), log_samples=log_samples,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    except TunesmithError:
        raise
    except Exception as exc:
        if not spec["local"] and _is_network_error(exc):
            # the hub libraries' own switch, which the workflow sets when config.yaml says offline
            raise _offline_error(name, exc, os.environ.get("HF_HUB_OFFLINE") == "1") from None
        raise
    seconds = time.time() - started
    assert results is not None
    samples = results.pop("samples", None)
    folder = Path(out_dir) / "lm_eval" / label
    result_file = folder / f"results_{name}.json"
    fileio.write_text(result_file, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    if samples and log_samples:
        for task, rows in samples.items():
            fileio.write_text(folder / f"samples_{task}.jsonl", "".join(
                json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    metrics = results["results"][name]
    metric = PRIMARY_METRIC.get(name) or next(k for k in metrics if k != "alias" and "_stderr" not in k)
    n = results.get("n-samples", {}).get(name, {})
    stderr_key = metric.replace(",", "_stderr,", 1)
    all_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k}
    return {
        "metric": metric,
        "score": float(metrics[metric]),
        "stderr": metrics.get(stderr_key) if isinstance(metrics.get(stderr_key), (int, float)) else None,
        "limit": n.get("effective", spec["limit"]),
        "n_available": n.get("original"),
        "all_metrics": all_metrics,
        # the primary metric first, then the rest, under names a recipe can write (evaluate.headline)
        # ("sample_len" and the like are counts, not metrics: lm-eval names metrics "<metric>,<filter>")
        "metrics": {short_metric(k): float(v) for k, v in sorted(all_metrics.items(), key=lambda kv: kv[0] != metric)
                    if "," in k},
        "seconds": round(seconds, 1),
        "results_file": str(result_file),
    }


def reference_likelihood(lm: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean log-likelihood per token of each row's reference answer after its rendered prompt, and
    the perplexity that goes with it (token-weighted over all rows). lm-eval's own loglikelihood
    requests score it, so HF models and GGUFs (tunesmith.gguf_lm) are measured the same way; tokens
    are counted with the model's own context/continuation split."""
    from lm_eval.api.instance import Instance

    rows = [r for r in rows if r["answer"]]
    if not rows:
        return {}
    requests = [Instance(request_type="loglikelihood", doc=r, arguments=(r["prompt_text"], r["answer"]), idx=0)
                for r in rows]
    lls = [ll for ll, _ in lm.loglikelihood(requests)]
    tokens = sum(len(lm._encode_pair(r["prompt_text"], r["answer"])[1]) for r in rows)
    mean = sum(lls) / max(1, tokens)
    return {"ref_logprob": mean, "ref_perplexity": math.exp(-mean), "ref_tokens": tokens}


def heldout_rows(task_dir: str | Path, limit: int | None) -> list[dict[str, Any]]:
    """The held-out rows lm-eval scores: its limit is the first N docs of heldout.jsonl."""
    path = Path(task_dir) / "heldout.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][: limit or None]


def score(lm: Any, specs: list[dict[str, Any]], task_dir: str | Path, out_dir: str | Path, *, label: str,
          log_samples: bool = False) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    # A TaskManager indexes lm-eval's ~15k built-in task files unless told not to: 15-20 s on 2 cores,
    # longer than scoring the held-out rows. Tasks tunesmith writes itself need none of them.
    task_manager = TaskManager(include_path=str(Path(task_dir).resolve()),
                               include_defaults=any(not spec["local"] for spec in specs))
    out = {}
    for spec in specs:
        out[spec["name"]] = run_task(lm, spec, task_manager, out_dir, label=label, log_samples=log_samples)
        if spec["name"] == "heldout":
            ref = reference_likelihood(lm, heldout_rows(task_dir, out["heldout"]["limit"]))
            out["heldout"]["ref_tokens"] = ref.pop("ref_tokens", 0)
            out["heldout"]["metrics"].update(ref)
        log.info("%s %s: %s = %.4f (limit %s, %.0f s)", label, spec["name"], out[spec["name"]]["metric"],
                 out[spec["name"]]["score"], out[spec["name"]]["limit"], out[spec["name"]]["seconds"])
    return out


def score_model(model_dir: str | Path, tasks: list[Any], out_dir: str | Path, *, eval_jsonl: str | None = None,
                template: str | None = None, label: str = "model", **settings: Any) -> dict[str, Any]:
    """Score one HF model folder on the named tasks (used by the rules and to score by hand, e.g.
    `score_model(dir, [{"name": "gsm8k_local"}], out, limit=20)`). settings: evaluate-section keys
    (limit, batch_size, max_gen_toks, log_samples); the rest come from the recipe schema."""
    from transformers import AutoTokenizer

    section = section_defaults("evaluate", {**settings, "tasks": tasks})
    specs = task_specs(section)
    task_dir = Path(out_dir) / "tasks" / label
    prepare_tasks(specs, task_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                  eval_jsonl=eval_jsonl, template=template)
    lm = hf_lm(model_dir, batch_size=section["batch_size"])
    return {"model": str(model_dir), "label": label,
            "tasks": score(lm, specs, task_dir, out_dir, label=label, log_samples=section["log_samples"])}


def score_gguf_files(gguf_dir: str | Path, specs: list[dict[str, Any]], task_dir: str | Path,
                     out_dir: str | Path, *, types: list[str] | None = None, threads: int = 2,
                     log_samples: bool = False) -> dict[str, Any]:
    """Local tasks on each quantized GGUF (in-process llama.cpp), in report.json order."""
    from tunesmith.gguf_lm import LlamaCppLM

    report_path = Path(gguf_dir) / "report.json"
    if not report_path.is_file():
        raise TunesmithError(f"{gguf_dir}: no report.json (is it the quantize rule's output?)")
    files = json.loads(report_path.read_text())["files"]
    local = [s for s in specs if s["local"]]
    out: dict[str, Any] = {}
    for qtype, entry in files.items():
        if (types is None and qtype == "F16") or (types is not None and qtype not in types):
            continue  # F16 matches the tuned model to ~1e-3 in logits: scoring it costs time and says little
        lm = LlamaCppLM(Path(gguf_dir) / entry["file"], threads=threads)
        try:
            out[qtype] = {"file": str(Path(gguf_dir) / entry["file"]),
                          "tasks": score(lm, local, task_dir, out_dir, label=f"gguf-{qtype}", log_samples=log_samples)}
        finally:
            lm.close()
    return out


# ---------------------------------------------------------------- comparison


def env_threads(threads: int) -> None:
    """torch and llama.cpp share the job's cores; more threads than that thrash a shared machine."""
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))


# ---------------------------------------------------------------- the stages


