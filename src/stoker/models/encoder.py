"""A small pre-LayerNorm BERT-style encoder for masked-language modelling.

The usual transformer encoder (Vaswani et al. 2017) with LayerNorm before each sub-layer
(Xiong et al. 2020: trains without warmup tricks), learned position embeddings, GELU MLP and the
output projection tied to the token embedding (Press & Wolf 2017). Attention runs through
``F.scaled_dot_product_attention`` so each backend picks its fastest kernel.

Three attention layouts, chosen by what the batch carries:

- ``document_ids`` [B, T] (packed rows; padding = -1): a token attends only to tokens of its own
  document, i.e. a block-diagonal mask. For ids ``[0, 0, 1, -1]`` token 2 sees only itself and
  the pad sees only the pad.
- ``attention_mask`` [B, T] bool (padded rows; True = real token): padding keys are masked.
- neither: full attention.

With ``predict_positions`` [B, M] the hidden states at those positions are gathered *before*
the vocabulary projection: at 15% masking that skips ~85% of its FLOPs (with ``tiny`` and
vocab 8192 the projection would otherwise be ~half the model's FLOPs).

Nothing in ``forward`` reads a device value on the host (no ``.item()``, no data-dependent
shapes), so it neither syncs nor breaks ``torch.compile``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stoker.errors import StokerError

__all__ = ["PRESETS", "Encoder", "EncoderConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class EncoderConfig:
    """Shape of an :class:`Encoder`. Start from a preset: ``EncoderConfig.preset("tiny", ...)``."""

    vocab_size: int
    """Number of token ids (the tokenizer's vocabulary size, e.g. 8192)."""
    max_len: int = 512
    """Number of learned positions; every position id must be below it."""
    dim: int = 256
    """Width of the residual stream (d_model)."""
    layers: int = 4
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads; must divide ``dim`` unless ``head_dim`` is given."""
    head_dim: int | None = None
    """Width of each head; default ``dim // heads``. Structured pruning removes heads and sets
    it, so that ``heads * head_dim`` (the attention width) can be smaller than ``dim``."""
    ffn_dim: int = 1024
    """Hidden width of the MLP (usually 4 * dim)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for short runs)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (BERT, GPT-2)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "dim", "layers", "heads", "ffn_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise StokerError(f"EncoderConfig.{name}={value!r} must be a positive integer.")
        head_dim = self.head_dim
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
            raise StokerError(f"EncoderConfig.head_dim={head_dim!r} must be a positive integer.")
        if self.head_dim is None and self.dim % self.heads:
            raise StokerError(
                f"EncoderConfig.dim={self.dim} is not divisible by heads={self.heads}; "
                f"choose heads among the divisors of dim (e.g. {self.dim // 64 or 1})."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise StokerError(f"EncoderConfig.dropout={self.dropout} must be in [0, 1).")

    @property
    def attn_dim(self) -> int:
        """Total width of the attention heads, ``heads * head_dim`` (``dim`` unless pruned)."""
        return self.heads * (self.head_dim or self.dim // self.heads)

    @staticmethod
    def preset(name: str, **overrides: Any) -> EncoderConfig:
        """A named configuration (``tiny``, ``small``, ``base``) with fields overridden.

        ``vocab_size`` has no default and must be among the overrides.
        """
        if name not in PRESETS:
            raise StokerError(
                f"Unknown encoder preset {name!r}; valid choices: {', '.join(PRESETS)}."
            )
        known = {f.name for f in fields(EncoderConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise StokerError(
                f"Unknown EncoderConfig field(s) {unknown}; "
                f"valid fields: {', '.join(sorted(known))}."
            )
        if "vocab_size" not in overrides:
            raise StokerError(
                f"EncoderConfig.preset({name!r}) needs vocab_size=..., e.g. "
                "tokenizer.get_vocab_size()."
            )
        return EncoderConfig(**{**PRESETS[name], **overrides})


# Non-embedding parameters (12 * dim^2 per block): tiny 0.8 M, small 4.7 M, base 85 M
# (BERT-base's encoder stack). With vocab 8192: 1.9 M, 7.0 M, 92 M in all. On the 2-core AMX dev
# machine (B=32, T=128, fwd+bwd+AdamW, bf16 autocast) tiny trains at ~2-4 x 10^4 tokens/s and
# small at ~1.2 x 10^4: tiny is the preset for a few minutes of CPU training.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 128, "layers": 4, "heads": 4, "ffn_dim": 512},
    "small": {"dim": 256, "layers": 6, "heads": 4, "ffn_dim": 1024},
    "base": {"dim": 768, "layers": 12, "heads": 12, "ffn_dim": 3072, "dropout": 0.1},
}


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """SDPA over [B, H, T, D/H]; in fp32 on CPU even under bf16 autocast.

    On the AMX development CPU (torch 2.13, one thread, B32 H4 T128 D32) the bf16 SDPA backward
    took ~41 ms against ~11 ms in fp32, ~half of a bf16 training step of the tiny encoder;
    attention is a small share of the FLOPs, so it runs in fp32 (autocast off, or it would cast
    the inputs back to bf16) and the projections around it keep bf16.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class _Block(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.attn_dim)
        self.attn_out = nn.Linear(cfg.attn_dim, cfg.dim)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.mlp_in = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.mlp_out = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        # [B, T, 3A] -> 3 x [B, H, T, A/H], A = heads * head_dim (= D unless heads were pruned)
        qkv = self.qkv(self.attn_norm(x))
        q, k, v = qkv.view(b, t, 3, self.heads, qkv.size(-1) // (3 * self.heads)).unbind(2)
        y = _attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            mask,
            self.dropout if self.training else 0.0,
        )
        x = x + self.resid_drop(self.attn_out(y.transpose(1, 2).reshape(b, t, -1)))
        h = F.gelu(self.mlp_in(self.mlp_norm(x)))
        return x + self.resid_drop(self.mlp_out(h))


class Encoder(nn.Module):
    """Pre-LN transformer encoder with a tied MLM head; see the module docstring."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.dim)
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))  # head weight = tok_emb
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases; residual outputs scaled by 1/sqrt(2*layers).

        The scaling keeps the residual stream's variance from growing with depth (GPT-2,
        Radford et al. 2019, section 2.3).
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, _Block)
            for proj in (block.attn_out, block.mlp_out):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.layers))
        nn.init.zeros_(self.out_bias)

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Number of parameters (tied weights counted once); optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        predict_positions: Tensor | None = None,
    ) -> Tensor:
        """Logits over the vocabulary.

        Args:
            input_ids: [B, T] long.
            attention_mask: [B, T] bool, True for real tokens (padding keys are ignored).
            document_ids: [B, T] long, attention stays within equal ids (padding = -1).
            position_ids: [B, T] long, each < ``max_len``; default ``arange(T)`` per row
                (packed rows pass positions restarting at 0 for each document).
            predict_positions: [B, M] long; if given, only those positions are projected.

        Returns:
            [B, M, V] if ``predict_positions`` is given, else [B, T, V].
        """
        t = input_ids.size(1)
        if position_ids is None:
            if t > self.config.max_len:
                raise StokerError(
                    f"Sequence length {t} exceeds EncoderConfig.max_len={self.config.max_len}; "
                    "truncate the batch (pad_batch/chunk_documents max_len) or raise max_len."
                )
            pos = self.pos_emb.weight[:t]  # [T, D], broadcast over the batch
        else:
            pos = self.pos_emb(position_ids)  # [B, T, D]
        x = self.emb_drop(self.tok_emb(input_ids) + pos)
        mask = self._attention_mask(attention_mask, document_ids)
        for block in self.blocks:
            x = block(x, mask)
        if predict_positions is not None:
            # [B, T, D] -> [B, M, D]: only these rows go through the head.
            x = x.gather(1, predict_positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        return F.linear(self.final_norm(x), self.tok_emb.weight, self.out_bias)

    @staticmethod
    def _attention_mask(
        attention_mask: Tensor | None, document_ids: Tensor | None
    ) -> Tensor | None:
        """Boolean SDPA mask (True = may attend), broadcastable to [B, H, T, T], or None.

        Every query keeps at least one key (no all-False row, which would give NaN): with
        document ids a token always sees itself; a query that is padding sees every key.
        """
        if document_ids is None and attention_mask is None:
            return None
        if document_ids is None:
            assert attention_mask is not None
            # [B, 1, 1, T]; a row that is all padding (no real key) attends everywhere.
            keys = attention_mask | ~attention_mask.any(dim=1, keepdim=True)
            return keys[:, None, None, :]
        mask = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, :] | ~attention_mask[:, :, None])
        return mask[:, None]
