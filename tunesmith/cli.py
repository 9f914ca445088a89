"""The `tunesmith` command: things done beside the workflow.

    tunesmith validate [RECIPE ...]            check config.yaml and recipes; prints OK or the error
    tunesmith sync-mlflow results/<recipe>     push stage records MLflow missed (server was down)
    tunesmith compare [--experiments A B] [--out results/compare]
                                               markdown + CSV + PNG across recipes and sweep variants
    tunesmith serve <file.gguf | recipe[/variant]> [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                                               OpenAI-compatible server (llama-cpp-python) on the GGUF
    tunesmith chat <file.gguf | recipe[/variant]>  a conversation with it in the terminal

The tracking URI comes from --tracking-uri, else TUNESMITH_TRACKING_URI, else config.yaml's
tracking.uri, else the local ./mlflow.db the workflow uses by default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tunesmith.errors import TunesmithError


def _uri(args: argparse.Namespace) -> str:
    from tunesmith import tracking

    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get(tracking.ENV_URI):
        return os.environ[tracking.ENV_URI]
    config = Path(args.config)
    if config.is_file():
        from tunesmith.recipe import load_config

        uri = load_config(config)["tracking"]["uri"]
        if uri:
            return uri
    return tracking.default_uri(".")


def cmd_validate(args: argparse.Namespace) -> int:
    from tunesmith.recipe import load_config, load_recipe, variants
    from tunesmith.schema import fill_defaults, load_schema

    failed = 0
    cfg = None
    if Path(args.config).is_file():
        try:
            cfg = load_config(args.config)
            print(f"OK    {args.config}")
        except TunesmithError as exc:
            print(f"ERROR {exc}")
            failed += 1
    elif not args.recipes:
        print(f"ERROR {args.config}: file not found (give --config, or name recipes to check)")
        return 1
    # Without a usable config.yaml: the config schema's defaults, and only the recipes named here.
    settings = cfg or fill_defaults({"recipes": []}, load_schema("config"))
    recipes_dir = Path(args.recipes_dir or settings["recipes_dir"])
    overrides = settings["overrides"]
    targets = args.recipes or [*settings["recipes"]]
    if args.all:
        targets = sorted({*targets, *(p.stem for p in recipes_dir.glob("*.yaml"))})
    for target in targets:
        path = Path(target)
        if path.suffix not in (".yaml", ".yml"):
            path = recipes_dir / f"{target}.yaml"
        try:
            recipe = load_recipe(path, overrides.get(path.stem))
            names = list(variants(recipe))
            extra = f" (variants: {', '.join(names)})" if names != ["main"] else ""
            print(f"OK    {path}{extra}")
        except TunesmithError as exc:
            print(f"ERROR {exc}")
            failed += 1
    return 1 if failed else 0


def cmd_sync(args: argparse.Namespace) -> int:
    from tunesmith import tracking, tracking_writer

    # Each record remembers the store it was meant for; --tracking-uri sends them elsewhere.
    uri = args.tracking_uri
    os.environ.setdefault(tracking.ENV_TIMEOUT, str(args.timeout))
    total_failed = 0
    for folder in args.results:
        path = Path(folder)
        if not (path / "tracking").is_dir():
            print(f"ERROR {path}: no tracking/ folder here (expected results/<recipe>)", file=sys.stderr)
            total_failed += 1
            continue
        pushed, failed = tracking_writer.sync(path, uri)
        print(f"{path}: pushed {pushed} stage record(s) to {uri or 'the store each was meant for'}"
              + (f", {failed} failed" if failed else ""))
        total_failed += failed
    return 1 if total_failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunesmith import leaderboard

    uri = _uri(args)
    paths = leaderboard.write(uri, args.out, args.experiments or None, by_invocation=args.by_invocation)
    for kind, path in paths.items():
        print(f"{kind:3} {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tunesmith import serving

    gguf = serving.find_gguf(args.target, args.results, args.type)
    serving.serve(gguf, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(serving.ENV_API_KEY),
                  n_ctx=args.n_ctx, threads=args.threads, alias=args.alias, repeat_penalty=args.repeat_penalty)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunesmith import serving

    gguf = serving.find_gguf(args.target, args.results, args.type)
    serving.chat(gguf, system=args.system, n_ctx=args.n_ctx, threads=args.threads, max_tokens=args.max_tokens,
                 temperature=args.temperature)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, tracking: bool = True) -> None:
        p.add_argument("--config", default="config.yaml", help="workflow config (default: config.yaml)")
        if tracking:
            p.add_argument("--tracking-uri", default=None,
                           help="MLflow URI (default: $TUNESMITH_TRACKING_URI, config tracking.uri, ./mlflow.db)")

    p = sub.add_parser("validate", help="validate config.yaml and recipes; print OK or the error")
    common(p, tracking=False)
    p.add_argument("recipes", nargs="*", help="recipe names (recipes/<name>.yaml) or paths; default: config's recipes")
    p.add_argument("--recipes-dir", default=None, help="folder of recipe files (default: config's recipes_dir)")
    p.add_argument("--all", action="store_true", help="also every recipe file in the recipes folder")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("sync-mlflow", help="push stage records not yet in MLflow (results/<recipe>)")
    common(p)
    p.add_argument("results", nargs="+", help="results/<recipe> folder(s)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per MLflow request (default 10)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("compare", help="compare recipes/variants from MLflow: markdown, CSV, PNG")
    common(p)
    p.add_argument("--experiments", nargs="+", default=None, help="experiment (= recipe) names; default: all")
    p.add_argument("--out", default="results/compare", help="output folder (default: results/compare)")
    p.add_argument("--by-invocation", action="store_true", help="one row per workflow invocation, not the latest")
    p.set_defaults(func=cmd_compare)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", help="a .gguf file, or recipe[/variant] (its GGUF under --results)")
        p.add_argument("--type", default=None, help="GGUF type of a recipe target (default: Q8_0, else Q4_K_M, else F16)")
        p.add_argument("--results", default="results", help="the workflow's results folder (default: results)")
        p.add_argument("--n-ctx", type=int, default=2048, help="context length in tokens (default 2048)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")

    p = sub.add_parser("serve", help="OpenAI-compatible server on a GGUF (llama-cpp-python), with its chat template")
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="required for a --host other machines can reach "
                   "(default: $TUNESMITH_API_KEY)")
    p.add_argument("--alias", default=None, help="model name clients send (default: the GGUF's file name)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="for requests that set none (default 1.0: "
                   "off, so that a greedy request gets the reply the model was evaluated on; llama-cpp-python's own is 1.1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="talk to a GGUF in the terminal")
    model_args(p)
    p.add_argument("--system", default=None, help="system prompt (e.g. the recipe's format.system_prompt)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TunesmithError as exc:
        print(f"tunesmith: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
