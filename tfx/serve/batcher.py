"""Dynamic batching: sentences from concurrent requests decoded together.

Each request's sentences wait in one queue. A worker takes the oldest waiting sentence and
up to `rows` - 1 others decoded the same way (same options, n-best and language) and closest
to it in length, as soon as `rows` such sentences wait or the oldest has waited `max_wait`
seconds, and decodes them in a thread (`decode`), off the event loop. A full queue refuses
a request at once (`QueueFull`); a request given up on (its timeout) leaves the queue, and
one that fails fails alone with the batch it was decoded in.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable

from tfx.serve.api import Request
from tfx.serve.metrics import Metrics


class QueueFull(Exception):
    """The queue holds too many sentences to take this request now."""


@dataclasses.dataclass(eq=False)
class Item:
    """One sentence waiting, with how to decode it (`key`) and its reply (`future`)."""

    sentence: str
    prefix: str
    key: tuple
    future: asyncio.Future
    arrived: float


# decode(items) -> one list of hypotheses per item, best first (at least the key's n-best).
Decode = Callable[[list[Item]], list[list]]


class Batcher:
    """The queue and its worker (`run`, a task for the server's life)."""

    def __init__(self, decode: Decode, rows: int, max_wait: float, max_queue: int, metrics: Metrics):
        self.decode, self.rows, self.max_wait, self.max_queue = decode, rows, max_wait, max_queue
        self.metrics = metrics
        self._waiting: list[Item] = []
        self._arrived = asyncio.Event()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tfx-decode")

    async def translate(self, request: Request) -> list[list]:
        """Each sentence's hypotheses, best first, cut to the request's n-best."""
        if len(self._waiting) + len(request.sentences) > self.max_queue:
            raise QueueFull(f"{len(self._waiting)} sentences are waiting (at most {self.max_queue}).")
        loop = asyncio.get_running_loop()
        key = (request.decoding, request.nbest, request.target_lang)
        prefixes = request.prefixes or [""] * len(request.sentences)
        items = [Item(sentence, prefix, key, loop.create_future(), loop.time())
                 for sentence, prefix in zip(request.sentences, prefixes)]
        self._waiting += items
        self._changed()
        try:
            results = await asyncio.gather(*(item.future for item in items))
        finally:
            for item in items:  # given up on (a timeout, a closed connection): no longer waiting.
                item.future.cancel()
            self._waiting = [item for item in self._waiting if not item.future.done()]
            self.metrics.queue_depth.set(len(self._waiting))
        return [hypotheses[:request.nbest] for hypotheses in results]

    def _changed(self):
        self.metrics.queue_depth.set(len(self._waiting))
        self._arrived.set()

    async def run(self):
        """Decodes batches for as long as the server runs."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            self.metrics.batch_size.observe(len(batch))
            try:
                results = await loop.run_in_executor(self._thread, self.decode, batch)
            except Exception as error:  # the batch's requests fail; the server goes on.
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.metrics.sentences.inc(len(batch))
            for item, hypotheses in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(hypotheses)

    async def _next_batch(self, loop) -> list[Item]:
        while True:
            self._waiting = [item for item in self._waiting if not item.future.done()]
            self._arrived.clear()
            if not self._waiting:
                await self._arrived.wait()
                continue
            oldest = self._waiting[0]
            alike = [item for item in self._waiting if item.key == oldest.key]
            left = oldest.arrived + self.max_wait - loop.time()
            if len(alike) < self.rows and left > 0:
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    pass
                continue
            alike.sort(key=lambda item: abs(len(item.sentence) - len(oldest.sentence)))
            batch = alike[:self.rows]  # the oldest first (distance 0, a stable sort).
            taken = set(map(id, batch))
            self._waiting = [item for item in self._waiting if id(item) not in taken]
            self.metrics.queue_depth.set(len(self._waiting))
            return batch

    def close(self):
        self._thread.shutdown(wait=True, cancel_futures=True)
