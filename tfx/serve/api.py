"""The server's requests: JSON bodies checked field by field into `Request`s.

Two endpoints take text (docs/serving.md):

- `POST /translate`, LibreTranslate's: {"q": str | [str], "source": LANG | "auto", "target":
  LANG, "format": "text", "alternatives": N}, as JSON or as a form; `libretranslate_request`.
- `POST /v1/translate`, tfx's own: {"text": str | [str], "prefix": str | [str], "nbest": K,
  "target_lang": LANG, and config.decode's options "strategy", "beam_size", "temperature",
  "top_k", "top_p", "length_penalty", "max_length"}; `v1_request`.

A language the model does not translate (tfx.serve.languages) is a `BadRequest` too.

Anything else is a `BadRequest` whose message names the field and what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import urllib.parse

import ml_collections

from tfx.core import config as config_lib
from tfx.serve.languages import Languages

# config.decode keys a /v1/translate request may set, and the JSON types they take.
DECODING_FIELDS = {"strategy": (str,), "beam_size": (int,), "temperature": (int, float),
                   "top_k": (int,), "top_p": (int, float), "length_penalty": (int, float),
                   "max_length": (int,)}
MOST_ALTERNATIVES = 16


class BadRequest(ValueError):
    """A request the server refuses with 400 (`status`: another 4xx) and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Request:
    """Sentences to translate the same way."""

    sentences: list[str]
    prefixes: list[str] | None = None  # forced target prefixes, one per sentence ("": none).
    nbest: int = 1
    decoding: tuple[tuple[str, object], ...] = ()  # config.decode overrides, sorted by key.
    target_lang: str | None = None  # the output language (tfx.serve.languages); None: the model's own.


def decoding_config(config: ml_collections.ConfigDict, decoding: tuple) -> ml_collections.ConfigDict:
    """A copy of `config` with a request's config.decode overrides, validated (BadRequest)."""
    config = config.copy_and_resolve_references()
    for key, value in decoding:
        config.decode[key] = value
    try:
        return config_lib.validate(config)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def parse_form(body: bytes) -> dict:
    """A form-encoded body (LibreTranslate's clients send forms too) as the JSON object it
    stands for: one value per field, a repeated field a list; `alternatives` a number."""
    try:
        fields = urllib.parse.parse_qs(body.decode("ascii"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as error:
        raise BadRequest(f"body: invalid form encoding ({error}).") from None
    payload = {key: values[0] if len(values) == 1 else values for key, values in fields.items()}
    if isinstance(payload.get("alternatives"), str):
        try:
            payload["alternatives"] = int(payload["alternatives"])
        except ValueError:
            raise BadRequest(f"alternatives: expected an integer, got {payload['alternatives']!r}.") from None
    return payload


def parse_json(body: bytes) -> dict:
    """The JSON object of a request body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"body: invalid UTF-8 at byte {error.start}.") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRequest(f"body: invalid JSON ({error.msg} at line {error.lineno} column {error.colno}).") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body: expected a JSON object, got {_json_type(payload)}.")
    return payload


def libretranslate_request(payload: dict, languages: Languages, most: int) -> tuple[Request, bool]:
    """(the request, whether `q` was a list) of LibreTranslate's /translate body; a language
    pair the model does not translate is LibreTranslate's 400 naming the language."""
    sentences, many = _texts(payload, "q", most)
    source = _optional(payload, "source", str, "auto")
    target = _required(payload, "target", str)
    if source != "auto" and not languages.targets(source):
        raise BadRequest(f"{source} is not supported")
    if target not in languages.targets(source):
        raise BadRequest(f"{target} is not supported")
    if _optional(payload, "format", str, "text") != "text":
        raise BadRequest('format: only "text" is supported.')
    alternatives = _optional(payload, "alternatives", int, 0)
    if not 0 <= alternatives <= MOST_ALTERNATIVES:
        raise BadRequest(f"alternatives: expected 0 to {MOST_ALTERNATIVES}, got {alternatives}.")
    return Request(sentences, nbest=1 + alternatives, target_lang=target), many


def v1_request(payload: dict, languages: Languages, most: int) -> tuple[Request, bool]:
    """(the request, whether `text` was a list) of a /v1/translate body."""
    known = {"text", "prefix", "nbest", "target_lang", *DECODING_FIELDS}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise BadRequest(f"{unknown[0]}: not a field of /v1/translate; expected some of {sorted(known)}.")
    sentences, many = _texts(payload, "text", most)
    prefixes = None
    if "prefix" in payload:
        prefixes, prefix_many = _texts(payload, "prefix", most, empty_ok=True)
        if prefix_many != many or len(prefixes) != len(sentences):
            raise BadRequest(f"prefix: expected one per text ({len(sentences)}, "
                             f"{'a list' if many else 'a string'}), got {len(prefixes)}.")
    nbest = _optional(payload, "nbest", int, 1)
    if not 1 <= nbest <= MOST_ALTERNATIVES:
        raise BadRequest(f"nbest: expected 1 to {MOST_ALTERNATIVES}, got {nbest}.")
    decoding = tuple(sorted((key, _required(payload, key, types)) for key, types in DECODING_FIELDS.items()
                            if key in payload))
    target_lang = _optional(payload, "target_lang", str, languages.target)
    if target_lang not in languages.targets():
        raise BadRequest(f"target_lang: expected one of {languages.targets()}, got {target_lang!r}.")
    return Request(sentences, prefixes, nbest, decoding, target_lang), many


def _texts(payload: dict, field: str, most: int, empty_ok: bool = False) -> tuple[list[str], bool]:
    """(the strings of `field`, a string or a list of them, whether it was a list)."""
    value = _required(payload, field, (str, list))
    many = isinstance(value, list)
    texts = value if many else [value]
    if many and not texts and not empty_ok:
        raise BadRequest(f"{field}: expected at least one string, got an empty list.")
    if len(texts) > most:
        raise BadRequest(f"{field}: {len(texts)} sentences; at most {most} per request.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(f"{field}[{i}]: expected a string, got {_json_type(text)}.")
        if "\n" in text.strip():
            raise BadRequest(f"{field}[{i}]: one sentence per string, without line breaks.")
    return texts, many


def _required(payload: dict, field: str, types):
    if field not in payload:
        raise BadRequest(f"{field}: missing.")
    return _checked(payload[field], field, types)


def _optional(payload: dict, field: str, types, default):
    return default if payload.get(field) is None else _checked(payload[field], field, types)


def _checked(value, field: str, types):
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) or not isinstance(value, types):  # bool is an int in Python.
        expected = " or ".join(_JSON_NAMES[t] for t in types)
        raise BadRequest(f"{field}: expected {expected}, got {_json_type(value)}.")
    return value


_JSON_NAMES = {str: "a string", list: "a list", int: "an integer", float: "a number", dict: "an object"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_NAMES.get(type(value), type(value).__name__)
