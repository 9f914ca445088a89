"""Task resolution offline: lm-eval's gsm8k reused over a local file, and a clear error for a
built-in task whose dataset would come from the hub."""

from __future__ import annotations

import pytest

from tunesmith import evaluation, tasks
from tunesmith.errors import TunesmithError
from tunesmith.schema import section_defaults


def _no_model():
    from lm_eval.api.model import LM

    class NoModel(LM):  # never called: these tasks fail before any request reaches a model
        def loglikelihood(self, requests):
            raise AssertionError("model called")

        loglikelihood_rolling = generate_until = loglikelihood

    return NoModel()


@pytest.fixture(scope="module")
def builtin_tasks(tmp_path_factory):
    """lm-eval's index of its built-in tasks: built once (it reads ~15k files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tmp_path_factory.mktemp("no-local-tasks")))


@pytest.fixture(scope="module")
def gsm8k_file():
    path = tasks.default_gsm8k_file()
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared/data beside the checkout)")
    return path


def test_gsm8k_local_reuses_lm_eval_definition_over_local_file(tmp_path, gsm8k_file):
    from lm_eval.tasks import TaskManager, get_task_dict

    evaluation.write_gsm8k_task(tmp_path, data_files=gsm8k_file)
    # as evaluation.score builds it for local tasks: without lm-eval's built-in index
    task = get_task_dict(["gsm8k_local"], TaskManager(include_path=str(tmp_path), include_defaults=False))["gsm8k_local"]
    docs = list(task.test_docs())
    assert len(docs) == 1319
    assert task.doc_to_text(docs[0]).startswith("Question: Janet")
    assert task.doc_to_target(docs[0]).endswith("#### 18")
    assert task.config.num_fewshot == 5 and task.config.fewshot_split == "train"  # from train.jsonl beside it
    assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]


def test_gsm8k_local_missing_file_says_how_to_point_it(tmp_path):
    with pytest.raises(TunesmithError, match="data_files"):
        evaluation.write_gsm8k_task(tmp_path, data_files=tmp_path / "nope.jsonl")


def test_builtin_task_offline_error_names_task_and_local_alternative(tmp_path, monkeypatch, builtin_tasks):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TUNESMITH_OFFLINE", "1")
    tm = builtin_tasks
    spec = tasks.task_specs(section_defaults("evaluate", {"tasks": ["arc_easy"], "limit": 2}))[0]
    with pytest.raises(TunesmithError) as err:
        evaluation.run_task(_no_model(), spec, tm, tmp_path, label="base")  # fails at the dataset, before the model
    text = str(err.value)
    assert "'arc_easy'" in text and "offline" in text and "gsm8k_local" in text and "heldout" in text
    assert "Traceback" not in text


def test_unknown_task_name_is_clear(tmp_path, builtin_tasks):
    spec = tasks.task_specs(section_defaults("evaluate", {"tasks": ["no_such_task_xyz"], "limit": 2}))[0]
    with pytest.raises(TunesmithError, match="unknown task 'no_such_task_xyz'"):
        evaluation.run_task(_no_model(), spec, builtin_tasks, tmp_path, label="base")


@pytest.mark.slow
def test_score_model_on_gsm8k_local(tmp_path, tiny_llama_dir, gsm8k_file):
    """The function the GSM8K recipe uses for its base figure; limit recorded next to the score."""
    out = evaluation.score_model(tiny_llama_dir, [{"name": "gsm8k_local", "max_gen_toks": 8, "num_fewshot": 0}],
                               tmp_path, limit=2, label="base")
    g = out["tasks"]["gsm8k_local"]
    assert g["metric"] == "exact_match,strict-match" and g["limit"] == 2 and g["score"] == 0.0
