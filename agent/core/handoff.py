"""Chunks handed from a producer thread to a reader through a small bounded queue, so reading,
hashing, decrypting and decompressing overlap. An exception in the producer is raised in the
reader; `stop` releases a producer blocked on a full queue."""

from __future__ import annotations

import queue
import threading

Item = bytes | memoryview | BaseException


class HandOff:
    def __init__(self, chunks: int) -> None:
        self._queue: queue.Queue[Item] = queue.Queue(chunks)
        self._stop = threading.Event()
        self._pending = memoryview(b"")
        self._ended = False

    def put(self, item: Item) -> bool:
        """Producer side: hand over a chunk (b"" at the end, or the exception that ended the
        producer). Return False, without handing it over, once `stop` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1) -> memoryview:
        """Reader side: up to `size` bytes (all of the current chunk when negative); empty at
        the end. Raise what the producer raised."""
        if not self._pending and not self._ended:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            self._pending = memoryview(item)
            self._ended = not item
        if size < 0 or size >= len(self._pending):
            data, self._pending = self._pending, memoryview(b"")
        else:
            data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def stop(self) -> None:
        self._stop.set()
