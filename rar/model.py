"""RAR's autoregressive generator (bytedance/1d-tokenizer, class RAR), architecture only.

A DiT-style decoder-only transformer over [cls, class condition, N image tokens]:
learned absolute positions plus a target-aware position table (the position of the
token being *predicted*), per-position adaLN conditioning c_j = E[condition] + t_j,
pre-LayerNorm blocks with q/k LayerNorm and an exact-GELU MLP. State-dict keys equal
the official `rar_{b,l,xl,xxl}.bin`, so they load strictly.

Sampling (CFG, SoftCFG) lives in `softcfg_patch`; this file only implements the
`softcfg_patch.GuidedModel` protocol: `prefill` and `decode` write into a
`StaticKVCache` through `causal_attention`. Only raster order is implemented (sampling
and the annealed-out end of training); RAR's random-permutation training is not.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcfg_patch.cache import StaticKVCache, causal_attention
from softcfg_patch.checkpoint import UNKNOWN_SOURCE, load_model

LN_EPS = 1e-6
PREFIX = 2  # cls + class condition, the positions before x_0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, cache: StaticKVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = causal_attention(q, k, v, cache, layer, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's Mlp, whose key names the checkpoints use)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """adaLN block; the modulation is per position because c carries a timestep term."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, attn_drop: float = 0.0,
                 drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden, drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cache: StaticKVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cache, layer)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm without affine, modulated; note the chunk order (scale, shift)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class RAR(nn.Module):
    """RAR generator. `config` is the OmegaConf config of configs/rar_*.yaml."""

    num_prefix_positions = PREFIX

    def __init__(self, config) -> None:
        super().__init__()
        gen, vq = config.model.generator, config.model.vq_model
        dim, depth, heads = gen.hidden_size, gen.num_hidden_layers, gen.num_attention_heads
        if dim % heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_attention_heads {heads}")
        self.vocab_size = vq.codebook_size
        self.num_classes = gen.condition_num_classes
        self.num_image_tokens = N = gen.image_seq_len
        self.num_layers, self.num_heads, self.head_dim = depth, heads, dim // heads
        # Embedding ids: [0, V) image tokens, V the (unused) mask token, V+1+label, then "none".
        self.none_condition_id = self.vocab_size + 1 + self.num_classes

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.embeddings = nn.Embedding(self.vocab_size + 1 + self.num_classes + 1, dim)
        # Table lengths are fixed by the checkpoints (N + 1024, N + 100), longer than used.
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1024, dim))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, N + 1024, dim))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, N + 100, dim))
        self.blocks = nn.ModuleList(
            Block(dim, heads, gen.intermediate_size, gen.get("attn_drop", 0.0), gen.get("dropout", 0.0))
            for _ in range(depth))
        self.adaln_before_head = FinalLayer(dim)
        self.lm_head = nn.Linear(dim, self.vocab_size, bias=True)

    # -- the GuidedModel protocol ------------------------------------------------------
    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return labels + self.vocab_size + 1

    def none_condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.none_condition_id)

    def prefill(self, condition_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Positions 0, 1 (cls, condition) together, causally; logits predicting x_0."""
        cond = self.embeddings(condition_ids)[:, None]
        cache.state["condition"] = cond  # adaLN needs it at every later step
        x = torch.cat([self.cls_token.expand(cond.shape[0], -1, -1), cond], dim=1)
        return self._run(x, cond, torch.arange(2, device=x.device), cache)[:, -1]

    def decode(self, tokens: torch.Tensor, step, cache: StaticKVCache) -> torch.Tensor:
        # x_{step-1} sits at position step + 1 (after cls and condition); `step` is an int
        # or a 0-d tensor (fixed-shape decoding).
        cond = cache.state.get("condition")
        if cond is None:
            raise RuntimeError("RAR.decode() needs a cache that went through RAR.prefill() first")
        position = ((step + 1).view(1) if torch.is_tensor(step)
                    else torch.arange(step + 1, step + 2, device=tokens.device))
        return self._run(self.embeddings(tokens)[:, None], cond, position, cache)[:, -1]

    def rng_preamble(self, num_rows: int, generator: torch.Generator | None,
                     device: torch.device) -> None:
        """Upstream draws B uniforms for its (probability 0) label dropout before the loop;
        drawing them too keeps the token stream identical to upstream for a seed."""
        torch.rand(num_rows, generator=generator, device=device)

    # -- full pass -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced raster-order causal pass: logits [B, L + 1, V] for tokens [B, L].

        Row r predicts token r (row 0 is the condition position; cls is dropped);
        the last row predicts past the end.
        """
        emb = self.embeddings(torch.cat([condition_ids[:, None], tokens], dim=1))
        x = torch.cat([self.cls_token.expand(emb.shape[0], -1, -1), emb], dim=1)
        return self._run(x, emb[:, :1], torch.arange(x.shape[1], device=x.device), None, drop_cls=True)

    def _run(self, x: torch.Tensor, cond: torch.Tensor, positions: torch.Tensor,
             cache: StaticKVCache | None, drop_cls: bool = False) -> torch.Tensor:
        """Blocks and head over x [B, T, D] holding the sequence positions `positions` [T]."""
        x = x + self.pos_embed[:, positions]
        x = x + self._target_aware(positions)
        c = cond + self.timesteps_embeddings[:, positions]
        for layer, block in enumerate(self.blocks):
            x = block(x, c, cache, layer)
        if drop_cls:
            x, c = x[:, 1:], c[:, 1:]
        return self.lm_head(self.adaln_before_head(x, c))

    def _target_aware(self, j: torch.Tensor) -> torch.Tensor:
        """Position j carries the embedding of the position it predicts, table row j + 1.

        Only the condition and token positions predict something in the image
        (1 <= j <= N); cls and the position past the last token get zero.
        """
        predicts = (j >= 1) & (j <= self.num_image_tokens)
        rows = self.target_aware_pos_embed[0, j + 1]  # j + 1 <= N + 2, inside the N + 1024 table
        return torch.where(predicts[:, None], rows, torch.zeros_like(rows))[None]


def load_generator(config, path, source: str = UNKNOWN_SOURCE) -> RAR:
    """The RAR of `config` with the weights of `path` (meta-device build, strict keys);
    `source` (where the file is published) is quoted in every error."""
    gen = config.model.generator
    return load_model(lambda: RAR(config), path, what=f"RAR generator ({config.experiment.name})",
                      source=source, architecture=f"hidden {gen.hidden_size}, {gen.num_hidden_layers} layers")
