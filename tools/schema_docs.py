"""The recipe-key and config-key reference pages, generated from the JSON Schemas at docs build time.

The schemas are the only place defaults and meanings live, so the reference is rendered from them
on every `mkdocs build` (this file is an mkdocs hook: mkdocs.yml names it) and cannot drift.
It reads the schema files themselves, not the tunesmith package, so the docs build needs nothing
beyond mkdocs. By hand: `python tools/schema_docs.py recipe` prints the recipe page.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "tunesmith" / "schemas"
# Generated page (path inside docs/) -> schema name and the file the page documents.
PAGES = {
    "reference/recipe.md": ("recipe", "recipes/<name>.yaml"),
    "reference/config.md": ("config", "config.yaml"),
}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((SCHEMAS / f"{name}.schema.yaml").read_text(encoding="utf-8"))


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """A node with its local $ref followed; the node's own keys (description, default) win."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    merged = {**_resolve(target, root), **{k: v for k, v in node.items() if k != "$ref"}}
    return merged


def _object_branch(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any] | None:
    """The part of a node that has keys of its own: itself, its array items, or a oneOf branch."""
    node = _resolve(node, root)
    if "properties" in node:
        return node
    items = node.get("items")
    if isinstance(items, dict):
        items = _resolve(items, root)
        if "properties" in items:
            return items
        for branch in items.get("oneOf", []):
            if "properties" in _resolve(branch, root):
                return _resolve(branch, root)
    return None


def walk(schema: dict[str, Any], node: dict[str, Any] | None = None,
         prefix: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(dotted path, resolved node, required) for every key, depth first in schema order.
    Keys of the objects in a list are written `list[].key`."""
    node = schema if node is None else node
    required = set(node.get("required", []))
    for key, child in node.get("properties", {}).items():
        child = _resolve(child, schema)
        path = f"{prefix}{key}"
        yield path, child, key in required
        inner = _object_branch(child, schema)
        if inner is not None:
            is_list = inner is not child and "properties" not in child
            yield from walk(schema, inner, f"{path}[]." if is_list else f"{path}.")


def _type(node: dict[str, Any]) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" if v is not None else "`null`" for v in node["enum"])
    if "oneOf" in node:
        return " or ".join(_type(branch) for branch in node["oneOf"])
    kinds = node.get("type", "any")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    words = []
    for kind in kinds:
        if kind == "array" and isinstance(node.get("items"), dict):
            inner = node["items"]
            words.append("list of " + ("objects" if "oneOf" in inner or "properties" in inner else _type(inner)))
        else:
            words.append(str(kind))
    text = " or ".join(words)
    bounds = [f"{sign} {node[key]}" for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                      ("maximum", "≤"), ("exclusiveMaximum", "<"))
              if key in node]
    if "minItems" in node:
        bounds.append(f"at least {node['minItems']} item{'s' if node['minItems'] != 1 else ''}")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _default(node: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in node:
        return "—"
    return f"`{json.dumps(node['default'], ensure_ascii=False)}`"


_ESCAPE = str.maketrans({c: f"\\{c}" for c in "\\*_[]|"} | {"<": "&lt;", ">": "&gt;"})


def _prose(text: str) -> str:
    """Schema text as one table cell: markdown-significant characters escaped outside `code`."""
    parts = " ".join(str(text).split()).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans at all
        return " ".join(str(text).split()).translate(_ESCAPE)
    return "".join("`" + p.replace("|", "\\|") + "`" if i % 2 else p.translate(_ESCAPE)
                   for i, p in enumerate(parts))


def render(name: str) -> str:
    schema = load(name)
    page = next(target for schema_name, target in PAGES.values() if schema_name == name)
    lines = [
        f"# {_prose(schema['title'])}",
        "",
        "<!-- Generated from tunesmith/schemas/" f"{name}.schema.yaml by tools/schema_docs.py at build time. -->",
        "",
        _prose(schema.get("description", "")),
        "",
        f"Every key `{page}` accepts, with its type, its default and what it means, read from "
        f"`tunesmith/schemas/{name}.schema.yaml` (the only place defaults live) when the site is built. "
        "A key not listed here is refused, naming the file and the closest key. Keys of the objects "
        "in a list are written `list[].key`.",
        "",
    ]
    top_level_scalars = []
    for key, node in schema["properties"].items():
        node = _resolve(node, schema)
        if _object_branch(node, schema) is None:
            top_level_scalars.append(key)
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    if top_level_scalars:
        lines += ["## Top level", "", *header]
        for path, node, required in walk(schema):
            if path in top_level_scalars:
                lines.append(_row(path, node, required))
        lines.append("")
    for key, node in schema["properties"].items():
        if key in top_level_scalars:
            continue
        node = _resolve(node, schema)
        lines += [f"## {key}", "", _prose(node.get("description", "")), "", *header]
        lines.append(_row(key, node, False))
        lines += [_row(path, child, required) for path, child, required in walk(schema, _object_branch(node, schema),
                                                                                 _child_prefix(key, node, schema))]
        lines.append("")
    return "\n".join(lines)


def _child_prefix(key: str, node: dict[str, Any], schema: dict[str, Any]) -> str:
    return f"{key}." if "properties" in node else f"{key}[]."


def _row(path: str, node: dict[str, Any], required: bool) -> str:
    return f"| `{path}` | {_prose(_type(node))} | {_default(node, required)} | {_prose(node.get('description', ''))} |"


# --- mkdocs hook -------------------------------------------------------------------------------

def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages to the site (they exist only in the build)."""
    from mkdocs.structure.files import File

    for src_uri, (name, _) in PAGES.items():
        files.append(File.generated(config, src_uri, content=render(name)))
    return files


def on_config(config: Any) -> Any:
    # A schema edit rebuilds the pages under `mkdocs serve`.
    config.watch.extend(str(SCHEMAS / f"{name}.schema.yaml") for name, _ in PAGES.values())
    return config


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "recipe"))
