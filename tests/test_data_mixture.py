"""dataset.sources: two sources with their own columns and weights. Rows keep their source, the
held-out split is taken per source before the train rows are resampled to the weights, no held-out
row reaches train (checked by hash), and the shares obtained are reported beside those requested.
Library level, no model: about a second."""

from __future__ import annotations

import hashlib
import json

import pytest

from tunesmith.data import contamination as decon
from tunesmith.data import formatting, load
from tunesmith.errors import RecipeError
from tunesmith.recipe import load_recipe
from tunesmith.schema import section_defaults


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def mixture(tmp_path):
    maths = _write(tmp_path / "maths.jsonl", [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}"}
                                              for i in range(120)])
    code = _write(tmp_path / "code.jsonl", [{"instruction": f"Write a function number {i}", "response": f"def f{i}(): pass"}
                                            for i in range(30)])
    return section_defaults("dataset", {"sources": [
        {"source": maths, "columns": {"instruction": "question", "input": None, "output": "answer"}, "weight": 1},
        {"source": code, "name": "code", "columns": {"output": "response"}, "weight": 1, "max_rows": 25}]})


def _hash(row):
    return hashlib.sha256(json.dumps([row["prompt"], row["completion"]], sort_keys=True).encode()).hexdigest()


def test_a_weighted_mixture_splits_per_source_then_resamples_train_to_the_weights(mixture):
    loaded = load.load_mixture(mixture, offline=True)
    frame = loaded.frame
    assert loaded.info["rows_by_source"] == {"maths": 120, "code": 25}  # code capped at max_rows
    assert frame["id"].is_unique and set(frame["source"]) == {"maths", "code"}
    fmt = section_defaults("format", {"eval_fraction": 0.1})
    kept, _ = decon.run(frame, {}, section_defaults("decontaminate"), fmt)
    train, evals = formatting.build(kept, fmt)
    assert {r["source"] for r in evals} == {"maths", "code"}  # each source is held out from
    assert sum(r["source"] == "code" for r in evals) == 2 and sum(r["source"] == "maths" for r in evals) == 12
    mixed, shares = formatting.mix(train, load.mixture_weights(mixture), fmt["seed"])
    assert shares["requested"] == {"maths": 0.5, "code": 0.5}
    assert shares["obtained"] == pytest.approx({"maths": 0.5, "code": 0.5}, abs=0.01)
    assert shares["rows"]["code"]["repeated"] > 0 and abs(len(mixed) - len(train)) <= 1  # code up-sampled
    assert not {_hash(r) for r in evals} & {_hash(r) for r in mixed}  # no held-out row in train


def test_mixture_recipes_are_checked(tmp_path):
    def recipe(dataset):
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({"dataset": dataset}))
        return path

    with pytest.raises(RecipeError, match="both set"):
        load_recipe(recipe({"source": "a.jsonl", "sources": [{"source": "b.jsonl"}]}))
    with pytest.raises(RecipeError, match=r"sources.1 has no weight"):
        load_recipe(recipe({"sources": [{"source": "a.jsonl", "weight": 2}, {"source": "b.jsonl"}]}))
    with pytest.raises(RecipeError, match="two sources named a"):
        load_recipe(recipe({"sources": [{"source": "x/a.jsonl"}, {"source": "y/a.jsonl"}]}))
    assert load_recipe(recipe({"sources": [{"source": "a.jsonl"}]}))["dataset"]["sources"][0]["columns"]["output"] == "output"
