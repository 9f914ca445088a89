"""Decontamination: curated rows against the documents of the eval tasks a recipe runs, and the
train split against the held-out split.

Matching is lm-eval's (and the GPT-3 paper's): text normalised by lm-eval's own Janitor
(lower case, punctuation deleted; NFKC first so look-alike Unicode spellings match too), split on
white space, and a row matches a document when they share one word n-gram (13 by default). A
document shorter than n words is matched on the whole of it. The optional embedding check reuses
the dedupe stage's embedder and a faiss inner-product index: a row matches the document most
similar to it when the cosine similarity reaches the threshold.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tunesmith.data import duplicates
from tunesmith.data.batches import read_table
from tunesmith.data.formatting import held_positions
from tunesmith.errors import DataError

log = logging.getLogger("tunesmith.data.decontaminate")

_JANITOR: Any = None


def _janitor() -> Any:
    global _JANITOR
    if _JANITOR is None:
        # lm-eval prints a traceback when its optional C++ helper is absent; the Python path is the same
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from lm_eval.decontamination.janitor import Janitor
            _JANITOR = Janitor()
    return _JANITOR


def words(text: str) -> list[str]:
    """Normalised words: NFKC, then lm-eval's Janitor normalisation (ASCII lower case, punctuation
    deleted), split on white space."""
    return _janitor().normalize_string(unicodedata.normalize("NFKC", text).lower()).split()


def ngrams(tokens: list[str], n: int) -> set[str]:
    if len(tokens) < n:
        return set()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class Documents:
    """One task's documents, indexed by their n-grams."""
    task: str
    texts: list[str]
    n: int
    index: dict[str, list[int]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)     # n-grams per document (1 for a short one)
    short: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # length -> whole doc -> ids

    @classmethod
    def build(cls, task: str, texts: list[str], n: int) -> "Documents":
        docs = cls(task, texts, n)
        index: dict[str, list[int]] = defaultdict(list)
        for i, text in enumerate(texts):
            toks = words(text)
            grams = ngrams(toks, n)
            if grams:
                for g in grams:
                    index[g].append(i)
                docs.sizes.append(len(grams))
            elif toks:  # shorter than n words: the whole document is its one n-gram
                docs.short.setdefault(len(toks), defaultdict(list))[" ".join(toks)].append(i)
                docs.sizes.append(1)
            else:
                docs.sizes.append(0)
        docs.index = dict(index)
        return docs

    def match(self, text: str) -> dict[int, int]:
        """Document id -> n-grams it shares with text."""
        toks = words(text)
        shared: dict[int, int] = defaultdict(int)
        for g in ngrams(toks, self.n):
            for i in self.index.get(g, ()):
                shared[i] += 1
        for length, whole in self.short.items():
            for g in ngrams(toks, length) & set(whole):
                for i in whole[g]:
                    shared[i] += 1
        return dict(shared)


def row_text(row: dict[str, Any]) -> str:
    """Everything a training row shows the model: instruction, input, output, messages, text."""
    parts = [str(row.get(k) or "") for k in ("instruction", "input", "output", "text")]
    msgs = row.get("messages")
    if msgs is not None and len(msgs):
        parts += [str(m.get("content") or "") for m in msgs]
    return "\n".join(p for p in parts if p)


