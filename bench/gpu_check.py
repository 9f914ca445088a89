"""GPU check for the train stage: qlora, unsloth, lora, lora+packing, full and full+fsdp (train.fsdp
under accelerate launch, one rank) in one run, each in its own
process (unsloth patches transformers globally), printing tokens/s, peak VRAM and MFU.

    python bench/gpu_check.py                       # SmolLM2-135M from resources/models, 40 steps each
    python bench/gpu_check.py --base /path/to/model --steps 60 --batch 8 --max-length 512
    python bench/gpu_check.py --only lora --liger   # same rows with transformers' use_liger_kernel

Needs a CUDA GPU (and `pip install unsloth` for the unsloth row; without it that row says so).

Figures (the "fixed" table; the "stage metrics" table repeats the train stage's own figures):
- tokens/s: non-padding input tokens per second over the steady steps only: timed from the end of
  step --warmup-steps to the end of the last step (CUDA-synchronised step ends, from a callback),
  so CUDA/kernel warm-up, the first-step allocations and the final checkpoint/model save are out.
  The stage's own tokens_per_second divides by the whole trainer.train() call (warm-up and the
  end-of-training checkpoint save included).
- peak VRAM: torch.cuda.max_memory_allocated during trainer.train() (tensors actually held);
  the stage reports max_memory_reserved (the caching allocator's pool, larger).
- MFU: k * N * tokens/s / peak bf16 dense FLOP/s, N = model parameters as the stage counts them
  (4-bit weights counted unpacked; tied embeddings once, the LM-head matmul uses them),
  k = 6 for full fine-tuning (forward 2N + backward 4N) and k = 4 for adapter methods (lora,
  qlora, unsloth: the frozen base needs no weight gradients, forward 2N + input-gradient 2N).
  Attention score FLOPs and gradient-checkpointing recompute are not counted (recompute is not
  useful work). The old figure used k = 6 for every method.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {  # name -> (method, packing)
    "qlora": ("qlora", False),
    "unsloth": ("unsloth", False),
    "lora": ("lora", False),
    "lora+packing": ("lora", True),
    "full": ("full", False),
    "full+fsdp": ("full", False),  # train.fsdp: the child runs under accelerate launch (FSDP2, one rank)
}
# --suite realistic, in the order they run (the most telling first: rows past the time budget are
# skipped). Stage rows train through the train stage; bare rows (bench/gpu_bare_qlora.py) are the
# plain loop each stage row is compared with ("bare"); an auto row's bare loop runs at the
# micro-batch its stage row chose.
SUITE = {
    "lora": dict(kind="stage", method="lora", packing=False, batch="fixed", bare="bare-lora"),
    "bare-lora": dict(kind="bare", mode="lora", packing=False, batch="fixed"),
    "lora+packing": dict(kind="stage", method="lora", packing=True, batch="fixed", bare="bare-lora-packed"),
    "bare-lora-packed": dict(kind="bare", mode="lora", packing=True, batch="fixed"),
    "full": dict(kind="stage", method="full", packing=False, batch="fixed", bare="bare-full"),
    "bare-full": dict(kind="bare", mode="full", packing=False, batch="fixed"),
    "qlora": dict(kind="stage", method="qlora", packing=False, batch="fixed", bare="bare-qlora"),
    "bare-qlora": dict(kind="bare", mode="qlora", packing=False, batch="fixed"),
    "lora-auto": dict(kind="stage", method="lora", packing=False, batch="auto", bare="bare-lora-auto"),
    "bare-lora-auto": dict(kind="bare", mode="lora", packing=False, batch="lora-auto"),
    "lora+packing-auto": dict(kind="stage", method="lora", packing=True, batch="auto", bare="bare-lora-packed-auto"),
    "bare-lora-packed-auto": dict(kind="bare", mode="lora", packing=True, batch="lora+packing-auto"),
    "full+packing-auto": dict(kind="stage", method="full", packing=True, batch="auto", bare=None),
    "lora-logits": dict(kind="stage", method="lora", packing=False, batch="fixed", fused="off", bare="bare-lora-logits"),
    "bare-lora-logits": dict(kind="bare", mode="lora", packing=False, batch="fixed", fused="off"),
    "unsloth": dict(kind="stage", method="unsloth", packing=False, batch="fixed", bare="bare-qlora"),
}
ADAPTER_METHODS = {"lora", "qlora", "unsloth"}
TIMING_FILE = "step_timing.json"
# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
         ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12),
         ("T4", 65e12)]


def write_data(folder: Path, n_eval: int = 32, source: str | None = None, base: str | None = None,
               max_length: int | None = None) -> dict[str, str]:
    """train/eval JSONL for the stage. With base and max_length, rows whose tokens (template
    included) exceed max_length are left out: the stage's contract gate refuses a response cut
    before its end-of-turn token, and the demo data has a few ~450-token rows."""
    rows = []
    with open(source or REPO / "data/demo/reverse_words.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            # {instruction, output} rows, or GSM8K's own {question, answer} (no system prompt then).
            ask, out = (r.get("instruction") or r.get("question") or ""), (r.get("output") or r.get("answer") or "")
            if ask.strip() and out.strip():
                system = [{"role": "system", "content": "You reverse word lists."}] if "instruction" in r else []
                rows.append({"prompt": [*system, {"role": "user", "content": ask}],
                             "completion": [{"role": "assistant", "content": out}]})
    if base and max_length:
        from tunesmith import contract
        from tunesmith.contract import load_tokenizer

        from tunesmith.schema import section_defaults

        model_cfg = {**section_defaults("model"), "max_length": max(max_length, 2048)}
        tokenizer, _ = load_tokenizer(base, None, model_cfg)
        before = len(rows)
        rows = [r for r in rows
                if len(contract.tokenize_example(tokenizer, r["prompt"], r["completion"], None)["input_ids"])
                <= max_length]
        print(f"gpu_check data: {len(rows)} of {before} rows fit max_length {max_length}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[n_eval:]), ("eval", rows[:n_eval])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"), "template": ""}


def section(method: str, packing: bool, opts: argparse.Namespace, fsdp: bool = False) -> dict:
    from tunesmith.schema import fill_defaults, load_schema

    schema = load_schema("recipe")
    sec = {"model": fill_defaults({}, schema["properties"]["model"], schema),
           "train": fill_defaults({"method": method}, schema["properties"]["train"], schema)}
    sec["train"]["args"] = fill_defaults({}, schema["$defs"]["training_args"], schema)
    sec["train"]["args"].update({"max_steps": opts.steps, "per_device_train_batch_size": opts.batch,
                                 "max_length": opts.max_length, "packing": packing, "logging_steps": 5,
                                 "save_steps": 10_000, "learning_rate": 2e-4,
                                 "gradient_checkpointing": opts.gradient_checkpointing,
                                 "use_liger_kernel": bool(opts.liger)})
    row = SUITE.get(getattr(opts, "row", None) or "")
    if row:
        sec["train"]["args"].update({"auto_batch": row["batch"] == "auto",
                                     "fused_cross_entropy": row.get("fused", "auto")})
        if row["batch"] == "auto":  # the effective batch the search may fill: batch x auto_accumulation
            sec["train"]["args"]["gradient_accumulation_steps"] = opts.auto_accumulation
    if opts.pad_token:
        sec["model"]["pad_token"] = opts.pad_token
    sec["train"]["fsdp"] = fsdp
    return copy.deepcopy(sec)


def step_timer(out_file: Path):
    """Callback: CUDA-synchronised wall time and tokens seen at the end of every optimizer step,
    and the peak allocated/reserved memory of trainer.train(), written to out_file at train end."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[int, float, int]] = []
            self.begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.steps.append((int(state.global_step), time.perf_counter(),
                               int(getattr(state, "num_input_tokens_seen", 0) or 0)))

        def on_train_end(self, args, state, control, **kwargs):
            out_file.write_text(json.dumps({
                "train_begin": self.begin, "steps": self.steps,
                "max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                "max_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1) if cuda else None}))

    return StepTimer()


