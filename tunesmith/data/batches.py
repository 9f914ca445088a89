"""Rows in and out of the data stages' parquet files one batch at a time, so a stage's memory is
set by its batch, not by the dataset (ten million rows held as one pandas frame do not fit).

Every stage reads its input with :func:`iter_batches` (pyarrow's row-group reader) and writes with
:class:`ParquetSink`, an atomic streaming writer: the output appears only once the stage finished,
so a failure never leaves half a file. A shard job (dataset.shards > 1) reads its rows [start, stop)
with :func:`iter_rows`; :func:`shard_bounds` is the one definition of which rows shard i of N holds.
"""

from __future__ import annotations

import resource
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tunesmith import fileio
from tunesmith.errors import DataError

# Rows per batch and per written row group. Not a recipe setting: it trades a few MB of memory per
# batch against per-batch overhead, and 64k rows of chat text (~35 MB of strings, a few times that
# as Python objects while a batch is being worked on) keeps both small.
BATCH_ROWS = 65_536

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# The canonical columns of raw.parquet (tunesmith.data.load): fixed here because a batch whose rows
# all have empty messages would otherwise be typed list<null> and clash with a later batch.
CANONICAL = pa.schema([("id", pa.int64()), ("instruction", pa.string()), ("input", pa.string()),
                       ("output", pa.string()), ("system", pa.string()), ("messages", pa.list_(MESSAGE)),
                       ("text", pa.string())])


def parquet_file(path: str | Path, **kwargs: Any) -> pq.ParquetFile:
    """pq.ParquetFile, with a cut-short or corrupt file named (pyarrow's own message names none)."""
    try:
        return pq.ParquetFile(path, **kwargs)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, exc) from None


def read_table(path: str | Path, **kwargs: Any) -> pa.Table:
    """pq.read_table, with a cut-short or corrupt file named."""
    try:
        return pq.read_table(path, **kwargs)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(path, exc) from None


def unreadable(path: str | Path, exc: BaseException) -> DataError:
    if not Path(path).is_file():
        return DataError(f"{path}: no such file")
    return DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                     "cut short by a killed job or a full disk? Delete it and re-run the job that wrote it")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB. On Linux the high-water mark of its own
    memory (VmHWM): ru_maxrss also counts the parent's resident memory at the moment it spawned
    this process (Linux carries it over exec), so under snakemake every job read at least
    snakemake's ~260 MB, and a bench job spawned by a 5 GB parent read 5 GB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # KiB on Linux, bytes on macOS


def num_rows(path: str | Path) -> int:
    return parquet_file(path).metadata.num_rows


def columns(path: str | Path) -> list[str]:
    return parquet_file(path).schema_arrow.names


def schema(path: str | Path) -> pa.Schema:
    """A parquet file's arrow schema (what a stage that passes rows through writes, even with none left)."""
    return parquet_file(path).schema_arrow.remove_metadata()


