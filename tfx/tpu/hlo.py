"""The collectives of a compiled program, read from its optimized HLO text.

A collective counts once however the compiler lays it out: the TPU compiler splits one
all-gather into steps (async collective fusions, each holding a copy of it) and writes a
reduce-scatter as an all-reduce and a dynamic slice inside a fusion named
`all-reduce-scatter`. Copies share the collective's `channel_id`, so collectives are counted by
channel. Bytes are per chip and per collective, of the whole array the collective reduces or
gathers (the all-reduce's operand, the all-gather's result, the reduce-scatter's operand): a
ring all-reduce sends about twice that over the links, an all-gather or a reduce-scatter once.
"""
from __future__ import annotations

import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.-]+)"
                     r"|(?:branch_computations|called_computations)=\{([^}]*)\}")
_ARRAY = re.compile(r"\b(pred|bf16|[fsuc]\d+|f8\w*)\[([\d,]*)\]")
_REDUCE_SCATTER_COMPUTATION = "all-reduce-scatter"


def _array_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape (an array or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = 8 if dtype == "pred" or dtype.startswith("f8") else int(dtype[1:] if dtype != "bf16" else 16)
        elements = 1
        for dim in filter(None, dims.split(",")):
            elements *= int(dim)
        total += elements * bits // 8
    return total


def _computations(hlo: str) -> tuple[dict[str, list[tuple]], str]:
    """{computation: [(name, shape, opcode, called computations, operand names, attributes)]},
    and the entry computation's name."""
    computations: dict[str, list[tuple]] = {}
    entry = current = None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, opcode, rest = match.groups()
            called = []
            for single, listed in _CALLED.findall(rest):
                called += [single] if single else [c.strip().lstrip("%") for c in listed.split(",")]
            operands = re.findall(r"%([\w.-]+)", rest.split("),")[0])
            computations[current].append((name, shape, opcode, called, operands, rest))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text.")
    return computations, entry


def collectives(hlo: str) -> tuple[dict[str, int], dict[str, int]]:
    """({kind: count}, {kind: bytes per chip}) of the collectives a program runs, each kind of
    `KINDS` present (see the module doc for how they are counted)."""
    computations, entry = _computations(hlo)
    shapes = {name: shape for body in computations.values() for name, shape, *_ in body}
    found: dict[tuple[str, str], int] = {}
    visited: set[tuple[str, bool]] = set()
    pending = [(entry, False)]
    while pending:
        computation, in_reduce_scatter = pending.pop()
        if (computation, in_reduce_scatter) in visited or computation not in computations:
            continue
        visited.add((computation, in_reduce_scatter))
        for name, shape, opcode, called, operands, rest in computations[computation]:
            kind = opcode.removesuffix("-start")
            if kind in KINDS:
                if kind == "all-reduce" and in_reduce_scatter:
                    kind = "reduce-scatter"
                channel = re.search(r"channel_id=(\d+)", rest)
                operand = sum(_array_bytes(shapes.get(o, "")) for o in operands)
                result = _array_bytes(shape)
                if opcode.endswith("-start"):  # an async start's result holds its operands too.
                    result -= operand
                size = max(result, operand)
                key = (kind, channel.group(1) if channel else name)
                found[key] = max(found.get(key, 0), size)
            pending += [(c, in_reduce_scatter or c.startswith(_REDUCE_SCATTER_COMPUTATION))
                        for c in called]
    counts = {kind: 0 for kind in KINDS}
    sizes = {kind: 0 for kind in KINDS}
    for (kind, _), size in found.items():
        counts[kind] += 1
        sizes[kind] += size
    return counts, sizes
