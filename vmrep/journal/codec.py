"""Blob codecs: how a block is stored in a pack (raw or one zstd frame), and back."""

from __future__ import annotations

import threading

import zstandard

from vmrep.errors import JournalError
from vmrep.journal import format as fmt

_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None or _tls.zlevel != level:
        c = _tls.zc = zstandard.ZstdCompressor(level=level, write_content_size=True)
        _tls.zlevel = level
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


SAMPLE = 8 << 10  # bytes per probe of the incompressibility test


def _looks_incompressible(data: bytes | memoryview) -> bool:
    """Compress three 8 KiB probes (start, middle, end): random or already-compressed data
    (most of what a disk holds that is not zero) is then not compressed whole for nothing.
    A block with any compressible region among the probes is compressed in full."""
    n = len(data)
    if n < 16 * SAMPLE:
        return False
    view = memoryview(data)
    c = _compressor(1)
    for off in (0, (n - SAMPLE) // 2, n - SAMPLE):
        if len(c.compress(view[off : off + SAMPLE])) < SAMPLE - (SAMPLE >> 5):
            return False
    return True


def encode_blob(data: bytes | memoryview, level: int) -> tuple[bytes | memoryview, int]:
    """Compress; keep raw when compression saves less than 1/32 of the block."""
    if level <= 0 or _looks_incompressible(data):
        return data, fmt.CODEC_RAW
    comp = _compressor(level).compress(data)
    if len(comp) >= len(data) - (len(data) >> 5):
        return data, fmt.CODEC_RAW
    return comp, fmt.CODEC_ZSTD


def decode_blob(blob: bytes, codec: int, rlen: int) -> bytes:
    if codec == fmt.CODEC_RAW:
        return blob
    if codec == fmt.CODEC_ZSTD:
        return _decompressor().decompress(blob, max_output_size=rlen)
    raise JournalError(f"unknown codec {codec}")
