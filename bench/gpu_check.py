"""GPU check for the train stage: qlora, unsloth, lora, lora+packing in one run, each in its own
process (unsloth patches transformers globally), printing tokens/s, peak VRAM and MFU.

    python bench/gpu_check.py                       # SmolLM2-135M from resources/models, 40 steps each
    python bench/gpu_check.py --base /path/to/model --steps 60 --batch 8 --max-length 512

Needs a CUDA GPU (and `pip install unsloth` for the unsloth row; without it that row says so).
MFU = 6 * N * tokens/s / peak bf16 dense FLOP/s, N = all model parameters (the usual
approximation; frozen-base LoRA does less backward work, so its MFU reads a bit high).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {  # name -> (method, packing)
    "qlora": ("qlora", False),
    "unsloth": ("unsloth", False),
    "lora": ("lora", False),
    "lora+packing": ("lora", True),
}
# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
         ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12),
         ("T4", 65e12)]


def write_data(folder: Path, n_eval: int = 32) -> dict[str, str]:
    rows = []
    with open(REPO / "data/demo/reverse_words.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("instruction", "").strip() and r.get("output", "").strip():
                rows.append({"prompt": [{"role": "system", "content": "You reverse word lists."},
                                        {"role": "user", "content": r["instruction"]}],
                             "completion": [{"role": "assistant", "content": r["output"]}]})
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[n_eval:]), ("eval", rows[:n_eval])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"), "template": ""}


def section(method: str, packing: bool, opts: argparse.Namespace) -> dict:
    from tunesmith.recipe import fill_defaults, load_schema

    schema = load_schema("recipe")
    sec = {"model": fill_defaults({}, schema["properties"]["model"], schema),
           "train": fill_defaults({"method": method}, schema["properties"]["train"], schema)}
    sec["train"]["args"] = fill_defaults({}, schema["$defs"]["training_args"], schema)
    sec["train"]["args"].update({"max_steps": opts.steps, "per_device_train_batch_size": opts.batch,
                                 "max_length": opts.max_length, "packing": packing, "logging_steps": 5,
                                 "save_steps": 10_000, "learning_rate": 2e-4,
                                 "gradient_checkpointing": opts.gradient_checkpointing})
    return copy.deepcopy(sec)


def run_one(name: str, opts: argparse.Namespace) -> None:
    """Child process: train one configuration, write its metrics.json."""
    from tunesmith.training import SFTPaths, train_sft

    method, packing = CONFIGS[name]
    work = Path(opts.workdir) / name.replace("+", "_")
    data = write_data(work / "data")
    paths = SFTPaths(base=opts.base, model=str(work / "model"), metrics=str(work / "metrics.json"),
                     loss=str(work / "loss.png"), **data)
    train_sft(paths, section(method, packing, opts))


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for frag, flops in PEAKS:
        if frag.lower() in device_name.lower():
            return flops
    return None


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
    ap.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.one:
        run_one(opts.one, opts)
        return

    import torch

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
          f"{opts.steps} steps, batch {opts.batch}, max_length {opts.max_length}; work dir {workdir}", flush=True)
    results = {}
    for name in opts.only:
        cmd = [sys.executable, __file__, "--one", name, "--workdir", str(workdir), "--base", opts.base,
               "--steps", str(opts.steps), "--batch", str(opts.batch), "--max-length", str(opts.max_length)]
        if opts.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        logfile = workdir / f"{name.replace('+', '_')}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        print(f"--- {name} (log: {logfile})", flush=True)
        with open(logfile, "w") as fh:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        metrics_file = workdir / name.replace("+", "_") / "metrics.json"
        if rc != 0 or not metrics_file.is_file():
            tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
            results[name] = {"error": f"exit {rc}: " + " | ".join(tail)[-300:]}
            continue
        m = json.loads(metrics_file.read_text())
        tps = m["tokens_per_second"]
        m["mfu"] = 6 * m["total_params"] * tps / peak if peak else None
        results[name] = m

    print()
    print(f"{'config':<14}{'tokens/s':>12}{'peak VRAM MiB':>15}{'MFU':>8}{'s/step':>9}{'loss first->last':>20}")
    for name, m in results.items():
        if "error" in m:
            print(f"{name:<14} FAILED  {m['error']}")
            continue
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "?"
        print(f"{name:<14}{m['tokens_per_second']:>12.0f}{m.get('peak_cuda_reserved_mb', float('nan')):>15.0f}"
              f"{mfu:>8}{m['seconds_per_step']:>9.3f}{m['train_loss_first']:>10.3f} -> {m['train_loss_last']:.3f}")
    (workdir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nfull figures: {workdir / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
