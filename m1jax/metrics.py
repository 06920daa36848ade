"""Training metrics: one JSON line per record in ``metrics.jsonl``, the same scalars as TensorBoard
event files, and a console progress bar.

The TensorBoard writer needs neither TensorFlow nor a TensorBoard package: an event file is a
sequence of TFRecords (``uint64 length | masked crc32c(length) | data | masked crc32c(data)``, all
little-endian), each ``data`` a serialized ``tensorflow.Event`` protobuf. We write the few fields
that scalars need by hand:

    Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
                 Summary summary = 5; SessionLog session_log = 7; }
    Summary    { repeated Value value = 1; }     Value { string tag = 1; float simple_value = 2; }
    SessionLog { Status status = 1; }            (START = 1)

(tensorboardX would write the same, but importing it imports torch whenever torch is installed.)
A restarted run writes a new event file that opens with ``SessionLog.START`` at the resume step:
TensorBoard then drops the first run's records from that step on, as the resumed run recomputes
them. ``metrics.jsonl`` is only appended to: after a resume, the last line of a (phase, step) wins.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import socket
import struct
import sys
import time
from typing import Any, BinaryIO, Mapping, TextIO

# ------------------------------------------------------------------------------ TFRecord framing


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# ------------------------------------------------------------------------------ protobuf encoding


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None,
           session_start: bool = False) -> bytes:
    if step < 0:
        raise ValueError(f"TensorBoard step must be >= 0, got {step}.")
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if summary is not None:
        out += _field_bytes(5, summary)
    if session_start:
        out += _field_bytes(7, _varint(1 << 3) + _varint(1))  # SessionLog{status: START}
    return out


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
    values = b""
    for tag, value in scalars.items():
        v = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
        values += _field_bytes(1, v)
    return values


def event_file_name() -> str:
    """A new event file's name. Fractional seconds keep the files of a crashed and a resumed run in
    order (TensorBoard reads the files of a directory in name order)."""
    return f"events.out.tfevents.{time.time():017.6f}.{socket.gethostname()}.{os.getpid()}"


class EventFileWriter:
    """Scalars to a TensorBoard event file, given open for binary appending (flushed every record).

    resume_step: this run continues an earlier one from that step (records a SessionLog.START)."""

    def __init__(self, f: BinaryIO, resume_step: int | None = None):
        self._f = f
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))
        if resume_step is not None:
            self._write(_event(time.time(), resume_step, session_start=True))

    def _write(self, event: bytes):
        self._f.write(tfrecord(event))
        self._f.flush()

    def scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None):
        if scalars:
            self._write(_event(time.time() if wall_time is None else wall_time, step,
                               summary=_scalar_summary(scalars)))

    def close(self):
        self._f.close()


# ------------------------------------------------------------------------------ both sinks


def _plain(v: Any) -> Any:
    """JSON-ready: int for integers, bool for booleans, float for other numbers (Python, numpy or
    0-d arrays alike); anything else unchanged."""
    if v is None or isinstance(v, (bool, str)):
        return v
    kind = getattr(getattr(v, "dtype", None), "kind", None)
    if kind == "b":
        return bool(v)
    if isinstance(v, numbers.Integral) or kind in ("i", "u"):
        return int(v)
    return float(v) if hasattr(v, "__float__") else v


class MetricsWriter:
    """``write({"step": s, "phase": p, name: value, ...})``: a JSON line to ``jsonl`` (a text file open
    for appending: ``workdir/metrics.jsonl``), and every numeric value as the TensorBoard scalar
    ``p/name`` at step s to ``events`` (an ``EventFileWriter`` on ``workdir/tb/<event_file_name()>``)."""

    def __init__(self, jsonl: TextIO, events: EventFileWriter | None = None):
        self._jsonl, self._events = jsonl, events

    def write(self, record: Mapping[str, Any]):
        rec = {k: _plain(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            phase = rec.get("phase", "train")
            self._events.scalars(int(rec["step"]), {f"{phase}/{k}": v for k, v in rec.items()
                                                    if k not in ("step", "phase") and isinstance(v, (int, float))})

    def close(self):
        self._jsonl.close()
        if self._events is not None:
            self._events.close()


# ------------------------------------------------------------------------------ console


class ProgressBar:
    """``[#######.......]  45% 405/900  2.1 it/s  eta 3m55s | <text>`` on one console line (a
    terminal), or a plain line every ``every`` steps (a log file or a pipe)."""

    def __init__(self, total: int, start: int = 0, width: int = 24, every: int = 25, stream=None):
        self.total, self.start, self.width, self.every = total, start, width, every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, done: int, text: str = ""):
        """``done`` steps of ``total`` are finished (the rate counts those since ``start``)."""
        if not self.tty and done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.inf
        filled = int(self.width * done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * done / max(self.total, 1):3.0f}% "
                f"{done}/{self.total} {rate:.2f} it/s eta {_duration(eta)} | {text}")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def message(self, text: str):
        """A line of its own (the bar continues on the next line)."""
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
