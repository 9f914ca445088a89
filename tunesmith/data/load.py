"""Reading a dataset (local file, URL or hub id) into tunesmith's canonical rows.

Canonical schema of ``raw.parquet`` (and of every later parquet, which adds token counts):

==============  =======================  ===================================================
column          type                     meaning
==============  =======================  ===================================================
id              int                      row index in the source (0-based, before skips)
instruction     str                      the user's request. For ``messages`` rows: every
                                         non-system message before the final assistant
                                         message, joined by blank lines (used for counts,
                                         filters and dedupe; format uses ``messages``)
input           str                      extra input appended to the instruction ("" if none)
output          str                      the reference response (final assistant message)
system          str                      per-row system prompt ("" if none)
messages        list[{role, content}]    ``messages`` schema only (else []): roles are
                                         system/user/assistant; ShareGPT ``from``/``value``
                                         with human/gpt are converted; trailing messages
                                         after the last assistant message are dropped
text            str                      ``text`` schema only: the raw document (else "")
==============  =======================  ===================================================

For the ``text`` schema ``output`` also holds the text, so that counts, filters and dedupe
treat a document as the thing to learn.

Bad rows (malformed JSON line, missing field, non-string field, non-UTF-8 bytes, unusable
messages) raise :class:`DataError` naming file, row (the 1-based line for JSONL, the 1-based
record otherwise) and field, or with ``on_bad_rows: skip`` are skipped and counted by reason.
An empty file, a mapped column absent from every row, or a hub id while offline always raise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from tunesmith.data import batches
from tunesmith.errors import DataError
from tunesmith.fileio import sha256
from tunesmith.provenance import redact_credentials

log = logging.getLogger("tunesmith.data.load")

FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
REQUIRED = {"instruction": ("instruction", "output"), "messages": ("messages",), "text": ("text",)}
OPTIONAL = {"instruction": ("input", "system"), "messages": ("system",), "text": ()}
MAX_EXAMPLES = 20
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class BadRow(Exception):
    """One unusable source row; ``where`` is 'line N' or 'record N'."""

    where: str
    reason: str
    field: str | None
    detail: str

    def message(self, file: str) -> str:
        fld = f", field '{self.field}'" if self.field else ""
        return f"{file}, {self.where}{fld}: {self.detail}"


@dataclass
class Skipped:
    by_reason: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, bad: BadRow) -> None:
        self.by_reason[bad.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": bad.where, "reason": bad.reason, "field": bad.field,
                                  "detail": bad.detail})

    def as_dict(self) -> dict[str, Any]:
        return {"count": sum(self.by_reason.values()), "by_reason": dict(self.by_reason),
                "examples": self.examples}


@dataclass
class Loaded:
    frame: pd.DataFrame
    info: dict[str, Any]


# ---------------------------------------------------------------- where the data is

def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_FORMATS
            or Path(source).exists())


def source_kind(source: str, fmt: str = "auto") -> str:
    """'local', 'url' or 'hub'."""
    if fmt == "hub":
        return "hub"
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        return "url"
    if _looks_like_path(source) or fmt != "auto":
        return "local"
    return "hub"


def file_format(path: Path, fmt: str = "auto") -> str:
    if fmt not in ("auto", "hub"):
        return fmt
    found = FILE_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"{path}: cannot tell the file format from the extension '{path.suffix}'; "
                        f"set dataset.format to one of json, jsonl, csv, parquet")
    return found


DOWNLOAD_CHUNK = 1 << 20
MAX_REDIRECTS = 5


def _cached(target: Path, expected_sha256: str | None) -> bool:
    """A finished download: its sidecar (written only after the file was complete and checked)
    names its size and hash, and the file still has them."""
    meta = target.with_name(target.name + ".download.json")
    if not (target.is_file() and meta.is_file()):
        return False
    try:
        facts = json.loads(meta.read_text())
    except ValueError:
        return False
    if target.stat().st_size != facts.get("bytes"):
        return False
    return expected_sha256 is None or facts.get("sha256") == expected_sha256.lower()


def fetch_url(url: str, cache_dir: str | Path, offline: bool, *, sha256_hex: str | None = None,
              max_bytes: int | None = None) -> Path:
    """Download a URL once into cache_dir (keyed by the URL) and return the local file.

    Each download goes to a temporary file of its own in the cache folder (two jobs fetching one
    URL never write the same file) and is moved into place only when complete: as many bytes as
    the server's Content-Length said, no more than max_bytes, and the sha256 the recipe gives, if
    it gives one; anything else raises and leaves nothing a later run would take as done.
    Redirects: at most MAX_REDIRECTS, never from https to http; credentials in the URL are sent as
    HTTP basic auth and dropped on a redirect to another host (requests' rule)."""
    shown = redact_credentials(url)
    if offline:
        raise DataError(f"dataset.source is the URL {shown}, and this run is offline (config.yaml "
                        f"offline: true). Download the file elsewhere, put it in the working directory "
                        f"and set dataset.source to its path, or set offline: false.")
    import requests

    name = Path(urllib.parse.urlparse(url).path).name or "download"
    target = Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if _cached(target, sha256_hex):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest, got = hashlib.sha256(), 0
    def no_downgrade(resp: Any, *args: Any, **kwargs: Any) -> None:
        # called on each response before requests follows its redirect
        if resp.is_redirect and resp.url.lower().startswith("https:"):
            hop = urllib.parse.urljoin(resp.url, resp.headers["Location"])
            if not hop.lower().startswith("https:"):
                raise DataError(f"dataset.source {shown} redirects from https to {redact_credentials(hop)}: refused "
                                f"(the file would travel unencrypted); give a URL that stays on https")

    try:
        with requests.Session() as session, os.fdopen(fd, "wb") as fh:
            session.max_redirects = MAX_REDIRECTS
            session.hooks["response"].append(no_downgrade)
            with session.get(url, stream=True, timeout=60) as resp:
                hops = [r.url for r in resp.history] + [resp.url]
                if resp.status_code != 200:
                    raise DataError(f"could not download dataset.source {shown}: HTTP {resp.status_code} "
                                    f"{resp.reason}")
                length = resp.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() and "Content-Encoding" not in resp.headers else None
                if max_bytes is not None and expected is not None and expected > max_bytes:
                    raise DataError(f"dataset.source {shown} is {expected} bytes, more than dataset.max_download_bytes "
                                    f"({max_bytes}): raise that cap if the file is meant to be this large")
                try:
                    for chunk in resp.iter_content(DOWNLOAD_CHUNK):
                        got += len(chunk)
                        if max_bytes is not None and got > max_bytes:
                            raise DataError(f"dataset.source {shown} sent more than dataset.max_download_bytes "
                                            f"({max_bytes}) bytes: stopped; raise that cap if the file is meant "
                                            f"to be this large")
                        digest.update(chunk)
                        fh.write(chunk)
                except requests.exceptions.ChunkedEncodingError:
                    # urllib3 saw the connection close before Content-Length: said as the cut it is
                    got = -1
        if got < 0 or (expected is not None and got != expected):
            said = (f"the server announced {expected} bytes, {'fewer' if got < 0 else f'only {got}'} arrived"
                    if expected is not None else "the connection closed mid-transfer")
            raise DataError(f"dataset.source {shown}: the download was cut off ({said}): nothing kept; run again")
        if sha256_hex and digest.hexdigest() != sha256_hex.lower():
            raise DataError(f"dataset.source {shown}: sha256 {digest.hexdigest()} is not dataset.sha256 "
                            f"{sha256_hex.lower()}: the file changed or was corrupted; nothing kept")
        tmp.replace(target)
    except requests.RequestException as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download dataset.source {shown}: {redact_credentials(str(exc))}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The sidecar says "complete"; written through a temporary file of its own as well (fileio's
    # temporary names are per process, and two downloads may share one).
    fd, meta_tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".json.part")
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": shown, "final_url": redact_credentials(hops[-1]), "bytes": got, "sha256": digest.hexdigest()}, fh)
    os.replace(meta_tmp, target.with_name(target.name + ".download.json"))
    return target


# ---------------------------------------------------------------- reading records

def _decode_document(raw: bytes, path: Path, on_bad_rows: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if on_bad_rows == "error":
            line = raw[:exc.start].count(b"\n") + 1
            raise DataError(f"{path}, line {line}: bytes that are not UTF-8 ({raw[exc.start:exc.end]!r} at "
                            f"byte {exc.start}). Re-encode the file as UTF-8, or set dataset.on_bad_rows: "
                            f"skip to drop the rows holding them.") from None
        # Keep going: rows whose strings carry the escaped bytes are skipped one by one later.
        return raw.decode("utf-8", errors="surrogateescape")


def _read_jsonl(path: Path, raw: bytes | Iterable[bytes], on_bad_rows: str) -> Iterator[tuple[str, Any]]:
    """raw: the file's bytes, or its lines (a file opened in binary mode streams them)."""
    lines = raw.split(b"\n") if isinstance(raw, bytes) else raw
    for number, line in enumerate(lines, start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield where, BadRow(where, "non_utf8", None,
                                f"bytes that are not UTF-8 ({line[exc.start:exc.end]!r} at column {exc.start + 1})")
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as exc:
            yield where, BadRow(where, "malformed_json", None, f"not valid JSON ({exc.msg} at column {exc.colno})")


def _read_json(path: Path, raw: bytes, on_bad_rows: str) -> Iterator[tuple[str, Any]]:
    text = _decode_document(raw, path, on_bad_rows)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data"):
            # A .json file that is really JSON lines.
            yield from _read_jsonl(path, raw, on_bad_rows)
            return
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records (or an object holding one list); "
                            f"found an object with keys {sorted(data)[:20]}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        yield f"record {number}", record


def _read_csv(path: Path, raw: bytes, on_bad_rows: str) -> Iterator[tuple[str, Any]]:
    text = _decode_document(raw, path, on_bad_rows)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for number, record in enumerate(reader, start=1):
            if None in record:
                yield f"record {number}", BadRow(f"record {number}", "malformed_csv", None,
                                                 f"more fields than the {len(reader.fieldnames or [])} in the header")
                continue
            yield f"record {number}", record
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None


def _read_parquet(path: Path, raw: bytes, on_bad_rows: str) -> Iterator[tuple[str, Any]]:
    try:
        frame = pd.read_parquet(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds; name the file
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    for number, record in enumerate(frame.to_dict("records"), start=1):
        yield f"record {number}", record


READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def read_local(path: Path, fmt: str, on_bad_rows: str) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise DataError(f"dataset.source {path}: file not found (paths are relative to the workflow's "
                        f"working directory)")
    if fmt == "jsonl":
        # Streamed line by line: a JSONL file of millions of rows is never held in memory whole.
        if _blank_file(path):
            raise DataError(f"{path}: the file is empty")
        return _stream_jsonl(path, on_bad_rows)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    return READERS[fmt](path, raw, on_bad_rows)


def _blank_file(path: Path) -> bool:
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if chunk.strip():
                return False
    return True


def _stream_jsonl(path: Path, on_bad_rows: str) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        yield from _read_jsonl(path, fh, on_bad_rows)


def read_hub(source: str, split: str, revision: str | None, offline: bool) -> Iterator[tuple[str, Any]]:
    if offline:
        raise DataError(
            f"dataset.source '{source}' is a Hugging Face hub dataset id, and this run is offline "
            f"(config.yaml offline: true). On a machine with network, save a copy, e.g. "
            f"python -c \"import datasets; datasets.load_dataset('{source}', split='{split}')"
            f".to_json('data/{source.replace('/', '_')}.jsonl')\", copy it here and set "
            f"dataset.source: data/{source.replace('/', '_')}.jsonl (or set offline: false).")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - hub errors are many; name the dataset
        raise DataError(f"could not load hub dataset '{source}' (split {split}): {exc}") from None
    for number, record in enumerate(ds, start=1):
        yield f"record {number}", record


# ---------------------------------------------------------------- canonical rows

def _string(record: dict[str, Any], column: str, canonical: str, where: str, required: bool) -> str:
    if column not in record:
        if required:
            raise BadRow(where, "missing_field", column, f"no '{column}' (mapped to {canonical}) in this row")
        return ""
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(where, "non_string_field", column,
                     f"expected a string for {canonical}, got {type(value).__name__} {str(value)[:60]!r}")
    if _SURROGATE.search(value):
        raise BadRow(where, "non_utf8", column, "bytes that are not UTF-8")
    return value


def message_list(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """A list of role/content (or ShareGPT from/value) messages -> canonical {role, content}
    messages; the one reader of message lists (SFT rows and preference pairs alike)."""
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise BadRow(where, "bad_messages", field, f"expected a list of messages, got {type(value).__name__}")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            raise BadRow(where, "bad_messages", f"{field}[{i}]", f"expected an object, got {type(msg).__name__}")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_MAP:
            raise BadRow(where, "bad_messages", f"{field}[{i}].role",
                         f"unknown role {role!r} (known: {', '.join(sorted(ROLE_MAP))})")
        if not isinstance(content, str):
            raise BadRow(where, "non_string_field", f"{field}[{i}].content",
                         f"expected a string, got {type(content).__name__}")
        if _SURROGATE.search(content):
            raise BadRow(where, "non_utf8", f"{field}[{i}].content", "bytes that are not UTF-8")
        out.append({"role": ROLE_MAP[role.lower()], "content": content})
    return out


def _messages(record: dict[str, Any], column: str, where: str) -> list[dict[str, str]]:
    if column not in record:
        raise BadRow(where, "missing_field", column, f"no '{column}' (mapped to messages) in this row")
    out = message_list(record[column], column, where)
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=-1)
    if last < 0 or not any(m["role"] == "user" for m in out[:last]):
        raise BadRow(where, "bad_messages", column, "no user message followed by an assistant message")
    return out[:last + 1]


def canonical_row(record: Any, index: int, where: str, schema: str, columns: dict[str, Any]) -> dict[str, Any]:
    """One source record -> one canonical row (raises BadRow)."""
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow(where, "not_an_object", None, f"expected an object with columns, got {type(record).__name__}")
    row: dict[str, Any] = {"id": index, "instruction": "", "input": "", "output": "", "system": "",
                           "messages": [], "text": ""}
    if columns.get("system"):
        row["system"] = _string(record, columns["system"], "system", where, required=False)
    if schema == "instruction":
        row["instruction"] = _string(record, columns["instruction"], "instruction", where, required=True)
        if columns.get("input"):
            row["input"] = _string(record, columns["input"], "input", where, required=False)
        row["output"] = _string(record, columns["output"], "output", where, required=True)
    elif schema == "messages":
        msgs = _messages(record, columns["messages"], where)
        systems = [m["content"] for m in msgs if m["role"] == "system"]
        if systems and not row["system"]:
            row["system"] = systems[0]
        row["messages"] = msgs
        row["instruction"] = "\n\n".join(m["content"] for m in msgs[:-1] if m["role"] != "system")
        row["output"] = msgs[-1]["content"]
    else:
        row["text"] = _string(record, columns["text"], "text", where, required=True)
        row["output"] = row["text"]
    return row


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["id", "instruction", "input", "output", "system", "messages", "text"])
    frame["id"] = frame["id"].astype("int64")
    return frame


def canonicalise(records: Iterator[tuple[str, Any]], *, file: str, schema: str, columns: dict[str, Any],
                 on_bad_rows: str = "error", limit: int | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Source records -> canonical frame + facts (source columns, skipped rows by reason)."""
    facts: dict[str, Any] = {}
    frames = list(canonical_batches(records, facts, file=file, schema=schema, columns=columns,
                                    on_bad_rows=on_bad_rows, limit=limit))
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return frame, facts


def canonical_batches(records: Iterator[tuple[str, Any]], facts: dict[str, Any], *, file: str, schema: str,
                      columns: dict[str, Any], on_bad_rows: str = "error", limit: int | None = None,
                      batch_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """canonicalise() in frames of batch_rows rows (all in one without it); `facts` is filled once the
    records are exhausted. A check that needs every record (no rows left, a mapped column no row
    has) raises after the last batch, so a writer of the batches must discard what it wrote."""
    rows: list[dict[str, Any]] = []
    n_rows = 0
    skipped = Skipped()
    seen_columns: dict[str, None] = {}
    records_read = 0
    for index, (where, record) in enumerate(records):
        if limit is not None and index >= limit:
            break
        records_read += 1
        if isinstance(record, dict):
            seen_columns.update(dict.fromkeys(record))
        try:
            rows.append(canonical_row(record, index, where, schema, columns))
            if batch_rows is not None and len(rows) >= batch_rows:
                n_rows += len(rows)
                yield to_frame(rows)
                rows = []
        except BadRow as bad:
            if on_bad_rows == "error":
                if bad.reason == "missing_field":
                    # Maybe a mapping mistake rather than one bad row: that error lists the columns.
                    _check_columns(file, schema, columns, seen_columns, records)
                raise DataError(bad.message(file) + _skip_hint(bad)) from None
            skipped.add(bad)
    if records_read == 0:
        raise DataError(f"{file}: the file holds no records")
    if seen_columns:  # with no readable row at all, the skip report below says more
        _check_columns(file, schema, columns, seen_columns, None)
    missing_optional = [columns[c] for c in OPTIONAL[schema] if columns.get(c) and columns[c] not in seen_columns]
    if missing_optional:
        log.warning("%s: optional mapped column(s) %s not found; left empty", file, missing_optional)
    if not rows and not n_rows:
        raise DataError(f"{file}: every one of the {records_read} rows was skipped as bad "
                        f"({dict(skipped.by_reason)}); first: {skipped.examples[:1]}")
    facts.update({"records_read": records_read, "source_columns": list(seen_columns),
                  "skipped": skipped.as_dict(), "missing_optional_columns": missing_optional,
                  "rows": n_rows + len(rows)})
    if rows:
        yield to_frame(rows)


def _skip_hint(bad: BadRow) -> str:
    return " (set dataset.on_bad_rows: skip to drop and count such rows)"


def _check_columns(file: str, schema: str, columns: dict[str, Any], seen: dict[str, None],
                   rest: Iterator[tuple[str, Any]] | None) -> None:
    """A required mapped column that no row has is a mapping error: list the columns that exist."""
    if rest is not None:
        # Look at the remaining records' keys before blaming the mapping.
        for _, record in rest:
            if isinstance(record, dict):
                seen.update(dict.fromkeys(record))
    for canonical in REQUIRED[schema]:
        column = columns[canonical]
        if column not in seen:
            raise DataError(f"{file}: mapped column '{column}' (dataset.columns.{canonical}) is missing; "
                            f"the columns that exist are: {', '.join(map(str, seen)) or '(none)'}")


def random_sample(records: Iterator[tuple[str, Any]], limit: int, seed: int) -> tuple[Iterator[tuple[str, Any]], dict[str, Any]]:
    """A seeded sample of `limit` records, in source order; each keeps where it was read (file and
    row), so a bad row in the sample is still named by its place in the source."""
    import numpy as np

    everything = list(records)
    n = len(everything)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(limit, n), replace=False)) if n else []
    return iter([everything[i] for i in chosen]), {"strategy": "random", "seed": seed, "rows": len(chosen),
                                                    "of_records": n}


SOURCE_KEYS = ("source", "format", "split", "revision", "schema", "columns", "on_bad_rows", "limit", "sample", "seed")


def source_name(source: str) -> str:
    return Path(source.rstrip("/")).stem or source


def source_sections(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The resolved dataset section of each source of a mixture (a key a source leaves out takes the
    dataset section's value), with its name, weight and max_rows. One entry for the single form."""
    if not section.get("sources"):
        return [{**section, "name": source_name(section["source"] or "data"), "weight": None, "max_rows": None}]
    out = []
    for item in section["sources"]:
        sub = {k: item.get(k, section[k]) for k in SOURCE_KEYS}
        # A checksum names one file: a source of a mixture never takes the dataset section's.
        sub["sha256"] = item.get("sha256")
        sub["max_download_bytes"] = item.get("max_download_bytes", section.get("max_download_bytes"))
        out.append({**sub, "sources": None, "name": item.get("name") or source_name(item["source"]),
                    "weight": item.get("weight"), "max_rows": item.get("max_rows")})
    return out


def mixture_weights(section: dict[str, Any]) -> dict[str, float] | None:
    """source name -> weight for a weighted mixture (dataset.sources with weights), else None."""
    subs = source_sections(section) if section.get("sources") else []
    if not subs or any(s["weight"] is None for s in subs):
        return None
    return {s["name"]: float(s["weight"]) for s in subs}


def load_mixture(section: dict[str, Any], *, offline: bool, cache_dir: str | Path = "resources/downloads") -> Loaded:
    """Every source of dataset.sources read as load() reads one, capped at its max_rows (a seeded
    sample), tagged with its name in a `source` column, ids renumbered across the mixture. Weights
    are applied by the format stage after the held-out split, so no eval row is ever repeated."""
    import numpy as np

    frames, infos = [], []
    for sub in source_sections(section):
        loaded = load(sub, offline=offline, cache_dir=cache_dir)
        frame, info = loaded.frame, dict(loaded.info, name=sub["name"], weight=sub["weight"], max_rows=sub["max_rows"])
        if sub["max_rows"] is not None and len(frame) > sub["max_rows"]:
            keep = np.sort(np.random.default_rng(sub["seed"]).choice(len(frame), sub["max_rows"], replace=False))
            frame = frame.iloc[keep].reset_index(drop=True)
            info["capped_from"] = info["rows"]
            info["rows"] = len(frame)
        frame = frame.assign(source=sub["name"])
        frames.append(frame)
        infos.append(info)
    frame = pd.concat(frames, ignore_index=True)
    frame["id"] = np.arange(len(frame), dtype="int64")
    total = sum(i["rows"] for i in infos)
    weights = [i["weight"] for i in infos]
    requested = ({i["name"]: w / sum(weights) for i, w in zip(infos, weights)} if all(w is not None for w in weights)
                 else None)
    info = {"origin": ", ".join(i["origin"] for i in infos), "kind": "mixture", "sources": infos,
            "rows": len(frame), "records_read": sum(i["records_read"] for i in infos),
            "rows_by_source": {i["name"]: i["rows"] for i in infos},
            "shares": {"requested_train": requested, "read": {i["name"]: i["rows"] / max(1, total) for i in infos}},
            "skipped": {"count": sum(i["skipped"]["count"] for i in infos),
                        "by_reason": _sum_counts(i["skipped"]["by_reason"] for i in infos)},
            "sha256": None, "columns": list(frame.columns)}
    return Loaded(frame, info)


def _sum_counts(dicts: Iterator[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def load(section: dict[str, Any], *, offline: bool, cache_dir: str | Path = "resources/downloads") -> Loaded:
    """Read dataset.source per the recipe's dataset section; returns canonical rows + source facts."""
    records, info, limit = _open(section, offline=offline, cache_dir=cache_dir)
    frame, facts = canonicalise(records, file=info.pop("_label"), schema=info["schema"], columns=info["columns_mapping"],
                                on_bad_rows=info["on_bad_rows"], limit=limit)
    info.update(facts)
    info["rows"] = len(frame)
    info["columns"] = list(frame.columns)
    return Loaded(frame, info)


def load_to_parquet(section: dict[str, Any], path: str | Path, *, offline: bool,
                    cache_dir: str | Path = "resources/downloads") -> dict[str, Any]:
    """load() of a single source written to `path` batch by batch (never the whole frame in memory);
    returns the source facts. Nothing is left at `path` when a row or the file is bad."""

    records, info, limit = _open(section, offline=offline, cache_dir=cache_dir)
    facts: dict[str, Any] = {}
    with batches.ParquetSink(path, batches.CANONICAL) as sink:
        for frame in canonical_batches(records, facts, file=info.pop("_label"), schema=info["schema"],
                                       columns=info["columns_mapping"], on_bad_rows=info["on_bad_rows"],
                                       limit=limit, batch_rows=batches.BATCH_ROWS):
            sink.write(frame)
    info.update(facts)
    info["columns"] = list(batches.CANONICAL.names)
    return info


def _open(section: dict[str, Any], *, offline: bool, cache_dir: str | Path) -> tuple[Iterator[tuple[str, Any]], dict[str, Any], int | None]:
    source = section["source"]
    if not source:
        raise DataError("dataset.source is empty: name a local file, URL or hub dataset id")
    fmt = section["format"]
    kind = source_kind(source, fmt)
    on_bad = section["on_bad_rows"]
    columns = dict(section["columns"])
    info: dict[str, Any] = {"origin": redact_credentials(source), "kind": kind, "schema": section["schema"],
                            "columns_mapping": columns, "on_bad_rows": on_bad}
    if kind == "hub":
        records = read_hub(source, section["split"], section["revision"], offline)
        label = f"hub dataset {source}"
        info.update(split=section["split"], revision=section["revision"], sha256=None)
    else:
        path = (fetch_url(source, cache_dir, offline, sha256_hex=section.get("sha256"),
                          max_bytes=section.get("max_download_bytes")) if kind == "url" else Path(source).expanduser())
        fmt = file_format(path, fmt)
        records = read_local(path, fmt, on_bad)
        label = str(path)
        info.update(path=str(path.resolve()), format=fmt, sha256=sha256(path))
    limit = section["limit"]
    if limit is not None and section["sample"] == "random":
        records, info["sample"] = random_sample(records, limit, section["seed"])
        limit = None
    info["_label"] = label
    return records, info, limit


def read_rows(path: str | Path) -> pd.DataFrame:
    """Read a canonical parquet back, with messages as plain lists of dicts."""
    frame = pd.read_parquet(path)
    if "messages" in frame.columns:
        frame["messages"] = [[{"role": str(m["role"]), "content": str(m["content"])} for m in (msgs if msgs is not None else [])]
                             for msgs in frame["messages"]]
    return frame
