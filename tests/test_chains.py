"""Recipes that chain (model.base: recipe:<name>[/<variant>]): the link is checked before any job,
the dry run plans the upstream recipe's jobs, and, on a real two-recipe chain on a tiny random
Llama (SFT, then DPO on pairs the verifier builds from the SFT model's samples), an upstream
change reruns the downstream chain while a downstream-only change reruns only its training and
what follows. Lineage reaches the model card, compare.json and MLflow."""

from __future__ import annotations

import re

import pytest
import yaml

from tunesmith.errors import RecipeError
from tunesmith.scorecard import chain
from tunesmith.recipe import load_recipe, resolve_chains, upstream
from workflow_helpers import REPO, failure_text, make_workdir, mlflow_runs, read_json, snakemake, write_config

TINY = str(REPO / "tests" / "data" / "tiny_reverse.jsonl")


def _recipe(folder, name, **sections):
    base = {"description": name, "dataset": {"source": TINY, "columns": {"input": None}}, "dedupe": {"near": False}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base | sections))
    return path


def _resolve(folder, *names):
    return resolve_chains({n: load_recipe(folder / f"{n}.yaml") for n in names}, folder,
                          lambda path, name: load_recipe(path))


def test_links_are_checked_before_any_job(tmp_path):
    _recipe(tmp_path, "sft")
    _recipe(tmp_path, "dpo", model={"base": "recipe:sft"})
    recipes = _resolve(tmp_path, "dpo")
    assert set(recipes) == {"dpo", "sft"} and upstream(recipes["dpo"]) == ("sft", "main")

    _recipe(tmp_path, "typo", model={"base": "recipe:sfft"})
    with pytest.raises(RecipeError, match=r"typo.yaml: model.base 'recipe:sfft' names no recipe.*did you mean 'recipe:sft'"):
        _resolve(tmp_path, "typo")
    _recipe(tmp_path, "novar", model={"base": "recipe:sft/r-8"})
    with pytest.raises(RecipeError, match=r"recipe 'sft' has no variant 'r-8'; its variants: main"):
        _resolve(tmp_path, "novar")
    _recipe(tmp_path, "a", model={"base": "recipe:b"})
    _recipe(tmp_path, "b", model={"base": "recipe:a"})
    with pytest.raises(RecipeError, match=r"circle: a -> b -> a|circle: b -> a -> b"):
        _resolve(tmp_path, "a")
    _recipe(tmp_path, "bad", model={"base": "recipe:"})
    with pytest.raises(RecipeError, match=r"not recipe:<name>"):
        load_recipe(tmp_path / "bad.yaml")


def test_compare_chain_runs_from_the_root_base_through_each_recipe_to_the_gguf():
    upstream_cmp = {"recipe": "sft", "base_model": "smol", "tuned_model": "results/sft/main/model/merged",
                    "tasks": {"heldout": {"base": 0.0, "tuned": 0.9}}}
    mine = {"tuned_model": "results/dpo/main/model/merged",
            "tasks": {"heldout": {"base": 0.9, "tuned": 0.95, "gguf": {"Q4_K_M": 0.94}}}}
    links = chain(upstream_cmp, mine, "dpo", "results/sft/main/eval/compare.json")
    assert [(link["label"], link["tasks"]["heldout"]) for link in links] == [
        ("base", 0.0), ("sft", 0.9), ("dpo", 0.95), ("Q4_K_M", 0.94)]
    # a third link drops the middle recipe's GGUF and keeps the rest of its chain
    again = chain({**mine, "recipe": "dpo", "chain": links}, {"tuned_model": "x", "tasks": {"heldout": {"tuned": 1.0}}},
                  "grpo", "results/dpo/main/eval/compare.json")
    assert [link["label"] for link in again] == ["base", "sft", "dpo", "grpo"]


