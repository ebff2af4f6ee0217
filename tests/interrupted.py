"""A Translator whose calls are counted and one of them killed: the tests of resumable corpora
(distillation, back-translation) interrupt a run with it."""
from tfx.infer.translate import Translator


class Killed(Exception):
    pass


def count_calls(monkeypatch, translator: Translator, crash_at: int = 0) -> list:
    """Records the calls of `translator.translate`; the `crash_at`-th raises Killed instead."""
    calls = []

    def translate(*args, **kwargs):
        calls.append(args)
        if len(calls) == crash_at:
            raise Killed
        return Translator.translate(translator, *args, **kwargs)

    monkeypatch.setattr(translator, "translate", translate)
    return calls
