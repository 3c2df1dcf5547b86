"""Bounded reads: an object over the limit is refused before, or instead of, reading it whole."""

import io

import pytest

from pipelines.storage import TooLarge, read_at_most, read_bytes


def test_small_file_is_read_whole(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    assert read_bytes(str(tmp_path / "a.bin"), limit=100) == b"x" * 100
    assert read_bytes(str(tmp_path / "a.bin")) == b"x" * 100


def test_file_over_the_limit_names_its_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 101)
    with pytest.raises(TooLarge, match="image of 101 bytes exceeds the limit of 100 bytes"):
        read_bytes(str(tmp_path / "a.bin"), limit=100)


class _Stream:
    """A stream with no size (as a pipe or a chunked download) that counts what is read from it."""

    def __init__(self, length: int):
        self.inner = io.BytesIO(b"y" * length)
        self.read_bytes = 0

    def size(self):
        raise OSError("size unknown")

    def read(self, n):
        data = self.inner.read(n)
        self.read_bytes += len(data)
        return data


class _LyingFile(_Stream):
    def size(self):
        return 10


@pytest.mark.parametrize("kind", [_Stream, _LyingFile])
def test_a_stream_of_unknown_or_wrong_size_is_cut_off_at_the_limit(kind):
    stream = kind(10_000)
    with pytest.raises(TooLarge, match="image of more than 100 bytes exceeds the limit"):
        read_at_most(stream, 100)
    assert stream.read_bytes == 101
    assert read_at_most(kind(100), 100) == b"y" * 100
