"""File formats of our own, as GGUF is llama.cpp's: direction files and input-statistics files.

They need nothing of a running model, so the edit (which reads both) never imports llama.cpp.
"""