def run_one(name: str, opts: argparse.Namespace) -> None:
    """Child process: train one configuration, write its metrics.json (+ the step timing)."""
    if (SUITE[name]["method"] if name in SUITE else CONFIGS[name][0]) == "unsloth":
        # As train does, unsloth goes in before transformers (write_data's tokenizer imports it).
        import unsloth  # noqa: F401
    from tunesmith.objectives import sft
    from tunesmith.training import TrainPaths, train

    method, packing = (SUITE[name]["method"], SUITE[name]["packing"]) if name in SUITE else CONFIGS[name]
    opts.row = name if name in SUITE else None
    work = Path(opts.workdir) / name.replace("+", "_")
    data = write_data(work / "data", source=opts.data, base=opts.base, max_length=opts.max_length)
    paths = TrainPaths(base=opts.base, model=str(work / "model"), metrics=str(work / "metrics.json"),
                     loss=str(work / "loss.png"), **data)

    build = sft.build_trainer

    def build_timed(*args, **kwargs):  # the objective's trainer, with the bench's CUDA-synchronised timer
        trainer = build(*args, **kwargs)
        trainer.add_callback(step_timer(work / TIMING_FILE))
        return trainer

    sft.build_trainer = build_timed
    train(paths, section(method, packing, opts, fsdp=name.endswith("+fsdp")))


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for frag, flops in PEAKS:
        if frag.lower() in device_name.lower():
            return flops
    return None


