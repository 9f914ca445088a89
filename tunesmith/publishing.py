"""publish (opt-in, after evaluate): the adapter, the merged model and the GGUFs to Hugging Face Hub
repositories, each with a model card whose metadata the Hub reads (base_model, datasets, license,
tags, a model-index holding the eval scores).

The plan is built first and written to publish/plan.json: which files go to which repository,
private or public, the commit message, each card. Every check runs before the first upload
(offline mode, a token, files present, card metadata that huggingface_hub parses back), so a
refusal pushes nothing and names every repository left unpushed. HF_TOKEN is read from the
environment and never written anywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tunesmith import fileio
from tunesmith.errors import TunesmithError
from tunesmith.provenance import git_commit, redact_credentials
from tunesmith.recipe import DEFAULT_VARIANT
from tunesmith.result import Result

KINDS = ("adapter", "merged", "gguf")
# Files of a folder that are not the artifact (bookkeeping of the workflow, the local card).
SKIP = {".snakemake_timestamp", "README.md"}
HUB_MODEL_ALIASES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _root_base(merged: Path) -> str:
    """The hub id of the model the chain started from, as the Hub's base_model wants it."""
    lineage = merged / "tunesmith_lineage.json"
    base = json.loads(lineage.read_text())[0]["base"] if lineage.is_file() else ""
    source = Path(base) / "tunesmith_source.json"
    if source.is_file():
        base = json.loads(source.read_text()).get("source", base)
    name = Path(base).name if base.startswith(("resources/", "/")) else base
    return HUB_MODEL_ALIASES.get(name, name)


