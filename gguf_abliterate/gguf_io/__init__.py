"""GGUF input and output: parse one file (reader), see a model over its split parts (model),
write a model's files (writer), and write any file atomically (atomic)."""

from gguf_abliterate.gguf_io.model import Model
from gguf_abliterate.gguf_io.reader import GGUFFile, TensorInfo
from gguf_abliterate.gguf_io.writer import OutFile, OutTensor, Reserved, output_paths, plan_files, write_files

__all__ = ["GGUFFile", "Model", "OutFile", "OutTensor", "Reserved", "TensorInfo", "output_paths", "plan_files",
           "write_files"]
