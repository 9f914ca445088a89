"""lm-eval through the evaluate stages on local tasks with a tiny model: scores, limits and
deltas land in compare.json, lm-eval's own result files are kept, and MLflow gets the metrics."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest

from tunesmith import evaluation, scorecard
from tunesmith.errors import TunesmithError
from tunesmith.schema import fill_defaults, load_schema
from tunesmith.runner import call_stage, stage_function
from tunesmith.stageio import StageIO

REPO = Path(__file__).resolve().parents[1]


def _section(**evaluate_keys):
    schema = load_schema("recipe")
    return {"evaluate": fill_defaults(evaluate_keys, schema["properties"]["evaluate"], schema),
            "model": fill_defaults({}, schema["properties"]["model"], schema)}


@pytest.mark.slow
def test_local_task_scores_land_in_compare_json_and_mlflow(tmp_path, tiny_llama_dir, eval_split, mlflow_store):
    section = _section(tasks=["heldout"], limit=4, max_gen_toks=8, batch_size=4, log_samples=True)
    results = tmp_path / "results" / "r"
    base_json = results / "eval_base" / "base.json"
    call_stage(stage_function("evaluate_base"), StageIO(input={"base": str(tiny_llama_dir), "eval": eval_split["eval"],
                                           "template": eval_split["template"]},
                                    output={"scores": str(base_json)}, params={"section": section}, threads=2,
                                    wildcards={"recipe": "r"}, stage="evaluate_base"))
    out = results / "main" / "eval"
    contamination = tmp_path / "decontaminate_report.json"
    contamination.write_text(json.dumps({"action": "flag", "ngram": 13, "embedding": None, "tasks": {},
                                         "heldout": {"rows_checked": 20, "rows_matched": 1}, "not_checked": {}}))
    call_stage(stage_function("evaluate"), StageIO(input={"tuned": str(tiny_llama_dir), "base_scores": str(base_json),
                                           "contamination": str(contamination),
                                           "eval": eval_split["eval"], "template": eval_split["template"], "gguf": []},
                                    output={"scores": str(out / "tuned.json"), "compare": str(out / "compare.json"),
                                            "plot": str(out / "compare.png")},
                                    params={"section": section}, threads=2, wildcards={"recipe": "r", "variant": "main"},
                                    stage="evaluate"))

    heldout = json.loads((out / "compare.json").read_text())["tasks"]["heldout"]
    assert heldout["metric"] == "exact_match,none" and heldout["limit"] == 4
    assert 0 <= heldout["base"] <= 1 and heldout["delta"] == pytest.approx(heldout["tuned"] - heldout["base"])
    assert heldout["tuned"] == heldout["base"]  # same model, greedy: same answers
    # free-form figures beside exact match, led by the headline (the first task's primary metric by default)
    comparison = json.loads((out / "compare.json").read_text())
    assert list(comparison)[0] == "headline" and comparison["headline"]["metric"] == "exact_match"
    metrics = heldout["metrics"]
    assert set(metrics) == {"exact_match", "chrf", "ref_logprob", "ref_perplexity"}
    assert 0 <= metrics["chrf"]["tuned"] <= 100 and metrics["ref_logprob"]["tuned"] < 0
    assert metrics["ref_perplexity"]["tuned"] == pytest.approx(math.exp(-metrics["ref_logprob"]["tuned"]))
    assert metrics["ref_logprob"]["delta"] == 0 and metrics["ref_perplexity"]["higher_is_better"] is False
    assert heldout["contamination"] == {"rows": 1, "rows_checked": 20, "action": "flag", "method": "13-gram"}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # lm-eval's own results and samples are kept; the samples show the training chat format
    assert json.loads((out / "lm_eval" / "tuned" / "results_heldout.json").read_text())["results"]["heldout"]
    sample = json.loads((out / "lm_eval" / "tuned" / "samples_heldout.jsonl").read_text().splitlines()[0])
    assert sample["arguments"][0][0].endswith("<|im_end|>\n<|im_start|>assistant\n")
    task_yaml = (out / "tasks" / "tuned" / "heldout.yaml").read_text()
    assert str((out / "tasks" / "tuned" / "heldout.jsonl").resolve()) in task_yaml  # absolute data_files

    db = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"))
    metrics = {(stage, key): value for stage, key, value in db.execute(
        "select t.value, m.key, m.value from metrics m join tags t on t.run_uuid = m.run_uuid "
        "where t.key = 'tunesmith.stage'")}
    assert metrics[("evaluate_base", "tasks.heldout.base")] == heldout["base"]
    assert metrics[("evaluate", "tasks.heldout.tuned")] == heldout["tuned"]
    assert metrics[("evaluate", "tasks.heldout.delta")] == pytest.approx(heldout["delta"])
    assert metrics[("evaluate", "tasks.heldout.limit")] == 4
    assert metrics[("evaluate", "tasks.heldout.metrics.chrf.tuned")] == pytest.approx(heldout["metrics"]["chrf"]["tuned"])


def test_compare_keeps_limits_and_gguf_scores_in_order():
    base = {"model": "b", "tasks": {"heldout": {"metric": "exact_match,none", "score": 0.1, "limit": 50}}}
    tuned = {"model": "t", "tasks": {"heldout": {"metric": "exact_match,none", "score": 0.7, "limit": 50}},
             "gguf": {"Q8_0": {"tasks": {"heldout": {"score": 0.7}}}, "Q4_K_M": {"tasks": {"heldout": {"score": 0.6}}}}}
    c = scorecard.compare(base, tuned)["tasks"]["heldout"]
    assert c["delta"] == pytest.approx(0.6) and c["limit"] == 50 and c["base_limit"] == 50
    assert list(c["gguf"]) == ["Q8_0", "Q4_K_M"] and c["gguf_delta_vs_tuned"]["Q4_K_M"] == pytest.approx(-0.1)
    assert c["regressed"] is False


def test_a_tuned_model_below_its_base_is_marked_with_the_noise_of_the_difference():
    """A chained recipe's base is its upstream model: DPO scoring below SFT must say so."""
    base = {"model": "sft", "tasks": {"heldout": {"metric": "exact_match,none", "score": 0.96, "limit": 50}}}
    tuned = {"model": "dpo", "tasks": {"heldout": {"metric": "exact_match,none", "score": 0.94, "limit": 50}}}
    c = scorecard.compare(base, tuned)["tasks"]["heldout"]
    assert c["regressed"] is True
    assert c["delta_stderr"] == pytest.approx(((0.96 * 0.04 + 0.94 * 0.06) / 50) ** 0.5)


