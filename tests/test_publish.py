"""The publish plan, built offline: which files go to which Hub repository, and model cards whose
metadata (base_model, license, tags, a model-index with the eval scores) huggingface_hub parses
back. Offline, or without HF_TOKEN, publishing refuses before any upload and names every
repository it did not push. No network, no model: seconds."""

from __future__ import annotations

import json
import logging
import os

import pytest

from tunesmith import publishing
from tunesmith.errors import TunesmithError
from tunesmith.stageio import StageIO
from tunesmith.stages import publish as publish_stage


@pytest.fixture
def artifacts(tmp_path) -> dict[str, str]:
    adapter, merged, gguf = (tmp_path / "model" / "trained", tmp_path / "model" / "merged", tmp_path / "gguf")
    for folder in (adapter, merged, gguf):
        folder.mkdir(parents=True)
        (folder / ".snakemake_timestamp").write_text("")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "checkpoints").mkdir()
    (adapter / "checkpoints" / "optimizer.pt").write_bytes(b"\0")
    (merged / "model.safetensors").write_bytes(b"\0" * 128)
    (merged / "config.json").write_text("{}")
    (merged / "README.md").write_text("---\nbase_model: smollm2-135m-instruct\n---\n\n# demo\n\n## Data\n\n540 rows\n")
    (merged / "tunesmith_lineage.json").write_text(json.dumps([{"recipe": "demo", "base": "resources/models/smollm2-135m-instruct"}]))
    for name in ("model-f16.gguf", "model-Q8_0.gguf"):
        (gguf / name).write_bytes(b"GGUF")
        (gguf / name.replace(".gguf", ".Modelfile")).write_text(f"FROM ./{name}\n")
    (gguf / "report.json").write_text("{}")
    (gguf / "smoke.txt").write_text("hi")
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps({"tasks": {"heldout": {"base": 0.0, "tuned": 0.94, "metric": "exact_match,none",
                                                         "gguf": {"F16": 0.94, "Q8_0": 0.92},
                                                         "contamination": {"rows": 3, "rows_checked": 540,
                                                                           "action": "flag", "method": "13-gram"},
                                                         "metrics": {"exact_match": {"base": 0.0, "tuned": 0.94,
                                                                                     "gguf": {"F16": 0.94, "Q8_0": 0.92}},
                                                                     "ref_logprob": {"base": -1.5, "tuned": -0.25,
                                                                                     "gguf": {"Q8_0": -0.3}}}}}}))
    return {"adapter": str(adapter), "merged": str(merged), "gguf": str(gguf), "compare": str(compare)}


SECTION = {"enabled": True, "repos": {"adapter": "me/demo-lora", "merged": "me/demo", "gguf": "me/demo-GGUF"},
           "private": True, "commit_message": None, "license": "apache-2.0", "tags": ["word-reversal"]}


def _plan(artifacts, section=SECTION, dataset="data/demo/reverse_words.jsonl"):
    return publishing.plan(recipe="demo", variant="main", section=section, compare=artifacts["compare"],
                        folders={k: artifacts[k] for k in publishing.KINDS}, dataset_source=dataset)


