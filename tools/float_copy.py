"""A float Hugging Face copy of a GGUF, as a user of a float-weights tool would make one.

    PYTHON-WITH-TRANSFORMERS tools/float_copy.py MODEL.gguf OUT_DIR

Runs in the environment of the tool being compared (it needs torch, transformers and gguf),
never in ours. transformers dequantizes every tensor to float32 and builds the tokenizer and
chat template from the GGUF's metadata; its model stays marked "quantized with gguf" and
refuses `save_pretrained`, so the weights are moved into a plain model of the same config
first (transformers 5.24; the families it reads from GGUF only: `qwen2`, `llama`, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main()