def steady_figures(timing: dict, warmup: int) -> dict:
    """tokens/s and s/step between the end of step `warmup` and the end of the last step."""
    steps = timing["steps"]
    if len(steps) <= warmup + 1:
        warmup = 0
    if warmup == 0:
        t0, tok0, s0 = timing["train_begin"], 0, 0
    else:
        s0, t0, tok0 = steps[warmup - 1]
    s1, t1, tok1 = steps[-1]
    dt = t1 - t0
    return {"steady_steps": s1 - s0, "steady_seconds": dt, "steady_tokens": tok1 - tok0,
            "steady_tokens_per_second": (tok1 - tok0) / dt if dt > 0 else 0.0,
            "steady_seconds_per_step": dt / (s1 - s0) if s1 > s0 else None}


def suite_model(opts: argparse.Namespace, workdir: Path) -> str:
    """The suite's base: --base if given, else a random-weight Llama made here (tiny for --tiny, the
    Llama-3.2-1B shape otherwise) with a ByteLevel BPE trained on the data by tunesmith's own
    tokenizer trainer (no hub on a GPU machine without network)."""
    if opts.base_given:
        return opts.base
    import gpu_make_models
    from transformers import AutoTokenizer

    from tunesmith.pretraining import train_tokenizer
    from tunesmith.schema import section_defaults

    shape = "tiny" if opts.tiny else "llama-1b-random"
    models = workdir / "models"
    if (models / shape / "model.safetensors").is_file():
        return str(models / shape)
    corpus = workdir / "corpus.jsonl"
    with open(opts.data, encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
        for line in src:
            r = json.loads(line)
            text = " ".join(str(v) for k, v in r.items() if k in ("instruction", "output", "question", "answer"))
            dst.write(json.dumps({"text": text}) + "\n")
    spec = {**section_defaults("pretrain")["tokenizer"], "vocab_size": 512 if opts.tiny else 8192}
    train_tokenizer({"source": str(corpus), "text_column": "text", "limit": None}, spec, workdir / "tokenizer",
                    max_length=4096)
    return str(gpu_make_models.make_model(AutoTokenizer.from_pretrained(str(workdir / "tokenizer")), models, shape))


def run_suite(opts: argparse.Namespace) -> None:
    """--suite realistic: one process a row, stage rows beside their bare loops, a table with
    tokens/s, tokens/step, peak allocated memory, MFU and the stage/bare ratio per row."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not opts.tiny:
        sys.exit("gpu_check --suite: no CUDA GPU visible to torch; add --tiny for the CPU smoke run")
    started = time.time()
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="tunesmith-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    opts.base = suite_model(opts, workdir)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_flops(device, opts.peak_tflops) if cuda else None
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    head = (f"suite {opts.suite}{' (tiny, CPU smoke)' if opts.tiny else ''}: {device}; peak bf16 "
            f"{peak / 1e12 if peak else '?'} TFLOP/s; base {opts.base}; {opts.steps} steps ({opts.warmup_steps} warm-up), "
            f"batch {opts.batch} (auto rows: up to {opts.batch} x {opts.auto_accumulation}), max_length "
            f"{opts.max_length}; data {opts.data}; budget {opts.budget:.0f} s")
    print(head, flush=True)
    have_unsloth = cuda and importlib.util.find_spec("unsloth") is not None
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    results: dict[str, dict] = {}
    out_json = workdir / "suite.json"
    for name, row in SUITE.items():
        if opts.rows and name not in opts.rows:
            continue
        left = opts.budget - (time.time() - started)
        method = row.get("method") or row.get("mode")
        if method == "unsloth" and not have_unsloth:
            results[name] = {"skipped": "unsloth is not installed" if cuda else "unsloth needs CUDA"}
            continue
        if method == "qlora" and not have_bnb:
            results[name] = {"skipped": "bitsandbytes is not installed"}
            continue
        if left < 30:
            results[name] = {"skipped": f"time budget spent ({opts.budget:.0f} s)"}
            continue
        tag = name.replace("+", "_")
        logfile = workdir / f"{tag}.log"
        if row["kind"] == "stage":
            cmd = [sys.executable, __file__, "--one", name, "--workdir", str(workdir), "--base", opts.base,
                   "--steps", str(opts.steps), "--batch", str(opts.batch), "--max-length", str(opts.max_length),
                   "--auto-accumulation", str(opts.auto_accumulation), "--data", opts.data]
        else:
            batch = opts.batch
            if row["batch"] != "fixed":  # the micro-batch the auto stage row chose
                chosen = results.get(row["batch"], {}).get("micro_batch")
                if not chosen:
                    results[name] = {"skipped": f"no micro-batch from row {row['batch']}"}
                    continue
                batch = int(chosen)
            cmd = [sys.executable, str(REPO / "bench/gpu_bare_qlora.py"), "--base", opts.base, "--mode", row["mode"],
                   "--batch", str(batch), "--steps", str(opts.steps), "--warmup-steps", str(opts.warmup_steps),
                   "--max-length", str(opts.max_length), "--data", opts.data, "--fused-ce", row.get("fused", "auto"),
                   "--device", "cuda" if cuda else "cpu", "--workdir", str(workdir / tag),
                   "--out", str(workdir / tag / "bare.json")]
            if row["packing"]:
                cmd.append("--packed")
        print(f"--- {name} (log: {logfile}; {left:.0f} s left)", flush=True)
        t0 = time.time()
        with open(logfile, "w") as fh:
            try:
                rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=min(opts.row_timeout, left)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        results[name] = collect(name, row, workdir / tag, logfile, rc, opts, peak)
        results[name]["process_seconds"] = round(time.time() - t0, 1)
        out_json.write_text(json.dumps({"head": head, "rows": results}, indent=2, default=str))
    for name, row in SUITE.items():  # the stage/bare ratios, once both ran
        m = results.get(name, {})
        bare = results.get(row.get("bare") or "", {})
        if m.get("tokens_per_second") and bare.get("tokens_per_second"):
            m["vs_bare"] = m["tokens_per_second"] / bare["tokens_per_second"]
            if peak and bare.get("mfu") is None and m.get("total_params"):
                bare["mfu"] = m["flops_per_token_factor"] * m["total_params"] * bare["tokens_per_second"] / peak
    table = suite_table(results, head, time.time() - started)
    print(table, flush=True)
    out_json.write_text(json.dumps({"head": head, "rows": results}, indent=2, default=str))
    (workdir / "suite.md").write_text(table + "\n")
    if opts.out:
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        shutil.copy(out_json, Path(opts.out) / "suite.json")
        shutil.copy(workdir / "suite.md", Path(opts.out) / "suite.md")
    failed = [n for n, m in results.items() if "error" in m]
    if failed:
        sys.exit(f"gpu_check --suite: rows failed: {', '.join(failed)} (logs in {workdir})")


def collect(name: str, row: dict, work: Path, logfile: Path, rc, opts: argparse.Namespace, peak: float | None) -> dict:
    """One row's figures: steady tokens/s, tokens/step, peak allocated memory, MFU."""
    def failure() -> dict:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-4:]
        return {"error": f"exit {rc}: " + " | ".join(tail)[-400:]}

    if row["kind"] == "bare":
        f = work / "bare.json"
        if rc != 0 or not f.is_file():
            return failure()
        b = json.loads(f.read_text())
        return {"kind": "bare", "method": b["mode"], "packed": b["packed"], "batch": b["batch"],
                "tokens_per_second": b["tokens_per_second"], "tokens_per_step": b["tokens_per_step"],
                "alloc_mb": b["peak_allocated_mb"], "attn_implementation": b["attn_implementation"],
                "loss_kernel": b["loss_kernel"], "mfu": None, "total_params": None}
    f = work / "metrics.json"
    if rc != 0 or not f.is_file():
        return failure()
    m = json.loads(f.read_text())
    timing = json.loads((work / TIMING_FILE).read_text())
    steady = steady_figures(timing, opts.warmup_steps)
    k = 4 if m["method"] in ADAPTER_METHODS else 6
    tps = steady["steady_tokens_per_second"]
    return {"kind": "stage", "method": m["method"], "packed": bool(m.get("packing")), "batch": m.get("micro_batch"),
            "micro_batch": m.get("micro_batch"), "gradient_accumulation_steps": m.get("gradient_accumulation_steps"),
            "auto_batch": m.get("auto_batch"), "tokens_per_second": tps,
            "tokens_per_step": steady["steady_tokens"] / steady["steady_steps"] if steady["steady_steps"] else None,
            "alloc_mb": timing["max_allocated_mb"], "mfu": k * m["total_params"] * tps / peak if peak else None,
            "flops_per_token_factor": k, "total_params": m["total_params"],
            "attn_implementation": m.get("attn_implementation"), "loss_kernel": m.get("loss_kernel"),
            "loss_kernel_reason": m.get("loss_kernel_reason"), "padding_share": m.get("padding_share"),
            "train_loss_first": m.get("train_loss_first"), "train_loss_last": m.get("train_loss_last")}


