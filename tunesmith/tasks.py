"""Facts about evaluation tasks, shared by the recipe checks, decontamination and the evaluator:
which tasks run locally, what each reports, which metric leads, and where a task's documents live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_TASKS = ("heldout", "gsm8k_local")



# Metric reported per task; the other metrics stay in the lm-eval result files.
PRIMARY_METRIC = {"heldout": "exact_match,none", "gsm8k_local": "exact_match,strict-match"}



# Every other figure is higher-is-better (exact match, chrF, log-likelihood).
LOWER_IS_BETTER = frozenset({"ref_perplexity"})



# What the local tasks report, so a recipe's evaluate.headline is checked before any job runs.
TASK_METRICS = {"heldout": ("exact_match", "chrf", "ref_logprob", "ref_perplexity"),
                "gsm8k_local": ("exact_match,strict-match", "exact_match,flexible-extract")}



# End-of-turn markers of common chat templates: generation stops at the first one.
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")



def default_gsm8k_file() -> Path:
    """../shared/data/gsm8k/test.jsonl beside the checkout (the reference data for tests and CI)."""
    return REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"



def task_specs(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Recipe evaluate.tasks (names or objects) -> one dict per task with every setting filled.
    section: the resolved evaluate section (schema defaults filled)."""
    specs = []
    for item in section["tasks"]:
        spec = {"name": item} if isinstance(item, str) else dict(item)
        spec.setdefault("limit", section["limit"])
        if spec["name"] == "gsm8k_local":
            # Chain-of-thought answers need room: lm-eval's gsm8k default, not the recipe's short one.
            spec.setdefault("max_gen_toks", 256)
        spec.setdefault("max_gen_toks", section["max_gen_toks"])
        spec["local"] = spec["name"] in LOCAL_TASKS
        specs.append(spec)
    return specs



def task_documents(section: dict[str, Any]) -> tuple[dict[str, Path], dict[str, str]]:
    """The local file holding each task's documents, for decontamination: {task: path}, and
    {task: why it is not checked}. `heldout` is the recipe's own split (checked as split leakage)."""
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for spec in task_specs(section):
        name = spec["name"]
        if name == "heldout":
            continue
        if spec.get("data_files"):
            files[name] = Path(spec["data_files"])
        elif name == "gsm8k_local":
            files[name] = default_gsm8k_file()
        else:
            skipped[name] = "an lm-eval built-in task whose documents come from the hub: give it data_files to check it"
    return files, skipped


def short_metric(key: str) -> str:
    """lm-eval's 'exact_match,none' -> 'exact_match'; a real filter stays ('exact_match,strict-match')."""
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else key
