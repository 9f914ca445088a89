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


def test_every_rule_reruns_on_its_own_code():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):(.*?)(?=^rule |\Z)", smk.read_text(), flags=re.M | re.S):
            assert f'code=stage_code("{rule}")' in body, rule


def test_code_digest_follows_the_library_code_a_stage_runs(tmp_path):
    import shutil

    for sub in ("tunesmith", "scripts"):
        shutil.copytree(REPO / sub, tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER}
    assert tmp_path / "tunesmith" / "trainer.py" in pipeline.code_files("train", tmp_path)
    assert tmp_path / "tunesmith" / "objectives" / "sft.py" in pipeline.code_files("train", tmp_path)

    with open(tmp_path / "tunesmith" / "merging.py", "a") as fh:
        fh.write("\n# an edit\n")
    after = {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER}
    assert {s for s in before if before[s] != after[s]} == {"merge"}

    with open(tmp_path / "tunesmith" / "tracking.py", "a") as fh:  # plumbing: reruns nothing
        fh.write("\n# an edit\n")
    assert {s: pipeline.code_digest(s, tmp_path) for s in pipeline.STAGE_ORDER} == after
