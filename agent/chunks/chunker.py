"""Cutting a file into chunks: FastCDC (pyfastcdc) with min 256 KiB, average 1 MiB, max
4 MiB; a file smaller than the minimum is one chunk. A sparse file is cut per data extent
(found with SEEK_DATA / SEEK_HOLE), so holes are neither read nor stored; a restorer leaves
the gaps between a file's chunks as holes.

`extents` and `chunks` read an open file descriptor; nothing else here does I/O.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

from pyfastcdc import FastCDC

logger = logging.getLogger(__name__)

MIN_SIZE = 256 << 10
AVG_SIZE = 1 << 20
MAX_SIZE = 4 << 20
WHOLE_READ = 2 * MAX_SIZE
_CDC = FastCDC(avg_size=AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)


def extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield the (start, end) of every data extent of the open file `fd` of `size` bytes, in
    order. A filesystem without SEEK_DATA gives one extent: the whole file."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                return
            if exc.errno == errno.EINVAL and position == 0:
                yield 0, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        position = end


class _ExtentReader:
    """`readinto` over the bytes [start, end) of `fd`, for FastCDC's stream chunker."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._position = start
        self._end = end

    def readinto(self, buffer: memoryview) -> int:
        wanted = min(len(buffer), self._end - self._position)
        if wanted <= 0:
            return 0
        count = os.preadv(self._fd, [buffer[:wanted]], self._position)
        self._position += count
        return count


def chunks(fd: int, size: int, dense: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (offset in the file, chunk bytes) of the open file `fd` of `size` bytes, extent
    by extent, each extent cut by FastCDC; `dense`: the file has no holes (its blocks cover
    its size), so it is one extent without asking. Reads each byte of data once; stops at
    `size` even if the file grew meanwhile. An extent up to WHOLE_READ bytes is read in one piece
    and cut in memory (the stream chunker's buffer of twice the maximum chunk would cost more
    than a small file's read)."""
    for start, end in [(0, size)] if dense and size else extents(fd, size):
        if end - start <= WHOLE_READ:
            data = os.pread(fd, end - start, start)
            view = memoryview(data)
            for piece in _CDC.cut_buf(view):
                yield start + piece.offset, bytes(view[piece.offset : piece.offset + piece.length])
            continue
        for piece in _CDC.cut_stream(_ExtentReader(fd, start, end)):
            yield start + piece.offset, bytes(piece.data)
