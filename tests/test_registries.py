"""The lists that must agree: schema enums and registries, workflow rules and the stage list,
entry scripts and stages. Each mismatch is a feature added in one place and forgotten in another."""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith import methods, objectives, pipeline
from tunesmith.schema import load_schema

REPO = Path(__file__).resolve().parents[1]


def _train_enum(key: str) -> set[str]:
    return set(load_schema("recipe")["properties"]["train"]["properties"][key]["enum"])


def test_every_method_in_the_schema_has_an_entry_and_back():
    assert _train_enum("method") == set(methods.METHODS)
    for name, entry in methods.METHODS.items():
        assert entry.name == name and callable(entry.load) and entry.default_optim
        assert entry.cuda_why or not entry.needs_cuda  # a refusal always says why


def test_every_objective_in_the_schema_has_a_module_and_back():
    # causal-lm is chosen by `kind: pretrain`, not by train.objective.
    assert _train_enum("objective") == set(objectives.OBJECTIVES) - {"causal-lm"}
    for name in objectives.OBJECTIVES:
        module = objectives.get(name)
        assert module.NAME == name
        for attr in ("config_class", "config_kwargs", "build_trainer", "dataset"):
            assert callable(getattr(module, attr)), (name, attr)


def test_every_rule_is_a_listed_stage_with_its_module():
    """Rule x runs tunesmith/stages/x.py through the one generic script; no stage module without its rule."""
    import importlib

    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^rule (\w+):", smk.read_text(), flags=re.M))
    assert rules == set(pipeline.STAGE_ORDER)
    modules = {p.stem for p in (REPO / "tunesmith" / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == rules
    for name in rules:
        assert callable(importlib.import_module(f"tunesmith.stages.{name}").run), name
    assert {p.name for p in (REPO / "scripts").glob("*.py")} == {"stage.py"}
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):(.*?)(?=^rule |\Z)", smk.read_text(), flags=re.M | re.S):
            assert 'script:\n        "../../scripts/stage.py"' in body, rule


def test_every_objective_declares_its_inputs_and_prepare():
    for name in objectives.OBJECTIVES:
        module = objectives.get(name)
        assert isinstance(module.INPUTS, dict), name
        if name != "causal-lm":  # kind: pretrain reads its corpus in the pretrain rule
            assert callable(module.prepare) and "train" in module.INPUTS, name


def test_rows_reports_are_written_by_their_stage():
    text = (REPO / "workflow" / "rules" / "data.smk").read_text()
    for stage in pipeline.STAGES:
        if stage.rows_report:
            assert f"data/{stage.rows_report}" in text, stage.name


def test_every_rule_reruns_on_its_own_code():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):(.*?)(?=^rule |\Z)", smk.read_text(), flags=re.M | re.S):
            assert f'code=stage_code("{rule}")' in body, rule


def test_code_digest_follows_the_library_code_a_stage_runs(tmp_path):
    import shutil

    for sub in ("tunesmith",):
        shutil.copytree(REPO / sub, tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER}
    assert tmp_path / "tunesmith" / "trainer.py" in pipeline.code_files("train", tmp_path)
    assert tmp_path / "tunesmith" / "objectives" / "sft.py" in pipeline.code_files("train", tmp_path)

    with open(tmp_path / "tunesmith" / "merging.py", "a") as fh:
        fh.write("\n# an edit\n")
    after = {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER}
    assert {s for s in before if before[s] != after[s]} == {"merge"}

    with open(tmp_path / "tunesmith" / "stages" / "quantize.py", "a") as fh:  # a stage's own module
        fh.write("\n# an edit\n")
    again = {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER}
    assert {s for s in after if after[s] != again[s]} == {"quantize"}
    after = again

    with open(tmp_path / "tunesmith" / "tracking.py", "a") as fh:  # plumbing: reruns nothing
        fh.write("\n# an edit\n")
    assert {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER} == after
