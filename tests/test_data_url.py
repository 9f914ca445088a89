"""URL datasets against a real HTTP server on 127.0.0.1 (http.server in a thread): a download is
kept only when complete (the server's Content-Length, the recipe's sha256, the size cap), each
download writes a temporary file of its own, redirects follow the documented rule, and
credentials in the URL reach neither the reports nor the MLflow params. No model: seconds."""

from __future__ import annotations

import base64
import hashlib
import http.server
import datetime
import json
import ssl
import threading
import time

import pytest

from tunesmith.data import load
from tunesmith.provenance import redact_credentials
from tunesmith.errors import DataError
from tunesmith.schema import section_defaults

ROWS = [{"instruction": f"Reverse: a{i} b{i}", "output": f"b{i} a{i}"} for i in range(50)]
BODY = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
SHA = hashlib.sha256(BODY).hexdigest()
USER, SECRET = "reader", "s3cret-pw-31337"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None]] = []  # (path, Authorization header) of every request

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, body: bytes, length: int | None = None, status: int = 200, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        if close or length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self):
        Handler.seen.append((self.path, self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        if path == "/data.jsonl":
            self._send(BODY, len(BODY))
        elif path == "/cut.jsonl":  # says 1000 bytes more than it sends, then hangs up
            self._send(BODY, len(BODY) + 1000, close=True)
        elif path == "/moved.jsonl":
            self.send_response(302)
            self.send_header("Location", "/data.jsonl")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop.jsonl":
            self.send_response(302)
            self.send_header("Location", "/loop.jsonl")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/big.jsonl":  # announces its size honestly
            self._send(BODY * 4, len(BODY) * 4)
        elif path == "/big-unannounced.jsonl":  # no Content-Length: only counting can stop it
            self._send(BODY * 4, None)
        elif path == "/slow.jsonl":  # two halves with a pause: two fetches overlap
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:100])
            self.wfile.flush()
            time.sleep(1.0)
            self.wfile.write(BODY[100:])
        elif path == "/private.jsonl":
            expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self._send(b"no", 2, status=401)
            else:
                self._send(BODY, len(BODY))
        else:
            self._send(b"not found", 9, status=404)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def tls_server(server, tmp_path_factory):
    """An https server on 127.0.0.1 (a self-signed certificate, trusted through REQUESTS_CA_BUNDLE)
    serving the same files, and /to-http: a redirect to the plain http server's copy."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))

    class TLSHandler(Handler):
        def do_GET(self):
            if self.path == "/to-http":
                self.send_response(302)
                self.send_header("Location", f"{server}/data.jsonl")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                super().do_GET()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TLSHandler)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{srv.server_address[1]}", folder / "cert.pem"
    srv.shutdown()
    srv.server_close()


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_a_complete_download_is_kept_and_reused(server, tmp_path):
    Handler.seen.clear()
    path = load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False, sha256_hex=SHA)
    assert path.read_bytes() == BODY and path.name == "data.jsonl"
    facts = json.loads(path.with_name("data.jsonl.download.json").read_text())
    assert facts == {"url": f"{server}/data.jsonl", "final_url": f"{server}/data.jsonl", "bytes": len(BODY), "sha256": SHA}
    assert load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False) == path
    assert len(Handler.seen) == 1  # the second call read the cache
    assert _files(tmp_path) == ["data.jsonl", "data.jsonl.download.json"]  # no temporary file left
    # through the download stage's reader: rows, and the hash of what was read
    out = load.load(section_defaults("dataset", {"source": f"{server}/data.jsonl"}), offline=False, cache_dir=tmp_path)
    assert out.info["rows"] == 50 and out.info["sha256"] == SHA


def test_a_cut_off_download_is_refused_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(DataError, match=rf"/cut.jsonl: the download was cut off \(the server announced "
                                        rf"{len(BODY) + 1000} bytes, fewer arrived\): nothing kept"):
        load.fetch_url(f"{server}/cut.jsonl", tmp_path, offline=False)
    assert _files(tmp_path) == []  # no file a later run would take as done


def test_a_file_cut_on_disk_since_is_fetched_again(server, tmp_path):
    path = load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False)
    path.write_bytes(BODY[:100])  # e.g. a disk that filled up after the fact, or an old partial cache
    Handler.seen.clear()
    assert load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False).read_bytes() == BODY
    assert len(Handler.seen) == 1


def test_sha256_is_checked_when_the_recipe_gives_one(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"sha256 {SHA} is not dataset.sha256 {wrong}: .*nothing kept"):
        load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False, sha256_hex=wrong)
    assert _files(tmp_path) == []
    load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False)
    Handler.seen.clear()  # a cached file whose hash is not the recipe's is fetched again, and refused
    with pytest.raises(DataError, match="is not dataset.sha256"):
        load.fetch_url(f"{server}/data.jsonl", tmp_path, offline=False, sha256_hex=wrong)
    assert len(Handler.seen) == 1


def test_redirects_are_followed_a_few_times_and_recorded(server, tmp_path):
    path = load.fetch_url(f"{server}/moved.jsonl", tmp_path, offline=False)
    assert path.read_bytes() == BODY and path.name == "moved.jsonl"
    facts = json.loads(path.with_name("moved.jsonl.download.json").read_text())
    assert facts["final_url"] == f"{server}/data.jsonl"
    with pytest.raises(DataError, match="could not download dataset.source .*/loop.jsonl: Exceeded 5 redirects"):
        load.fetch_url(f"{server}/loop.jsonl", tmp_path, offline=False)


def test_a_redirect_from_https_to_http_is_refused_before_it_is_followed(server, tls_server, tmp_path, monkeypatch):
    url, cert = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    assert load.fetch_url(f"{url}/data.jsonl", tmp_path, offline=False).read_bytes() == BODY  # https itself works
    Handler.seen.clear()
    with pytest.raises(DataError, match=rf"/to-http redirects from https to {server}/data.jsonl: refused"):
        load.fetch_url(f"{url}/to-http", tmp_path, offline=False)
    assert Handler.seen == []  # the plain http server was never asked
    assert not list(tmp_path.rglob("*.part"))


def test_the_size_cap_refuses_a_large_file_before_or_while_reading_it(server, tmp_path):
    cap = len(BODY) * 2
    with pytest.raises(DataError, match=rf"/big.jsonl is {len(BODY) * 4} bytes, more than dataset.max_download_bytes \({cap}\)"):
        load.fetch_url(f"{server}/big.jsonl", tmp_path, offline=False, max_bytes=cap)
    with pytest.raises(DataError, match=rf"big-unannounced.jsonl sent more than dataset.max_download_bytes \({cap}\) bytes"):
        load.fetch_url(f"{server}/big-unannounced.jsonl", tmp_path, offline=False, max_bytes=cap)
    assert _files(tmp_path) == []
    # the schema's default cap lets an ordinary file through
    default = section_defaults("dataset", {"source": f"{server}/big.jsonl"})["max_download_bytes"]
    assert default >= 1 << 30
    assert load.fetch_url(f"{server}/big.jsonl", tmp_path, offline=False, max_bytes=default).stat().st_size == len(BODY) * 4


def test_two_jobs_fetching_one_url_write_separate_temporary_files(server, tmp_path):
    results, parts = [], set()

    def fetch():
        results.append(load.fetch_url(f"{server}/slow.jsonl", tmp_path, offline=False))

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while any(t.is_alive() for t in threads) and time.time() < deadline:
        parts |= {p.name for p in tmp_path.rglob("*.part")}
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(parts) == 2, parts  # each download had its own temporary file
    assert len(results) == 2 and results[0] == results[1] and results[0].read_bytes() == BODY
    assert _files(tmp_path) == ["slow.jsonl", "slow.jsonl.download.json"]


def test_credentials_in_the_url_are_used_but_never_reported(server, tmp_path):
    from tunesmith import tracking_record

    url = f"http://{USER}:{SECRET}@{server.removeprefix('http://')}/private.jsonl?token=tok-{SECRET}"
    Handler.seen.clear()
    section = section_defaults("dataset", {"source": url})
    out = load.load(section, offline=False, cache_dir=tmp_path)
    assert out.info["rows"] == 50 and Handler.seen[0][1].startswith("Basic ")  # sent as basic auth
    assert out.info["origin"] == f"http://***@{server.removeprefix('http://')}/private.jsonl?token=***"
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))
    record = tracking_record.StageRecord(recipe="demo", stage="download", results_dir=str(tmp_path))
    record.log_params({"dataset": section})
    for text in (json.dumps(out.info, default=str), written, json.dumps(record.params)):
        assert SECRET not in text
    assert record.params["dataset.source"] == out.info["origin"]
    with pytest.raises(DataError) as err:  # a refusal names the URL without its password
        load.fetch_url(url.replace(SECRET, "wrong", 1), tmp_path, offline=False)
    assert "HTTP 401" in str(err.value) and "wrong" not in str(err.value)
    with pytest.raises(DataError) as err:
        load.fetch_url(url, tmp_path, offline=True)
    assert SECRET not in str(err.value)
    assert redact_credentials(f"see https://u:{SECRET}@h/x?X-Amz-Signature=abc&part=2") == \
        "see https://***@h/x?X-Amz-Signature=***&part=2"
