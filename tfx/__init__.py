"""tfx: encoder-decoder Transformers for machine translation in JAX/Flax NNX."""