def test_dry_run_of_a_chained_recipe_plans_the_upstream_recipe(tmp_path):
    work = make_workdir(tmp_path)
    config = write_config(work, {"recipes": ["demo-reverse-dpo"]})
    proc = snakemake(work, config, "-n", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "results/demo-reverse-sft-short/main/model/merged" in out   # the upstream merge, as the base
    assert "results/demo-reverse-sft-short/main/eval/compare.json" in out  # its scores start the chain
    assert "results/demo-reverse-dpo/data/pairs_built.jsonl" in out


def _planned(proc) -> set[tuple[str, str]]:
    """(rule, recipe) of each job a dry run plans."""
    jobs = set()
    for block in proc.stdout.split("\nrule ")[1:] + proc.stdout.split("\nlocalrule ")[1:]:
        name = block.split(":", 1)[0].strip()
        m = re.search(r"wildcards:.*recipe=([\w.-]+)", block.split("\n\n")[0])
        if m:
            jobs.add((name, m.group(1)))
    return jobs


@pytest.mark.slow
def test_sft_then_dpo_chain_runs_and_reruns_what_a_change_touches(tmp_path, tiny_llama_dir):
    work = make_workdir(tmp_path)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    tiny_train = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 64, "logging_steps": 1}
    small = {"evaluate": {"tasks": ["heldout"], "limit": 3, "max_gen_toks": 8}, "quantize": {"enabled": False},
             "format": {"eval_max_rows": 4}}
    _recipe(recipes, "tiny-sft", model={"base": str(tiny_llama_dir), "max_length": 256},
            train={"lora": {"r": 4}, "args": tiny_train, "sample_eval_rows": 2}, **small)
    _recipe(recipes, "tiny-dpo", model={"base": "recipe:tiny-sft", "max_length": 256},
            preference={"verifier": {"samples": 2, "max_new_tokens": 8, "limit": 6}},
            train={"objective": "dpo", "lora": {"r": 4}, "dpo": {"beta": 0.1},
                   "args": {**tiny_train, "max_length": 96}, "sample_eval_rows": 2}, **small)
    cfg = {"recipes": ["tiny-dpo"], "recipes_dir": str(recipes)}
    config = write_config(work, cfg)
    proc = snakemake(work, config, timeout=1500)
    assert proc.returncode == 0, failure_text(proc, work)

    dpo = work / "results" / "tiny-dpo"
    # curated alike, split alike: no held-out row of the chain is a row its upstream trained on
    sft_data = work / "results" / "tiny-sft" / "data"
    assert (dpo / "data" / "eval.jsonl").read_bytes() == (sft_data / "eval.jsonl").read_bytes()
    built = read_json(dpo / "data" / "pairs_built.json")
    assert built["prompts"] == built["all_correct"] + built["all_wrong"] + built["mixed"] == 6
    assert built["pairs"] == built["pairs_from_samples"] + built["pairs_from_reference"] > 0
    curated = read_json(dpo / "data" / "pairs_report.json")
    assert curated["rows_in"] == built["pairs"] == curated["rows_out"] + sum(curated["dropped"].values())
    metrics = read_json(dpo / "main" / "train" / "metrics.json")
    assert metrics["objective"] == "dpo" and metrics["steps"] == 2
    assert [h["step"] for h in metrics["histories"]["rewards/accuracies"]] == [1, 2]
    assert (dpo / "main" / "train" / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    compare = read_json(dpo / "main" / "eval" / "compare.json")
    assert [link["label"] for link in compare["chain"]] == ["base", "tiny-sft", "tiny-dpo"]
    card = (dpo / "main" / "model" / "merged" / "README.md").read_text()
    assert "## Lineage" in card and "tiny-sft/main | sft / lora" in card and "tiny-dpo/main | dpo / lora" in card
    runs = {r["tags"].get("tunesmith.stage"): r for r in mlflow_runs(work / "mlflow.db")
            if r["experiment"] == "tiny-dpo"}
    assert runs["merge"]["tags"]["tunesmith.upstream"] == "tiny-sft/main"
    upstream_merge = next(r for r in mlflow_runs(work / "mlflow.db")
                          if r["experiment"] == "tiny-sft" and r["tags"].get("tunesmith.stage") == "merge")
    assert runs["merge"]["tags"]["tunesmith.upstream.merge_run_id"] == upstream_merge["run_id"]

    # Only the downstream's beta changes: its training and what follows rerun, nothing before it.
    cfg["overrides"] = {"tiny-dpo": {"train": {"dpo": {"beta": 0.2}}}}
    planned = _planned(snakemake(work, write_config(work, cfg), "-n"))
    assert {("train", "tiny-dpo"), ("merge", "tiny-dpo"), ("evaluate", "tiny-dpo")} <= planned, planned
    assert not {job for job in planned if job[1] == "tiny-sft"}, planned
    assert ("build_pairs", "tiny-dpo") not in planned and ("format", "tiny-dpo") not in planned

    # The upstream's LoRA rank changes: it retrains, and the downstream chain follows.
    cfg["overrides"] = {"tiny-sft": {"train": {"lora": {"r": 8}}}}
    planned = _planned(snakemake(work, write_config(work, cfg), "-n"))
    assert {("train", "tiny-sft"), ("merge", "tiny-sft"), ("build_pairs", "tiny-dpo"), ("train", "tiny-dpo"),
            ("evaluate", "tiny-dpo")} <= planned, planned
