"""gguf-abliterate: remove or amplify a behaviour direction in a quantized GGUF model, on CPU."""

__version__ = "0.1.0"
