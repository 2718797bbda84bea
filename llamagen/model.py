"""LlamaGen's class-conditional GPT (FoundationVision/LlamaGen, autoregressive/models/gpt.py).

A Llama-style decoder over [class embedding, block_size image tokens]: pre-norm RMSNorm
blocks, attention without biases and with 2-D rotary embeddings over the image grid,
optional grouped-query attention (n_kv_head < n_head), SwiGLU MLP, untied output head.
State-dict keys equal the published `c2i_*.pt` checkpoints (GPT-B/L/XL/XXL/3B).

Sampling (CFG, SoftCFG, top-k/top-p) lives in `softcfg_patch`; this file implements the
`softcfg_patch.GuidedModel` protocol: `prefill` and `decode` write into a
`StaticKVCache` through `causal_attention`. Training-only parts (dropouts, label
dropout, the loss) are left out.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from softcfg_patch.cache import StaticKVCache, causal_attention
# The same arithmetic as AliTok's (a grid with no 1-D prefix and one all-zero condition row).
from softcfg_patch.layers import RMSNorm, SwiGLU, apply_rotary, at_step, rotary_table
from softcfg_patch.checkpoint import UNKNOWN_SOURCE, CheckpointError, load_model, read_state_dict

# Upstream loads with strict=False. These upstream buffers can sit in a saved state dict
# (an older rotary buffer; the KV cache and mask if setup_caches() ran before saving);
# they hold no learned weights, so they are dropped and named.
HARMLESS_EXTRAS = ("freqs_cis", "causal_mask", ".attention.kv_cache.k_cache", ".attention.kv_cache.v_cache")


def ffn_hidden_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """int(2/3 * 4 * dim), times the optional multiplier, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int) -> None:
        super().__init__()
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: StaticKVCache | None,
                layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = apply_rotary(q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), rope)
        k = apply_rotary(k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2), rope)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.n_kv_head != self.n_head:
            # The cache keeps one K/V per query head (its layout is [rows, n_head, ...]), so
            # grouped heads are expanded before caching; query head h reads kv head h // group.
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = causal_attention(q, k, v, cache, layer)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, ffn_hidden: int, norm_eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head)
        self.feed_forward = SwiGLU(dim, ffn_hidden)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: StaticKVCache | None, layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embeddings; with class_dropout_prob > 0 one extra row, id num_classes, is "no class"."""

    def __init__(self, num_classes: int, dim: int, has_null_class: bool) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(ids)


class GPT(nn.Module):
    """LlamaGen c2i GPT. `config` is the OmegaConf config of configs/llamagen_*.yaml; the keys
    of `config.model.generator` are named as upstream's ModelArgs."""

    num_prefix_positions = 1  # the class embedding

    def __init__(self, config) -> None:
        super().__init__()
        gen = config.model.generator
        dim, n_layer, n_head = int(gen.dim), int(gen.n_layer), int(gen.n_head)
        n_kv_head = int(gen.get("n_kv_head") or n_head)
        _check_sizes(dim, n_head, n_kv_head, int(gen.block_size), int(gen.get("cls_token_num", 1)))
        self.vocab_size, self.num_classes = int(gen.vocab_size), int(gen.num_classes)
        self.num_image_tokens = int(gen.block_size)
        self.num_layers, self.num_heads, self.head_dim = n_layer, n_head, dim // n_head
        self.grid_size = round(self.num_image_tokens ** 0.5)
        self.rope_base = float(gen.get("rope_base", 10000))
        self.has_null_class = float(gen.get("class_dropout_prob", 0.1)) > 0
        hidden = ffn_hidden_size(dim, int(gen.get("multiple_of", 256)), gen.get("ffn_dim_multiplier"))
        norm_eps = float(gen.get("norm_eps", 1e-5))
        self.architecture = (f"LlamaGen GPT: dim {dim}, n_layer {n_layer}, n_head {n_head}, n_kv_head "
                             f"{n_kv_head}, block_size {self.num_image_tokens}, vocab {self.vocab_size}, "
                             f"{self.num_classes} classes")

        self.cls_embedding = LabelEmbedder(self.num_classes, dim, self.has_null_class)
        self.tok_embeddings = nn.Embedding(self.vocab_size, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, n_head, n_kv_head, hidden, norm_eps)
                                    for _ in range(n_layer))
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, self.vocab_size, bias=False)
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the rotary table: row 0 (the class position) all zeros, then the grid in
        raster order, first half of the pairs rotating with the row, second with the column.
        Call after `to_empty()`, which leaves this non-persistent buffer uninitialised."""
        table = rotary_table(self.head_dim, prefix_len=0, grid_size=self.grid_size, base=self.rope_base)
        self.register_buffer("rope", table.to(device) if device is not None else table, persistent=False)

    init_buffers = reset_rope  # what the shared loader calls after a meta-device build

    # -- the GuidedModel protocol ------------------------------------------------------
    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def none_condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.has_null_class:
            raise ValueError("this GPT has no 'no class' embedding (class_dropout_prob 0), so it cannot "
                             "run CFG; use guidance_scale <= 1 or a config with class_dropout_prob > 0")
        return torch.full_like(labels, self.num_classes)

    unguided_at = "<=1"  # upstream runs the unconditional rows only when cfg_scale > 1
    # (and, unlike AliTok and RAR, draws no random numbers before its loop: no rng_preamble)

    def prefill(self, condition_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        x = self.cls_embedding(condition_ids)[:, None]
        return self._run(x, self.rope[:1], cache)[:, -1]

    def decode(self, tokens: torch.Tensor, step: int | torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        # x_{step-1} sits at sequence position `step` (position 0 is the class); `step` is an
        # int or a 0-d LongTensor, read with at_step (a gather for a tensor: no recompiles).
        x = self.tok_embeddings(tokens)[:, None]
        return self._run(x, at_step(self.rope, step), cache)[:, -1]

    # -- full pass -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, condition_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced causal pass over [class, tokens]: logits [B, L + 1, V] (float32).

        Row r predicts token r; the last row predicts past the end.
        """
        x = torch.cat([self.cls_embedding(condition_ids)[:, None], self.tok_embeddings(tokens)], dim=1)
        return self._run(x, self.rope[:x.shape[1]], None)

    def _run(self, x: torch.Tensor, rope: torch.Tensor, cache: StaticKVCache | None) -> torch.Tensor:
        for layer, block in enumerate(self.layers):
            x = block(x, rope, cache, layer)
        return self.output(self.norm(x)).float()


