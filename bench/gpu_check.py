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
import json
import os
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
            if r.get("instruction", "").strip() and r.get("output", "").strip():
                rows.append({"prompt": [{"role": "system", "content": "You reverse word lists."},
                                        {"role": "user", "content": r["instruction"]}],
                             "completion": [{"role": "assistant", "content": r["output"]}]})
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
    if CONFIGS[name][0] == "unsloth":
        # As train does, unsloth goes in before transformers (write_data's tokenizer imports it).
        import unsloth  # noqa: F401
    from tunesmith.objectives import sft
    from tunesmith.training import TrainPaths, train

    method, packing = CONFIGS[name]
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
    ap.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.one:
        run_one(opts.one, opts)
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
