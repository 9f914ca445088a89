"""CPU (or GPU) training throughput: the train stage vs plain TRL SFTTrainer vs a bare
transformers + peft AdamW loop, on the same rows, printed side by side from ONE run.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py
        [--contenders stage,stage-token-metrics,trl,bare] [--warmup 4 --steps 6 --batch 8 --threads 0]
        [--set gradient_checkpointing=true ...]   (train.args overrides for the stage rows)
        [--sweep]                                  (also: grad checkpointing, batch 4/16, 1 thread, 2 processes)

Rows: the default recipe's (recipes/demo-reverse-lora.yaml) data, built as its format stage
builds them (data/demo/reverse_words.jsonl, empty/short rows dropped, its system prompt), or a
formatted train.jsonl given with --train. Model: SmolLM2-135M-Instruct from resources/models.
LoRA r16 / alpha 32 / dropout 0 on all linear layers, lr 1e-3, max_length 128, batch 8: the
default recipe's train section. Every contender trains on the same batches in the same order (the
rows shuffled once, then taken in file order), runs in its own process, in turn (never two at
once), and is timed the same way: from the end of optimizer step `warmup` to the end of step
`warmup + steps` (so warm-up, the eval before/after and the final save are left out; a logging
or checkpoint step in between counts, as it does for a user).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = REPO / "resources" / "models" / "smollm2-135m-instruct"
RECIPE = REPO / "recipes" / "demo-reverse-lora.yaml"


def section(overrides: dict) -> dict:
    """The default recipe's model + train sections, resolved with the schema defaults."""
    from tunesmith.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    recipe["train"]["args"].update(overrides)
    return {"model": recipe["model"], "train": recipe["train"]}


