"""Token counts per row with the model's fast tokenizer, in batches.

The prompt side counted as ``n_instruction_tokens`` is the instruction plus the input (joined
by a blank line, as format renders them); ``n_output_tokens`` counts the output; ``n_tokens``
is their sum. Counts exclude special tokens and the chat template's framing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tunesmith.data.batches import read_table
from tunesmith.errors import DataError

log = logging.getLogger("tunesmith.data.tokens")


def load_tokenizer(path: str | Path) -> Any:
    """A fast (Rust) tokenizer from a local model folder."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - name the folder, not transformers' internals
        raise DataError(f"could not load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{path}: the tokenizer is not a fast (Rust) tokenizer; batched counting needs one "
                        f"(a tokenizer.json file)")
    return tok


def load_counter(path: str | Path) -> Any:
    """What token counting needs: the Rust tokenizer of a folder, read from its tokenizer.json.
    Counting encodes without special tokens on that Rust object, which is all transformers would
    hand over, and reading it alone skips transformers' import of torch (8.5 s -> 0.25 s here per
    tokenize_count job). A folder without tokenizer.json goes through transformers."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return load_tokenizer(path)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - name the file, not the Rust error's internals
        raise DataError(f"{file}: not a tokenizer file the tokenizers library can read "
                        f"({type(exc).__name__}: {exc})") from None


def backend(tokenizer: Any) -> Any:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def switch_off_padding(tokenizer: Any) -> None:
    """Before saving a tokenizer: batched calls with padding=True leave padding and truncation on in
    the Rust tokenizer, and tokenizer.json keeps them, so every later encode of the saved tokenizer
    would pad to the longest text of its batch."""
    rust = getattr(tokenizer, "backend_tokenizer", None)
    if rust is not None:
        rust.no_padding()
        rust.no_truncation()


def prompt_texts(frame: pd.DataFrame) -> list[str]:
    """instruction + blank line + input (when there is an input), per row."""
    return [f"{i}\n\n{x}" if x else i for i, x in zip(frame["instruction"].tolist(), frame["input"].tolist())]


def count_tokens(texts: Sequence[str], tokenizer: Any, batch_size: int = 1000, progress: bool = False) -> np.ndarray:
    """Token count of each text. One Rust call per batch (encode_batch_fast skips offsets)."""
    rust = backend(tokenizer)
    if getattr(rust, "padding", None) is not None or getattr(rust, "truncation", None) is not None:
        # A tokenizer.json saved with padding on (see switch_off_padding): count on a copy without.
        from tokenizers import Tokenizer

        rust = Tokenizer.from_str(rust.to_str())
        rust.no_padding()
        rust.no_truncation()
    encode = getattr(rust, "encode_batch_fast", None) or rust.encode_batch
    out = np.zeros(len(texts), dtype=np.int64)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="tokenize", unit="batch", mininterval=2)
    for start in starts:
        batch = list(texts[start:start + batch_size])
        encodings = encode(batch, add_special_tokens=False)
        out[start:start + len(batch)] = [len(e.ids) for e in encodings]
    return out


def count_frame(frame: pd.DataFrame, tokenizer: Any, batch_size: int = 1000, progress: bool = False) -> pd.DataFrame:
    """id + n_instruction_tokens + n_output_tokens + n_tokens for canonical rows."""
    n_in = count_tokens(prompt_texts(frame), tokenizer, batch_size, progress)
    n_out = count_tokens(frame["output"].tolist(), tokenizer, batch_size, progress)
    return pd.DataFrame({"id": frame["id"].to_numpy(), "n_instruction_tokens": n_in,
                         "n_output_tokens": n_out, "n_tokens": n_in + n_out})


def field_stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0, "sum": 0}
    return {"min": int(values.min()), "median": float(np.median(values)),
            "p95": round(float(np.percentile(values, 95)), 2), "max": int(values.max()),
            "mean": round(float(values.mean()), 2), "sum": int(values.sum())}


def stats(counts: pd.DataFrame | dict[str, np.ndarray]) -> dict[str, Any]:
    """min/median/p95/max (+ mean, sum) per field; counts: a frame or counts_arrays()."""
    return {"rows": len(counts["n_tokens"]),
            "instruction": field_stats(np.asarray(counts["n_instruction_tokens"])),
            "output": field_stats(np.asarray(counts["n_output_tokens"])),
            "combined": field_stats(np.asarray(counts["n_tokens"]))}


def counts_arrays(n_instruction: np.ndarray, n_output: np.ndarray) -> dict[str, np.ndarray]:
    """The count columns as arrays (what stats and the histogram need of every row), sums in int64."""
    n_in, n_out = n_instruction.astype(np.int64), n_output.astype(np.int64)
    return {"n_instruction_tokens": n_in, "n_output_tokens": n_out, "n_tokens": n_in + n_out}


COUNT_COLUMNS = ["n_instruction_tokens", "n_output_tokens", "n_tokens"]


def counts_schema() -> Any:
    """token_counts.parquet's columns (what count_frame's frames are written as)."""
    import pyarrow as pa

    return pa.schema([pa.field("id", pa.int64())] + [pa.field(c, pa.int64()) for c in COUNT_COLUMNS])


class CountIndex:
    """token_counts.parquet held as arrays (a few bytes per row, not the rows), to attach each row's
    counts to a batch of rows by id: attach_counts() for a stream of batches."""

    def __init__(self, path: str | Path):
        table = read_table(path, columns=["id", *COUNT_COLUMNS])
        self.ids = table.column("id").to_numpy()
        # int32: one row's count fits, and it halves what is held for ten million rows.
        self.cols = {c: table.column(c).to_numpy().astype(np.int32) for c in COUNT_COLUMNS}
        self._next = 0
        self._index: pd.Index | None = None

    def attach(self, batch: Any) -> Any:
        """An arrow batch of canonical rows + its count columns (int64, replacing any it had)."""
        import pyarrow as pa

        ids = batch.column("id").to_numpy()
        start, n = self._next, len(ids)
        if np.array_equal(self.ids[start:start + n], ids):  # the usual case: same row order as raw
            positions = slice(start, start + n)
            self._next += n
        else:
            if self._index is None:
                self._index = pd.Index(self.ids)
            positions = self._index.get_indexer(ids)
            if (positions < 0).any():
                missing = ids[positions < 0][:5].tolist()
                raise DataError(f"token counts do not cover every row (ids {missing} missing): rerun tokenize_count")
        names = [c for c in batch.schema.names if c not in COUNT_COLUMNS]
        arrays = [batch.column(c) for c in names] + [pa.array(self.cols[c][positions].astype(np.int64))
                                                     for c in COUNT_COLUMNS]
        return pa.RecordBatch.from_arrays(arrays, names=names + COUNT_COLUMNS)


def attach_counts(frame: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """Join counts onto rows by id; every row must have its count."""
    cols = ["id", "n_instruction_tokens", "n_output_tokens", "n_tokens"]
    merged = frame.drop(columns=[c for c in cols[1:] if c in frame.columns]).merge(
        counts[cols], on="id", how="left", validate="one_to_one")
    if merged["n_tokens"].isna().any():
        missing = merged.loc[merged["n_tokens"].isna(), "id"].head(5).tolist()
        raise DataError(f"token counts do not cover every row (ids {missing} missing): rerun tokenize_count")
    for col in cols[1:]:
        merged[col] = merged[col].astype("int64")
    return merged
