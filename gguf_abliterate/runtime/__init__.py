"""Running a model: llama.cpp through llama-cpp-python (library, hooked model), and the torch pass."""
