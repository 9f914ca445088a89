"""The front door of `tunesmith serve`: an ASGI layer in front of llama-cpp-python's server app
that answers a client's mistake as a client error, before the model or its lock is involved.

In order, for every HTTP request:
1. Without an API key (a loopback bind), the Host header must name this machine's loopback and a
   browser's Origin must be a loopback page: a web page elsewhere cannot reach the model through
   DNS rebinding or a cross-site POST (llama-cpp-python allows CORS from any origin; tunesmith
   removes that). 403.
2. With an API key, the bearer token is checked from the headers alone, before a byte of the body
   is read. 401.
3. A body larger than max_request_bytes is refused as soon as its Content-Length, or its running
   count for a chunked body, says so; it is never buffered whole. 413.
4. A completion request must be JSON of the shape llama-cpp-python's own request models accept
   (they do the validation); a missing `messages`/`prompt`, a prompt longer than the context, and
   a max_tokens that does not fit beside the prompt are refused before the request queues. 400,
   with an OpenAI-style error object naming the field.
5. A completion request that names no repeat_penalty gets the server's (see serving.serve).

Everything else (the model, its queue, the OpenAI responses) is llama-cpp-python's."""

from __future__ import annotations

import hmac
import ipaddress
import json
import urllib.parse
from typing import Any, Callable

CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"
COMPLETION_PATHS = (CHAT, COMPLETION, "/v1/engines/copilot-codex/completions")
NOT_SERVED = ("/v1/embeddings",)
# Pages that describe the API; everything else needs the key when one is set.
OPEN_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'localhost' -> 'localhost'."""
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            413: "invalid_request_error"}.get(status, "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _split_loc(loc: tuple, data: Any, missing: bool) -> tuple[tuple, int | None]:
    """(the fields of loc as the client wrote them, the index in loc of the first union tag or None).

    pydantic names the member of a union it tried inside loc ('str', 'list[str]',
    'ChatCompletionRequestUserMessage'); a part is a field when the data has it (or, last, when it
    is the missing field), else such a tag."""
    fields, tag, here = [], None, data
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(here, list) and part < len(here):
            fields.append(part)
            here = here[part]
        elif isinstance(here, dict) and (part in here or (missing and i == len(loc) - 1)):
            fields.append(part)
            here = here.get(part)
        else:
            tag = i if tag is None else tag
    return tuple(fields), tag


def field_error(exc: Any, data: Any) -> tuple[str, str]:
    """(param, message) of a pydantic ValidationError of `data`, the field named as a client wrote it.

    A union (a message is system | user | assistant | tool | function; a prompt is a string or a
    list) fails once per member: told here as one, the member whose role matched if one did, else
    'role must be one of ...', else every member's complaint."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    fields, tag = _split_loc(first["loc"], data, first["type"] == "missing")
    if tag is None:
        return _param(fields), f"{_param(fields)}: {first['msg']}"
    prefix = first["loc"][:tag]
    members: dict[Any, list[dict]] = {}
    for err in errors:
        if err["loc"][:tag] == prefix and len(err["loc"]) > tag:
            members.setdefault(err["loc"][tag], []).append(err)
    role_missed = [any(e["type"] == "literal_error" and e["loc"][tag + 1:] == ("role",) for e in errs)
                   for errs in members.values()]
    if any(role_missed):
        for errs, missed in zip(members.values(), role_missed):
            if not missed:
                where = _param(_split_loc(errs[0]["loc"], data, errs[0]["type"] == "missing")[0])
                return where, f"{where}: {errs[0]['msg']}"
        roles = [e["ctx"]["expected"] for errs in members.values() for e in errs
                 if e["type"] == "literal_error" and e["loc"][tag + 1:] == ("role",) and "ctx" in e]
        where = _param(prefix + ("role",))
        return where, f"{where}: must be one of {', '.join(roles)}"
    where = _param(prefix)
    said = list(dict.fromkeys(errs[0]["msg"] for errs in members.values()))
    return where, f"{where}: {'; or '.join(said)}"


