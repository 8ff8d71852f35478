"""Work over an array of block indexes, split in parts, on a few threads.

The journal's disk export and recovery's disk write and compare all do this: their
per-part work releases the GIL in reads, writes, hashing and decompression, so a few
threads overlap I/O with CPU. One thread (or one part) runs in the caller's thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np


def each_part(work: Callable[[Any], None], indexes: Any, parts: int, threads: int) -> None:
    """Call `work` on each of `parts` consecutive slices of `indexes` (nothing when empty);
    an exception in any part is raised here."""
    if not len(indexes):
        return
    chunks = np.array_split(indexes, max(1, parts))
    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(work, chunks))
    else:
        for c in chunks:
            work(c)