def card(*, kind: str, repo_id: str, recipe: str, variant: str, base_model: str, datasets: list[str],
         license: str | None, tags: list[str], scores: dict[str, Any], body: str) -> Any:
    """A huggingface_hub ModelCard. ModelCardData checks the eval results (each needs the model's
    name); parsing the rendered card back proves the YAML metadata is what the Hub will read."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = []
    for task, t in scores.items():
        # adapter and merged model score as the tuned model; a GGUF repo holds one score per type
        labels = [k for k in t if k == "F16" or k.startswith(("Q", "IQ"))] if kind == "gguf" else ["tuned"]
        primary = (str(t.get("metric", "score")).split(",")[0], t)
        head = t.get("headline")
        # the headline first (the Hub shows the first result): it is the figure that moved
        pairs = [primary] if not head or head["metric"] == primary[0] else [
            (head["metric"], {"tuned": head["tuned"], **(head.get("gguf") or {})}), primary]
        for metric, values in pairs:
            for label in labels:
                if isinstance(values.get(label), (int, float)):
                    results.append(EvalResult(task_type="text-generation", dataset_type=task,
                                              dataset_name=f"{recipe} {task}", metric_type=metric,
                                              metric_name=f"{metric} ({label})" if kind == "gguf" else metric,
                                              metric_value=float(values[label])))
    data = ModelCardData(base_model=base_model, datasets=datasets or None, license=license,
                         tags=["tunesmith", kind, *tags], library_name="peft" if kind == "adapter" else
                         (None if kind == "gguf" else "transformers"),
                         model_name=repo_id, eval_results=results or None)
    text = f"---\n{data.to_yaml()}\n---\n\n{redact_credentials(body)}"
    parsed = ModelCard(text)
    if parsed.data.to_dict() != data.to_dict():
        raise TunesmithError(f"{repo_id}: the model card's metadata does not parse back as written")
    return parsed


def plan(*, recipe: str, variant: str, section: dict[str, Any], folders: dict[str, str], compare: str | None,
         dataset_source: str | None) -> dict[str, Any]:
    """What publish would push: per artifact the repository, visibility, commit message, files
    (path in the repo -> local path, bytes) and the card text."""
    pub = section
    if not pub.get("license"):
        raise TunesmithError("publish.license: name the license of what you publish (e.g. apache-2.0, the base "
                             "model's own); the Hub card carries it")
    merged = Path(folders["merged"])
    flat = flat_scores(compare)
    body = _merge_card_body(merged)
    out: dict[str, Any] = {"recipe": recipe, "variant": variant, "repos": []}
    for kind in KINDS:
        repo_id = (pub.get("repos") or {}).get(kind)
        if not repo_id:
            continue
        repo_id = variant_repo(repo_id, variant, kind)
        folder = Path(folders[kind])
        if not folder.is_dir():
            raise TunesmithError(f"publish.repos.{kind}: {folder} does not exist (nothing to push to {repo_id})")
        files = {p.relative_to(folder).as_posix(): {"path": str(p.resolve()), "bytes": p.stat().st_size}
                 for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in SKIP
                 and not p.name.startswith(".") and "checkpoints" not in p.relative_to(folder).parts}
        if kind == "gguf":
            files = {k: v for k, v in files.items() if k.endswith((".gguf", ".Modelfile")) or k == "report.json"}
        c = card(kind=kind, repo_id=repo_id, recipe=recipe, variant=variant, base_model=_root_base(merged),
                 datasets=_hub_datasets(dataset_source), license=pub["license"],
                 tags=list(pub.get("tags") or []), scores=flat,
                 body=card_body(body, flat, recipe, variant, _how_to_run(kind, repo_id)))
        out["repos"].append({"kind": kind, "repo_id": repo_id, "private": bool(pub.get("private", True)),
                             "commit_message": pub.get("commit_message") or f"tunesmith: {recipe}/{variant} {kind}",
                             "files": files, "card": str(c)})
    if not out["repos"]:
        raise TunesmithError("publish.repos: name at least one repository (adapter, merged or gguf)")
    return out


def variant_repo(repo_id: str, variant: str, kind: str) -> str:
    """A sweep's variants each push to their own repository (<repo>-<variant>): one name for all of
    them would leave on the Hub whichever variant pushed last. The one variant of a recipe without a
    sweep (main) keeps the name as written."""
    if variant == DEFAULT_VARIANT:
        return repo_id
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    # The Hub refuses '--' and '..' and names over 96 characters; a variant may hold '=' or '__'.
    suffix = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", variant)).replace("..", ".").strip("-.")
    named = f"{repo_id}-{suffix}"
    try:
        validate_repo_id(named)
    except HFValidationError as exc:
        raise TunesmithError(f"publish.repos.{kind}: the sweep variant {variant!r} would push to {named!r}, which "
                             f"the Hub refuses ({exc}); shorten the repository name or the sweep") from None
    return named


def check_visibility(api: Any, repo: dict[str, Any]) -> bool:
    """Whether repo['repo_id'] exists. One that exists and is public while the plan says private is
    refused: create_repo(private=True, exist_ok=True) leaves an existing repository as it is, and the
    push would publish what the recipe keeps private."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo["repo_id"], repo_type="model")
    except RepositoryNotFoundError:
        return False
    if repo["private"] and not getattr(info, "private", False):
        raise TunesmithError(f"publish: {repo['repo_id']} already exists and is public, while publish.private is "
                             "true; nothing pushed. Make it private on the Hub (Settings, or HfApi()."
                             "update_repo_settings(repo_id, private=True)), or set publish.private: false")
    return True


def _hub_datasets(dataset_source: str | None) -> list[str]:
    """The card's `datasets`: the source when it is a Hub id (a local file or a URL is none)."""
    if dataset_source and not Path(dataset_source).exists() and "://" not in dataset_source:
        return [dataset_source]
    return []


def flat_scores(compare: str | None) -> dict[str, Any]:
    """compare.json's tasks as {task: {base, tuned, metric, <gguf type>..., contamination}}."""
    data = json.loads(Path(compare).read_text()) if compare else {}
    head = data.get("headline") or {}
    return {t: {"tuned": c.get("tuned"), "base": c.get("base"), "metric": c.get("metric"), **(c.get("gguf") or {}),
                "contamination": c.get("contamination"), "metrics": c.get("metrics"),
                **({"headline": head} if head.get("task") == t else {})}
            for t, c in data.get("tasks", {}).items()}


