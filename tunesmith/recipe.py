"""Recipe and config loading: JSON Schema validation with messages a person can act on,
defaults filled from the schema, config overrides, and sweep expansion into variants."""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import RecipeError
from tunesmith.methods import get as get_method
from tunesmith.schema import deep_merge, fill_defaults, load_schema, validate
from tunesmith.tasks import TASK_METRICS

DEFAULT_VARIANT = "main"


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *anchor' may be overridden on purpose
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:
                    continue  # unhashable key: SafeLoader's own check reports it below
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """Parse one YAML file; a key written twice in a mapping is a RecipeError naming both lines."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (SafeLoader subclass)
    except _DuplicateKey as dup:
        raise RecipeError(
            f"{path}: key '{dup.key}' is written twice, at lines {dup.first} and {dup.second}; keep one"
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: file not found")
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = _read_yaml(path)
    validate(data, "config", str(path))
    return fill_defaults(data, load_schema("config"))


def check_config(data: dict[str, Any], source: str, files: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Validate an already-loaded config (Snakemake merges --config into it) and fill defaults.

    files: the YAML files it was read from (Snakemake's loader keeps the last of two equal keys);
    each is re-read only to refuse duplicate keys."""
    for path in files:
        read_yaml(path)
    validate(data, "config", source)
    return fill_defaults(data, load_schema("config"))


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, override, validate and default-fill one recipe. The result has a 'name' key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(_no_such_recipe(path))
    data = _read_yaml(path)
    validate(data, "recipe", str(path))
    if overrides:
        data = deep_merge(data, overrides)
        validate(data, "recipe", f"{path} (with overrides from config.yaml)")
    recipe = fill_defaults(data, load_schema("recipe"))
    _check_semantics(recipe, str(path))
    _check_pretrain_start(data, recipe, str(path))
    recipe["name"] = path.stem
    _check_sweep(recipe, str(path))
    return recipe


def _no_such_recipe(path: Path) -> str:
    """A missing recipe file, with the closest recipe names in its folder (a typo in config.yaml's
    `recipes:` or `--config recipes=...` is the usual cause)."""
    if not path.parent.is_dir():
        return f"{path}: no such recipe file; the folder {path.parent} does not exist"
    known = sorted(p.stem for p in path.parent.glob("*.yaml"))
    near = [f"'{n}'" for n in difflib.get_close_matches(path.stem, known, n=3)]
    if near:
        hint = "did you mean " + (f"{', '.join(near[:-1])} or {near[-1]}" if len(near) > 1 else near[0]) + "?"
    else:
        hint = f"recipes in {path.parent}: {', '.join(known) or 'none'}"
    return f"{path}: no such recipe file; {hint}"


def continues_pretraining(recipe: dict[str, Any]) -> bool:
    """kind: pretrain from an existing model (model.base) rather than from scratch ('pretrained')."""
    return recipe["kind"] == "pretrain" and recipe["model"]["base"] != "pretrained"


def _check_pretrain_start(given: dict[str, Any], recipe: dict[str, Any], source: str) -> None:
    """Where kind: pretrain starts must be said, not defaulted: the schema's default base would
    otherwise turn a from-scratch recipe into continued pretraining of the default model."""
    if recipe["kind"] != "pretrain":
        return
    if "base" not in (given.get("model") or {}):
        raise RecipeError(f"{source}: kind: pretrain needs model.base: 'pretrained' to pretrain from scratch "
                          f"(a tokenizer and a Llama from pretrain.tokenizer and pretrain.model), or the model "
                          f"to continue pretraining from (a hub id, a local directory or recipe:<name>)")
    if continues_pretraining(recipe):
        scratch_only = [f"pretrain.{k}" for k in ("tokenizer", "model") if k in (given.get("pretrain") or {})]
        if scratch_only:
            raise RecipeError(f"{source}: {' and '.join(scratch_only)} only apply to pretraining from scratch "
                              f"(model.base: pretrained); continued pretraining keeps the tokenizer and the "
                              f"architecture of model.base '{recipe['model']['base']}'")


