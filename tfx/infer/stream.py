"""Lines as they arrive: `translate.py --stream` reads a pipe or a terminal a line at a time
and answers each batch of the lines already waiting at once, so it can sit in a pipeline.

    for batch in waiting_batches(decode_lines(sys.stdin.buffer, "<stdin>"), most=64):
        ...  # translate `batch`, write, flush

A thread reads the lines into a queue; each batch is the first line (waiting for it) and
whatever lines followed it in the meantime, up to `most`. An error reading the input (invalid
UTF-8) comes out after the lines before it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_END = object()


def waiting_batches(lines: Iterable[str], most: int) -> Iterator[list[str]]:
    """Batches of `lines`: each the next line and up to most - 1 lines already read after it."""
    waiting: queue.Queue = queue.Queue()

    def read():
        try:
            for line in lines:
                waiting.put(line)
        except Exception as error:  # handed to the consumer, raised there in order.
            waiting.put(error)
        waiting.put(_END)

    threading.Thread(target=read, daemon=True, name="tfx-stdin").start()
    while True:
        batch, item = [], waiting.get()
        while item is not _END and not isinstance(item, Exception):
            batch.append(item)
            if len(batch) == most:
                break
            try:
                item = waiting.get_nowait()
            except queue.Empty:
                break
        if batch:
            yield batch
        if item is _END:
            return
        if isinstance(item, Exception):
            raise item
