"""Test support: the tiny models the tests build (tiny_models.py) and ggml's C code as the
quantizers' oracle (ggml_ref.py)."""
