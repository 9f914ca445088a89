"""The recipe and config JSON Schemas: loading, validation with messages a person can act on, and
defaults. The schemas (tunesmith/schemas/) are the only place defaults live."""

from __future__ import annotations

import copy
import difflib
import functools
from importlib import resources
from typing import Any

import jsonschema
import yaml

from tunesmith.errors import RecipeError


@functools.cache
def _schema_text(name: str) -> str:
    # The schemas ship inside the package (tunesmith/schemas/), so an installed wheel finds them.
    return resources.files("tunesmith").joinpath("schemas", f"{name}.schema.yaml").read_text(encoding="utf-8")



def load_schema(name: str) -> dict[str, Any]:
    """The named JSON Schema ('recipe' or 'config'), a fresh copy the caller may change."""
    return yaml.safe_load(_schema_text(name))



def _dotted(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(top level)"



def _explain(error: jsonschema.ValidationError, schema: dict[str, Any]) -> str:
    where = _dotted(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        parts = []
        for key in extra:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            parts.append(f"unknown key '{_dotted([*error.absolute_path, key])}'{hint}")
        return "; ".join(parts) + f". Allowed here: {', '.join(allowed)}"
    if error.validator == "required":
        return f"missing required key under {where}: {error.message}"
    if error.validator == "enum":
        return f"key '{where}' is {error.instance!r}; allowed values: {', '.join(map(str, error.validator_value))}"
    if error.validator == "type":
        return f"key '{where}' should be of type {error.validator_value}, got {type(error.instance).__name__} {error.instance!r}"
    if error.validator == "propertyNames":
        return f"key '{error.instance}' under '{where}' is not allowed: {error.message}"
    return f"key '{where}': {error.message}"



def validate(data: Any, schema_name: str, source: str) -> None:
    """Raise RecipeError naming the file and key of every schema violation."""
    schema = load_schema(schema_name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_explain(e, schema)}" for e in errors)
        raise RecipeError(f"{source} is not a valid {schema_name}:\n{lines}")



def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in schema:
        return schema
    target: Any = root
    for part in schema["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}



def fill_defaults(data: dict[str, Any], schema: dict[str, Any], root: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a copy of data with every missing key set to the schema's default, recursively."""
    root = root or schema
    schema = _resolve(schema, root)
    out = copy.deepcopy(data)
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if isinstance(out.get(key), dict) and "properties" in sub:
            out[key] = fill_defaults(out[key], sub, root)
        items = _resolve(sub.get("items", {}), root)
        if isinstance(out.get(key), list) and "properties" in items:  # a list of objects, e.g. filter.regex
            out[key] = [fill_defaults(item, items, root) if isinstance(item, dict) else item for item in out[key]]
    return out



def section_defaults(name: str, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recipe section `name` (dataset, filter, evaluate, ...) with the given values, the rest from the schema."""
    schema = load_schema("recipe")
    return fill_defaults(values or {}, schema["properties"][name], schema)



def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
