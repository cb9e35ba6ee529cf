"""Sensor recordings on disk: one recording per file, rows are time steps, columns are channels.

* ``.npy``: a 2-D array ``(time, channels)`` (a 1-D array is one channel);
* ``.csv``: comma-separated numbers, one time step per line; a first line that is not numeric
  is a header and is skipped (e.g. ``x,y,z``).

Both readers fail with a :class:`~d2v.api.errors.SpecError` naming the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from d2v.api.errors import SpecError

EXTENSIONS = (".npy", ".csv")


def _is_number_row(line: str) -> bool:
    try:
        [float(cell) for cell in line.split(",")]
    except ValueError:
        return False
    return True


def _csv_rows(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and not _is_number_row(lines[0]):
        lines = lines[1:]
    return lines


def read_recording(path: str | Path) -> np.ndarray:
    """The recording at ``path`` as float32 ``(time, channels)``."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".csv":
            data = np.array([[float(cell) for cell in row.split(",")] for row in _csv_rows(path)], dtype=np.float64)
        else:
            raise ValueError(f"unsupported extension (expected {' or '.join(EXTENSIONS)})")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read sensor recording '{path}': {err}. Each file must hold one recording "
                        f"as rows of numbers (time steps) by columns (channels).") from None
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise SpecError(f"sensor recording '{path}' has shape {data.shape}; expected (time steps, channels) "
                        f"with at least one of each.")
    if not np.isfinite(data).all():
        raise SpecError(f"sensor recording '{path}' holds NaN or infinite values; fill or drop those samples.")
    return data.astype(np.float32)


def count_samples(path: str | Path) -> int:
    """Number of time steps in the recording at ``path``, without reading all of its values
    (``.npy``: the header; ``.csv``: the lines)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        return len(_csv_rows(path))
    except (OSError, ValueError, UnicodeDecodeError, IndexError) as err:
        raise SpecError(f"cannot read sensor recording '{path}': {err}.") from None


def write_recording(path: str | Path, data: np.ndarray, *, header: list[str] | None = None) -> None:
    """Write ``data`` ``(time, channels)`` as ``.npy`` or ``.csv`` (by the suffix of ``path``)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        np.save(path, np.asarray(data, dtype=np.float32))
        return
    lines = [",".join(header)] if header else []
    lines += [",".join(f"{v:.5f}" for v in row) for row in np.asarray(data)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
