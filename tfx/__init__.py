"""tfx: encoder-decoder Transformers for machine translation in JAX/Flax NNX.

Importing tfx changes nothing process-wide; the launchers (train.py, eval.py, translate.py,
bench/*) opt in to the host memory settings of `tfx.core.host_memory`.
"""
