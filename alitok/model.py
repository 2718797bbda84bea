"""AliTok's autoregressive generator (ali-vilab/alitok, class ARModel), architecture only.

A pre-norm decoder-only transformer over [class condition, 273 image tokens]:
RMSNorm, attention with per-head q/k RMSNorm and rotary embeddings, SwiGLU MLP.
State-dict keys equal the official `alitok_{b,l,xl}.bin`, so they load strictly.

Sampling (CFG, SoftCFG) lives in `softcfg_patch`; this file only implements the
`softcfg_patch.GuidedModel` protocol: `prefill` and `decode` write into a
`StaticKVCache` through `causal_attention`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from softcfg_patch.cache import StaticKVCache, causal_attention
from softcfg_patch.checkpoint import UNKNOWN_SOURCE, load_model
from softcfg_patch.layers import RMSNorm, SwiGLU, apply_rotary, at_step, rotary_table


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: StaticKVCache | None,
                layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rotary(self.q_norm(q), rope)
        k = apply_rotary(self.k_norm(k), rope)
        out = causal_attention(q, k, v, cache, layer, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


def mlp_hidden_size(dim: int) -> int:
    return -(-int(8 * dim / 3) // 256) * 256  # int(8D/3) rounded up to a multiple of 256


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden_size(dim), drop)

    def forward(self, x, rope, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


class ARModel(nn.Module):
    """AliTok generator. `config` is the OmegaConf config of configs/alitok_*.yaml."""

    num_prefix_positions = 1  # the class condition

    def __init__(self, config) -> None:
        super().__init__()
        gen, vq = config.model.generator, config.model.vq_model
        dim, depth, heads = gen.hidden_size, gen.num_hidden_layers, gen.num_attention_heads
        prefix_len, grid = gen.get("rope_prefix_len", 17), gen.get("rope_grid_size", 16)
        if gen.image_seq_len != prefix_len + grid * grid:
            raise ValueError(f"image_seq_len ({gen.image_seq_len}) must equal rope_prefix_len + "
                             f"rope_grid_size**2 = {prefix_len} + {grid}**2 = {prefix_len + grid * grid}")
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"hidden_size {dim} / num_attention_heads {heads} must give a head_dim "
                             f"divisible by 4 (2-D rotary pairs)")
        self.vocab_size = vq.codebook_size
        self.num_classes = gen.condition_num_classes
        self.num_image_tokens = gen.image_seq_len
        self.num_layers, self.num_heads, self.head_dim = depth, heads, dim // heads
        # Embedding ids: [0, V) image tokens, V the (unused) mask token, V+1+label, then "none".
        self.none_condition_id = self.vocab_size + 1 + self.num_classes

        self.embeddings = nn.Embedding(self.vocab_size + 1 + self.num_classes + 1, dim)
        self.tok_dropout = nn.Dropout(gen.get("tok_dropout", 0.0))
        self.blocks = nn.ModuleList(Block(dim, heads, gen.get("attn_drop", 0.0), gen.get("dropout", 0.0))
                                    for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, self.vocab_size, bias=True)
        self.rope_sizes = (prefix_len, grid)
        self.architecture = f"hidden {dim}, {depth} layers"
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build the rotary table, a computed buffer that meta-device loading leaves empty."""
        self.register_buffer("rope", rotary_table(self.head_dim, *self.rope_sizes).to(device), persistent=False)

    # -- the GuidedModel protocol ------------------------------------------------------
    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return labels + self.vocab_size + 1

    def none_condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.none_condition_id)

    def prefill(self, condition_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        return self._run(self.embeddings(condition_ids)[:, None], self.rope[:1], cache)[:, -1]

    def decode(self, tokens: torch.Tensor, step, cache: StaticKVCache) -> torch.Tensor:
        # x_{step-1} sits at position `step` (position 0 is the condition); `step` is an
        # int or a 0-d tensor (fixed-shape decoding), the row is the same either way.
        return self._run(self.embeddings(tokens)[:, None], at_step(self.rope, step), cache)[:, -1]

    def rng_preamble(self, num_rows: int, generator: torch.Generator | None,
                     device: torch.device) -> None:
        """Upstream draws B uniforms for its (probability 0) label dropout before the loop;
        drawing them too keeps the token stream identical to upstream for a seed."""
        torch.rand(num_rows, generator=generator, device=device)

    # -- full pass -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced causal pass over [condition, tokens]: logits [B, L + 1, V].

        Row r predicts token r; the last row predicts past the end.
        """
        ids = torch.cat([condition_ids[:, None], tokens], dim=1)
        x = self.tok_dropout(self.embeddings(ids))
        return self._run(x, self.rope[:ids.shape[1]], None)

    def _run(self, x: torch.Tensor, rope: torch.Tensor, cache: StaticKVCache | None) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        return self.output(self.norm(x))


def load_generator(config, path, source: str = UNKNOWN_SOURCE) -> ARModel:
    """The ARModel of `config` with the weights of `path` (meta-device build, strict keys);
    `source` (where the file is published) is quoted in every error."""
    return load_model(lambda: ARModel(config), path, what=f"AliTok generator ({config.experiment.name})",
                      source=source)
