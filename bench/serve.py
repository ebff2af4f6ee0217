"""serve.py under load against translate.py on the same file: prints one JSON line.

    python bench/serve.py --workdir runs/multi30k --checkpoint average:5 \\
        [--input data/multi30k-en-de/test_2016_flickr.en] [--clients 1,8,32,128] [--rounds 3]
    python bench/serve.py --workdir runs/multi30k --checkpoint average:5 --soak 300
    [--max_wait_ms MS]  (serve.py's batching window; its default otherwise)

First translate.py's library translates the file (one untimed run, then --rounds timed ones):
its sentences/s. Then serve.py starts on loopback and, for each number of clients, LibreTranslate
requests of one sentence each go through the whole file --rounds times (one untimed round
first): sentences/s (median, min, max of the rounds), latency p50 and p99 over the timed
rounds, the mean sentences per decoded batch (the server's /metrics), and the share of
translate.py's throughput. Every reply must be translate.py's translation of its sentence.

--soak S instead: 32 clients for S seconds, every 10th request a bad one, the server's RSS
read every 10 s: the replies by status, the unexpected ones, and the RSS's first, last, min
and max.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]


def translate_py(workdir: str, checkpoint: str, sentences: list[str], rounds: int) -> tuple[list[str], dict]:
    """(translate.py's translations, its sentences/s) with the run's own config."""
    from stats import run_times, summary

    from tfx.core import config as config_lib
    from tfx.infer import trained
    from tfx.infer.translate import Translator

    translator = Translator(trained.load(config_lib.validate(config_lib.load_run(workdir)), workdir, checkpoint))
    times, (results, _) = run_times(lambda: translator.translate(sentences), rounds)
    return [r[0].text for r in results], summary(len(sentences) / t for t in times)


def load_rounds(url: str, sentences: list[str], expected: list[str], clients: int, rounds: int) -> dict:
    """The server's throughput and latencies at `clients` (see the module doc)."""
    import numpy as np
    from stats import summary

    from tfx.serve.load import run_load

    rates, latencies = [], []
    batches = {}
    for round_number in range(rounds + 1):
        if round_number == 1:
            batches = batch_sizes(url)
        load = asyncio.run(run_load(url, sentences, clients, len(sentences), seconds=3600))
        wrong = [i for i, status, text in load.good if (status, text) != (200, expected[i])]
        if wrong:
            raise AssertionError(f"{len(wrong)} replies differ from translate.py's, e.g. sentence {wrong[0]}")
        if round_number:  # the first is a warm-up.
            rates.append(len(load.good) / load.seconds)
            latencies += load.latencies
    p50, p99 = np.percentile(latencies, [50, 99])
    after = batch_sizes(url)
    mean_batch = (after["sum"] - batches["sum"]) / max(after["count"] - batches["count"], 1)
    return {"sentences_per_sec": summary(rates), "latency_p50_ms": round(1000 * p50, 1),
            "latency_p99_ms": round(1000 * p99, 1), "mean_batch_sentences": round(mean_batch, 1)}


def batch_sizes(url: str) -> dict:
    """The server's tfx_batch_sentences histogram's sum and count so far (/metrics)."""
    import httpx

    lines = httpx.get(url + "/metrics").text.splitlines()
    return {part: float(next(line.split()[1] for line in lines if line.startswith(f"tfx_batch_sentences_{part} ")))
            for part in ("sum", "count")}


def soak(server, sentences: list[str], expected: list[str], seconds: float) -> dict:
    """32 clients for `seconds` with bad requests among them; RSS sampled every 10 s."""
    from tfx.serve.load import run_load

    samples, done = [], threading.Event()

    def sample_rss():
        while not done.wait(10):
            with open(f"/proc/{server.process.pid}/status") as status:
                samples.append(next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS")))

    threading.Thread(target=sample_rss, daemon=True).start()
    load = asyncio.run(run_load(server.url, sentences, 32, 10**9, seconds, bad_every=10))
    done.set()
    unexpected = [(i, status) for i, status, text in load.good if (status, text) != (200, expected[i])]
    unexpected += [(None, status) for status in load.bad_statuses if status != 400]
    return {**load.summary(), "unexpected": len(unexpected), "rss_mb": {
        "first": samples[0], "last": samples[-1], "min": min(samples), "max": max(samples)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--input", default=os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr.en"))
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak", type=float, default=0, help="Seconds of soak instead of the load rounds.")
    parser.add_argument("--max_wait_ms", type=float, default=None, help="serve.py's, if given.")
    args = parser.parse_args()
    from servers import Server

    from tfx.data.sources import read_lines

    sentences = [line for line in read_lines(args.input) if line.strip()]
    expected, reference = translate_py(args.workdir, args.checkpoint, sentences, args.rounds)
    result = {"input": os.path.basename(args.input), "sentences": len(sentences), "cpus": os.cpu_count(),
              "translate_py_sentences_per_sec": reference}
    flags = [f"--workdir={args.workdir}", f"--checkpoint={args.checkpoint}"]
    if args.max_wait_ms is not None:
        flags.append(f"--max_wait_ms={args.max_wait_ms}")
        result["max_wait_ms"] = args.max_wait_ms
    with Server(flags) as server:
        if args.soak:
            result["soak"] = soak(server, sentences, expected, args.soak)
        else:
            for clients in map(int, args.clients.split(",")):
                figures = load_rounds(server.url, sentences, expected, clients, args.rounds)
                figures["of_translate_py"] = round(figures["sentences_per_sec"]["median"] / reference["median"], 3)
                result[f"clients_{clients}"] = figures
        result["exit_code"] = server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
