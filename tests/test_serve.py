"""`tunesmith serve` on a real GGUF: llama-cpp-python's OpenAI-compatible server answers a held-out
prompt of the reverse-words task with exactly the HF model's greedy reply, through the chat
template embedded in the GGUF, and stops at the end-of-turn token; Ctrl+C shuts it down cleanly.
The model is SmolLM2-135M-Instruct as bf16 safetensors (what merge writes), converted to F16 by
llama.cpp's converter, as quantize does (the first held-out row on which greedy decoding is
not decided by rounding: see the test). And the refusals: a wide bind without a key, a
recipe without GGUFs, CONFIG_FILE in the environment.

Bad clients and faults, over real HTTP against the real server on loopback: every malformed,
mistyped, incomplete or too-long request answered 400 (404, 401) with an OpenAI error object
naming the field, and a good request answered after them; an unauthenticated 8 GiB body refused
from its headers, an over-limit body refused without being read; 50 requests from 8 client
threads, streams among them, all answered whole (the figures are printed); a keyless server
refusing other Host names and other sites' pages. ~3 min on 2 busy cores."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tunesmith import quantization, serving
from tunesmith.errors import TunesmithError

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory, smollm2_dir) -> Path:
    out = tmp_path_factory.mktemp("serve") / "model-f16.gguf"
    quantization.convert(smollm2_dir, out)
    return out


def _hf_greedy(model_dir: Path, rows: list[dict], max_new_tokens: int):
    """Yields (messages, greedy reply, stopped at end of turn, smallest top-1/top-2 logit margin on the way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for row in rows:
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        margin = min(float(t.topk(2).values[0, 0] - t.topk(2).values[0, 1]) for t in gen.logits)
        new = gen.sequences[0, ids["input_ids"].shape[1]:].tolist()
        stopped = tok.eos_token_id in new
        if stopped:
            new = new[:new.index(tok.eos_token_id)]
        yield row["prompt"], tok.decode(new, skip_special_tokens=True), stopped, margin


@pytest.mark.slow
def test_serve_answers_like_the_hf_model_and_stops_at_end_of_turn(smollm2_gguf, smollm2_dir, eval_split):
    rows = [json.loads(line) for line in Path(eval_split["eval"]).read_text().splitlines()]
    # The untuned model is unsure on some rows: where its top two tokens lie within rounding of
    # each other (bf16 weights in fp32 against llama.cpp's F16), greedy decoding may go either way
    # in either runtime. Equality is asked on the first row whose every step is decided.
    found = next((c for c in _hf_greedy(smollm2_dir, rows[:3], max_new_tokens=48) if c[2] and c[3] > 0.05), None)
    assert found, "no held-out row with a decided greedy reply that ends its turn within 48 tokens"
    messages, expected, _, _ = found  # system + user, as the held-out split holds them

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", str(smollm2_gguf), "--port", str(port),
                             "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as resp:
                    models = json.loads(resp.read())
                break
            except OSError:
                assert time.time() < deadline, "server not up after 120 s"
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == ["model-f16"]
        body = {"model": "model-f16", "messages": messages, "temperature": 0.0, "max_tokens": 48}
        req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            reply = json.loads(resp.read())
        choice = reply["choices"][0]
        assert choice["message"]["content"] == expected
        assert choice["finish_reason"] == "stop"  # the end-of-turn token, not the length limit
        assert reply["usage"]["completion_tokens"] < 48
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C sends
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"serve did not stop on Ctrl+C:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in out and "stop with Ctrl+C" in out and "stopped" in out


@pytest.mark.slow
def test_chat_talks_in_the_terminal_and_says_how_to_stop(smollm2_gguf):
    out = io.StringIO()
    serving.chat(smollm2_gguf, system="You reverse word lists.", inp=io.StringIO("Reverse: lamp, ocean\n/exit\n"),
                 out=out, max_tokens=16, threads=2)
    text = out.getvalue()
    assert text.startswith(f"tunesmith chat: {smollm2_gguf} (in this terminal; stop with /exit or Ctrl+D)")
    reply = text.split("> ", 1)[1].split("\n", 1)[0]
    assert reply.strip() and text.rstrip().endswith("tunesmith chat: bye")


def test_serve_refuses_a_wide_bind_without_a_key_and_names_missing_ggufs(tmp_path):
    with pytest.raises(TunesmithError, match="--host 0.0.0.0 is reachable from other machines: give an API key"):
        serving.check_bind("0.0.0.0", None)
    serving.check_bind("0.0.0.0", "secret")
    serving.check_bind("::1", None)
    serving.check_bind("localhost", None)
    with pytest.raises(TunesmithError, match="no GGUF folder at .*demo/main/gguf; run the workflow"):
        serving.find_gguf("demo", tmp_path)
    folder = tmp_path / "demo" / "lr-1" / "gguf"
    folder.mkdir(parents=True)
    (folder / "model-Q8_0.gguf").write_bytes(b"")
    (folder / "report.json").write_text(json.dumps({"files": {"Q8_0": {"file": "model-Q8_0.gguf"}}}))
    with pytest.raises(TunesmithError, match="this recipe has GGUFs for: lr-1"):
        serving.find_gguf("demo", tmp_path)
    assert serving.find_gguf("demo/lr-1", tmp_path) == folder / "model-Q8_0.gguf"
    with pytest.raises(TunesmithError, match=r"no Q4_K_M GGUF in .* \(made: Q8_0\)"):
        serving.find_gguf("demo/lr-1", tmp_path, "Q4_K_M")
    with pytest.raises(TunesmithError, match="nope.gguf: no such GGUF file"):
        serving.find_gguf(str(tmp_path / "nope.gguf"), tmp_path)


# ------------------------------------------------------------------ a client's mistakes, faults, load

KEY = "test-key-" + os.urandom(6).hex()


class Served:
    """`tunesmith serve` in a process of its own on a free loopback port; stop() sends Ctrl+C."""

    def __init__(self, gguf: Path, *args: str, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", str(gguf), "--port", str(self.port),
                                      "--threads", "2", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=full_env, start_new_session=True)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert time.time() < deadline, "server not up after 120 s"
                time.sleep(0.3)

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
        return out


def _post(url: str, body: bytes | dict, key: str | None = KEY, headers: dict | None = None,
          timeout: float = 300) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a POST; urllib's default Content-Type is a form, as curl -d's."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    head = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=head, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def _raw(port: int, head: str, body_chunks=(), read_timeout: float = 10) -> tuple[bytes, int]:
    """Send request headers, then body chunks until the server answers; (answer, body bytes sent)."""
    import select

    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body was all sent
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection: what it answered is still readable
                break
            sent += len(chunk)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
        except ConnectionResetError:
            pass
    return answer, sent


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


CHAT_OK = {"messages": [{"role": "user", "content": "Reverse: lamp, ocean"}], "max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def keyed(smollm2_gguf):
    # API_KEY in the environment is llama-cpp-python's own setting: it must not replace --api-key.
    srv = Served(smollm2_gguf, "--api-key", KEY, "--max-request-bytes", "65536", "--n-ctx", "512",
                 env={"API_KEY": "env-key", "LORA_PATH": "/nonexistent/adapter.gguf"})
    yield srv
    out = srv.stop()
    assert "Traceback" not in out, out[-5000:]  # no client's mistake reached a server error


@pytest.mark.slow
def test_a_clients_mistakes_are_client_errors_naming_the_field_and_it_is_answered_after(keyed):
    chat, comp = f"{keyed.url}/v1/chat/completions", f"{keyed.url}/v1/completions"
    user = [{"role": "user", "content": "hi"}]
    cases = [  # (url, body, status, param, code)
        (chat, b"not json", 400, None, "invalid_json"),
        (chat, b"[1, 2]", 400, None, "invalid_json"),
        (chat, {"messages": "garbage"}, 400, "messages", "invalid_type"),
        (chat, {}, 400, "messages", "missing_required_parameter"),
        (chat, {"messages": []}, 400, "messages", "invalid_value"),
        (chat, {"messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_type"),
        (chat, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_type"),
        (chat, {"messages": user, "max_tokens": "lots"}, 400, "max_tokens", "invalid_type"),
        (chat, {"messages": user, "temperature": [1]}, 400, "temperature", "invalid_type"),
        (chat, {"messages": user, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
        # fits alone, not with the prompt: llama-cpp-python would cut max_tokens silently, and a
        # stream would answer 200 and then fail inside the model
        (chat, {"messages": user, "max_tokens": 500}, 400, "max_tokens", "context_length_exceeded"),
        (chat, {"messages": user, "max_tokens": 500, "stream": True}, 400, "max_tokens", "context_length_exceeded"),
        (comp, {"prompt": "word " * 300, "max_tokens": 300}, 400, "max_tokens", "context_length_exceeded"),
        (chat, {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}, 400, "messages",
         "context_length_exceeded"),
        (comp, {"max_tokens": 4}, 400, "prompt", "missing_required_parameter"),
        (comp, {"prompt": 5}, 400, "prompt", "invalid_type"),
        (f"{keyed.url}/v1/embeddings", {"input": "x"}, 404, None, "not_served"),
    ]
    for url, body, status, param, code in cases:
        got, answer, _ = _post(url, body)
        assert got == status, (body, got, answer)
        error = answer["error"]
        assert (error["param"], error["code"]) == (param, code), (body, error)
        assert error["message"] and error["type"] == "invalid_request_error", error
    _, answer, _ = _post(chat, {"messages": user, "max_tokens": 500})
    prompt = int(answer["error"]["message"].split("prompt's ")[1].split(" tokens")[0])
    assert f"in this model's context of 512 tokens: ask for at most {512 - prompt}" in answer["error"]["message"]
    # the count is the model's own: exactly the most that fits is answered
    got, answer, _ = _post(chat, {"messages": user, "max_tokens": 512 - prompt, "temperature": 0.0,
                                  "stop": ["\n", "."]})
    assert got == 200 and answer["usage"]["prompt_tokens"] == prompt, answer

    # only the key given on the command line opens it; llama-cpp-python's API_KEY variable does not
    for key in (None, "env-key", KEY + "x"):
        got, answer, headers = _post(chat, CHAT_OK, key=key)
        assert got == 401 and answer["error"]["code"] == "invalid_api_key", (key, answer)
        assert headers.get("www-authenticate") == "Bearer"
    assert _get(f"{keyed.url}/v1/models")[0] == 401

    # and after all of that, a good request (sent as a form, as curl -d sends it) is answered
    got, answer, _ = _post(chat, CHAT_OK)
    assert got == 200 and answer["choices"][0]["message"]["content"].strip(), answer
    assert answer["usage"]["completion_tokens"] <= 8
    got, answer, _ = _post(comp, {"prompt": "Hello", "max_tokens": 4, "temperature": 0.0})
    assert got == 200 and answer["choices"][0]["text"], answer


@pytest.mark.slow
def test_large_bodies_are_refused_without_being_buffered(keyed):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{keyed.port}\r\n"
            f"Content-Type: application/json\r\n")
    before = keyed.rss_kb()
    # no key, 8 GiB announced, not one body byte sent: refused at once from the headers alone
    t0 = time.time()
    answer, _ = _raw(keyed.port, head + f"Content-Length: {8 << 30}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 ") and b"connection: close" in answer.lower(), answer[:300]
    assert time.time() - t0 < 10
    # no key, a body on its way: the answer comes before the body is sent (64 MiB offered)
    answer, sent = _raw(keyed.port, head + f"Content-Length: {64 << 20}\r\n\r\n", [b"x" * (1 << 20)] * 64)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
    assert sent < 64 << 20
    # the key, a Content-Length over --max-request-bytes: 413 before the body
    answer, _ = _raw(keyed.port, head + f"Authorization: Bearer {KEY}\r\nContent-Length: 65537\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"--max-request-bytes" in answer, answer[:300]
    # the key, a chunked body with no length: stopped once it passes the limit, not read to its end
    chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
    answer, sent = _raw(keyed.port, head + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n",
                        [chunk] * 1024)  # 64 MiB offered
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert sent < 1024 * len(chunk)
    assert keyed.rss_kb() - before < 32 * 1024  # nothing of the order of the bodies offered was kept
    assert _post(f"{keyed.url}/v1/chat/completions", CHAT_OK)[0] == 200


@pytest.mark.slow
def test_a_bounded_load_is_answered_with_nothing_lost(keyed):
    """50 requests from 8 client threads (every tenth streamed): the model answers one at a time,
    the others queue; every request gets its whole answer, streams included (llama-cpp-python's
    default would end a stream early whenever another request waits)."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{keyed.url}/v1/chat/completions"

    def one(i: int) -> tuple[bool, float, str]:
        body = {**CHAT_OK, "messages": [{"role": "user", "content": f"Reverse: lamp{i}, ocean{i}"}],
                "stream": i % 10 == 0}
        t0 = time.time()
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                raw = resp.read().decode()
        except Exception as exc:  # counted, not raised: the figures say what was lost
            return False, time.time() - t0, repr(exc)
        if body["stream"]:
            events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            finished = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1]]
            ok = events[-1:] == ["[DONE]"] and finished[-1] in ("stop", "length")
        else:
            answer = json.loads(raw)
            ok = answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] > 0
        return ok, time.time() - t0, raw[-200:]

    start = time.time()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(50)))
    wall = time.time() - start
    latencies = sorted(r[1] for r in results)
    answered = sum(r[0] for r in results)
    figures = {"requests": 50, "clients": 8, "answered": answered, "errors": 50 - answered,
               "p50_s": round(latencies[24], 2), "p95_s": round(latencies[int(0.95 * 50) - 1], 2),
               "wall_s": round(wall, 1), "load_average": os.getloadavg()}
    print(f"\nserve load: {json.dumps(figures)}")
    assert answered == 50, [r[2] for r in results if not r[0]]


@pytest.mark.slow
def test_without_a_key_other_hosts_and_other_sites_pages_are_refused(smollm2_gguf):
    srv = Served(smollm2_gguf)
    try:
        models = f"{srv.url}/v1/models"
        assert _get(models)[0] == 200
        assert _get(models, {"Host": f"localhost:{srv.port}"})[0] == 200
        assert _get(models, {"Origin": "http://localhost:3000"})[0] == 200  # a page of this machine
        # DNS rebinding: a name that resolves to 127.0.0.1 arrives with its own Host header
        got, answer, _ = _get(models, {"Host": f"attacker.example:{srv.port}"})
        assert got == 403 and answer["error"]["code"] == "host_not_allowed"
        got, answer, _ = _post(f"{srv.url}/v1/chat/completions", CHAT_OK, key=None,
                               headers={"Origin": "http://attacker.example", "Content-Type": "text/plain"})
        assert got == 403 and answer["error"]["code"] == "origin_not_allowed"
        req = urllib.request.Request(f"{srv.url}/v1/chat/completions", method="OPTIONS",
                                     headers={"Origin": f"http://127.0.0.1:{srv.port}",
                                              "Access-Control-Request-Method": "POST"})
        try:
            headers = dict(urllib.request.urlopen(req, timeout=30).headers)
        except urllib.error.HTTPError as err:
            headers = dict(err.headers)
        assert not any(h.lower().startswith("access-control-allow") for h in headers), headers  # no CORS
    finally:
        out = srv.stop()
    assert "no API key: any program or user on this machine can use it" in out


def test_config_file_in_the_environment_is_refused(tmp_path, monkeypatch):
    """llama-cpp-python reads CONFIG_FILE and takes the API key and model from it: refused, named."""
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"host": "0.0.0.0", "api_key": None, "models": [{"model": "other.gguf"}]}))
    monkeypatch.setenv("CONFIG_FILE", str(config))
    with pytest.raises(TunesmithError, match=r"CONFIG_FILE is set in the environment .*server.json.*Unset it"):
        serving.build_app(tmp_path / "m.gguf", host="127.0.0.1", port=8000, api_key="k", n_ctx=512, threads=1,
                          alias="m", repeat_penalty=1.0, max_request_bytes=1024)
