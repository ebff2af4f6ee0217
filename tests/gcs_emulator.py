"""A Cloud Storage API server on loopback for the gs:// tests: gcp-storage-emulator, in memory.

Every client of a run reaches it through the environment, which subprocesses inherit:
- gcsfs (epath) and google-cloud-storage: STORAGE_EMULATOR_HOST;
- TensorStore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING.

gcp-storage-emulator accepts uploads and deletes whatever their `ifGenerationMatch` says (an
upload with ifGenerationMatch=0 over an existing object succeeds), so `enforce_preconditions`
adds Cloud Storage's documented check to its upload and delete handlers: a mismatch answers
412 Precondition Failed and changes nothing. The check and the write are one step under a lock.
Its downloads also lack the `x-goog-generation` header of Cloud Storage's, from which
TensorStore's OCDBT (orbax) reads a manifest's generation before a conditional write (without it
a save fails now and then with "Malformed StorageGeneration"): `send_generation` adds it.
"""
from __future__ import annotations

import contextlib
import http
import os
import socket
import threading
from collections.abc import Iterator

BUCKET = "tfx-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _current_generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name).get("generation") or 0)
    except Exception:  # the emulator's NotFound: no live object is generation 0.
        return 0


def _precondition_failed(response):
    response.status = http.HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet",
                             "errors": [{"reason": "conditionNotMet"}]}})


def enforce_preconditions():
    """Wraps the emulator's object upload and delete handlers with the ifGenerationMatch check."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    guard = threading.Lock()
    original_insert, original_delete = objects.insert, objects.delete

    def insert(request, response, storage, *args, **kwargs):
        expected = request.query.get("ifGenerationMatch")
        if expected is None:
            with guard:  # not while a conditional upload has swapped create_file.
                return original_insert(request, response, storage, *args, **kwargs)
        create_file = storage.create_file

        def checked_create(bucket, name, *rest, **kw):
            if _current_generation(storage, bucket, name) != int(expected[0]):
                raise _PreconditionFailed
            return create_file(bucket, name, *rest, **kw)

        with guard:
            storage.create_file = checked_create
            try:
                return original_insert(request, response, storage, *args, **kwargs)
            except _PreconditionFailed:
                _precondition_failed(response)
            finally:
                del storage.create_file

    def delete(request, response, storage, *args, **kwargs):
        expected = request.query.get("ifGenerationMatch")
        with guard:
            if expected is not None and _current_generation(
                    storage, request.params["bucket_name"], request.params["object_id"]) != int(expected[0]):
                return _precondition_failed(response)
            return original_delete(request, response, storage, *args, **kwargs)

    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is original_insert:
                methods[method] = insert
            elif handler is original_delete:
                methods[method] = delete


class _PreconditionFailed(Exception):
    pass


def send_generation():
    """Makes the emulator's downloads carry the object's generation and metageneration headers,
    as Cloud Storage's do."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        if response.status in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
            found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(found["generation"])
            response["x-goog-metageneration"] = str(found["metageneration"])

    objects.download = download  # objects.get calls it for ?alt=media.
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is original:
                methods[method] = download


@contextlib.contextmanager
def running() -> Iterator[str]:
    """Starts the emulator with bucket BUCKET, points this process's environment at it, and
    yields the bucket's URL (gs://tfx-test); stops it and restores the environment after."""
    from gcp_storage_emulator.server import create_server

    enforce_preconditions()
    send_generation()
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    variables = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "tfx-test",
                 "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
