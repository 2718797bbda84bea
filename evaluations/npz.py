"""Streaming reader for ADM batch files: `arr_0` images read in row batches straight out of the npz.

An ADM sample batch is `np.savez(path, images[N, H, W, 3] uint8, labels)`: a zip whose member
`arr_0.npy` can be 10 GB. We parse the .npy header of that member and then read raw rows from
the zip stream, so memory holds one batch whatever N is (stored or deflated members alike).
Small arrays (`mu`, `sigma`, `mu_s`, `sigma_s`) are read whole with np.load, which only
decompresses the member asked for.
"""
from __future__ import annotations

import hashlib
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from softcfg_patch.errors import SoftCFGError
from softcfg_patch.files import file_identity

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class BatchFileError(SoftCFGError, ValueError):
    """An npz batch file that cannot be evaluated; the message says what to fix."""


class NpzImages:
    """The `arr_0` images of an ADM batch file, validated on open, read in batches.

        with NpzImages("samples.npz", image_size=256) as images:
            for batch in images.batches(64, limit=50000): ...
    """

    def __init__(self, path: str | os.PathLike, image_size: int | None = 256, role: str = "batch"):
        self.path, self.role = Path(path), role
        if not self.path.is_file():
            raise FileNotFoundError(f"{role} file not found: '{self.path}'")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as err:
            cut = truncation(self.path)
            if cut:
                raise BatchFileError(f"{role} file '{self.path}' looks truncated: {cut}; the file was probably cut "
                                     f"short by an interrupted copy or write: copy or write it again") from err
            raise BatchFileError(f"{role} file '{self.path}' is not an .npz (zip) file ({err}); save images "
                                 f"with np.savez(path, images) where images is uint8 [N, H, W, 3]") from err
        names = self._zip.namelist()
        member = IMAGES_KEY + ".npy"
        if member not in names:
            found = sorted(n[:-4] if n.endswith(".npy") else n for n in names)
            self.close()
            raise BatchFileError(f"{role} file '{self.path}' has no '{IMAGES_KEY}' array (found keys: {found}); "
                                 f"ADM batch files store the images first: np.savez(path, images, labels)")
        self._info = self._zip.getinfo(member)
        self.stat_names = [k for k in STAT_KEYS if k + ".npy" in names]
        try:
            with self._zip.open(self._info) as f:
                self.shape, self.dtype, _, self._streamable = _read_npy_header(f)
            self._check(image_size)
        except (BatchFileError, ValueError, OSError, zipfile.BadZipFile) as err:
            self.close()
            if isinstance(err, BatchFileError):
                raise
            raise BatchFileError(f"{role} file '{self.path}': cannot read the arr_0 header ({err})") from err
        if not self._streamable:  # Fortran order: rows are not contiguous on disk
            warnings.warn(f"{self.path}: arr_0 is stored in Fortran order and will be loaded whole; rewrite it "
                          f"with np.savez(path, np.ascontiguousarray(images)) to stream it", stacklevel=2)

    def _check(self, image_size: int | None) -> None:
        where = f"{self.role} file '{self.path}'"
        if self.dtype != np.uint8:
            raise BatchFileError(f"{where}: arr_0 has dtype {self.dtype}, expected uint8 pixels 0..255; convert "
                                 f"float images in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8)")
        if len(self.shape) != 4 or self.shape[-1] != 3:
            raise BatchFileError(f"{where}: arr_0 has shape {self.shape}, expected [N, H, W, 3] (RGB, channels "
                                 f"last); transpose NCHW data with x.transpose(0, 2, 3, 1)")
        if self.shape[0] == 0:
            raise BatchFileError(f"{where}: arr_0 holds no images")
        if image_size and tuple(self.shape[1:3]) != (image_size, image_size):
            raise BatchFileError(f"{where}: images are {self.shape[1]}x{self.shape[2]}, expected "
                                 f"{image_size}x{image_size}; pass --image-size {self.shape[1]} if this is "
                                 f"intended (the reference batch must match the samples' resolution)")

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Yield writable uint8 arrays [<=batch_size, H, W, 3] for the first `limit` rows (default all)."""
        n = len(self) if limit is None else limit
        if n > len(self):
            raise BatchFileError(f"{self.role} file '{self.path}' holds {len(self)} images, fewer than the "
                                 f"{n} asked for; lower --num-samples or sample more images")
        if not self._streamable:
            with np.load(self.path) as npz:  # Fortran order: the same whole-array fallback as ADM
                data = npz[IMAGES_KEY]
            for start in range(0, n, batch_size):
                yield np.ascontiguousarray(data[start:min(start + batch_size, n)])
            return
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        try:
            yield from self._stream(n, batch_size, row_bytes)
        except zipfile.BadZipFile as err:
            raise BatchFileError(f"{self.role} file '{self.path}' is corrupt ({err}); write it again") from err

    def _stream(self, n: int, batch_size: int, row_bytes: int) -> Iterator[np.ndarray]:
        with self._zip.open(self._info) as f:
            _read_npy_header(f)  # skip to the data
            for start in range(0, n, batch_size):
                rows = min(batch_size, n - start)
                buf = bytearray(rows * row_bytes)
                got = f.readinto(memoryview(buf)) if hasattr(f, "readinto") else 0
                while got < len(buf):
                    chunk = f.read(len(buf) - got)
                    if not chunk:
                        raise BatchFileError(f"{self.role} file '{self.path}' is truncated: arr_0 ends at row "
                                             f"{start + got // row_bytes} of {len(self)}; rewrite the file")
                    buf[got:got + len(chunk)] = chunk
                    got += len(chunk)
                yield np.frombuffer(buf, dtype=self.dtype).reshape(rows, *self.shape[1:])

    def read_stats(self) -> dict[str, np.ndarray]:
        """Precomputed `mu`, `sigma`, `mu_s`, `sigma_s` present in the file (ADM reference batches)."""
        return self.read_arrays(self.stat_names)

    def read_arrays(self, names) -> dict[str, np.ndarray]:
        """The small arrays among `names` that the file holds (e.g. `labels`, `manifest`), read whole."""
        present = [k for k in names if k + ".npy" in self._zip.namelist()]
        if not present:
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return {k: data[k] for k in present}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise BatchFileError(f"{self.role} file '{self.path}': cannot read {present} ({err})") from err

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_npy_header(f) -> tuple[tuple, np.dtype, bool, bool]:
    """(shape, dtype, fortran_order, streamable) of an open .npy stream, positioned at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):  # v3 only allows utf-8 field names; an image header is ascii
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise BatchFileError(f"unsupported .npy format version {version}; rewrite the file with np.savez")
    return tuple(shape), np.dtype(dtype), bool(fortran), not (fortran or dtype.hasobject)


