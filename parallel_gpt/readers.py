"""The documents of prepare's inputs, streamed: text, JSON Lines, Parquet, gzip and zstd.

    *.txt (or any other name)   one document, UTF-8
    *.jsonl                     one document per row: the string in `field`
    *.parquet                   one document per row: the string in column `field`
    *.gz, *.zst                 decompressed as a stream, then read by the name without the suffix
                                (`a.jsonl.zst` is JSON Lines, `a.txt.gz` text)

A null in `field` (JSON null, or a Parquet null) is an empty document, skipped like an
empty text file: nullable text columns are common and a missing value carries no text.
A row whose field is missing or is not a string is an error. Parquet columns must be
text (string, large_string or string_view): numbers are not converted, and binary
columns are refused rather than guessed to be UTF-8. Parquet rows are numbered from 0,
as pyarrow numbers them; JSON Lines lines from 1, as editors do.

Parquet needs pyarrow, zstd needs zstandard (the [data] extra); both are imported only
when an input needs them. Memory: a Parquet file is read a batch of BATCH_ROWS rows at a
time from page-sized buffers (pre_buffer off, so a row group's column chunk is never held
whole); importing pyarrow adds ~40 MiB to the process once. A .zst stream is decompressed
in reads of READ_BYTES.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import zlib
from pathlib import Path

from parallel_gpt.errors import DataError

READ_BYTES = 1 << 18
# Parquet rows per batch: FineWeb's documents average ~3 KB, so ~200 KB of text per batch.
BATCH_ROWS = 64
_PARQUET_BUFFER = 1 << 16  # bytes read from a column chunk at a time
_EXTRA = "pip install 'parallel_gpt[data]'"


def input_files(inputs: list[str], out: Path | None = None) -> list[Path]:
    """Every input file, directories expanded (every file below, in name order), never a
    file of the output directory `out` or of its temporary siblings (`out`.tmp-*): a rerun
    would read its own earlier output. DataError for a missing path, or for a .parquet or
    .zst file when its reader is not installed."""
    files = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not _is_output(p, out)))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {raw!r} does not exist: pass text, .jsonl or .parquet files, or directories")
    if not files:
        raise DataError(f"no input files in {', '.join(inputs)}: pass text, .jsonl or .parquet files, or directories")
    for suffix, module in ((".parquet", "pyarrow.parquet"), (".zst", "zstandard")):
        needing = next((p for p in files if p.suffix == suffix), None)
        if needing is not None:
            try:
                __import__(module)
            except ImportError:
                raise DataError(f"{needing}: reading {suffix} files needs {module.split('.')[0]}: {_EXTRA}") from None
    return files


def _is_output(path: Path, out: Path | None) -> bool:
    if out is None:
        return False
    for parent in path.resolve().parents:
        if parent == out or (parent.parent == out.parent and parent.name.startswith(f"{out.name}.tmp-")):
            return True
    return False


def check_overlap(inputs: list[str], out: Path):
    """DataError when `out` is an input or holds one: replacing it would delete the input."""
    for raw in inputs:
        path = Path(raw).resolve()
        if path == out or out in path.parents:
            raise DataError(f"--out {str(out)!r} is or contains the input {raw!r}: replacing it would delete the "
                            f"input; choose an --out outside the inputs")


def documents(files: list[Path], field: str, progress):
    """Each document as an iterator of text chunks (a JSON Lines or Parquet row is one chunk)."""
    for path in files:
        if path.suffix == ".parquet":
            yield from _parquet_rows(path, field, progress)
        elif path.name.removesuffix(path.suffix if path.suffix in (".gz", ".zst") else "").endswith(".jsonl"):
            yield from _jsonl_rows(path, field, progress)
        else:
            yield _text_chunks(path, progress)


@contextlib.contextmanager
def _open(path: Path):
    """`path` for reading bytes (.gz and .zst decompressed as streams); a damaged file is a DataError."""
    damaged = (OSError, EOFError, zlib.error)
    try:
        if path.suffix == ".zst":
            import zstandard

            damaged += (zstandard.ZstdError,)
            _check_zstd_frames(path)
            with open(path, "rb") as raw:
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_BYTES, read_across_frames=True)
                yield io.BufferedReader(reader, READ_BYTES)
        else:
            with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
                yield f
    except damaged as e:
        raise DataError(f"cannot read {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}: "
                        f"check the file (a .gz or .zst file must be whole)") from None


def _check_zstd_frames(path: Path):
    """DataError when the file ends inside a zstd frame (a cut download): zstandard's
    stream reader returns what it has without an error. Walks the frame and block headers
    with seeks, reading ~3 bytes per block of up to 128 KiB, so it costs next to nothing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50 and len(head) == 8:  # a skippable frame: magic, size, data
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528 or len(head) < 5:
                raise DataError(f"{path}: no zstd frame at byte {pos}: the file is damaged or is not zstd")
            flags = head[4]  # the frame header descriptor
            single_segment, checksum = flags >> 5 & 1, flags >> 2 & 1
            pos += 5 + (1 - single_segment) + (0, 1, 2, 4)[flags & 3] + (single_segment, 2, 4, 8)[flags >> 6]
            last = False
            while not last and pos + 3 <= size:
                f.seek(pos)
                block = int.from_bytes(f.read(3), "little")  # bit 0: last block; 1-2: type; 3-23: size
                last = bool(block & 1)
                pos += 3 + (1 if (block >> 1) & 3 == 1 else block >> 3)  # an RLE block stores one byte
            pos += 4 * checksum
            if not last or pos > size:
                break
    if pos != size:
        raise DataError(f"{path} ends inside a zstd frame (at byte {size}): the file is cut short: fetch it again")


