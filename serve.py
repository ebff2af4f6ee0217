"""Serve a trained run over HTTP: LibreTranslate's API, tfx's own, a web page and metrics.

    python serve.py --workdir runs/multi30k [--checkpoint average:5] [--port 8080]
        [--host 127.0.0.1] [--max_wait_ms 5] [--max_queue 1024] [--timeout 60]
        [--max_body_kb 1024] [--max_sentences 64] [--keep_alive_s 75]
        [--config.decode.beam_size=4 ...]
    python serve.py --backend ctranslate2 --model runs/multi30k-ct2 [--port 8080] ...

The API, the page and the figures are in docs/serving.md. The jax backend decodes the run's
checkpoint as translate.py does (its config.json, with --config.KEY=VALUE overrides of what
may change at inference), compiling every padded source length before it listens; the
ctranslate2 backend serves a `python -m tfx.export ctranslate2` directory without JAX.
Sentences of concurrent requests are batched (config.per_device_eval_batch_size per
data-parallel device). SIGTERM or Ctrl-C: the requests in flight are answered, then it exits.
Once listening it prints "serving on http://HOST:PORT" to stderr (--port 0: a free port).
"""
import signal
import socket
import sys

from absl import flags, logging

from tfx.core import cli


def main():
    shared = cli.define_flags(workdir="The training run's workdir (--backend jax).", checkpoint=True,
                              workdir_required=False)
    backend = flags.DEFINE_enum("backend", "jax", ["jax", "ctranslate2"], "What decodes.")
    model = flags.DEFINE_string("model", None, "--backend ctranslate2: the exported model directory.")
    host = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port = flags.DEFINE_integer("port", 8080, "Port to listen on; 0: a free one.")
    max_wait_ms = flags.DEFINE_float("max_wait_ms", 5.0, "How long a sentence waits for a fuller batch.")
    max_queue = flags.DEFINE_integer("max_queue", 1024, "Sentences waiting, at most; then 503.")
    timeout = flags.DEFINE_float("timeout", 60.0, "Seconds a request may take; then 504.")
    max_body_kb = flags.DEFINE_integer("max_body_kb", 1024, "Largest request body; then 413.")
    max_sentences = flags.DEFINE_integer("max_sentences", 64, "Sentences per request, at most; then 400.")
    keep_alive_s = flags.DEFINE_integer(
        "keep_alive_s", 75, "Seconds an idle connection stays open (nginx's default); behind a "
        "load balancer, more than its idle timeout, or it may send a request onto a closing connection.")

    def command():
        from tfx.serve.app import Settings, create_app

        settings = Settings(max_wait=max_wait_ms.value / 1000, max_queue=max_queue.value,
                            timeout=timeout.value, max_body=max_body_kb.value * 1024,
                            max_sentences=max_sentences.value)
        app = create_app(load_backend(backend.value, shared, model.value), settings)
        serve(app, host.value, port.value, keep_alive_s.value)

    cli.run("serve.py", command, verbosity=logging.ERROR)


def load_backend(kind: str, shared: cli.SharedFlags, model: str | None):
    """The backend `kind` (see the module doc), ready to decode."""
    if kind == "ctranslate2":
        if not model or shared.workdir.value:
            raise ValueError("--backend ctranslate2 serves --model DIR (an export), not --workdir.")
        from tfx.serve.ctranslate2_backend import CTranslate2Backend
        return CTranslate2Backend(model)
    if not shared.workdir.value or model:
        raise ValueError("--backend jax serves --workdir DIR (a training run); --model is for ctranslate2.")
    from tfx.serve.jax_backend import JaxBackend
    backend = JaxBackend(shared.run_config(), shared.workdir.value, shared.checkpoint.value)
    backend.warm_up()
    return backend


def serve(app, host: str, port: int, keep_alive_s: int):
    """Runs `app` on HOST:PORT until SIGTERM or SIGINT (uvicorn's graceful shutdown)."""
    import uvicorn

    # uvicorn answers what is in flight, then raises the signal again with the handlers it
    # found: these make a requested stop exit 0, before uvicorn takes the signals over too.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: sys.exit(0))
    # uvicorn's own backlog (Python's default of 128 would drop the connections of a burst).
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=keep_alive_s,
                                            timeout_graceful_shutdown=60))
    bound_host, bound_port = listener.getsockname()[:2]
    print(f"serving on http://{bound_host}:{bound_port}", file=sys.stderr, flush=True)
    server.run(sockets=[listener])


if __name__ == "__main__":
    main()
