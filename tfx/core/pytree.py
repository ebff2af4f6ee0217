"""Names of pytree leaves, for messages and reports."""
from __future__ import annotations


def path_name(path) -> str:
    """`encoder/layers/0/attention/query` for a jax key path (dict keys, sequence indices,
    attribute names)."""
    parts = (getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))) for key in path)
    return "/".join(str(part) for part in parts)