def _check_sizes(dim: int, n_head: int, n_kv_head: int, block_size: int, cls_token_num: int) -> None:
    if dim % n_head or (dim // n_head) % 4:
        raise ValueError(f"dim {dim} / n_head {n_head} must give a head_dim divisible by 4 (2-D rotary pairs)")
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_head {n_head} must be a multiple of n_kv_head {n_kv_head}")
    if round(block_size ** 0.5) ** 2 != block_size:
        raise ValueError(f"block_size {block_size} must be a square number of image tokens "
                         f"(256 for 256px, 576 for 384px with VQ-16)")
    if cls_token_num != 1:
        raise ValueError(f"cls_token_num must be 1 for class-conditional LlamaGen, got {cls_token_num}")


# -- checkpoints ---------------------------------------------------------------------------
def load_gpt(config, path: str | Path, source: str = UNKNOWN_SOURCE) -> GPT:
    """Build the GPT of `config` and strictly load `path` into it (float32, eval mode, no grads).

    Upstream's harmless extras (HARMLESS_EXTRAS) are dropped with a warning that names them;
    anything else that does not match is an error that says which config fits the file.
    """
    what = "LlamaGen GPT"
    state = read_state_dict(path, what=what, source=source)
    extras = sorted(k for k in state if k.endswith(HARMLESS_EXTRAS))
    if extras:
        warnings.warn(f"'{path}': ignoring {len(extras)} upstream buffer(s) that hold no weights: "
                      f"{', '.join(extras[:4])}{', ...' if len(extras) > 4 else ''}", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in extras}
    _check_is_llamagen(state, config.model.generator, path, source)
    return load_model(lambda: GPT(config), path, what=what, source=source, state=state)


def _check_is_llamagen(state: dict, gen, path, source: str) -> None:
    """One-line errors for the two common mistakes: not a LlamaGen file, or another size."""
    embed = state.get("tok_embeddings.weight")
    if embed is None or "cls_embedding.embedding_table.weight" not in state:
        sample = ", ".join(sorted(state)[:3])
        raise CheckpointError(f"'{path}' is not a LlamaGen class-conditional GPT checkpoint (no tok_embeddings/"
                              f"cls_embedding keys; it starts with {sample}); pass a c2i_*.pt file from {source}")
    n_layer = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    if embed.shape[1] != gen.dim or n_layer != gen.n_layer:
        sizes = {768: "b", 1024: "l", 1280: "xl", 1536: "xxl", 3200: "3b"}
        hint = f"configs/llamagen_{sizes[embed.shape[1]]}*.yaml" if embed.shape[1] in sizes else "a matching config"
        raise CheckpointError(f"'{path}' holds a LlamaGen GPT with dim {embed.shape[1]} and {n_layer} layers, "
                              f"but the config builds dim {gen.dim} and {gen.n_layer} layers; use {hint}")
