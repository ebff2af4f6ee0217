"""The Transformer model: layers, encoder-decoder, decoding."""
