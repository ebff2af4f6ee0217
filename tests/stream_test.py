import threading
import time

import pytest

from tfx.infer.stream import waiting_batches


def test_a_batch_is_the_next_line_and_those_already_waiting_up_to_most():
    more = threading.Event()

    def lines():
        yield from ("a", "b", "c")
        more.wait()  # the reader blocks here, as on a pipe with nothing to read.
        yield "d"
        raise ValueError("<stdin>:5: invalid UTF-8")

    batches = waiting_batches(lines(), most=2)
    time.sleep(0.5)  # the reader thread has queued a, b and c.
    assert next(batches) == ["a", "b"]
    assert next(batches) == ["c"]  # not waiting for d.
    more.set()
    assert next(batches) == ["d"]
    with pytest.raises(ValueError, match="<stdin>:5"):
        next(batches)


def test_the_end_of_the_input_ends_the_batches():
    batches = list(waiting_batches(iter(["x", "y", "z"]), most=8))
    assert sum(batches, []) == ["x", "y", "z"] and all(batches)
    assert list(waiting_batches(iter([]), most=8)) == []
