"""Model stages read pixel batches straight from Arrow buffers: same pixels as row by row."""

import numpy as np
import pyarrow as pa
import pytest

from blip_ops.preprocess import resize_for
from pipelines.dataflow.stages import _pixel_batch


@pytest.fixture(scope="module")
def preparer(tiny_itm):
    return resize_for(tiny_itm)


def _pixels(preparer, n, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, preparer.num_bytes, dtype=np.uint8).tobytes() for _ in range(n)]


@pytest.mark.parametrize("binary_type", [pa.binary(), pa.large_binary()])
def test_pixel_batch_equals_row_by_row_across_chunks_and_nulls(preparer, binary_type):
    values = _pixels(preparer, 5)
    first = pa.array([values[0], None, values[1]], binary_type)
    second = pa.array([values[2], None, values[3], values[4]], binary_type)
    column = pa.chunked_array([first, second.slice(1)], binary_type)  # a sliced chunk: non-zero offset
    as_list = column.to_pylist()
    rows = np.array([0, 2, 4, 5])
    batch = _pixel_batch(column, rows, preparer)
    assert batch.shape == (4, 3, preparer.height, preparer.width) and batch.dtype == np.uint8
    expected = np.stack([preparer.from_bytes(as_list[i]) for i in rows])
    np.testing.assert_array_equal(batch, expected)


def test_pixel_batch_of_no_rows(preparer):
    column = pa.chunked_array([pa.array([None], pa.binary())])
    assert _pixel_batch(column, np.array([], dtype=np.int64), preparer).shape == (0, 3, preparer.height, preparer.width)


def test_pixel_batch_refuses_values_of_the_wrong_size(preparer):
    column = pa.chunked_array([pa.array([b"\x00" * (preparer.num_bytes - 1)], pa.binary())])
    with pytest.raises(ValueError, match="bytes"):
        _pixel_batch(column, np.array([0]), preparer)


@pytest.mark.parametrize("sliced", [False, True])
def test_a_whole_single_chunk_batch_is_a_view_of_the_arrow_buffer(preparer, sliced):
    values = _pixels(preparer, 4, seed=3)
    array = pa.array(values, pa.binary())
    if sliced:  # a batch cut from a larger block: the chunk starts at an offset
        array = pa.array([_pixels(preparer, 1, seed=9)[0], *values], pa.binary()).slice(1)
    column = pa.chunked_array([array])
    batch = _pixel_batch(column, np.arange(4), preparer)
    np.testing.assert_array_equal(batch, np.stack([preparer.from_bytes(v) for v in values]))
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    assert np.shares_memory(batch, data)  # no copy
    assert not np.shares_memory(_pixel_batch(column, np.array([0, 2]), preparer), data)  # a subset is gathered
