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


def prompt_counter(llama: Any) -> Any:
    """count(chat, request) -> the prompt's length in tokens, as the model will see it.

    For the gate to refuse a prompt plus max_tokens that passes the context before the request
    queues: llama-cpp-python would shorten max_tokens silently (finish_reason "length", as if the
    reply had been finished), and a streamed request that fails inside the model has already
    answered 200. A chat is formatted by llama-cpp-python's own path (the GGUF's template, the
    same chat handler) up to the point where it would start generating."""
    from llama_cpp import Llama

    class Counted(Exception):
        pass

    class Probe:
        """The model, except that completing a prompt reports its length instead."""

        def __getattr__(self, name: str) -> Any:
            return getattr(llama, name)

        def create_completion(self, prompt: Any, *args: Any, **kwargs: Any) -> Any:
            raise Counted(len(prompt) if isinstance(prompt, list) else text_tokens(prompt))

    def text_tokens(prompt: str) -> int:
        # as Llama._create_completion counts a text prompt: BOS (if the model adds one) + the text
        return len(llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)) if prompt else 1

    def count(chat: bool, request: dict) -> int:
        if not chat:
            prompt = request["prompt"]
            return text_tokens(prompt[0] if isinstance(prompt, list) and prompt else prompt or "")
        try:
            Llama.create_chat_completion(Probe(), messages=request["messages"], functions=request.get("functions"),
                                         function_call=request.get("function_call"), tools=request.get("tools"),
                                         tool_choice=request.get("tool_choice"))
        except Counted as got:
            return got.args[0]
        raise AssertionError("llama-cpp-python's chat handler never asked for a completion")

    return count


def build_app(gguf: Path, *, host: str, port: int, api_key: str | None, n_ctx: int, threads: int | None,
              alias: str, repeat_penalty: float, max_request_bytes: int) -> Any:
    """llama-cpp-python's server app on one GGUF (the model loaded), behind serving_gate.Gate."""
    if os.environ.get("CONFIG_FILE"):
        # llama-cpp-python's create_app would take the API key, the bind and the model from that
        # file instead of these options, undoing the key check of a wide --host.
        raise TunesmithError(f"CONFIG_FILE is set in the environment ({os.environ['CONFIG_FILE']}): llama-cpp-python "
                             f"would take the API key and the model from it instead of tunesmith serve's options. "
                             f"Unset it (env -u CONFIG_FILE tunesmith serve ...)")
    try:
        from fastapi.middleware.cors import CORSMiddleware
        from llama_cpp.server import app as server_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise TunesmithError(f"llama-cpp-python's server extra is missing ({exc.name}): "
                             f"pip install -r requirements.txt") from None
    from tunesmith.serving_gate import Gate

    def args_only(cls: type) -> type:
        # pydantic-settings would fill every option left out here from environment variables of
        # the same name (LORA_PATH, HF_MODEL_REPO_ID, ...): the server runs what the command line says.
        return type(cls.__name__, (cls,), {"settings_customise_sources": classmethod(
            lambda c, settings_cls, init_settings, **other_sources: (init_settings,))})

    # chat_format None: llama-cpp-python formats chats with the template stored in the GGUF.
    model = args_only(ModelSettings)(model=str(gguf), model_alias=alias, n_ctx=n_ctx, chat_format=None, verbose=False,
                                     n_threads=threads or max(1, os.cpu_count() or 1))
    # interrupt_requests False: a request waiting for the model queues; with it on, a waiting
    # request would cut a streaming reply short. One model, one request at a time (its lock).
    server = args_only(ServerSettings)(host=host, port=port, api_key=api_key, interrupt_requests=False)
    app = server_app.create_app(server_settings=server, model_settings=[model])
    # llama-cpp-python lets any web page read the answers (CORS *, with credentials); the gate
    # refuses cross-site requests to a keyless server, and a keyed one needs no browser access.
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    model_now = server_app._llama_proxy()  # the loaded model (llama-cpp-python 0.3.36's module state)
    return Gate(app, api_key=api_key, max_request_bytes=max_request_bytes, n_ctx=n_ctx,
                count_prompt=prompt_counter(model_now), repeat_penalty=repeat_penalty, bind_host=host)


def serve(gguf: Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          n_ctx: int = 2048, threads: int | None = None, alias: str | None = None, repeat_penalty: float = 1.0,
          max_request_bytes: int | None = None, out: TextIO = sys.stdout) -> None:
    """Run llama-cpp-python's server on one GGUF until interrupted (Ctrl+C or SIGTERM).

    Requests that name no repeat_penalty get `repeat_penalty`: llama-cpp-python applies 1.1 unless
    told otherwise and OpenAI clients have no such field, so their greedy reply would not be the
    reply the model was evaluated on (a word-reversal model has to repeat the prompt's words)."""
    from tunesmith.serving_gate import DEFAULT_MAX_REQUEST_BYTES

    check_bind(host, api_key)
    try:
        import uvicorn
    except ImportError as exc:
        raise TunesmithError(f"llama-cpp-python's server extra is missing ({exc.name}): "
                             f"pip install -r requirements.txt") from None
    alias = alias or gguf.stem
    limit = max_request_bytes or DEFAULT_MAX_REQUEST_BYTES
    app = build_app(gguf, host=host, port=port, api_key=api_key, n_ctx=n_ctx, threads=threads, alias=alias,
                    repeat_penalty=repeat_penalty, max_request_bytes=limit)
    who = ("API key required" if api_key else
           "no API key: any program or user on this machine can use it (--api-key to restrict)")
    print(f"tunesmith serve: {gguf} as model {alias!r}\n"
          f"  OpenAI-compatible API at http://{host}:{port}/v1 (chat: POST /v1/chat/completions)\n"
          f"  {who}; request bodies up to {limit} bytes; one request at a time, others queue\n"
          f"  stop with Ctrl+C", file=out, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
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
