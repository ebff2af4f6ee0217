"""A load generator for serve.py: concurrent clients sending sentences, bounded in count and time.

    python -m tfx.serve.load --url http://127.0.0.1:8080 --input test.en --clients 32 \\
        [--requests 1000] [--seconds 60] [--bad_every 10]

Each of `clients` clients posts one sentence at a time to LibreTranslate's /translate, over a
connection of its own, taking the next sentence of the input (round and round) until
`requests` have been sent or `seconds` have passed; with `bad_every` n, every n-th request is
a bad one instead (a rotation of invalid JSON, a wrong type, an unsupported language), which
must get its 400. It prints one JSON line: sentences/s and the latencies' p50 and p99 of the
good requests, and the replies by status. bench/serve.py and the tests call `run_load`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time

import httpx
import numpy as np

from tfx.data.sources import read_lines

BAD_BODIES = (b"{", b'{"q": 7, "source": "en", "target": "de"}', b'{"q": "x", "source": "en", "target": "xx"}')


@dataclasses.dataclass
class Load:
    """What a load run saw: the good requests' (sentence index, status, translation) and
    latencies, the bad requests' statuses, and the wall time."""

    good: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    bad_statuses: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        ok = sum(status == 200 for _, status, _ in self.good)
        statuses = [status for _, status, _ in self.good] + self.bad_statuses
        p50, p99 = np.percentile(self.latencies, [50, 99]) if self.latencies else (0.0, 0.0)
        return {"sentences_per_sec": round(ok / max(self.seconds, 1e-9), 2),
                "latency_p50_ms": round(1000 * p50, 1), "latency_p99_ms": round(1000 * p99, 1),
                "requests": len(statuses), "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}


async def run_load(url: str, sentences: list[str], clients: int, requests: int, seconds: float,
                   source: str = "en", target: str = "de", bad_every: int = 0) -> Load:
    """Sends up to `requests` requests from `clients` concurrent clients for at most `seconds`.
    Each client keeps a connection of its own, as a user's would: a pool shared by all of them
    would hand a request the connection that idled longest, which a server may be closing."""
    load, numbers = Load(), itertools.count()
    deadline = time.perf_counter() + seconds

    async def client():
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=1),
                                     timeout=max(seconds, 60)) as http:
            while time.perf_counter() < deadline:
                number = next(numbers)
                if number >= requests:
                    return
                if bad_every and number % bad_every == bad_every - 1:
                    body = BAD_BODIES[number // bad_every % len(BAD_BODIES)]
                    load.bad_statuses.append((await http.post("/translate", content=body)).status_code)
                    continue
                index = number % len(sentences)
                start = time.perf_counter()
                reply = await http.post("/translate", json={"q": sentences[index], "source": source,
                                                            "target": target})
                load.latencies.append(time.perf_counter() - start)
                text = reply.json().get("translatedText", "") if reply.status_code == 200 else reply.text
                load.good.append((index, reply.status_code, text))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    load.seconds = time.perf_counter() - start
    return load


def main():
    from absl import flags

    from tfx.core import cli

    cli.define_flags(config=None)
    url = flags.DEFINE_string("url", None, "The server, e.g. http://127.0.0.1:8080.", required=True)
    inputs = flags.DEFINE_string("input", None, "Sentences, one per line.", required=True)
    clients = flags.DEFINE_integer("clients", 32, "Concurrent clients.")
    requests = flags.DEFINE_integer("requests", 1000, "Requests in all, at most.")
    seconds = flags.DEFINE_float("seconds", 60.0, "Stop sending after this many seconds.")
    bad_every = flags.DEFINE_integer("bad_every", 0, "Every n-th request is a bad one (0: none).")
    source = flags.DEFINE_string("source", "en", "LibreTranslate's source language.")
    target = flags.DEFINE_string("target", "de", "LibreTranslate's target language.")

    def command():
        sentences = [line for line in read_lines(inputs.value) if line.strip()]
        load = asyncio.run(run_load(url.value, sentences, clients.value, requests.value, seconds.value,
                                    source.value, target.value, bad_every.value))
        print(json.dumps(load.summary()))

    cli.run("tfx.serve.load", command)


if __name__ == "__main__":
    main()
