"""Talk to a GGUF: llama-cpp-python's OpenAI-compatible server (`tunesmith serve`) and a terminal
conversation (`tunesmith chat`), both with the chat template embedded in the GGUF, which is the
one the model was trained with.

A target is a .gguf file, or `recipe[/variant]`: the GGUF that recipe's quantize stage wrote
under results/<recipe>/<variant>/gguf/ (Q8_0 unless --type says otherwise).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from tunesmith.errors import TunesmithError

ENV_API_KEY = "TUNESMITH_API_KEY"
PREFERRED_TYPES = ("Q8_0", "Q4_K_M", "F16")


def find_gguf(target: str, results_dir: str | Path = "results", qtype: str | None = None) -> Path:
    """A .gguf path, or the GGUF of `recipe[/variant]` under results_dir; errors name what was looked for."""
    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunesmithError(f"{path}: no such GGUF file")
        return path
    recipe, _, variant = target.partition("/")
    folder = Path(results_dir) / recipe / (variant or "main") / "gguf"
    if not folder.is_dir():
        variants = sorted(p.parent.name for p in (Path(results_dir) / recipe).glob("*/gguf"))
        hint = (f"; this recipe has GGUFs for: {', '.join(variants)}" if variants
                else "; run the workflow for it first (snakemake ... quantize)")
        raise TunesmithError(f"{target}: no GGUF folder at {folder}{hint}")
    report = folder / "report.json"
    files = json.loads(report.read_text())["files"] if report.is_file() else {}
    if qtype:
        if qtype not in files:
            raise TunesmithError(f"{target}: no {qtype} GGUF in {folder} (made: {', '.join(files) or 'none'})")
        return folder / files[qtype]["file"]
    for name in PREFERRED_TYPES:
        if name in files:
            return folder / files[name]["file"]
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise TunesmithError(f"{target}: no .gguf file in {folder}")
    return found[0]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Anything reachable from other machines needs a key: the server runs the model for whoever asks."""
    if not is_loopback(host) and not api_key:
        raise TunesmithError(f"--host {host} is reachable from other machines: give an API key "
                             f"(--api-key, or {ENV_API_KEY} in the environment), or bind 127.0.0.1")


class DefaultRepeatPenalty:
    """ASGI middleware: a completion request that names no repeat_penalty gets this one.

    llama-cpp-python's server applies 1.1 unless the request says otherwise, and OpenAI clients
    have no such field: their greedy reply would not be the reply the model was evaluated on
    (a word-reversal model has to repeat the prompt's words). 1.0 turns the penalty off."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app: Any, value: float = 1.0):
        self.app, self.value = app, value

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            data = json.loads(body or b"null")
        except ValueError:
            data = None  # the server answers malformed JSON itself
        if isinstance(data, dict) and "repeat_penalty" not in data:
            body = json.dumps({**data, "repeat_penalty": self.value}).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def serve(gguf: Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          n_ctx: int = 2048, threads: int | None = None, alias: str | None = None, repeat_penalty: float = 1.0,
          out: TextIO = sys.stdout) -> None:
    """Run llama-cpp-python's server on one GGUF until interrupted (Ctrl+C or SIGTERM)."""
    check_bind(host, api_key)
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise TunesmithError(f"llama-cpp-python's server extra is missing ({exc.name}): "
                             f"pip install -r requirements.txt") from None
    alias = alias or gguf.stem
    # chat_format None: llama-cpp-python formats chats with the template stored in the GGUF.
    model = ModelSettings(model=str(gguf), model_alias=alias, n_ctx=n_ctx, chat_format=None, verbose=False,
                          n_threads=threads or max(1, os.cpu_count() or 1))
    app = create_app(server_settings=ServerSettings(host=host, port=port, api_key=api_key), model_settings=[model])
    print(f"tunesmith serve: {gguf} as model {alias!r}\n"
          f"  OpenAI-compatible API at http://{host}:{port}/v1 (chat: POST /v1/chat/completions)"
          + (", API key required" if api_key else "") + "\n  stop with Ctrl+C", file=out, flush=True)
    uvicorn.run(DefaultRepeatPenalty(app, repeat_penalty), host=host, port=port, log_level="warning")
    print("tunesmith serve: stopped", file=out, flush=True)


def chat(gguf: Path, *, system: str | None = None, n_ctx: int = 2048, threads: int | None = None,
         max_tokens: int = 512, temperature: float = 0.0, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """A terminal conversation with one GGUF, streamed token by token."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads or max(1, os.cpu_count() or 1), verbose=False)
    try:
        print(f"tunesmith chat: {gguf} (in this terminal; stop with /exit or Ctrl+D)", file=out, flush=True)
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        while True:
            print("> ", end="", file=out, flush=True)
            line = inp.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            reply = []
            for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                    temperature=temperature, stream=True):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                reply.append(piece)
                print(piece, end="", file=out, flush=True)
            print(file=out, flush=True)
            messages.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        pass
    finally:
        llm.close()
    print("tunesmith chat: bye", file=out, flush=True)
