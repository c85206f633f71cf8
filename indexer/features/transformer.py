"""A small GPT-2-style causal language model in plain torch (the text demo's model, factory ``gpt``).

Every weight matrix is an ``nn.Linear`` or an ``nn.Embedding`` used through its own forward, so the
Kronecker projection (DESIGN.md 1.7) covers all of them with hooks; only the layer norms' scales and
shifts go to the rest block. The output head is not tied to the token embedding (an ``nn.Linear`` head
sharing the embedding's weight would also be one block; a head written ``h @ W.T`` would be dense-projected).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CausalSelfAttention", "GPT", "GPTBlock", "gpt"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on `(batch, T, d_model)` with one ``qkv`` and one ``proj`` Linear.

    Args:
        d_model: width; n_head: heads (``d_model`` divisible by it).

    Raises:
        ValueError: ``d_model`` not divisible by ``n_head``.
    """

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} must be divisible by n_head {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, T, d_model)` -> `(batch, T, d_model)`; position t attends to positions <= t only."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (GELU, width 4d)."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, T, d_model)` -> `(batch, T, d_model)`."""
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token ids `(batch, T)` int64 -> next-token logits `(batch, T, vocab_size)`.

    Right padding needs no attention mask: attention is causal, so a real token never sees the padding
    after it (padded positions are excluded from the targets instead).

    Args:
        vocab_size: tokens; max_len: longest sequence (learned positions); d_model: width;
        n_layer: blocks; n_head: attention heads.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layer: int, n_head: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """`(batch, T)` int64 ids, T <= ``max_len`` -> `(batch, T, vocab_size)` logits.

        Raises:
            ValueError: a sequence longer than ``max_len``.
        """
        b, t = ids.shape
        if t > self.max_len:
            raise ValueError(f"sequences of {t} tokens exceed the model's {self.max_len} positions")
        # positions as a per-example (batch, T) input, so that their embedding's hooks see a batch
        where = torch.arange(t, device=ids.device).expand(b, t)
        x = self.tokens(ids) + self.positions(where)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(
    vocab_size: int, max_len: int = 64, d_model: int = 128, n_layer: int = 2, n_head: int = 4
) -> nn.Module:
    """The ``gpt`` model factory: a :class:`GPT` (random weights).

    Args:
        vocab_size: size of the tokenizer's vocabulary; max_len: positions; d_model, n_layer, n_head:
            width, blocks and attention heads.
    """
    return GPT(vocab_size, max_len, d_model, n_layer, n_head)
