"""The pretraining corpus, read the one way pretraining and the GGUF checks both use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import DataError


def iter_corpus(corpus: dict[str, Any]) -> Iterator[str]:
    """Documents from a local .txt (one per line) / .jsonl / .json / .parquet file."""
    source = corpus.get("source")
    if not source:
        raise DataError("pretrain.corpus.source is empty")
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found (pretrain.corpus.source; relative paths start at the "
                        f"working directory)")
    column = corpus.get("text_column") or "text"
    limit = corpus.get("limit")
    suffix = path.suffix.lower()
    n = 0

    def take(text: Any, where: str) -> Iterator[str]:
        nonlocal n
        if not isinstance(text, str):
            raise DataError(f"{path}, {where}, field '{column}': expected text, got {type(text).__name__}")
        if text.strip():
            n += 1
            yield text

    if suffix == ".txt":
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                yield from take(line.rstrip("\n"), f"line {i}")
                if limit and n >= limit:
                    return
    elif suffix in (".jsonl", ".json"):
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise DataError(f"{path}, row {i}: not valid JSON ({exc.msg})") from None
        else:
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg})") from None
            if isinstance(rows, dict):
                rows = next((v for v in rows.values() if isinstance(v, list)), [rows])
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or column not in row:
                raise DataError(f"{path}, row {i}: missing field '{column}' (pretrain.corpus.text_column)")
            yield from take(row[column], f"row {i}")
            if limit and n >= limit:
                return
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise DataError(f"{path}: no column '{column}' (has {', '.join(table.column_names)})")
        for i, text in enumerate(table.column(column).to_pylist(), 1):
            yield from take(text, f"row {i}")
            if limit and n >= limit:
                return
    else:
        raise DataError(f"{path}: unsupported corpus format '{suffix}' (use .txt, .jsonl, .json or .parquet)")
    if n == 0:
        raise DataError(f"{path}: the corpus has no non-empty documents")
