"""tfx: encoder-decoder Transformers for machine translation in JAX/Flax NNX."""
from tfx import host_memory

host_memory.keep_freed_memory()