def _merge_card_body(merged: Path) -> str:
    """The merge stage's card (lineage, data rows per stage, training, samples, recipe) less its
    metadata block, which each artifact's card writes for itself."""
    text = (merged / "README.md").read_text(encoding="utf-8") if (merged / "README.md").is_file() else ""
    return text.split("---", 2)[2].lstrip() if text.startswith("---") else text


def card_body(body: str, flat: dict[str, Any], recipe: str, variant: str, how_to_run: str) -> str:
    """One body for every card, local or on the Hub: lineage, scores with contamination, provenance,
    how to run."""
    return body.rstrip() + "\n\n" + _scores_table(flat) + _provenance(recipe, variant) + how_to_run


SCORE_KEYS = {"base", "tuned", "metric", "contamination", "metrics", "headline"}


def _scores_table(flat: dict[str, Any]) -> str:
    """Held-out scores base -> tuned -> each GGUF, as evaluate measured them (compare.json), and the
    training rows the decontaminate stage matched to each task's documents."""
    if not flat:
        return ""
    labels = ["base", "tuned", *sorted({k for t in flat.values() for k in t} - SCORE_KEYS)]
    lead = []
    for task, t in flat.items():
        if t.get("headline"):
            h = t["headline"]
            chain = " -> ".join(f"{k} {h[k]:.3f}" for k in ("base", "tuned") if isinstance(h.get(k), (int, float)))
            chain += "".join(f" -> {q} {v:.3f}" for q, v in (h.get("gguf") or {}).items() if isinstance(v, (int, float)))
            lead = [f"**Headline: {task} {h['metric']}** {chain} ({h.get('reason', '')})", ""]
    lines = ["## Scores (held-out)", "", *lead, "| task | metric | " + " | ".join(labels) + " | training rows matching its documents |",
             "|---|---|" + "---|" * (len(labels) + 1)]
    for task, t in flat.items():
        # every metric the task reports (exact match says nothing about code or chat; chrF and the
        # reference log-likelihood do), the headline one first
        rows = [(name, {"base": m.get("base"), "tuned": m.get("tuned"), **(m.get("gguf") or {})})
                for name, m in (t.get("metrics") or {}).items()] or [(str(t.get("metric")).split(",")[0], t)]
        rows.sort(key=lambda r: r[0] != (t.get("headline") or {}).get("metric"))
        for i, (metric, values) in enumerate(rows):
            cells = [f"{values[k]:.3f}" if isinstance(values.get(k), (int, float)) else "-" for k in labels]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {_dirty(t) if i == 0 else ''} |")
    return "\n".join(lines) + "\n\n"


def _dirty(t: dict[str, Any]) -> str:
    c = t.get("contamination") or {}
    if c.get("rows") is None:
        return f"not checked ({c['not_checked']})" if c.get("not_checked") else "-"
    return f"{c['rows']} of {c.get('rows_checked', '?')} ({c.get('method', '')}, {c.get('action', '')})"


def _provenance(recipe: str, variant: str) -> str:

    return f"Made by tunesmith recipe `{recipe}` (variant `{variant}`) at git commit `{git_commit()}`.\n\n"


def _how_to_run_local(kind: str, folder: Path) -> str:
    """The same instructions for the files on disk, before anything is published."""
    if kind == "gguf":
        ggufs = sorted(folder.glob("*.gguf"), key=lambda p: ("Q8_0" not in p.name, p.name))  # near-lossless first
        first = ggufs[0] if ggufs else folder / "model-Q8_0.gguf"
        modelfile = first.with_suffix(".Modelfile")
        return (f"## How to run\n\n```bash\ntunesmith serve {first}      # OpenAI-compatible API on 127.0.0.1:8000\n"
                f"tunesmith chat {first}\nollama create mymodel -f {modelfile} && ollama run mymodel\n```\n")
    if kind == "adapter" and (folder / "adapter_config.json").is_file():
        return (f"## How to run\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{folder}\")\n```\n")
    return (f"## How to run\n\n```python\nfrom transformers import pipeline\n"
            f"chat = pipeline(\"text-generation\", \"{folder}\")\n```\n")