LOCAL_HEADER = struct.Struct("<4s2xH10xIIHH")  # magic, flags, compressed and uncompressed size, name/extra lengths
LOCAL_MAGIC = b"PK\x03\x04"
DATA_DESCRIPTOR = 0x08  # flag bit: the sizes follow the data (a zip written to a stream)
ZIP64_EXTRA = 0x0001


def truncation(path: Path) -> str | None:
    """Where a zip whose end record zipfile cannot find stops, walking its local headers from
    the start (a truncated file keeps those); None for a file that does not start like a zip."""
    size = path.stat().st_size
    where, members, pos = f"its {size:,} bytes", [], 0
    with open(path, "rb") as f:
        if f.read(4) != LOCAL_MAGIC:
            return None
        while True:
            member = _local_member(f, pos)
            if member is None:  # past the last member: the central directory was cut off
                return (f"{where} hold all {len(members)} members ({', '.join(members)}) but the zip's end record "
                        f"is missing")
            if member == "cut":
                return (f"{where} end inside the zip header of member {len(members) + 1}, and the zip's end record "
                        f"is missing")
            name, flags, start, csize = member
            if flags & DATA_DESCRIPTOR:  # the sizes come after the data: how much is missing is unknown
                return (f"{where} end in or after member {name}, whose sizes are in a data descriptor after its "
                        f"data, and the zip's end record is missing")
            if start + csize > size:
                return (f"{where} end inside member {name}, which needs {csize:,} bytes of data and has "
                        f"{max(size - start, 0):,}, and the zip's end record is missing")
            members.append(name)
            pos = start + csize