def _text_chunks(path: Path, progress):
    """The UTF-8 text of `path` in chunks; DataError naming the byte offset of bad bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open(path) as f:
        while True:
            raw = f.read(READ_BYTES)
            held = len(decoder.getstate()[0])  # bytes of a character cut at the previous chunk's end
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text: bad byte at offset {offset - held + e.start}: "
                                f"convert it to UTF-8") from None
            progress(len(raw))
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


def _jsonl_rows(path: Path, field: str, progress):
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            progress(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{path}, line {number}: not a JSON object ({e}): fix or drop the row") from None
            text = row.get(field) if isinstance(row, dict) else None
            if isinstance(text, str):
                yield iter([text])
            elif not isinstance(row, dict) or field not in row or text is not None:
                raise DataError(f"{path}, line {number}: no string field {field!r}: "
                                f"pass --jsonl_field with the name of the text field")


def _parquet_rows(path: Path, field: str, progress):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # mimalloc, pyarrow's default pool, keeps the pages it frees: reading a 40 MiB
    # single-row-group file grew the peak RSS by 22 MiB with it and by 10 MiB with the
    # system allocator, which returns them.
    pa.set_memory_pool(pa.system_memory_pool())
    row, where = 0, str(path)
    try:
        # Checksums, where the writer stored them, catch damaged pages that still decode.
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=_PARQUET_BUFFER, page_checksum_verification=True)
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise DataError(f"{path}: no column {field!r} (its columns: {', '.join(schema.names[:20])}): "
                            f"pass --jsonl_field with the name of the text column")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise DataError(f"{path}: column {field!r} holds {kind}, not text: "
                            f"pass --jsonl_field with the name of a string column")
        rows, size = max(parquet.metadata.num_rows, 1), path.stat().st_size
        where = f"{path} at row 0"
        for group in range(parquet.num_row_groups):  # a batch never spans two: an error names a row in its group
            for batch in parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=[field], use_threads=False):
                texts = batch.column(0).to_pylist()
                progress(size * (row + len(texts)) // rows - size * row // rows)
                row += len(texts)
                where = f"{path} at row {row}"  # the first row of the batch read next
                yield from (iter([t]) for t in texts if t is not None)
    except (pa.ArrowException, OSError) as e:
        message = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split())
        raise DataError(f"cannot read {where}: {message}: check the file "
                        f"(a .parquet file must be whole)") from None