def iter_batches(path: str | Path, columns: Sequence[str] | None = None, *,
                 row_groups: Sequence[int] | None = None, batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet file, in row order; row_groups: only those (a shard)."""
    # pre_buffer (pyarrow's default) keeps every byte range it read until the reader is closed:
    # memory that grows to the size of the file (measured: 228 MB over a 224 MB file). Streamed
    # reads through a 1 MiB buffer instead stay flat.
    source = parquet_file(path, pre_buffer=False, buffer_size=1 << 20)
    yield from source.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=list(columns) if columns else None,
                                   row_groups=row_groups)


def shard_bounds(n_rows: int, shards: int, shard: int) -> tuple[int, int]:
    """Rows [start, stop) of shard (0-based) out of shards contiguous, near-equal slices: the one
    contract of every shard job (tokenize_shard, filter_shard, embed_shard) and of their gathers."""

    if not 0 <= shard < shards:
        raise DataError(f"shard {shard} is outside 0..{shards - 1} (dataset.shards = {shards})")
    return n_rows * shard // shards, n_rows * (shard + 1) // shards


def iter_rows(path: str | Path, columns: Sequence[str] | None = None, *, start: int = 0,
              stop: int | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of rows [start, stop) of a parquet file, in row order: only the row groups that
    hold them are read, one batch at a time (memory set by the batch, as iter_batches)."""
    meta = parquet_file(path).metadata
    stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
    groups, pos, first = [], 0, None
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        if pos < stop and pos + n > start:
            groups.append(group)
            first = pos if first is None else first
        pos += n
    if not groups or start >= stop:
        return
    pos = first
    for batch in iter_batches(path, columns, row_groups=groups):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if hi > lo:
            yield batch if (lo, hi) == (0, batch.num_rows) else batch.slice(lo, hi - lo)
        pos += batch.num_rows
        if pos >= stop:
            return


def read_columns(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """A few (small) columns of every row, strings of a column named `source` or `split` as categories."""
    present = set(parquet_file(path).schema_arrow.names)
    table = read_table(path, columns=[c for c in columns if c in present],
                          read_dictionary=[c for c in ("source", "split") if c in columns and c in present])
    return table.to_pandas()


def to_frame(batch: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """A batch as the pandas frame the stages' row functions take (tunesmith.data.load.read_rows:
    messages as plain lists of {role, content} dicts)."""
    if "messages" not in batch.schema.names:
        return batch.to_pandas()
    rest = batch.drop_columns(["messages"]) if isinstance(batch, pa.Table) else \
        pa.Table.from_batches([batch]).drop_columns(["messages"])
    frame = rest.to_pandas()
    messages = batch.column("messages").to_pylist()
    frame.insert(batch.schema.names.index("messages"), "messages",
                 [[{"role": str(m["role"]), "content": str(m["content"])} for m in (ms or [])] for ms in messages])
    return frame


class ParquetSink:
    """Write a parquet file batch by batch, atomically (see fileio.atomic_path). The schema is the
    one given or the first batch's; later batches are cast to it. metadata: key/value strings written
    into the file's footer when the sink closes (a shard's bounds, read back by file_metadata), so a
    stage may add to it until then. Use as a context manager."""

    def __init__(self, path: str | Path, schema: pa.Schema | None = None, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.schema = schema
        self.metadata = dict(metadata or {})
        self.rows = 0
        self._stack = ExitStack()
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> "ParquetSink":
        self._tmp = self._stack.enter_context(fileio.atomic_path(self.path))
        return self

    def write(self, data: pa.RecordBatch | pa.Table | pd.DataFrame) -> None:
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, schema=self._schema_for(data), preserve_index=False)
        elif isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if self.schema is None:
            self.schema = data.schema.remove_metadata()
        if data.schema.remove_metadata() != self.schema:
            data = data.select(self.schema.names).cast(self.schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self.schema)
        if data.num_rows:
            self._writer.write_table(data, row_group_size=BATCH_ROWS)
            self.rows += data.num_rows

    def _schema_for(self, frame: pd.DataFrame) -> pa.Schema | None:
        if self.schema is not None:
            return self.schema
        # Known canonical columns keep their fixed types; any other column is inferred.
        fields = [CANONICAL.field(c) if c in CANONICAL.names else pa.Schema.from_pandas(frame[[c]],
                  preserve_index=False).field(c) for c in frame.columns]
        return pa.schema(fields)

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc is None:
                if self._writer is None:  # no batch at all: still a valid (empty) file
                    self._writer = pq.ParquetWriter(self._tmp, self.schema or CANONICAL)
                if self.metadata:
                    self._writer.add_key_value_metadata(self.metadata)
                self._writer.close()
            elif self._writer is not None:
                self._writer.close()
        finally:
            self._stack.__exit__(kind, exc, tb)
        return False


def file_metadata(path: str | Path) -> dict[str, str]:
    """The key/value metadata a ParquetSink wrote into a file (its own keys, not pyarrow's)."""
    meta = parquet_file(path).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:") and k != b"pandas"}


def take_mask(batch: pa.RecordBatch, keep: np.ndarray) -> pa.RecordBatch:
    return batch.filter(pa.array(keep, type=pa.bool_()))


# Every shard job works on rows [start, stop) of its input as shard_bounds cuts them, and records
# those bounds beside its output; the gathering job checks that its shards meet end to end over the
# input it reads, so a stale or misplaced shard is named, never silently mixed in.
def shard_metadata(start: int, stop: int, total: int) -> dict[str, str]:
    return {"shard_start": str(start), "shard_stop": str(stop), "shard_total": str(total)}



def read_shard_bounds(path: str, meta: dict[str, Any]) -> tuple[int, int, int]:
    try:
        return int(meta["shard_start"]), int(meta["shard_stop"]), int(meta["shard_total"])
    except KeyError:
        raise DataError(f"{path}: not a shard file (no shard bounds in it): re-run its shard job") from None



def check_shards(paths: list[str], bounds: list[tuple[int, int, int, int]], *, unit: str, job: str,
                 total: int | None = None, source: str = "") -> None:
    """bounds: per shard file (start, stop, rows of the input it was cut from, rows it holds). The
    shards must hold consecutive slices of one input of `total` rows (when given), start to end."""
    stop, seen_total = 0, total
    for shard, (path, (start, end, rows, held)) in enumerate(zip(paths, bounds)):
        seen_total = rows if seen_total is None else seen_total
        if start != stop or rows != seen_total or held != end - start:
            raise DataError(f"{path}: shard {shard + 1} of {len(paths)} holds rows {start}..{end} of {rows} "
                            f"({held} {unit}), expected rows from {stop} of {seen_total}"
                            f"{' (' + source + ')' if source else ''}: re-run its {job} job")
        stop = end
    if seen_total is not None and paths and stop != seen_total:
        raise DataError(f"{paths[-1]}: the shards end at row {stop} of {seen_total}: a shard job is missing")
