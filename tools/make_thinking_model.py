"""A copy of a GGUF whose chat template makes the model think before it answers.

    python tools/make_thinking_model.py IN.gguf OUT.gguf

No real thinking model these machines can run comes through pip, so the behaviour of the
thinking pipeline is shown on an instruct model made to think: the generation prompt opens
<think> itself (as DeepSeek-R1's template does), after Qwen2.5's own system turn. The template
speaks Qwen3's switch (`enable_thinking`: off, it writes a closed empty thought), so
`--thinking on|off` work as on Qwen3. Every tensor and every other key is copied byte for
byte (the project's own writer).

A system turn that asked for the reasoning inside <think> tags (the first design) made
Qwen2.5-Coder-0.5B and 1.5B comply with every harmful request tried, inside the thought: the
template keeps Qwen's own system turn, and with only the opened thought the 1.5B reasons
about a harmful request, refuses inside the thought and closes it, as thinking models do.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_abliterate import names  # noqa: E402
from gguf_abliterate.gguf_io import Model  # noqa: E402
from gguf_abliterate.gguf_io.writer import OutTensor, plan_files, write_files  # noqa: E402

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's own default
TEMPLATE = (
    "{%- set thinking = not (enable_thinking is defined and enable_thinking is false) -%}"
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if thinking %}{{ '<think>\\n' }}{%- else %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = Model(src)
    try:
        tensors = [OutTensor(n, tuple(int(d) for d in t.shape), t.tensor_type, copy_of=n)
                   for n, t in model.tensors.items()]
        files = plan_files(model, out, tensors, {names.CHAT_TEMPLATE: TEMPLATE}, names.CHAT_TEMPLATE, merge=True)
        write_files(model, files)
    finally:
        model.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
