"""The docs site: it builds with `mkdocs build --strict` (a broken link or anchor fails), the key
references generated from the schemas list every key, and the README's links and its first
recipe are real."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tunesmith" / "schemas"


def _schema_docs():
    spec = importlib.util.spec_from_file_location("schema_docs", REPO / "tools" / "schema_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema(name: str) -> dict:
    return yaml.safe_load((SCHEMAS / f"{name}.schema.yaml").read_text(encoding="utf-8"))


def _every_key(schema: dict) -> list[tuple[str, dict]]:
    """(dotted path, node) for every key the schema accepts, found independently of the generator:
    every `properties` reachable through $ref, list items and oneOf branches."""
    def resolve(node):
        while "$ref" in node:
            target = schema
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def walk(node, prefix):
        node = resolve(node)
        for key, child in node.get("properties", {}).items():
            child = resolve(child)
            yield prefix + key, child
            yield from walk(child, f"{prefix}{key}.")
            items = child.get("items")
            if isinstance(items, dict):
                for branch in (items, *items.get("oneOf", [])):
                    yield from walk(branch, f"{prefix}{key}[].")

    return list(walk(schema, ""))


@pytest.mark.parametrize("name", ["recipe", "config"])
def test_generated_reference_lists_every_schema_key(name):
    page = _schema_docs().render(name)
    keys = _every_key(_schema(name))
    assert len(keys) > (200 if name == "recipe" else 8)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", page, re.M)}
    missing = [path for path, _ in keys if path not in rows]
    assert not missing, f"keys of {name}.schema.yaml missing from the generated page: {missing}"
    for path, node in keys:
        # its default, written as JSON, and the start of its description
        if "default" in node:
            assert f"`{json.dumps(node['default'], ensure_ascii=False)}`" in rows[path], (path, rows[path])
        words = re.sub(r"[^A-Za-z0-9 ]", " ", node.get("description", "")).split()[:3]
        assert all(w in rows[path] for w in words), (path, words, rows[path])


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    # NO_MKDOCS_2_WARNING: Material prints a banner about a future MkDocs on every build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    # The generated pages are in the site, with keys from deep in the schema and their defaults.
    recipe = (site / "reference" / "recipe" / "index.html").read_text(encoding="utf-8")
    assert "train.args.learning_rate" in recipe and "0.0002" in recipe
    assert "dataset.sources[].weight" in recipe and "evaluate.headline.metric" in recipe
    assert "tracking.timeout_s" in (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    # The stage picture the Stages page shows is shipped with it.
    assert (site / "rulegraph.svg").is_file()


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"[`*]", "", heading), "-")


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README should point into the docs"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = REPO / target
        assert path.exists(), f"README links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links to {link}: no such heading"


def test_readme_first_recipe_is_a_valid_recipe():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("# recipes/")]
    assert blocks
    validator = jsonschema.Draft202012Validator(_schema("recipe"))
    for block in blocks:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(block))]
        assert not errors, errors