def test_the_plan_names_files_per_repository_and_cards_whose_metadata_parses(artifacts):
    from huggingface_hub import ModelCard

    plan = _plan(artifacts)
    repos = {r["kind"]: r for r in plan["repos"]}
    assert list(repos["adapter"]["files"]) == ["adapter_config.json", "adapter_model.safetensors"]  # no checkpoints
    assert list(repos["merged"]["files"]) == ["config.json", "model.safetensors", "tunesmith_lineage.json"]
    assert list(repos["gguf"]["files"]) == ["model-Q8_0.Modelfile", "model-Q8_0.gguf", "model-f16.Modelfile",
                                            "model-f16.gguf", "report.json"]
    assert repos["merged"]["files"]["model.safetensors"]["bytes"] == 128
    assert all(r["private"] for r in plan["repos"])
    assert repos["gguf"]["commit_message"] == "tunesmith: demo/main gguf"

    merged = ModelCard(repos["merged"]["card"]).data
    assert merged.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and merged.license == "apache-2.0"
    assert {"tunesmith", "merged", "word-reversal"} <= set(merged.tags) and merged.library_name == "transformers"
    assert merged.datasets is None  # a local file is no Hub dataset
    [result] = merged.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("heldout", "exact_match", 0.94)
    gguf = ModelCard(repos["gguf"]["card"]).data
    assert sorted((r.metric_name, r.metric_value) for r in gguf.eval_results) == [
        ("exact_match (F16)", 0.94), ("exact_match (Q8_0)", 0.92)]
    assert "## Data" in repos["gguf"]["card"] and "tunesmith serve model/model-Q8_0.gguf" in repos["gguf"]["card"]
    # every card states the scores base -> tuned -> quantized, the recipe and its commit
    for repo in plan["repos"]:
        assert ("| heldout | exact_match | 0.000 | 0.940 | 0.940 | 0.920 | 3 of 540 (13-gram, flag) |"
                in repo["card"]), repo["kind"]
        assert "tunesmith recipe `demo` (variant `main`) at git commit" in repo["card"]
    assert ModelCard(repos["adapter"]["card"]).data.library_name == "peft"
    hub = _plan(artifacts, dataset="HuggingFaceH4/no_robots")
    assert ModelCard(hub["repos"][0]["card"]).data.datasets == ["HuggingFaceH4/no_robots"]


