"""The lists that must agree: schema enums and registries, workflow rules and the stage list,
entry scripts and stages. Each mismatch is a feature added in one place and forgotten in another."""

from __future__ import annotations

import re
from pathlib import Path

from tunesmith import methods, objectives, pipeline
from tunesmith.recipe import load_schema

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


def test_every_rule_is_a_listed_stage_with_its_script():
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^rule (\w+):", smk.read_text(), flags=re.M))
    assert rules == set(pipeline.STAGE_ORDER)
    scripts = {p.name for p in (REPO / "scripts").glob("*.py")}
    assert scripts == {s.script for s in pipeline.STAGES}
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):(.*?)(?=^rule |\Z)", smk.read_text(), flags=re.M | re.S):
            assert f'scripts/{pipeline.stage(rule).script}"' in body, rule


def test_rows_reports_are_written_by_their_stage():
    text = (REPO / "workflow" / "rules" / "data.smk").read_text()
    for stage in pipeline.STAGES:
        if stage.rows_report:
            assert f"data/{stage.rows_report}" in text, stage.name
