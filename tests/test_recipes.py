"""Recipes and config.yaml: every shipped recipe validates and plans; bad ones stop before any
job runs, with the file and key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.errors import RecipeError
from tunesmith.recipe import check_config, load_config, load_recipe, variants

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def test_five_seed_recipes_and_the_default_ship():
    names = {p.stem for p in RECIPES}
    assert {"platypus-llama2-qlora", "alpaca-gpt2-lora", "dolly-pirate-llama3.2-unsloth",
            "scratch-llama", "gsm8k-smollm2-lora", "demo-reverse-lora"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe["name"] == path.stem
    # Defaults are filled from the schema, so every stage can index its section directly.
    assert recipe["train"]["args"]["seed"] is not None
    assert recipe["dedupe"]["threshold"] > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_says_how_to_run_it(path):
    head = path.read_text().splitlines()[:8]
    assert head[0].startswith(f"# {path.stem}")
    assert any("snakemake" in line for line in head), "header comment must give the command"


def test_default_config_validates_and_names_existing_recipes():
    cfg = load_config(REPO / "config.yaml")
    for name in cfg["recipes"]:
        assert (REPO / "recipes" / f"{name}.yaml").is_file()


def _write(tmp_path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"}, "train": {"lora": {"rr": 8}}})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "train.lora.rr" in msg and "did you mean 'r'" in msg


def test_wrong_type_is_named(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"}, "train": {"args": {"learning_rate": "fast"}}})
    with pytest.raises(RecipeError, match=r"train\.args\.learning_rate.*number"):
        load_recipe(path)


def test_bad_enum_lists_allowed_values(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"}, "train": {"method": "qlorax"}})
    with pytest.raises(RecipeError, match=r"train\.method.*full, lora, qlora, unsloth"):
        load_recipe(path)


def test_missing_dataset_source_is_named(tmp_path):
    path = _write(tmp_path, {"kind": "sft"})
    with pytest.raises(RecipeError, match=r"dataset\.source.*required"):
        load_recipe(path)


def test_trust_remote_code_needs_a_reason(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"}, "model": {"trust_remote_code": True}})
    with pytest.raises(RecipeError, match="trust_remote_code_reason"):
        load_recipe(path)


def test_defaults_fill_list_items_too(tmp_path):
    """filter.regex rules get their field and action from the schema like every other key."""
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"}, "filter": {"regex": [{"name": "n", "pattern": "x"}]}})
    assert load_recipe(path)["filter"]["regex"] == [{"name": "n", "pattern": "x", "field": "output", "action": "drop"}]


def test_whitespace_reason_for_remote_code_is_refused(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"},
                             "model": {"trust_remote_code": True, "trust_remote_code_reason": "  \t "}})
    with pytest.raises(RecipeError, match="trust_remote_code_reason"):
        load_recipe(path)
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"},
                             "model": {"trust_remote_code": True, "trust_remote_code_reason": "custom MoE layers"}})
    assert load_recipe(path)["model"]["trust_remote_code"] is True


def test_duplicate_recipe_key_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("dataset:\n  source: x.jsonl\ntrain:\n  method: lora\n  args: {seed: 1}\n  method: full\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "'method'" in msg and "lines 4 and 6" in msg
    # The same key under two different parents is fine.
    path.write_text("dataset:\n  source: x.jsonl\nformat:\n  seed: 1\nselect:\n  seed: 2\n")
    assert load_recipe(path)["select"]["seed"] == 2


def test_duplicate_key_in_flow_mapping_and_config(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text("dataset: {source: x.jsonl, source: y.jsonl}\n")
    with pytest.raises(RecipeError, match=r"key 'source' is written twice, at lines 1 and 1"):
        load_recipe(path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("recipes: [demo-reverse-lora]\noffline: true\nresults_dir: out\noffline: false\n")
    with pytest.raises(RecipeError, match=r"config.yaml: key 'offline' is written twice, at lines 2 and 4"):
        load_config(cfg)
    with pytest.raises(RecipeError, match=r"key 'offline' is written twice"):
        check_config({"recipes": ["demo-reverse-lora"]}, "config.yaml", files=[cfg])


def test_sweep_expands_into_named_variants(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"},
                             "sweep": {"train.lora.r": [8, 16], "train.args.learning_rate": [0.0001, 0.0002]}})
    out = variants(load_recipe(path))
    assert len(out) == 4
    assert out["learning_rate-0.0001__r-16"]["train"]["lora"]["r"] == 16


def test_sweep_key_outside_train_is_refused(tmp_path):
    path = _write(tmp_path, {"dataset": {"source": "x.jsonl"}, "sweep": {"dedupe.threshold": [0.9]}})
    with pytest.raises(RecipeError, match="dedupe.threshold"):
        load_recipe(path)


def _snakemake(*args, cwd=REPO):
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bad_recipe_stops_the_workflow_before_any_job(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "broken.yaml").write_text("dataset:\n  source: x.jsonl\nfilter:\n  max_tokenz: 5\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"recipes": ["broken"], "recipes_dir": str(recipes)}))
    proc = _snakemake("-n", "--configfile", str(cfg), "--directory", str(tmp_path),
                      "--snakefile", str(REPO / "Snakefile"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "broken.yaml" in out and "filter.max_tokenz" in out and "did you mean 'max_tokens'" in out
    assert "jobid" not in out  # nothing was scheduled


def test_bad_config_key_stops_the_workflow(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"recipes": ["demo-reverse-lora"], "trackin": {"uri": None}}))
    proc = _snakemake("-n", "--configfile", str(cfg))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "trackin" in out and "did you mean 'tracking'" in out


def test_unknown_recipe_name_suggests_the_closest_recipes(tmp_path):
    with pytest.raises(RecipeError, match=r"no such recipe file; did you mean 'demo-reverse-lora'"):
        load_recipe(REPO / "recipes" / "demo-reverse-lorra.yaml")
    # Nothing close: the recipes that are there are listed instead.
    (tmp_path / "alpha.yaml").write_text("dataset: {source: x.jsonl}\n")
    with pytest.raises(RecipeError, match=r"zzz\.yaml: no such recipe file; recipes in .*: alpha$"):
        load_recipe(tmp_path / "zzz.yaml")


def test_unknown_recipe_in_config_stops_the_workflow_with_a_suggestion():
    # The name given on the command line, as the README tells: no job runs, the closest name is said.
    proc = _snakemake("-n", "--config", "recipes=[gsm8k-lora]")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "recipes/gsm8k-lora.yaml: no such recipe file; did you mean 'gsm8k-smollm2-lora'?" in out
    assert "jobid" not in out


def test_dry_run_plans_every_recipe():
    names = ",".join(p.stem for p in RECIPES)
    proc = _snakemake("-n", "--cores", "1", "--config", f"recipes=[{names}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in RECIPES:
        assert f"results/{path.stem}/" in proc.stdout
    for rule in ("download", "tokenize_count", "filter", "dedupe", "select", "format", "train",
                 "merge", "evaluate", "quantize", "train_tokenizer", "pretrain", "build_pairs", "curate_pairs"):
        assert f"rule {rule}:" in proc.stdout or f"localrule {rule}:" in proc.stdout, rule


def test_gpt2_recipe_targets_c_attn_and_q_proj_lists_what_gpt2_has():
    """GPT-2 fuses q/k/v into Conv1D c_attn: the recipe's targets fit a GPT-2 architecture, q_proj does not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.errors import TunesmithError
    from tunesmith.methods import check_target_modules

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    recipe = load_recipe(REPO / "recipes" / "alpaca-gpt2-lora.yaml")
    assert check_target_modules(gpt2, recipe["train"]["lora"]["target_modules"]) == ["c_attn"]
    with pytest.raises(TunesmithError, match=r"q_proj.*c_attn, c_fc, c_proj"):
        check_target_modules(gpt2, ["q_proj", "v_proj"])