def write_rows(folder: Path, train: str | None) -> Path:
    """train.jsonl as the default recipe's format stage writes it (prompt/completion conversations)."""
    if train:
        return Path(train)
    from tunesmith.data.formatting import conversation
    from tunesmith.recipe import load_recipe

    from transformers import AutoTokenizer

    recipe = load_recipe(RECIPE)
    system, limits = recipe["format"]["system_prompt"], recipe["filter"]
    tok = AutoTokenizer.from_pretrained(MODEL)
    out = folder / "train.jsonl"
    kept = []
    for i, line in enumerate(open(REPO / "data/demo/reverse_words.jsonl")):
        row = json.loads(line)
        text = [str(row.get("instruction") or "").strip(), str(row.get("output") or "").strip()]
        n = sum(len(tok(t)["input_ids"]) for t in text)
        if not all(text) or not limits["min_tokens"] <= n <= limits["max_tokens"]:  # the recipe's filter
            continue
        prompt, completion = conversation(row, system)
        kept.append({"id": i, "prompt": prompt, "completion": completion})
    # Shuffled once here, then read in file order by every contender (SEQUENTIAL): the same batches,
    # so the same padded widths, step for step. Each trainer drawing its own order made the bare
    # loop's batches wider than the stage's and it came out slower.
    random.Random(recipe["train"]["args"]["seed"]).shuffle(kept)
    with open(out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
    return out


SEQUENTIAL = "sequential"  # transformers' train_sampling_strategy: batches in dataset order


def timed(ends: list[float], warmup: int, steps: int) -> float:
    """Seconds per step between the end of step `warmup` and the end of step `warmup + steps`."""
    return (ends[warmup + steps - 1] - ends[warmup - 1]) / steps


def step_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.ends.append(time.perf_counter())

    return Clock()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- contenders (one per process)

def run_stage(opts, work: Path, train: Path) -> dict:
    from tunesmith import trainer as trainer_loop
    from tunesmith import histories, training

    clock = step_clock()
    made = histories.make_history_callback

    def with_clock():  # the stage's own callbacks, plus the same clock as the other contenders
        history = made()
        real = history.on_step_end

        def on_step_end(*a, **k):
            out = real(*a, **k)
            clock.ends.append(time.perf_counter())
            return out
        history.on_step_end = on_step_end
        return history

    histories.make_history_callback = with_clock
    made_args = trainer_loop.training_arguments

    def in_file_order(*a, **k):
        config = made_args(*a, **k)
        config.train_sampling_strategy = SEQUENTIAL
        return config
    trainer_loop.training_arguments = in_file_order
    sec = section({"max_steps": opts.warmup + opts.steps, "per_device_train_batch_size": opts.batch, **opts.set})
    template = work / "chat_template.jinja"
    template.write_text((MODEL / "chat_template.jinja").read_text())
    out = work / "stage"
    paths = training.TrainPaths(train=str(train), eval="", template=str(template), base=str(MODEL),
                              model=str(out / "model"), metrics=str(out / "train/metrics.json"),
                              loss=str(out / "train/loss.png"))
    started = time.perf_counter()
    result = training.train(paths, sec)
    return {"s_step": timed(clock.ends, opts.warmup, opts.steps), "wall_s": time.perf_counter() - started,
            "tokens_per_step": result.metrics["tokens_this_run"] / result.metrics["steps_this_run"],
            "loss_first": result.metrics["train_loss_first"], "loss_last": result.metrics["train_loss_last"]}


def _lora(sec: dict):
    from peft import LoraConfig

    lora = sec["train"]["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def run_trl(opts, work: Path, train: Path) -> dict:
    """TRL as its docs show it: conversational prompt/completion rows, SFTConfig, peft_config."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    sec = section({"per_device_train_batch_size": opts.batch, **opts.set})
    args = sec["train"]["args"]
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16 if cuda else torch.float32)
    data = load_dataset("json", data_files=str(train), split="train").remove_columns(["id"])
    clock = step_clock()
    config = SFTConfig(output_dir=str(work / "trl"), max_steps=opts.warmup + opts.steps,
                       per_device_train_batch_size=opts.batch, learning_rate=args["learning_rate"],
                       warmup_steps=args["warmup_steps"], max_length=args["max_length"],
                       logging_steps=args["logging_steps"], logging_first_step=True, save_strategy="no", report_to="none",
                       gradient_checkpointing=bool(args["gradient_checkpointing"]), use_cpu=not cuda,
                       bf16=cuda, seed=args["seed"], disable_tqdm=True, train_sampling_strategy=SEQUENTIAL)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=_lora(sec), callbacks=[clock])
    started = time.perf_counter()
    out = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e] or [float("nan")]
    return {"s_step": timed(clock.ends, opts.warmup, opts.steps), "wall_s": time.perf_counter() - started,
            "loss_first": losses[0], "loss_last": losses[-1], "train_loss": out.training_loss}


def run_bare(opts, work: Path, train: Path) -> dict:
    """transformers + peft + torch AdamW, nothing else: the stage's own tokenised rows (prompt
    masked), in file order, padded to the longest row of each batch."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    from tunesmith import contract
    from tunesmith.data.formatting import read_split

    sec = section({"per_device_train_batch_size": opts.batch, **opts.set})
    args = sec["train"]["args"]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tok, _ = contract.load_tokenizer(MODEL, MODEL / "chat_template.jinja", sec["model"])
    examples = contract.tokenize_rows(tok, read_split(train), args["max_length"])
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).to(device)
    if args["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, _lora(sec))
    model.train()
    total = opts.warmup + opts.steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args["learning_rate"],
                            weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, args["warmup_steps"], total)
    ends, losses = [], []
    started = time.perf_counter()
    for step in range(total):
        rows = examples[step * opts.batch:(step + 1) * opts.batch]
        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * p for r, p in zip(rows, pad)], device=device)
        labels = torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad)], device=device)
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)], device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        _sync()
        ends.append(time.perf_counter())
    return {"s_step": timed(ends, opts.warmup, opts.steps), "wall_s": time.perf_counter() - started,
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_losspath(opts, work: Path, train: Path) -> dict:
    """Where TRL's time over the bare loop goes, measured on one batch in one process, the two
    interleaved so that machine load drifts hit both alike: forward + backward through trl's fused
    LM head with its metrics (log-probs, entropy and top-1 over the whole vocabulary at every
    position: SFTTrainer's compute_loss) against transformers' own logits + cross-entropy (the
    stage's default, train.args.token_metrics: false)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tunesmith import contract
    from tunesmith.data.formatting import read_split

    sec = section({"per_device_train_batch_size": opts.batch, **opts.set})
    args = sec["train"]["args"]
    tok, _ = contract.load_tokenizer(MODEL, MODEL / "chat_template.jinja", sec["model"])
    rows = contract.tokenize_rows(tok, read_split(train)[:opts.batch], args["max_length"])
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.tensor([r["input_ids"] + [tok.pad_token_id] * (width - len(r["input_ids"])) for r in rows]),
             "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
             "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])}
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, _lora(sec))
    model.train()
    paths = {"trl_fused_head_with_metrics": lambda: model(**batch, fused_lm_head=True, use_cache=False).loss,
             "transformers_loss": lambda: model(**batch, use_cache=False).loss}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(opts.warmup + opts.steps):
        for name, fn in paths.items():
            started = time.perf_counter()
            fn().backward()
            model.zero_grad(set_to_none=True)
            if rep >= opts.warmup:
                times[name].append(time.perf_counter() - started)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"s_step": med["transformers_loss"], "trl_fused_s": med["trl_fused_head_with_metrics"],
            "loss_first": float("nan"), "loss_last": float("nan"), "tokens": int(batch["attention_mask"].sum())}


CONTENDERS = {"stage": run_stage, "trl": run_trl, "bare": run_bare, "losspath": run_losspath}


def child(opts) -> None:
    if opts.code:  # an earlier checkout's tunesmith (--before): imported in place of this one
        sys.path.insert(0, str(Path(opts.code).resolve()))
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="tput-") as tmp:
        work = Path(tmp)
        train = write_rows(work, opts.train)
        figures = CONTENDERS[opts.child](opts, work, train)
    import resource

    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures["threads"] = torch.get_num_threads()
    figures["rank"] = int(os.environ.get("RANK", 0))
    print("RESULT " + json.dumps(figures), flush=True)


# ---------------------------------------------------------------- driver

def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = json.loads(value) if value not in ("", None) else value
    return out


def run_one(name: str, label: str, argv: list[str], code: str | None = None, processes: int = 1) -> dict:
    # processes > 1: the child runs under accelerate launch (DDP over gloo), as the stage relaunches
    # itself for train.processes; each rank prints its RESULT, rank 0's is the last.
    launcher = [sys.executable]
    if processes > 1:
        from tunesmith import launch

        launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch.launcher_flags(processes, False),
                    "--num_machines", "1", "--main_process_port", str(launch.free_port()), "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
    cmd = [*launcher, __file__, "--child", name, *argv, *(["--code", code] if code else [])]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ") and '"rank": 0' in x]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"label": label, "error": f"exit {proc.returncode}"}
    figures = json.loads(lines[-1][len("RESULT "):])
    figures.update(label=label, process_s=time.time() - started)
    print(f"  {label:<44} {figures['s_step']:.2f} s/step  (process {figures['process_s']:.0f} s, "
          f"RSS {figures['peak_rss_mb']} MB)", flush=True)
    return figures


def _fastest(found: list[dict]) -> dict:
    """One row per contender: its fastest run, carrying every run's s/step. Other work on the machine
    only ever slows a run down, so the fastest of N is the best estimate of the contender's own cost."""
    good = sorted((r for r in found if "error" not in r), key=lambda r: r["s_step"])
    if not good:
        return found[0]
    return good[0] | {"all_s_step": [r["s_step"] for r in good]}


def common_argv(opts, batch: int | None = None, threads: int | None = None, sets: dict | None = None) -> list[str]:
    argv = ["--warmup", str(opts.warmup), "--steps", str(opts.steps), "--batch", str(batch or opts.batch),
            "--threads", str(opts.threads if threads is None else threads)]
    for k, v in {**opts.set, **(sets or {})}.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    if opts.train:
        argv += ["--train", opts.train]
    return argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default="stage,stage-token-metrics,trl,bare")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="train.args override")
    ap.add_argument("--sweep", action="store_true", help="also the stage with grad checkpointing, batch 4/16, 1 thread, and 2 processes "
                    "(DDP over gloo) of half the batch each")
    ap.add_argument("--losspath", action="store_true", help="only: trl's fused-head loss vs transformers' loss, "
                    "forward + backward on one batch, interleaved (median of --steps after --warmup)")
    ap.add_argument("--train", default=None, help="a formatted train.jsonl (default: built as the default recipe does)")
    ap.add_argument("--json", default=None, help="write every row's figures here")
    ap.add_argument("--before", default=None, metavar="DIR", help="also the train stage of an earlier checkout "
                    "(e.g. git worktree add DIR <commit>): a true before/after in one run")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the contenders, interleaved; the table gives "
                    "each row's fastest s/step and the range (runs of 8 steps vary by 10-25%% here, even at load 1)")
    ap.add_argument("--code", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    opts.set = parse_set(opts.set)
    if opts.child:
        return child(opts)

    load = os.getloadavg()
    print(f"train throughput: SmolLM2-135M, LoRA r16 all-linear, batch {opts.batch}, {opts.warmup} warm-up + "
          f"{opts.steps} timed steps; {os.cpu_count()} CPUs; load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    if opts.losspath:
        r = run_one("losspath", "forward+backward, transformers' loss", common_argv(opts))
        if "error" not in r:
            print(f"| loss path (batch {opts.batch}, {r['tokens']} tokens) | median s | x transformers' loss |\n|---|---|---|\n"
                  f"| transformers' logits + cross-entropy (the stage's default) | {r['s_step']:.3f} | 1.00x |\n"
                  f"| trl's fused LM head + entropy + top-1 (SFTTrainer; token_metrics: true) | {r['trl_fused_s']:.3f} | "
                  f"{r['trl_fused_s'] / r['s_step']:.2f}x |")
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return
    names = {"stage": "the train stage", "trl": "plain TRL SFTTrainer", "bare": "bare transformers+peft AdamW loop",
             "stage-token-metrics": "the train stage, token_metrics: true (trl's fused LM head)"}
    plan = [(name.split("-")[0], names[name], common_argv(opts, sets={"token_metrics": True}
             if name == "stage-token-metrics" else {}), None, name) for name in opts.contenders.split(",")]
    if opts.before:
        commit = subprocess.run(["git", "-C", opts.before, "log", "-1", "--format=%h"], capture_output=True,
                                text=True).stdout.strip() or Path(opts.before).name
        plan.insert(0, ("stage", f"the train stage before (commit {commit})", common_argv(opts), opts.before,
                        "stage-before"))
    runs: dict[str, list[dict]] = {}
    for _ in range(max(1, opts.repeat)):
        for name, label, argv, code, key in plan:
            runs.setdefault(key, []).append(run_one(name, label, argv, code) | {"name": key})
    rows = [_fastest(found) for found in runs.values()]
    if opts.sweep:
        sweeps = [("stage", "stage, gradient_checkpointing on", common_argv(opts, sets={"gradient_checkpointing": True})),
                  ("bare", "bare, gradient_checkpointing on", common_argv(opts, sets={"gradient_checkpointing": True})),
                  ("stage", "stage, batch 4", common_argv(opts, batch=4)),
                  ("stage", "stage, batch 16", common_argv(opts, batch=16)),
                  ("stage", "stage, 1 torch thread", common_argv(opts, threads=1)),
                  ("stage", f"stage, 2 processes x batch {opts.batch // 2} x 1 thread (train.processes: 2)",
                   common_argv(opts, batch=max(1, opts.batch // 2), threads=1))]
        for name, label, argv in sweeps:
            rows.append(_fastest([run_one(name, label, argv, processes=2 if "processes" in label else 1)
                                  | {"name": f"sweep-{name}"}]))
    load = os.getloadavg()
    bare = next((r for r in rows if r.get("name") == "bare" and "error" not in r), None)
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| what ran | s/step (fastest) | range (runs) | tokens/s | x bare | loss first -> last | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{bare['s_step'] / r['s_step']:.2f}x" if bare else "-"
        tps = f"{r['tokens_per_step'] / r['s_step']:.0f}" if r.get("tokens_per_step") else "-"
        spread = f"{min(r['all_s_step']):.2f}-{max(r['all_s_step']):.2f} ({len(r['all_s_step'])})"
        print(f"| {r['label']} | {r['s_step']:.2f} | {spread} | {tps} | {ratio} | {r['loss_first']:.3f} -> "
              f"{r['loss_last']:.3f} | {r['peak_rss_mb']} |")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"load_after": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