def suite_table(results: dict, head: str, seconds: float) -> str:
    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    lines = [head, "", "| row | micro-batch | tok/s | tok/step | alloc GB | MFU | vs bare | padding | attention | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, m in results.items():
        if "skipped" in m or "error" in m:
            lines.append(f"| {name} | {'skipped: ' + m['skipped'] if 'skipped' in m else 'FAILED: ' + m['error'][:120]} "
                         f"| | | | | | | | |")
            continue
        alloc = m["alloc_mb"] / 1024 if m.get("alloc_mb") else None
        mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") else "-"
        lines.append(f"| {name} | {m.get('batch')}{' x ' + str(m['gradient_accumulation_steps']) if m.get('gradient_accumulation_steps', 1) != 1 else ''} "
                     f"| {num(m['tokens_per_second'], ',.0f')} | {num(m.get('tokens_per_step'), ',.0f')} | {num(alloc, '.1f')} "
                     f"| {mfu} | {num(m.get('vs_bare'), '.2f')}{'x' if m.get('vs_bare') else ''} "
                     f"| {num(m.get('padding_share'), '.1%')} | {m.get('attn_implementation') or '-'} | {m.get('loss_kernel') or '-'} |")
    lines.append(f"\nsuite wall time {seconds:.0f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "resources/models/smollm2-135m-instruct"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 dense peak")
    ap.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the steady tokens/s")
    ap.add_argument("--liger", action="store_true", help="train with transformers' use_liger_kernel=True")
    ap.add_argument("--data", default=None,
                    help="JSONL of {instruction, output} rows (default: data/demo/reverse_words.jsonl)")
    ap.add_argument("--pad-token", default=None,
                    help="model.pad_token for the recipe (a token not in the vocabulary makes the stage add it "
                         "and grow the embeddings)")
    ap.add_argument("--suite", choices=["realistic"], default=None,
                    help="every method and the bare loops, padded and packed, batch --batch and the auto batch, "
                         "one process a row, within --budget seconds (defaults: 1B shape, GSM8K, max-length 1024)")
    ap.add_argument("--tiny", action="store_true",
                    help="with --suite: a tiny random Llama and tokenizer made here, on CPU where no GPU is: "
                         "runs every row's code path in a few minutes, so a GPU session does not find a typo")
    ap.add_argument("--budget", type=float, default=450, help="suite: seconds for all rows (rows left are skipped)")
    ap.add_argument("--row-timeout", type=float, default=150, help="suite: seconds a row may take")
    ap.add_argument("--auto-accumulation", type=int, default=4,
                    help="suite auto rows: gradient_accumulation_steps, so the search may fill batch x this")
    ap.add_argument("--out", default=None, help="suite: also copy the JSON and the table here")
    ap.add_argument("--rows", nargs="*", choices=list(SUITE), default=None,
                    help="suite: only these rows (an auto row's bare loop needs its stage row)")
    ap.add_argument("--one", choices=[*CONFIGS, *SUITE], help=argparse.SUPPRESS)
    opts = ap.parse_args()
    opts.base_given = any(a == "--base" or a.startswith("--base=") for a in sys.argv[1:])
    if opts.suite and not opts.one:
        given = set(a.split("=")[0] for a in sys.argv[1:])
        # The suite's own sizes unless the command line says otherwise (--tiny: seconds on a CPU).
        for flag, attr, real, tiny in (("--steps", "steps", 20, 6), ("--batch", "batch", 16, 4),
                                       ("--max-length", "max_length", 1024, 128), ("--warmup-steps", "warmup_steps", 5, 2),
                                       ("--row-timeout", "row_timeout", 150, 400), ("--budget", "budget", 450, 3000)):
            if flag not in given:
                setattr(opts, attr, tiny if opts.tiny else real)
        if opts.data is None:
            if not opts.tiny:
                sys.exit("gpu_check --suite realistic: --data GSM8K-like JSONL ({question, answer} or {instruction, output})")
            opts.data = str(REPO / "data/demo/reverse_words.jsonl")
    if opts.one:
        run_one(opts.one, opts)
        return
    if opts.suite:
        run_suite(opts)
        return

    import torch

    from tunesmith import launch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to torch; run this on a GPU node")
    if not Path(opts.base, "config.json").is_file():
        sys.exit(f"gpu_check: no model at {opts.base}; prepare it first: "
                 f"snakemake --cores 1 resources/models/smollm2-135m-instruct")
    device = torch.cuda.get_device_name(0)
    peak = peak_flops(device, opts.peak_tflops)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="tunesmith-gpu-check-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"device: {device}; peak bf16 {peak / 1e12 if peak else '?'} TFLOP/s; base {opts.base}; "
          f"{opts.steps} steps, batch {opts.batch}, max_length {opts.max_length}; "
          f"liger {'on' if opts.liger else 'off'}; data {opts.data or 'data/demo/reverse_words.jsonl'}; "
          f"work dir {workdir}", flush=True)
    results = {}
    for name in opts.only:
        # FSDP is set up by accelerate's launcher (as the train stage relaunches itself): one rank here.
        launcher = ([sys.executable, "-m", "accelerate.commands.launch", *launch.launcher_flags(1, True),
                     "--mixed_precision", "no", "--dynamo_backend", "no"] if name.endswith("+fsdp") else [sys.executable])
        cmd = [*launcher, __file__, "--one", name, "--workdir", str(workdir), "--base", opts.base,
               "--steps", str(opts.steps), "--batch", str(opts.batch), "--max-length", str(opts.max_length)]
        if opts.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if opts.liger:
            cmd.append("--liger")
        if opts.data:
            cmd += ["--data", opts.data]
        if opts.pad_token:
            cmd += ["--pad-token", opts.pad_token]
        logfile = workdir / f"{name.replace('+', '_')}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        print(f"--- {name} (log: {logfile})", flush=True)
        started = time.time()
        with open(logfile, "w") as fh:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        metrics_file = workdir / name.replace("+", "_") / "metrics.json"
        if rc != 0 or not metrics_file.is_file():
            tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
            results[name] = {"error": f"exit {rc}: " + " | ".join(tail)[-300:]}
            continue
        m = json.loads(metrics_file.read_text())
        m["process_seconds"] = time.time() - started
        n = m["total_params"]
        k = 4 if m["method"] in ADAPTER_METHODS else 6
        m["mfu_stage"] = 6 * n * m["tokens_per_second"] / peak if peak else None  # the old figure
        m["mfu"] = m["mfu_stage"]  # kept under its old key for old readers
        timing_file = metrics_file.parent / TIMING_FILE
        if timing_file.is_file():
            timing = json.loads(timing_file.read_text())
            m.update(steady_figures(timing, opts.warmup_steps))
            m["peak_cuda_allocated_mb"] = timing["max_allocated_mb"]
            m["flops_per_token_factor"] = k
            m["mfu_steady"] = k * n * m["steady_tokens_per_second"] / peak if peak else None
        results[name] = m

    def pct(x):
        return f"{100 * x:.1f}%" if x is not None else "?"

    print()
    print("stage metrics (as the train stage reports them: tokens/s over all of trainer.train(), "
          "peak reserved VRAM, MFU with 6N):")
    print(f"{'config':<14}{'tokens/s':>12}{'peak VRAM MiB':>15}{'MFU':>8}{'s/step':>9}{'loss first->last':>20}")
    for name, m in results.items():
        if "error" in m:
            print(f"{name:<14} FAILED  {m['error']}")
            continue
        print(f"{name:<14}{m['tokens_per_second']:>12.0f}{m.get('peak_cuda_reserved_mb', float('nan')):>15.0f}"
              f"{pct(m['mfu_stage']):>8}{m['seconds_per_step']:>9.3f}{m['train_loss_first']:>10.3f} -> "
              f"{m['train_loss_last']:.3f}")
    print()
    print(f"fixed (steady steps after {opts.warmup_steps} warm-up steps, save excluded; peak allocated VRAM; "
          f"MFU with 4N for adapters, 6N for full):")
    print(f"{'config':<14}{'tokens/s':>12}{'alloc MiB':>11}{'MFU':>8}{'s/step':>9}{'tok/step':>10}"
          f"{'params':>15}{'trainable':>12}")
    for name, m in results.items():
        if "error" in m or "steady_tokens_per_second" not in m:
            print(f"{name:<14} {'FAILED' if 'error' in m else 'no step timing'}")
            continue
        per_step = m["steady_tokens"] / m["steady_steps"] if m["steady_steps"] else float("nan")
        alloc = m["peak_cuda_allocated_mb"] if m["peak_cuda_allocated_mb"] is not None else float("nan")
        print(f"{name:<14}{m['steady_tokens_per_second']:>12.0f}{alloc:>11.0f}"
              f"{pct(m['mfu_steady']):>8}{m['steady_seconds_per_step']:>9.4f}{per_step:>10.0f}"
              f"{m['total_params']:>15,}{m['trainable_params']:>12,}")
    (workdir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfull figures: {workdir / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
