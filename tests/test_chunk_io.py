"""Direct chunk reads and writes agree with Zarr's own on every layout and reject a damaged shard index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec

from medsyn_xai.chunk_io import ChunkFileError, _row_layout, read_rows, write_rows

SHAPE = (12, 4, 3, 5)


def _values(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE).astype(np.float32)


def _group(tmp_path: Path) -> zarr.Group:
    return zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)


def _sharded(tmp_path: Path, rows_per_shard: int = SHAPE[0]) -> zarr.Array:
    return _group(tmp_path).create_array(
        "tokens", data=_values(), chunks=(1, *SHAPE[1:]), shards=(rows_per_shard, *SHAPE[1:]), compressors=None
    )


def _unsharded(tmp_path: Path) -> zarr.Array:
    return _group(tmp_path).create_array("heatmaps", data=_values(), chunks=(1, *SHAPE[1:]), compressors=None)


ROWS = [7, 0, 11, 7, 3]


@pytest.mark.parametrize("rows_per_shard", [SHAPE[0], 4])
def test_sharded_rows_match_zarr(tmp_path: Path, rows_per_shard: int) -> None:
    array = _sharded(tmp_path, rows_per_shard)
    assert _row_layout(array) == "sharded_rows"

    got = read_rows(array, ROWS)

    assert got.dtype == np.float32
    assert got.shape == (len(ROWS), *SHAPE[1:])
    np.testing.assert_array_equal(got, array.oindex[ROWS])
    np.testing.assert_array_equal(got, _values()[ROWS])


def test_unsharded_rows_match_zarr(tmp_path: Path) -> None:
    array = _unsharded(tmp_path)
    assert _row_layout(array) == "rows"

    np.testing.assert_array_equal(read_rows(array, ROWS), _values()[ROWS])


def test_unwritten_rows_give_fill_value(tmp_path: Path) -> None:
    group = _group(tmp_path)
    sharded = group.create_array(
        "sharded", shape=SHAPE, dtype=np.float32, chunks=(1, *SHAPE[1:]), shards=(4, *SHAPE[1:]), compressors=None,
        fill_value=-1.0,
    )
    sharded[1] = _values()[1]  # shard 0 exists with one inner chunk, shards 1 and 2 do not
    plain = group.create_array("plain", shape=SHAPE, dtype=np.float32, chunks=(1, *SHAPE[1:]), compressors=None)
    plain[2] = _values()[2]

    for array in (sharded, plain):
        got = read_rows(array, [0, 1, 2, 9])
        np.testing.assert_array_equal(got, array.oindex[[0, 1, 2, 9]])
    assert (read_rows(sharded, [0, 9]) == -1.0).all()
    np.testing.assert_array_equal(read_rows(sharded, [1])[0], _values()[1])


def test_other_layouts_fall_back_to_zarr(tmp_path: Path) -> None:
    group = _group(tmp_path)
    compressed = group.create_array("compressed", data=_values(), chunks=(1, *SHAPE[1:]))
    big_endian = group.create_array(
        "big", data=_values(), chunks=(1, *SHAPE[1:]), compressors=None, serializer=BytesCodec(endian="big")
    )
    blocks = group.create_array("blocks", data=_values(), chunks=(3, *SHAPE[1:]), compressors=None)

    for array in (compressed, big_endian, blocks):
        assert _row_layout(array) is None
        np.testing.assert_array_equal(read_rows(array, ROWS), _values()[ROWS])
    assert read_rows(compressed, []).shape == (0, *SHAPE[1:])


def test_row_outside_array_rejected(tmp_path: Path) -> None:
    with pytest.raises(IndexError, match="row 12 is outside"):
        read_rows(_sharded(tmp_path), [3, 12])


def test_written_rows_read_back_through_zarr(tmp_path: Path) -> None:
    group = _group(tmp_path)
    plain = group.create_array("plain", shape=SHAPE, dtype=np.float32, chunks=(1, *SHAPE[1:]), compressors=None)
    compressed = group.create_array("compressed", shape=SHAPE, dtype=np.float32, chunks=(1, *SHAPE[1:]))

    for array in (plain, compressed):
        write_rows(array, _values(3))
        reopened = zarr.open_array(tmp_path / "g.zarr" / array.basename, mode="r")
        np.testing.assert_array_equal(reopened[:], _values(3))

    with pytest.raises(ValueError, match="does not fit array"):
        write_rows(plain, _values()[:2])


def test_fill_value_rows_get_no_chunk_file(tmp_path: Path) -> None:
    array = _unsharded(tmp_path)  # every row written once with random values
    values = _values(5)
    values[[2, 9]] = 0.0

    write_rows(array, values)

    folder = Path(array.store.root) / array.path
    assert not (folder / array.metadata.encode_chunk_key((2, 0, 0, 0))).exists()
    assert (folder / array.metadata.encode_chunk_key((3, 0, 0, 0))).exists()
    np.testing.assert_array_equal(zarr.open_array(folder, mode="r")[:], values)


def _shard_file(array: zarr.Array) -> Path:
    return Path(array.store.root) / array.path / array.metadata.encode_chunk_key((0, 0, 0, 0))


def test_damaged_shard_index_rejected(tmp_path: Path) -> None:
    array = _sharded(tmp_path)
    shard = _shard_file(array)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its 4-byte checksum
    shard.write_bytes(bytes(data))

    with pytest.raises(ChunkFileError, match="fails its CRC32C"):
        read_rows(array, [0])


def test_short_chunk_file_rejected(tmp_path: Path) -> None:
    array = _unsharded(tmp_path)
    chunk = Path(array.store.root) / array.path / array.metadata.encode_chunk_key((4, 0, 0, 0))
    chunk.write_bytes(chunk.read_bytes()[:-4])

    with pytest.raises(ChunkFileError, match="has 236 bytes, expected 240"):
        read_rows(array, [4])


def test_truncated_shard_rejected(tmp_path: Path) -> None:
    array = _sharded(tmp_path)
    shard = _shard_file(array)
    shard.write_bytes(shard.read_bytes()[:100])

    with pytest.raises(ChunkFileError, match="too few"):
        read_rows(array, [0])
