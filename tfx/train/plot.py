"""Loss and BLEU curves of a run: `python -m tfx.train.plot --workdir W` (or `... plot W`) writes
W/curves.png.

Left: train and eval loss against steps. Right: eval BLEU against wall-clock minutes.
"""
from __future__ import annotations

import os

from matplotlib.figure import Figure  # without pyplot: no backend chosen, no global state.

from tfx.core import files
from tfx.train.metrics import read_metrics


def plot(workdir: str) -> str:
    """Writes and returns the path of `<workdir>/curves.png`."""
    records = read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    figure = Figure(figsize=(11, 4))
    loss_axes, bleu_axes = figure.subplots(1, 2)
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    loss_axes.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    loss_axes.set(xlabel="step", ylabel="loss (label-smoothed)", title="loss")
    loss_axes.legend()
    with_bleu = [r for r in evals if "bleu" in r]
    bleu_axes.plot([r.get("wall_time_s", 0) / 60 for r in with_bleu], [r["bleu"] for r in with_bleu], "o-")
    for r in with_bleu[-1:]:
        bleu_axes.annotate(f"{r['bleu']:.1f} (step {r['step']})", (r.get("wall_time_s", 0) / 60, r["bleu"]),
                           ha="right", va="bottom")
    bleu_axes.set(xlabel="wall-clock minutes", ylabel="sacreBLEU", title="eval BLEU")
    figure.suptitle(os.fspath(files.path(workdir)))
    figure.tight_layout()
    path = files.join(workdir, "curves.png")
    with files.replacing(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    return path


def main():
    """The command line (absl flags, defined here so that importing tfx.train.plot defines none)."""
    from absl import app

    from tfx.core import cli

    shared = cli.define_flags(workdir="The run whose curves are drawn.", config=None,
                              workdir_required=False)

    def draw(arguments):
        if len(arguments) > 1 or bool(arguments) == bool(shared.workdir.value):
            raise app.UsageError("give the run's workdir: --workdir W (or W alone).")
        print(plot(shared.workdir.value or arguments[0]))

    cli.run("tfx.train.plot", draw, arguments=True)


if __name__ == "__main__":
    main()