def test_bad_eval_row_names_file_and_line(tmp_path, eval_split, smollm2_dir):
    from transformers import AutoTokenizer

    bad = tmp_path / "eval.jsonl"
    bad.write_text(Path(eval_split["eval"]).read_text() + '{"id": 9, "prompt": "not a list", "answer": "x"}\n')
    with pytest.raises(TunesmithError, match=r"eval.jsonl, row 7: missing field .completion."):
        evaluation.render_heldout(bad, eval_split["template"], AutoTokenizer.from_pretrained(smollm2_dir))


class _CountingLM:
    """Stands in for HFLM / LlamaCppLM: log-likelihood -1 per continuation character."""

    def loglikelihood(self, requests):
        return [(-float(len(r.args[1])), False) for r in requests]

    def _encode_pair(self, context, continuation):
        return list(context), list(continuation)


def test_reference_likelihood_is_token_weighted_and_skips_empty_answers():
    rows = [{"prompt_text": "p", "answer": "abcd"}, {"prompt_text": "q", "answer": "ab"},
            {"prompt_text": "r", "answer": ""}]
    ref = evaluation.reference_likelihood(_CountingLM(), rows)
    assert ref == {"ref_logprob": -1.0, "ref_perplexity": pytest.approx(math.e), "ref_tokens": 6}


def test_compare_leads_with_the_headline_metric_and_names_the_metrics_a_task_has():
    def scores(em, chrf, lp, label):
        return {"model": label, "tasks": {"heldout": {
            "metric": "exact_match,none", "score": em, "limit": 20,
            "metrics": {"exact_match": em, "chrf": chrf, "ref_logprob": lp, "ref_perplexity": math.exp(-lp)}}}}
    tuned = scores(0.0, 41.0, -0.6, "t")
    tuned["gguf"] = {"Q8_0": {"tasks": {"heldout": {"score": 0.0, "metrics": {"exact_match": 0.0, "chrf": 40.0}}}}}
    c = scorecard.compare(scores(0.0, 30.0, -0.9, "b"), tuned, {"task": "heldout", "metric": "chrf"})
    assert list(c)[0] == "headline"
    assert c["headline"] == {"task": "heldout", "metric": "chrf", "base": 30.0, "tuned": 41.0, "delta": 11.0,
                             "higher_is_better": True, "gguf": {"Q8_0": 40.0}, "chosen_by": "recipe",
                             "reason": "evaluate.headline in the recipe"}
    m = c["tasks"]["heldout"]["metrics"]
    assert m["exact_match"]["delta"] == 0 and m["ref_logprob"]["delta"] == pytest.approx(0.3)
    assert m["ref_perplexity"]["delta"] < 0 and "gguf" not in m["ref_logprob"]  # Q8_0 had no log-likelihood here
    with pytest.raises(TunesmithError, match=r"did you mean 'chrf'\?.*exact_match, chrf"):
        scorecard.compare(scores(0, 1, -1, "b"), scores(0, 1, -1, "t"), {"task": "heldout", "metric": "chrF"})


def test_a_headline_the_recipe_cannot_have_stops_it_before_any_job(tmp_path):
    from tunesmith.errors import RecipeError
    from tunesmith.recipe import load_recipe

    path = tmp_path / "r.yaml"
    for headline, message in (({"task": "heldot", "metric": "chrf"}, r"did you mean 'heldout'\?"),
                              ({"task": "heldout", "metric": "ref_logprb"}, r"did you mean 'ref_logprob'\?")):
        path.write_text(json.dumps({"dataset": {"source": "d.jsonl"}, "evaluate": {"headline": headline}}))
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)
