"""A two-value sweep (tests/recipes/tiny-sweep.yaml: train.lora.r [8, 16]) plans two train runs that
share one set of data jobs. Dry run only (snakemake -n): seconds, no model."""

from __future__ import annotations

import re

from workflow_helpers import REPO, make_workdir, snakemake, write_config

DATA_RULES = ("download", "tokenize_count", "filter", "dedupe", "select", "format", "evaluate_base")


def _job_counts(out: str) -> dict[str, int]:
    table = out[out.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_two_value_sweep_plans_two_trainings_on_one_dataset(tmp_path):
    work = make_workdir(tmp_path)
    config = write_config(work, {
        "recipes": ["tiny-sweep"],
        "recipes_dir": str(REPO / "tests" / "recipes"),
        # gpus: 1 as on a GPU cluster (LoRA alone asks for none): both trainings must carry it.
        "overrides": {"tiny-sweep": {"dataset": {"source": str(REPO / "tests" / "data" / "tiny_reverse.jsonl")},
                                     "train": {"gpus": 1}}},
    })
    proc = snakemake(work, config, "-n", "--forceall", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    counts = _job_counts(out)
    for rule in DATA_RULES:
        assert counts.get(rule) == 1, (rule, counts)
    for rule in ("train", "merge", "evaluate"):
        assert counts.get(rule) == 2, (rule, counts)
    assert counts.get("compare") == 1, counts
    train_blocks = re.findall(r"^rule train:\n(.*?resources:[^\n]*)", out, re.S | re.M)
    variants = sorted(re.search(r"variant=([\w.=-]+)", block).group(1) for block in train_blocks)
    assert variants == ["r-16", "r-8"]
    for block in train_blocks:
        assert re.search(r"gpu=1\b", block), block
    # both variants read the same formatted data
    assert out.count("results/tiny-sweep/data/train.jsonl") >= 3


# ------------------------------------------------ sweep values and variant names (issue 27)

def _validate(tmp_path, sweep: dict) -> tuple[int, str]:
    import contextlib
    import io

    import yaml

    from tunesmith import cli

    path = tmp_path / "swept.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"source": str(REPO / "tests" / "data" / "tiny_reverse.jsonl")},
                                    "sweep": sweep}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["validate", "--config", str(tmp_path / "none.yaml"), str(path)])
    return rc, out.getvalue()


def test_a_sweep_value_is_validated_against_the_schema(tmp_path):
    """Before: batch size 0 in a sweep passed `tunesmith validate` (OK) and failed in the trainer."""
    rc, out = _validate(tmp_path, {"train.args.per_device_train_batch_size": [4, 0]})
    assert rc == 1, out
    assert "train.args.per_device_train_batch_size: 0" in out and "minimum of 1" in out, out
    rc, out = _validate(tmp_path, {"train.lora.dropout": [0.1, "high"]})
    assert rc == 1 and "train.lora.dropout: 'high'" in out, out
    rc, out = _validate(tmp_path, {"train.args.per_device_train_batch_size": [2, 4]})
    assert rc == 0 and "per_device_train_batch_size-2" in out, out


def test_a_variant_name_must_be_a_safe_folder_name(tmp_path):
    """Before: a value such as '../x' became the variant 'lr_scheduler_type-../x', a path component."""
    rc, out = _validate(tmp_path, {"train.args.lr_scheduler_type": ["linear", "../../x"]})
    assert rc == 1 and "lr_scheduler_type-../../x" in out and "letters, digits" in out, out