def _check_semantics(recipe: dict[str, Any], source: str) -> None:
    """Rules JSON Schema cannot say simply."""
    if recipe["kind"] == "sft" and not has_dataset(recipe):
        raise RecipeError(f"{source}: key 'dataset.source' (or 'dataset.sources') is required for kind: sft")
    mixture = recipe["dataset"]["sources"]
    if mixture:
        if recipe["dataset"]["source"]:
            raise RecipeError(f"{source}: dataset.source and dataset.sources are both set: a mixture names its "
                              f"files under dataset.sources only")

        # Imported here, not at the top: `tunesmith validate` from a plain `pip install tunesmith`
        # has only the schema's libraries, and tunesmith.data.load needs pandas (tests/test_install.py).
        from tunesmith.data.load import source_sections

        names = [s["name"] for s in source_sections(recipe["dataset"])]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RecipeError(f"{source}: dataset.sources: two sources named {', '.join(twice)}: give each a name")
        weighted = [s.get("weight") is not None for s in mixture]
        if any(weighted) and not all(weighted):
            raise RecipeError(f"{source}: dataset.sources.{weighted.index(False)} has no weight while others have "
                              f"one: weights are shares of the mix, give one to every source or to none")
    if recipe["kind"] == "pretrain" and not recipe["pretrain"]["corpus"]["source"]:
        raise RecipeError(f"{source}: key 'pretrain.corpus.source' is required for kind: pretrain")
    if recipe["model"]["base"] == "pretrained" and recipe["kind"] != "pretrain":
        raise RecipeError(f"{source}: model.base 'pretrained' needs kind: pretrain")
    base = recipe["model"]["base"]
    if base.startswith(CHAIN_PREFIX) and not re.fullmatch(r"recipe:[A-Za-z0-9._-]+(/[A-Za-z0-9._=-]+)?", base):
        raise RecipeError(f"{source}: model.base '{base}' is not recipe:<name> or recipe:<name>/<variant>")
    if recipe["format"]["template"] == "custom" and not recipe["format"]["custom_template"]:
        raise RecipeError(f"{source}: format.template is 'custom' but format.custom_template is empty")
    if recipe["model"]["trust_remote_code"] and not (recipe["model"]["trust_remote_code_reason"] or "").strip():
        raise RecipeError(
            f"{source}: model.trust_remote_code is on; say why in model.trust_remote_code_reason"
        )
    if recipe["train"]["fsdp"]:

        if get_method(recipe["train"]["method"]).adapter:
            raise RecipeError(f"{source}: train.fsdp shards full weights; method '{recipe['train']['method']}' trains "
                              f"an adapter on a frozen base, which data-parallel copies cheaply: use train.gpus "
                              f"without fsdp, or method: full")
    for key in recipe["sweep"]:
        _get_dotted(recipe, key, source)
    headline = recipe["evaluate"]["headline"]
    if headline:
        tasks = [t if isinstance(t, str) else t["name"] for t in recipe["evaluate"]["tasks"]]
        if headline["task"] not in tasks:
            near = difflib.get_close_matches(headline["task"], tasks, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; the recipe runs {', '.join(tasks)}"
            raise RecipeError(f"{source}: evaluate.headline.task '{headline['task']}' is not one of evaluate.tasks{hint}")

        known = TASK_METRICS.get(headline["task"])
        if known and headline["metric"] not in known:
            near = difflib.get_close_matches(headline["metric"], known, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise RecipeError(f"{source}: evaluate.headline.metric '{headline['metric']}': task '{headline['task']}' "
                              f"has no such metric; {hint}it reports {', '.join(known)}")


CHAIN_PREFIX = "recipe:"


def has_dataset(recipe: dict[str, Any]) -> bool:
    """The recipe fine-tunes on instruction data: one dataset.source or a dataset.sources mixture."""
    return bool(recipe["dataset"]["source"] or recipe["dataset"]["sources"])


def upstream(recipe: dict[str, Any]) -> tuple[str, str] | None:
    """(recipe, variant) that `model.base: recipe:<name>[/<variant>]` names, or None."""
    base = recipe["model"]["base"]
    if not base.startswith(CHAIN_PREFIX):
        return None
    name, _, variant = base[len(CHAIN_PREFIX):].partition("/")
    return name, variant or DEFAULT_VARIANT


def resolve_chains(recipes: dict[str, dict[str, Any]], recipes_dir: str | Path,
                   load: Any) -> dict[str, dict[str, Any]]:
    """Add every recipe that the named ones start from (transitively), loaded with load(path, name),
    and check each link: the upstream exists, trains a model of its own, has the variant named, and
    no chain comes back to where it began. Returns the recipes, upstream ones included."""
    out = dict(recipes)
    todo = list(out)
    while todo:
        name = todo.pop()
        link = upstream(out[name])
        if link is None:
            continue
        up, variant = link
        source = f"recipes/{name}.yaml: model.base '{out[name]['model']['base']}'"
        if up not in out:
            path = Path(recipes_dir) / f"{up}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in Path(recipes_dir).glob("*.yaml"))
                near = difflib.get_close_matches(up, known, n=1)
                hint = f"; did you mean 'recipe:{near[0]}'?" if near else f"; recipes there: {', '.join(known)}"
                raise RecipeError(f"{source} names no recipe in {recipes_dir}{hint}")
            out[up] = load(path, up)
            todo.append(up)
        if not has_dataset(out[up]):
            raise RecipeError(f"{source}: recipe '{up}' trains no model to start from (kind: "
                              f"{out[up]['kind']}, no dataset.source): chain on a recipe that fine-tunes")
        names = variants(out[up])
        if variant not in names:
            raise RecipeError(f"{source}: recipe '{up}' has no variant '{variant}'; its variants: {', '.join(names)}")
    for name in out:  # a chain that comes back to where it began
        seen, at = [name], upstream(out[name])
        while at is not None:
            if at[0] in seen:
                raise RecipeError("recipes chain in a circle: " + " -> ".join([*seen, at[0]]))
            seen.append(at[0])
            at = upstream(out[at[0]])
    return out


def chain(recipes: dict[str, dict[str, Any]], name: str) -> list[tuple[str, str]]:
    """[(recipe, variant), ...] from the root upstream down to (not including) `name`."""
    links, at = [], upstream(recipes[name])
    while at is not None:
        links.insert(0, at)
        at = upstream(recipes[at[0]])
    return links


def _get_dotted(data: dict[str, Any], dotted: str, source: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise RecipeError(f"{source}: sweep key '{dotted}' does not name a recipe setting")
        node = node[part]
    return node


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value


def _short(key: str) -> str:
    return key.split(".")[-1]


# A variant's name becomes a folder (results/<recipe>/<variant>/) and a Snakemake wildcard value.
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9._=-]+$")


def _check_sweep(recipe: dict[str, Any], source: str) -> None:
    """Each sweep value against the schema, as if the recipe had set it (the sweep section itself only
    says 'lists'): a batch size of 0 stops here, naming the key and value, not as a trainer traceback."""
    sweep = recipe.get("sweep") or {}
    base = {k: v for k, v in recipe.items() if k not in ("name", "variant")}
    for key in sorted(sweep):
        _get_dotted(base, key, source)
        for value in sweep[key]:
            tried = copy.deepcopy(base)
            _set_dotted(tried, key, value)
            try:
                validate(tried, "recipe", f"{source} (sweep {key}: {value!r})")
            except RecipeError as exc:
                raise RecipeError(f"{source}: sweep value {key}: {value!r} is not valid:\n"
                                  + str(exc).split("\n", 1)[-1]) from None
    variants(recipe)  # the names: a clear error here rather than a path or wildcard problem later


def variants(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Map variant name -> recipe with that sweep combination applied ('main' without a sweep)."""
    sweep = recipe.get("sweep") or {}
    if not sweep:
        return {DEFAULT_VARIANT: recipe}
    keys = sorted(sweep)
    out: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(sweep[k] for k in keys)):
        name = "__".join(f"{_short(k)}-{v}" for k, v in zip(keys, combo))
        if not _VARIANT_NAME.match(name) or name in out:
            why = "is taken by another combination" if name in out else "may hold only letters, digits and . _ = -"
            values = ", ".join(f"{k}: {v!r}" for k, v in zip(keys, combo))
            raise RecipeError(f"recipe {recipe.get('name', '?')}: the sweep variant {name!r} ({values}) {why}: "
                              "it names a results folder")
        resolved = copy.deepcopy(recipe)
        for key, value in zip(keys, combo):
            _set_dotted(resolved, key, value)
        resolved["variant"] = dict(zip(keys, combo))
        out[name] = resolved
    return out