def _local_member(f, pos: int):
    """(name, flags, first data byte, compressed size) of the local header at `pos`; None when
    no header starts there, "cut" when the file ends inside it."""
    f.seek(pos)
    header = f.read(LOCAL_HEADER.size)
    if not header or not LOCAL_MAGIC.startswith(header[:4]):
        return None
    if len(header) < LOCAL_HEADER.size:
        return "cut"
    _, flags, csize, usize, name_len, extra_len = LOCAL_HEADER.unpack(header)
    name, extra = f.read(name_len), f.read(extra_len)
    if len(name) < name_len or len(extra) < extra_len:
        return "cut"
    start = pos + LOCAL_HEADER.size + name_len + extra_len
    return name.decode("utf-8", "replace"), flags, start, _zip64_compressed_size(extra, csize, usize)


def _zip64_compressed_size(extra: bytes, csize: int, usize: int) -> int:
    """The compressed size, from the zip64 extra field when the header says 0xFFFFFFFF (np.savez
    always writes zip64 headers)."""
    if csize != 0xFFFFFFFF:
        return csize
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        if tag == ZIP64_EXTRA:  # 8-byte fields, in order, only for the sizes set to 0xFFFFFFFF
            fields = struct.unpack_from(f"<{min(length, len(extra) - i - 4) // 8}Q", extra, i + 4)
            index = 1 if usize == 0xFFFFFFFF else 0
            return fields[index] if index < len(fields) else csize
        i += 4 + length
    return csize


def _member_spans(path: Path) -> list[tuple[zipfile.ZipInfo, int, int]]:
    """(info, first data byte, end) of every member, from the local headers (whose extra field
    can differ in length from the central directory's)."""
    spans = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BatchFileError(f"'{path}': member {info.filename} uses zip compression {info.compress_type}; "
                                     f"rewrite the file with np.savez or np.savez_compressed")
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise BatchFileError(f"'{path}': the zip header of {info.filename} is damaged; rewrite the file")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((info, start, start + info.compress_size))
    return sorted(spans, key=lambda s: s[1])


def verified_sha256(path: str | os.PathLike, role: str = "batch", chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, and in the same single read the CRC-32 of every npz member's
    uncompressed data, checked against the zip directory. A damaged file is a BatchFileError
    before any of its rows is scored (reading only the first rows never reaches the CRC)."""
    path = Path(path)
    try:
        spans = _member_spans(path)
    except (zipfile.BadZipFile, OSError, struct.error) as err:
        raise BatchFileError(f"{role} file '{path}' is not a readable .npz (zip) file ({err}); rewrite it") from err
    crcs = [0] * len(spans)
    inflaters = [zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
                 for info, _, _ in spans]
    h = hashlib.sha256()
    try:
        crcs = _hash_and_crc(path, spans, inflaters, crcs, h, chunk)
    except zlib.error as err:
        raise BatchFileError(f"{role} file '{path}' is corrupt: a compressed member does not inflate ({err}); "
                             f"copy or write the file again") from err
    for (info, _, _), crc, inflater in zip(spans, crcs, inflaters):
        if inflater is not None:
            crc = zlib.crc32(inflater.flush(), crc)
        if crc != info.CRC:
            raise BatchFileError(f"{role} file '{path}' is corrupt: member {info.filename} fails its CRC-32 check "
                                 f"(stored {info.CRC:08x}, read {crc:08x}); copy or write the file again")
    return h.hexdigest()


def _hash_and_crc(path: Path, spans: list, inflaters: list, crcs: list, h, chunk: int) -> list:
    pos = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            for i, (info, start, end) in enumerate(spans):
                lo, hi = max(start, pos), min(end, pos + len(block))
                if lo < hi:
                    data = block[lo - pos:hi - pos]
                    if inflaters[i] is not None:
                        data = inflaters[i].decompress(data)
                    crcs[i] = zlib.crc32(data, crcs[i])
            pos += len(block)
    return crcs


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks."""
    return file_identity(path)["sha256"]