class Gate:
    """ASGI middleware: see the module's docstring. n_ctx: the model's context in tokens."""

    def __init__(self, app: Any, *, api_key: str | None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 n_ctx: int, count_prompt: Callable[[bool, dict], int] | None = None, repeat_penalty: float = 1.0,
                 bind_host: str = "127.0.0.1"):
        self.app, self.api_key, self.max_bytes = app, api_key, max_request_bytes
        self.n_ctx, self.count_prompt = n_ctx, count_prompt
        self.repeat_penalty, self.bind_host = repeat_penalty, bind_host

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        refusal = self._refuse_before_body(headers, path, method)
        if refusal:
            await self._answer(send, *refusal, close=True)
            return
        if method not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(headers, receive)
        if body is None:
            await self._answer(send, 413, f"request body larger than this server's limit of {self.max_bytes} bytes "
                                          f"(tunesmith serve --max-request-bytes)", None, "request_too_large", close=True)
            return
        if path in NOT_SERVED:
            await self._answer(send, 404, f"{path} is not served: tunesmith serve runs a chat model "
                                          f"(POST {CHAT})", None, "not_served")
            return
        if path in COMPLETION_PATHS:
            checked = self._check_completion(path, body)
            if isinstance(checked, bytes) and self.count_prompt:
                checked = await self._check_length(path, checked)
            if isinstance(checked, tuple):
                await self._answer(send, 400, *checked)
                return
            body = checked
        kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-length", b"content-type",
                                                                                    b"transfer-encoding")]
        # The body is JSON (checked above, or left for FastAPI to refuse); curl -d sends it as a
        # form, which llama-cpp-python's routes would take as bytes and fail on.
        scope = {**scope, "headers": [*kept, (b"content-length", str(len(body)).encode()),
                                      (b"content-type", b"application/json")]}
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the app waits here for a client's disconnect

        await self.app(scope, replay, send)

    def _refuse_before_body(self, headers: dict[str, str], path: str, method: str) -> tuple | None:
        if not self.api_key:
            host = _host_name(headers.get("host", ""))
            if not (_is_loopback_name(host) or host == self.bind_host):
                return (403, f"Host {headers.get('host', '')!r} is not this server's: without an API key it answers "
                             f"only requests addressed to the loopback (127.0.0.1, localhost, [::1])",
                        None, "host_not_allowed")
            origin = headers.get("origin")
            if origin is not None and not _is_loopback_name(urllib.parse.urlsplit(origin).hostname or ""):
                return (403, f"requests from web pages of other sites (Origin {origin!r}) are refused: "
                             f"give the server an API key (--api-key) to serve them", None, "origin_not_allowed")
        elif not (method == "GET" and path in OPEN_PATHS):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return (401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                        None, "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return (413, f"request body of {int(length)} bytes is larger than this server's limit of "
                         f"{self.max_bytes} bytes (tunesmith serve --max-request-bytes)", None, "request_too_large")
        return None

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes | None:
        """The body, or None as soon as it passes the limit (a chunked body has no Content-Length)."""
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            parts.append(chunk)
            more = message.get("more_body", False)
        return b"".join(parts)

    def _check_completion(self, path: str, body: bytes) -> bytes | tuple:
        """The body to pass on, or (message, param, code) of a 400."""
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
        from pydantic import ValidationError

        try:
            data = json.loads(body)
        except ValueError as exc:
            return f"request body is not valid JSON: {exc}", None, "invalid_json"
        if not isinstance(data, dict):
            return f"request body must be a JSON object, not {type(data).__name__}", None, "invalid_json"
        chat = path == CHAT
        need = "messages" if chat else "prompt"
        if need not in data:
            return f"'{need}' is required", need, "missing_required_parameter"
        try:
            (CreateChatCompletionRequest if chat else CreateCompletionRequest).model_validate(data)
        except ValidationError as exc:
            param, message = field_error(exc, data)
            return message, param, "invalid_type"
        if chat and not data["messages"]:
            return "messages: give at least one message", "messages", "invalid_value"
        max_tokens = data.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > self.n_ctx:
            return (f"max_tokens {max_tokens} is more than this model's context of {self.n_ctx} tokens, which the "
                    f"prompt and the reply share (tunesmith serve --n-ctx)", "max_tokens", "context_length_exceeded")
        if "repeat_penalty" not in data:
            data["repeat_penalty"] = self.repeat_penalty
        return json.dumps(data).encode()

    async def _check_length(self, path: str, body: bytes) -> bytes | tuple:
        """body, or (message, param, code) of a 400 when the prompt with max_tokens passes the context."""
        import anyio

        data = json.loads(body)
        # tokenizing reads only the vocabulary: safe beside a generation in progress; off the event
        # loop so that a long prompt does not hold up the other clients
        n = await anyio.to_thread.run_sync(self.count_prompt, path == CHAT, data)
        where = "messages" if path == CHAT else "prompt"
        if n >= self.n_ctx:
            return (f"{where}: the prompt is {n} tokens, and this model's context is {self.n_ctx} "
                    f"(tunesmith serve --n-ctx)", where, "context_length_exceeded")
        max_tokens = data.get("max_tokens")
        if isinstance(max_tokens, int) and n + max_tokens > self.n_ctx:
            return (f"max_tokens {max_tokens} does not fit beside the prompt's {n} tokens in this model's context of "
                    f"{self.n_ctx} tokens: ask for at most {self.n_ctx - n}, or start the server with a larger "
                    f"--n-ctx", "max_tokens", "context_length_exceeded")
        return body

    @staticmethod
    async def _answer(send: Any, status: int, message: str, param: str | None, code: str | None,
                      close: bool = False) -> None:
        body = error_body(status, message, param, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if close:  # the body was not read: this connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