def test_offline_or_tokenless_publishing_pushes_nothing_and_names_what_was_not_pushed(artifacts, monkeypatch):
    plan = _plan(artifacts)
    with pytest.raises(TunesmithError, match=r"offline .* nothing pushed\. Not pushed: me/demo-lora \(adapter, 2 files\), "
                                             r"me/demo \(merged, 3 files\), me/demo-GGUF \(gguf, 5 files\)"):
        publishing.push(plan, offline=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(TunesmithError, match="HF_TOKEN is not set .* Not pushed: me/demo-lora"):
        publishing.push(plan, offline=False)
    with pytest.raises(TunesmithError, match="publish.license"):
        _plan(artifacts, {**SECTION, "license": None})
    with pytest.raises(TunesmithError, match="publish.repos: name at least one"):
        _plan(artifacts, {**SECTION, "repos": {}})


def test_the_stage_writes_the_plan_before_refusing_offline(artifacts, tmp_path, monkeypatch, caplog):
    # A token is set, as on a machine that publishes: its value must reach no file the stage
    # writes, no card, no message. (Looking for the name HF_TOKEN with no token set proved nothing.)
    token = "hf_sentinel" + os.urandom(12).hex()
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    out = tmp_path / "publish" / "plan.json"
    io = StageIO(input={**{k: artifacts[k] for k in publishing.KINDS}, "compare": artifacts["compare"]},
                 output={"plan": str(out)}, params={"section": {"publish": SECTION}, "dataset_source": None},
                 wildcards={"recipe": "demo", "variant": "main"}, stage="publish")
    with caplog.at_level(logging.DEBUG), pytest.raises(TunesmithError, match="Not pushed") as err:
        publish_stage.run(io)  # offline: TUNESMITH_OFFLINE unset means offline
    assert not out.exists()  # the rule's output means "pushed"
    pending = json.loads(out.with_suffix(".pending.json").read_text())
    assert [r["repo_id"] for r in pending["repos"]] == ["me/demo-lora", "me/demo", "me/demo-GGUF"]
    assert all(r["card"] for r in pending["repos"])  # the cards were written, and are searched below
    publishing.local_cards(recipe="demo", variant="main", section={"license": None, "tags": []},
                           folders={k: artifacts[k] for k in publishing.KINDS}, compare=artifacts["compare"],
                           dataset_source=None, out_dir=tmp_path / "cards")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert out.with_suffix(".pending.json") in written and len(list((tmp_path / "cards").iterdir())) == 3
    for path in written:
        assert token.encode() not in path.read_bytes(), path
    assert token not in str(err.value) and token not in caplog.text


def test_local_cards_state_lineage_scores_contamination_and_how_to_run_each_artifact(artifacts, tmp_path):
    """The cards stage: without publishing, each artifact on disk gets the card publish would push,
    with instructions for the local files."""
    from huggingface_hub import ModelCard

    out = tmp_path / "cards"
    result = publishing.local_cards(recipe="demo", variant="main", section={"license": None, "tags": []},
                                 folders={k: artifacts[k] for k in publishing.KINDS}, compare=artifacts["compare"],
                                 dataset_source="data/demo/reverse_words.jsonl", out_dir=out)
    assert result.metrics["cards"] == 3 and sorted(p.name for p in out.iterdir()) == ["adapter.md", "gguf.md", "merged.md"]
    for kind in publishing.KINDS:
        text = (out / f"{kind}.md").read_text()
        assert ModelCard(text).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct", kind
        assert "## Data" in text and "540 rows" in text  # lineage from the merge card
        assert "| 0.000 | 0.940 |" in text and "3 of 540 (13-gram, flag)" in text
        assert "| heldout | ref_logprob | -1.500 | -0.250 | - | -0.300 |  |" in text  # every metric, not only the headline
        assert "at git commit" in text
    assert f"tunesmith serve {artifacts['gguf']}/model-Q8_0.gguf" in (out / "gguf.md").read_text()
    assert f'AutoPeftModelForCausalLM.from_pretrained("{artifacts["adapter"]}")' in (out / "adapter.md").read_text()
    assert f'pipeline("text-generation", "{artifacts["merged"]}")' in (out / "merged.md").read_text()


# ------------------------------------------------ sweeps and visibility (issue 27)

def test_each_sweep_variant_pushes_to_its_own_repositories(artifacts):
    """Before: every variant of a sweep planned the same three repositories; the last push won."""
    plans = [publishing.plan(recipe="demo", variant=v, section=SECTION, compare=artifacts["compare"],
                             folders={k: artifacts[k] for k in publishing.KINDS}, dataset_source=None)
             for v in ("r-8", "r-16__learning_rate-0.0002", "main")]
    ids = [[r["repo_id"] for r in p["repos"]] for p in plans]
    assert ids[0] == ["me/demo-lora-r-8", "me/demo-r-8", "me/demo-GGUF-r-8"]
    assert ids[1][1] == "me/demo-r-16__learning_rate-0.0002"
    assert ids[2] == ["me/demo-lora", "me/demo", "me/demo-GGUF"]  # no sweep: the names as written
    assert "me/demo-r-8" in plans[0]["repos"][1]["card"]
    with pytest.raises(TunesmithError, match="publish.repos.adapter: the sweep variant .* the Hub refuses"):
        publishing.plan(recipe="demo", variant="r-" + "8" * 100, section=SECTION, compare=artifacts["compare"],
                        folders={k: artifacts[k] for k in publishing.KINDS}, dataset_source=None)


class FakeHub:
    """The part of huggingface_hub.HfApi that push calls, with repositories that already exist."""

    def __init__(self, existing: dict[str, bool]):
        self.existing, self.created, self.commits = existing, [], []

    def repo_info(self, repo_id, repo_type=None):
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        if repo_id not in self.existing:  # what HfApi raises on a 404 (the response: its headers and request)
            response = SimpleNamespace(headers={}, request=None, status_code=404)
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response)
        return SimpleNamespace(id=repo_id, private=self.existing[repo_id])

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.created.append((repo_id, private))

    def create_commit(self, repo_id, operations, commit_message, repo_type=None):
        self.commits.append(repo_id)


def test_private_is_enforced_on_a_repository_that_already_exists(artifacts, monkeypatch):
    """Before: create_repo(private=True, exist_ok=True) left an existing public repository public and
    the push went ahead, while plan.json said private."""
    monkeypatch.setenv("HF_TOKEN", "hf_sentinel")
    plan = _plan(artifacts)
    hub = FakeHub({"me/demo": False})  # the merged model's repository exists, public
    with pytest.raises(TunesmithError, match=r"me/demo already exists and is public.*publish.private.*nothing pushed"):
        publishing.push(plan, offline=False, api=hub)
    assert hub.commits == [] and hub.created == []  # refused before any repository or upload
    hub = FakeHub({"me/demo": True})
    assert publishing.push(plan, offline=False, api=hub) == ["me/demo-lora", "me/demo", "me/demo-GGUF"]
    assert hub.created == [("me/demo-lora", True), ("me/demo", True), ("me/demo-GGUF", True)]
    public = _plan(artifacts, {**SECTION, "private": False})
    assert publishing.push(public, offline=False, api=FakeHub({"me/demo": False})) == [
        "me/demo-lora", "me/demo", "me/demo-GGUF"]