def read_documents(path: str | Path, task: str) -> list[str]:
    """A task's documents from a local .jsonl/.json/.parquet/.csv: each row's string fields joined
    (question and answer for GSM8K), so a training row holding either part is found."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"decontaminate: task '{task}': document file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {line_no}: not valid JSON ({exc.msg})") from None
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); cut short?") from None
    elif suffix == ".parquet":
        records = read_table(path).to_pandas().to_dict("records")
    elif suffix == ".csv":
        try:
            records = pd.read_csv(path).to_dict("records")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable CSV file ({str(exc).splitlines()[0][:200]})") from None
    else:
        raise DataError(f"decontaminate: task '{task}': {path}: unsupported file type '{suffix}' "
                        f"(use .jsonl, .json, .parquet or .csv)")
    texts = []
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}, row {i}: expected an object with text fields, got {type(rec).__name__}")
        texts.append("\n".join(str(v) for v in rec.values() if isinstance(v, str) and v.strip()))
    return texts


def _clip(text: str, n: int = 240) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class Match:
    row: int            # position in the rows checked
    doc: int            # document id
    method: str         # ngram | embedding
    overlap: float | None = None      # shared n-grams / the document's n-grams
    similarity: float | None = None   # cosine, embedding check


def ngram_matches(docs: Documents, texts: list[str]) -> list[Match]:
    out = []
    for pos, text in enumerate(texts):
        shared = docs.match(text)
        if shared:
            doc = max(shared, key=lambda i: shared[i] / max(1, docs.sizes[i]))
            out.append(Match(pos, doc, "ngram", overlap=round(shared[doc] / max(1, docs.sizes[doc]), 4)))
    return out


def embedding_matches(doc_vectors: np.ndarray, row_vectors: np.ndarray, threshold: float) -> list[Match]:

    if not len(doc_vectors) or not len(row_vectors):
        return []
    index, device, _ = duplicates.build_index(doc_vectors, "flat")
    sims, ids = duplicates.neighbours(index, row_vectors, 1, device)
    return [Match(pos, int(ids[pos, 0]), "embedding", similarity=round(float(sims[pos, 0]), 4))
            for pos in range(len(row_vectors)) if sims[pos, 0] >= threshold]


def check(task: str, doc_texts: list[str], row_texts: list[str], section: dict[str, Any], *,
          embedder: Any = None) -> tuple[dict[int, Match], dict[str, Any]]:
    """Rows of row_texts that match a document of doc_texts: {row position: best match} and the
    task's report (counts by method, example pairs). section: the resolved decontaminate section."""
    started = time.perf_counter()
    docs = Documents.build(task, doc_texts, section["ngram"])
    found = {m.row: m for m in ngram_matches(docs, row_texts)}
    by_method = {"ngram": len(found)}
    emb = section["embedding"]
    embed_seconds = None
    if emb["enabled"] and embedder is not None:

        t0 = time.perf_counter()
        vectors = duplicates.embed(embedder, list(doc_texts) + list(row_texts), batch_size=emb["batch_size"])
        embed_seconds = time.perf_counter() - t0
        near = embedding_matches(vectors[: len(doc_texts)], vectors[len(doc_texts):], emb["threshold"])
        by_method["embedding"] = len(near)
        by_method["embedding_only"] = sum(m.row not in found for m in near)
        for m in near:
            if m.row in found:
                found[m.row].similarity = m.similarity
            else:
                found[m.row] = m
    examples = sorted(found.values(), key=lambda m: -(m.overlap or 0) - (m.similarity or 0))[: section["examples"]]
    report = {
        "documents": len(doc_texts),
        "documents_too_short_for_ngram": sum(len(v) for d in docs.short.values() for v in d.values()),
        "rows_checked": len(row_texts),
        "rows_matched": len(found),
        "by_method": by_method,
        "examples": [{"row": m.row, "document": m.doc, "method": m.method, "overlap": m.overlap,
                      "similarity": m.similarity, "row_text": _clip(row_texts[m.row]),
                      "document_text": _clip(doc_texts[m.doc])} for m in examples],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if embed_seconds is not None:
        report["embed_seconds"] = round(embed_seconds, 3)
        report["embed_rows_per_s"] = round((len(doc_texts) + len(row_texts)) / max(embed_seconds, 1e-9), 1)
    return found, report


class _EmbeddingCache:
    """The rows are checked against every task and then against the held-out split: each text is
    embedded once."""

    def __init__(self, model: Any) -> None:
        self.model, self.seen = model, {}

    def encode(self, texts: list[str], **kwargs: Any) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.seen))
        if missing:
            self.seen.update(zip(missing, self.model.encode(missing, **kwargs)))
        return np.stack([self.seen[t] for t in texts])


def run(frame: pd.DataFrame, tasks: dict[str, list[str]], section: dict[str, Any], split: dict[str, Any], *,
        skipped: dict[str, str] | None = None, embedder: Any = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Check frame's rows against each task's documents, then the train split against the held-out
    split (taken as the format stage takes it: split = the resolved format section). Returns the
    rows kept (with `split` = train | eval, and `contamination` naming the tasks a flagged row
    matched) and the report."""

    action = section["action"]
    embedder = _EmbeddingCache(embedder) if embedder is not None else None
    texts = [row_text(r) for r in frame.to_dict("records")]
    ids = [int(i) for i in frame["id"]]
    hits: dict[int, list[str]] = defaultdict(list)
    report_tasks: dict[str, Any] = {}
    for task, docs in tasks.items():
        found, rep = check(task, docs, texts, section, embedder=embedder)
        for pos in found:
            hits[pos].append(task)
        for ex in rep["examples"]:  # positions -> row ids a reader can look up
            ex["row_id"] = ids[ex.pop("row")]
        report_tasks[task] = rep
        log.info("decontaminate: %s: %d of %d rows match its %d documents %s", task, rep["rows_matched"],
                 len(texts), len(docs), rep["by_method"])
    frame = frame.copy()
    frame["contamination"] = [",".join(hits.get(i, [])) for i in range(len(frame))]
    if action == "drop":
        frame = frame[frame["contamination"] == ""].reset_index(drop=True)
    # The held-out split is fixed here, so dropping a leaking train row cannot move another row
    # across it; format keeps this split.
    held = held_positions(frame.drop(columns=["split"], errors="ignore"), split)
    frame["split"] = ["eval" if i in held else "train" for i in range(len(frame))]
    leak_report: dict[str, Any] = {"rows_checked": 0, "rows_matched": 0}
    if section["split_leakage"] and held:
        texts = [row_text(r) for r in frame.to_dict("records")]
        train_pos = [i for i in range(len(frame)) if i not in held]
        eval_pos = sorted(held)
        found, leak_report = check("heldout", [texts[i] for i in eval_pos], [texts[i] for i in train_pos], section,
                                   embedder=embedder)
        for ex in leak_report["examples"]:  # positions -> row ids a reader can look up
            ex["row_id"] = int(frame.iloc[train_pos[ex.pop("row")]]["id"])
            ex["heldout_row_id"] = int(frame.iloc[eval_pos[ex.pop("document")]]["id"])
        leaking = {train_pos[p] for p in found}
        if action == "drop":
            frame = frame.drop(index=sorted(leaking)).reset_index(drop=True)
        else:
            for i in leaking:
                frame.at[i, "contamination"] = ",".join(filter(None, [frame.at[i, "contamination"], "heldout"]))
        log.info("decontaminate: %d train rows leak into the %d held-out rows %s", len(leaking), len(eval_pos),
                 leak_report["by_method"])
    report = {"action": action, "ngram": section["ngram"],
              "embedding": section["embedding"] if section["embedding"]["enabled"] else None,
              "tasks": report_tasks, "heldout": leak_report, "not_checked": skipped or {},
              "rows_flagged": int((frame["contamination"] != "").sum())}
    return frame, report
