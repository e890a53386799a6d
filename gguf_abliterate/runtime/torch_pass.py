"""A CPU torch forward pass over a GGUF's dequantized weights: llama, qwen2 and gemma3.

The second engine for `direction` (`--engine torch`): it gives the same per-block residual
stream as llama.cpp's `l_out-L`, in a form users can put hooks in or take gradients through.
It follows llama.cpp's graphs, not Hugging Face's: GGUF stores llama's Q/K weights permuted
for llama.cpp's adjacent-pair RoPE (qwen2 and gemma3 use the NEOX half-split form), and
Gemma's norm weights already include the +1. Weights are dequantized once, to float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR

from gguf_abliterate import names
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model

SUPPORTED = ("llama", "qwen2", "gemma3")
T = MODEL_TENSOR


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError("the torch engine needs PyTorch: pip install 'gguf-abliterate[torch]'") from None
    return torch


@dataclass
class _Hparams:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_base: float
    rope_base_swa: float
    swa: int  # sliding window, 0 for none
    swa_pattern: int  # every swa_pattern-th layer is global (gemma3: 6)


class TorchModel:
    """Dequantized weights and a forward pass that returns the residual stream after each block."""

    def __init__(self, model: Model):
        self.torch = torch = _torch()
        if model.arch not in SUPPORTED:
            raise UserError(f"the torch engine supports {', '.join(SUPPORTED)}, not {model.arch}")
        self.arch = a = model.arch
        n_head = model.arch_int(names.HEAD_COUNT)
        head_dim = model.arch_get(names.KEY_LENGTH) or model.n_embd // n_head
        swa = model.arch_get(names.SLIDING_WINDOW) or 0
        self.hp = _Hparams(
            model.n_layer, model.n_embd, n_head, model.arch_get(names.HEAD_COUNT_KV) or n_head,
            int(head_dim), float(model.arch_get(names.RMS_EPS) or 1e-6),
            float(model.arch_get(names.ROPE_FREQ_BASE) or 10000.0),
            float(model.arch_get(names.ROPE_FREQ_BASE_SWA) or 10000.0), int(swa), 6 if a == "gemma3" else 0)
        self.w = {name: torch.from_numpy(np.array(model.values(name), dtype=np.float32))
                  for name in model.tensors}

    def _get(self, name: str) -> Any:
        return self.w.get(name)

    def _rms(self, x: Any, weight: Any) -> Any:
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.hp.eps) * weight

    def _rope(self, x: Any, pos: Any, base: float) -> Any:
        """x: (heads, tokens, head_dim). llama: adjacent pairs; qwen2/gemma3: NEOX halves."""
        torch, d = self.torch, x.shape[-1]
        inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = (pos[:, None].double() * inv[None, :]).float()
        cos, sin = torch.cos(ang), torch.sin(ang)
        if self.arch == "llama":
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def _linear(self, x: Any, kind: MODEL_TENSOR, block: int) -> Any:
        y = x @ self.w[names.block_tensor(kind, block)].T
        bias = self._get(names.block_tensor(kind, block, "bias"))
        return y if bias is None else y + bias

    def _norm(self, x: Any, kind: MODEL_TENSOR, block: int) -> Any:
        return self._rms(x, self.w[names.block_tensor(kind, block)])

    def residuals(self, tokens: list[int]) -> np.ndarray:
        """(n_layer, n_tokens, n_embd): the residual stream after each block, for one sequence."""
        torch, hp = self.torch, self.hp
        n = len(tokens)
        pos = torch.arange(n)
        x = self.w[names.TOKEN_EMBD][torch.tensor(tokens)]
        if self.arch == "gemma3":
            x = x * math.sqrt(hp.n_embd)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        out = []
        with torch.no_grad():
            for i in range(hp.n_layer):
                h = self._norm(x, T.ATTN_NORM, i)
                q = self._linear(h, T.ATTN_Q, i).view(n, hp.n_head, hp.head_dim).transpose(0, 1)
                k = self._linear(h, T.ATTN_K, i).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)
                v = self._linear(h, T.ATTN_V, i).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)
                local = hp.swa > 0 and hp.swa_pattern and (i + 1) % hp.swa_pattern != 0
                if self.arch == "gemma3":
                    q = self._norm(q, T.ATTN_Q_NORM, i)
                    k = self._norm(k, T.ATTN_K_NORM, i)
                base = hp.rope_base_swa if local else hp.rope_base
                q, k = self._rope(q, pos, base), self._rope(k, pos, base)
                rep = hp.n_head // hp.n_head_kv
                k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
                mask = causal & (pos[:, None] - pos[None, :] < hp.swa) if local else causal
                scores = (q @ k.transpose(1, 2)) / math.sqrt(hp.head_dim)
                att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
                o = self._linear(att.transpose(0, 1).reshape(n, -1), T.ATTN_OUT, i)
                if self.arch == "gemma3":
                    o = self._norm(o, T.ATTN_POST_NORM, i)
                x = x + o
                f = self._norm(x, T.FFN_NORM, i)
                gate = self._linear(f, T.FFN_GATE, i)
                act = torch.nn.functional.gelu(gate, approximate="tanh") if self.arch == "gemma3" else \
                    torch.nn.functional.silu(gate)
                y = self._linear(act * self._linear(f, T.FFN_UP, i), T.FFN_DOWN, i)
                if self.arch == "gemma3":
                    y = self._norm(y, T.FFN_POST_NORM, i)
                x = x + y
                out.append(x)
        return torch.stack(out).numpy()

    def last_token_residuals(self, encoded: list[list[int]]) -> np.ndarray:
        """(n_prompts, n_layer, n_embd): like LlamaModel.residuals, from token ids."""
        return np.stack([self.residuals(toks)[:, -1] for toks in encoded])
