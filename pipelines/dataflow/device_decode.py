"""``--decode-device gpu`` inside a model stage: the batch's JPEG rows decoded on the actor's device.

The decode task left those rows' pixels null and passed their bytes (``S.JPEG_SCORE`` for the score
actor, ``S.JPEG_CAPTION`` for the caption actor) with their EXIF orientation; each actor that needs
an image decodes it once, on its own card, from its own column, and drops the column. A row that
neither the device decoder nor the CPU path can decode becomes the ``image_error`` the decode task
would have written (same messages), and the other stage's bytes of it are dropped, so the caption
actor does not try again. Rows decoded on the CPU arrive as pixels and are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import schema as S

JPEG_COLUMNS = (S.JPEG_SCORE, S.JPEG_CAPTION, S.JPEG_ORIENTATION)


@dataclass
class DeviceRows:
    """The rows of one batch decoded in this actor: ``index[row]`` is a row's place in ``pixels``, -1 elsewhere."""

    decoded: np.ndarray  # bool per row
    index: np.ndarray
    pixels: object  # torch uint8 (k, 3, h, w) on the device
    on_device: int
    fell_back: int

    def gather(self, pixel_column: pa.ChunkedArray, rows: np.ndarray, size, pixel_batch):
        """The chosen rows' pixels as one uint8 ``(n, 3, h, w)`` tensor on the device: decoded here, or
        decoded by the task (``pixel_batch`` reads those from Arrow, as without device decoding)."""
        import torch

        out = torch.empty((len(rows), 3, size.height, size.width), dtype=torch.uint8, device=self.pixels.device)
        here = self.decoded[rows]
        if here.any():
            out[torch.as_tensor(np.flatnonzero(here), device=out.device)] = self.pixels[
                torch.as_tensor(self.index[rows[here]], device=out.device)
            ]
        if (~here).any():
            task = pixel_batch(pixel_column, rows[~here], size)
            out[torch.as_tensor(np.flatnonzero(~here), device=out.device)] = torch.from_numpy(np.ascontiguousarray(task)).to(out.device)
        return out


def decode_jpeg_rows(batch: pa.Table, decoder, column: str, others: tuple[str, ...] = ()) -> tuple[pa.Table, DeviceRows]:
    """Decode ``column``'s JPEG rows with ``decoder`` (``blip_ops.jpeg_device.DeviceJpegDecoder``); returns the
    batch without ``column``, with failures in ``S.IMAGE_ERROR`` (where the batch has it) and dropped from ``others``."""
    n = batch.num_rows
    if column not in batch.column_names:
        return batch, DeviceRows(np.zeros(n, dtype=bool), np.full(n, -1), decoder.decode([], []).pixels, 0, 0)
    values = batch.column(column)
    rows = np.flatnonzero(values.is_valid().to_numpy(zero_copy_only=False))
    blobs = values.take(pa.array(rows, pa.int64())).to_pylist()
    orientations = batch.column(S.JPEG_ORIENTATION).take(pa.array(rows, pa.int64())).to_pylist()
    result = decoder.decode(blobs, orientations)
    failed = np.array([e is not None for e in result.errors], dtype=bool)
    decoded = np.zeros(n, dtype=bool)
    decoded[rows[~failed]] = True
    index = np.full(n, -1)
    index[rows] = np.arange(len(rows))
    batch = batch.drop_columns([column])
    if failed.any():
        bad = np.zeros(n, dtype=bool)
        bad[rows[failed]] = True
        if S.IMAGE_ERROR in batch.column_names:
            errors = batch.column(S.IMAGE_ERROR).to_pylist()
            for row, error in zip(rows[failed], (e for e in result.errors if e is not None)):
                errors[row] = error
            batch = batch.set_column(batch.schema.get_field_index(S.IMAGE_ERROR), S.IMAGE_ERROR, pa.array(errors, pa.string()))
        for other in others:
            if other in batch.column_names:
                values = batch.column(other)
                batch = batch.set_column(
                    batch.schema.get_field_index(other), other, pc.if_else(pa.array(bad), pa.nulls(n, values.type), values)
                )
    return batch, DeviceRows(decoded, index, result.pixels, result.on_device, result.fell_back)


def drop_jpeg_columns(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in JPEG_COLUMNS if c in batch.column_names])