def local_cards(*, recipe: str, variant: str, section: dict[str, Any], folders: dict[str, str], compare: str | None,
                dataset_source: str | None, out_dir: str | Path) -> Any:
    """The cards stage: a model card for each artifact the run made (adapter, merged model, GGUF
    files), with the body publish pushes and how to run the files on disk; written whether or not
    anything is published, so every artifact states its lineage, scores and contamination."""

    merged = Path(folders["merged"])
    flat, body = flat_scores(compare), _merge_card_body(merged)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written = []
    for kind in KINDS:
        folder = Path(folders.get(kind) or "")
        if not folders.get(kind) or not folder.is_dir():
            continue
        c = card(kind=kind, repo_id=f"{recipe}-{variant}-{kind}", recipe=recipe, variant=variant,
                 base_model=_root_base(merged), datasets=_hub_datasets(dataset_source),
                 license=section.get("license"), tags=list(section.get("tags") or []), scores=flat,
                 body=card_body(body, flat, recipe, variant, _how_to_run_local(kind, folder)))
        (tmp / f"{kind}.md").write_text(str(c), encoding="utf-8")
        written.append(kind)
    fileio.replace_dir(tmp, out)
    return Result(metrics={"cards": len(written)}, artifacts=[str(out)], summary="model cards: " + ", ".join(written))


def _how_to_run(kind: str, repo_id: str) -> str:
    if kind == "gguf":
        return (f"## How to run\n\n```bash\nhf download {repo_id} --local-dir model\n"
                f"tunesmith serve model/model-Q8_0.gguf      # OpenAI-compatible API on 127.0.0.1:8000\n"
                f"ollama create mymodel -f model/model-Q8_0.Modelfile && ollama run mymodel\n```\n")
    if kind == "adapter":
        return (f"## How to run\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")\n```\n")
    return (f"## How to run\n\n```python\nfrom transformers import pipeline\n"
            f"chat = pipeline(\"text-generation\", \"{repo_id}\")\n```\n")


def push(the_plan: dict[str, Any], *, offline: bool, api: Any = None) -> list[str]:
    """Create each repository and commit its files and card in one commit. Every refusal comes
    before the first upload and names what was not pushed. api: an HfApi (default: one with HF_TOKEN)."""
    names = ", ".join(f"{r['repo_id']} ({r['kind']}, {len(r['files'])} files)" for r in the_plan["repos"])
    if offline:
        raise TunesmithError(f"publish: offline (config offline: true or HF_HUB_OFFLINE=1), nothing pushed. "
                             f"Not pushed: {names}. The plan is in publish/plan.json")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise TunesmithError(f"publish: HF_TOKEN is not set in the environment, nothing pushed. Not pushed: {names}")
    for repo in the_plan["repos"]:
        missing = [f["path"] for f in repo["files"].values() if not Path(f["path"]).is_file()]
        if missing:
            raise TunesmithError(f"publish: {missing[0]} vanished, nothing pushed. Not pushed: {names}")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api if api is not None else HfApi(token=token)
    try:
        for repo in the_plan["repos"]:
            check_visibility(api, repo)
    except TunesmithError as exc:
        raise TunesmithError(f"{exc}. Not pushed: {names}") from None
    pushed: list[str] = []
    for repo in the_plan["repos"]:
        try:
            api.create_repo(repo["repo_id"], private=repo["private"], exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=f["path"]) for name, f in repo["files"].items()]
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=repo["card"].encode("utf-8")))
            api.create_commit(repo["repo_id"], operations=ops, commit_message=repo["commit_message"], repo_type="model")
        except Exception as exc:  # noqa: BLE001 - say what made it and what did not
            left = [r["repo_id"] for r in the_plan["repos"] if r["repo_id"] not in pushed]
            raise TunesmithError(f"publish: {repo['repo_id']} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                                 f"pushed: {', '.join(pushed) or 'none'}; not pushed: {', '.join(left)}") from None
        pushed.append(repo["repo_id"])
    return pushed
