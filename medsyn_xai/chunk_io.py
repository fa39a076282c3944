"""Direct reads and writes of uncompressed Zarr v3 chunks on a local file system.

The explain job reads a few token maps of a study and writes about ten entity
heatmaps. Through Zarr's codec pipeline each chunk costs about half a millisecond
of Python and event-loop work on a 2-core CPU, more than reading or writing its
bytes. For the two layouts the study store uses, a chunk of an uncompressed
little-endian array is its raw bytes in a file whose name Zarr computes, so these
functions read and write those files themselves:

* rows of shape (1, *shape[1:]) in one file each (``entities/heatmaps``)
* rows of shape (1, *shape[1:]) as inner chunks of shards that span whole rows,
  index at the end, checked by its CRC32C (``saliency/tokens``)

Both functions check the array's metadata first and hand any other layout (a
compressor, another chunk shape, a store that is not a local folder) to Zarr
itself, so the result never depends on which path was taken. Files are named by
the array's own chunk key encoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.storage import LocalStore

__all__ = ["ChunkFileError", "read_rows", "write_rows"]

# Offset and length of an inner chunk that was never written (Zarr v3 sharding spec).
_MISSING = 2**64 - 1


class ChunkFileError(ValueError):
    """A chunk file has the wrong size, or a shard's index fails its checksum or points outside the file."""


def read_rows(array: zarr.Array, rows: Sequence[int]) -> np.ndarray:
    """Read the rows ``rows`` along the first axis of ``array``.

    Args:
        array: a Zarr v3 array of shape (N, ...).
        rows: row indices in [0, N), in any order, repeats allowed.

    Returns:
        Array of shape (len(rows), *array.shape[1:]) and ``array``'s dtype. A row
        whose chunk was never written contains the fill value.

    Raises:
        IndexError: a row outside [0, N).
        ChunkFileError: a chunk file has the wrong size, or a shard index fails
            its CRC32C or points past its file.
    """
    rows = [int(row) for row in rows]
    for row in rows:
        if not 0 <= row < array.shape[0]:
            raise IndexError(f"row {row} is outside the first axis of length {array.shape[0]}")
    folder = _local_folder(array)
    layout = _row_layout(array) if folder is not None else None
    if folder is None or layout is None:
        return np.asarray(array.oindex[rows]) if rows else np.zeros((0, *array.shape[1:]), dtype=array.dtype)

    dtype = array.dtype.newbyteorder("<")
    out = np.full((len(rows), *array.shape[1:]), array.fill_value, dtype=array.dtype)
    row_bytes = out[0].nbytes if rows else 0
    if layout == "rows":
        for position, row in enumerate(rows):
            try:
                payload = (folder / _chunk_key(array, row)).read_bytes()
            except FileNotFoundError:
                continue
            if len(payload) != row_bytes:
                path = folder / _chunk_key(array, row)
                raise ChunkFileError(f"chunk file '{path}' has {len(payload)} bytes, expected {row_bytes}")
            out[position] = np.frombuffer(payload, dtype=dtype).reshape(array.shape[1:])
        return out

    rows_per_shard = array.shards[0]
    by_shard: dict[int, list[int]] = {}
    for position, row in enumerate(rows):
        by_shard.setdefault(row // rows_per_shard, []).append(position)
    for shard, positions in by_shard.items():
        path = folder / _chunk_key(array, shard)
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            index = _read_shard_index(descriptor, path, rows_per_shard)
            for position in positions:
                offset, length = (int(value) for value in index[rows[position] % rows_per_shard])
                if offset == _MISSING:
                    continue
                if length != row_bytes:
                    message = f"shard '{path}' lists {length} bytes for row {rows[position]}, expected {row_bytes}"
                    raise ChunkFileError(message)
                payload = os.pread(descriptor, length, offset)
                out[position] = np.frombuffer(payload, dtype=dtype).reshape(array.shape[1:])
        finally:
            os.close(descriptor)
    return out


def write_rows(array: zarr.Array, data: np.ndarray) -> None:
    """Write all of ``data`` into ``array``, row by row along the first axis.

    A row equal to the fill value everywhere gets no chunk file (an old one is
    removed), as Zarr does by default, and reads back as the fill value.
    Entities past the text's token limit have all-zero heatmaps, so a long
    prompt does not fill the disk.

    Args:
        array: a new Zarr v3 array of the same shape as ``data``.
        data: the values, cast to ``array``'s dtype.
    """
    data = np.asarray(data)
    if data.shape != array.shape:
        raise ValueError(f"data of shape {data.shape} does not fit array of shape {array.shape}: pass the full array")
    folder = _local_folder(array)
    if folder is None or _row_layout(array) != "rows":
        array[...] = data
        return

    values = np.ascontiguousarray(data, dtype=array.dtype.newbyteorder("<"))
    fill = array.fill_value
    for row in range(values.shape[0]):
        path = folder / _chunk_key(array, row)
        if (values[row] == fill).all():
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(memoryview(values[row]))


def _local_folder(array: zarr.Array) -> Path | None:
    """Folder of ``array`` when its store is a local folder, else None."""
    store = array.store
    if not isinstance(store, LocalStore) or array.metadata.zarr_format != 3:
        return None
    return Path(store.root) / array.path


def _row_layout(array: zarr.Array) -> str | None:
    """``"rows"``, ``"sharded_rows"`` or None when ``array`` has neither layout of the module docstring."""
    if array.ndim < 1 or array.dtype.kind not in "fiub" or array.chunks != (1, *array.shape[1:]):
        return None
    codecs = array.metadata.codecs
    if len(codecs) != 1:
        return None
    codec = codecs[0]
    if _is_little_endian_bytes(codec):
        return "rows"
    if not isinstance(codec, ShardingCodec) or array.shards is None:
        return None
    inner_ok = len(codec.codecs) == 1 and _is_little_endian_bytes(codec.codecs[0])
    index_ok = (
        len(codec.index_codecs) == 2
        and _is_little_endian_bytes(codec.index_codecs[0])
        and isinstance(codec.index_codecs[1], Crc32cCodec)
        and codec.index_location == ShardingCodecIndexLocation.end
    )
    whole_rows = tuple(array.shards[1:]) == tuple(array.shape[1:])
    return "sharded_rows" if inner_ok and index_ok and whole_rows else None


def _is_little_endian_bytes(codec: object) -> bool:
    return isinstance(codec, BytesCodec) and (codec.endian is None or codec.endian.value == "little")


def _chunk_key(array: zarr.Array, first_axis_chunk: int) -> str:
    return array.metadata.encode_chunk_key((first_axis_chunk, *([0] * (array.ndim - 1))))


def _read_shard_index(descriptor: int, path: Path, n_chunks: int) -> np.ndarray:
    """Read and check the (n_chunks, 2) uint64 offsets and lengths at the end of a shard file."""
    index_bytes = 16 * n_chunks
    size = os.fstat(descriptor).st_size
    if size < index_bytes + 4:
        raise ChunkFileError(f"shard '{path}' has {size} bytes, too few for an index of {n_chunks} chunks")
    raw = os.pread(descriptor, index_bytes + 4, size - index_bytes - 4)
    stored = int.from_bytes(raw[-4:], "little")
    if google_crc32c.value(raw[:-4]) != stored:
        raise ChunkFileError(f"shard '{path}' has an index that fails its CRC32C checksum")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)
    written = index[:, 0] != _MISSING
    if np.any(index[written, 0] + index[written, 1] > size - index_bytes - 4):
        raise ChunkFileError(f"shard '{path}' has an index entry past the end of its data")
    return index
