"""AliTok's image tokenizer (ali-vilab/alitok, `AliTok()` / `VAutoencoder`), architecture only.

A ViT encoder turns a 256x256 image into 273 latent tokens (17 prefix tokens + a 16x16
grid), each snapped to the nearest entry of a 4096 x 32 codebook. A ViT decoder maps the
273 codebook vectors (behind 32 learned class tokens) back to pixels: only the last 256
positions are kept, each unpacked into a 16x16x3 patch, and a sigmoid gives [0, 1].

State-dict keys and shapes equal the official `AliTok.pth`, so it loads with strict=True.
Images are float RGB in [0, 1] on both sides (upstream feeds `ToTensor()` output as is).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcfg_patch.checkpoint import UNKNOWN_SOURCE, load_model
from softcfg_patch.layers import unit_to_uint8_hwc



class Attention(nn.Module):
    """Non-causal multi-head attention with a fused q|k|v projection (heads contiguous)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # The reference computes attention in float32 whatever the activation dtype.
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float()
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C).to(x.dtype))


class Block(nn.Module):
    """Pre-LN transformer block; the MLP uses exact (erf) GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()  # named children give the checkpoint's mlp.c_fc / mlp.c_proj keys
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _param(*shape: int, scale: float) -> nn.Parameter:
    # through nn.init, so the meta-device loader can skip it (checkpoint.meta_build)
    return nn.Parameter(nn.init.normal_(torch.empty(*shape), std=scale))


class Encoder(nn.Module):
    """Patches + learned latent tokens through a ViT; the latent outputs become token_size codes."""

    def __init__(self, width: int, num_layers: int, num_heads: int, token_size: int,
                 grid_size: int, patch_size: int, num_latent_tokens: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_latent_tokens = num_latent_tokens
        self.positional_embedding = _param(grid_size ** 2, width, scale=width ** -0.5)
        self.latent_token_positional_embedding = _param(num_latent_tokens, width, scale=width ** -0.5)
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(num_layers))
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, token_size, kernel_size=1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> continuous latents [B, token_size, 1, L]."""
        B = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.positional_embedding
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, -self.num_latent_tokens:])
        # The 1x1 conv runs on a (B, width, L, 1) map, the layout the reference uses.
        z = self.conv_out(x.transpose(1, 2).unsqueeze(-1))
        return z.reshape(B, -1, 1, self.num_latent_tokens)


class PatchUnpack(nn.Module):
    """[B, p*p*C, h, w] -> [B, C, h*p, w*p]; channel index (p1*p + p2)*C + c is pixel (h*p+p1, w*p+p2)."""

    def __init__(self, patch_size: int, channels: int = 3) -> None:
        super().__init__()
        self.p, self.c = patch_size, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        x = x.view(B, self.p, self.p, self.c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(B, self.c, h * self.p, w * self.p)


class Decoder(nn.Module):
    """Class tokens + projected codes through a ViT; the last grid**2 outputs become patches."""

    def __init__(self, width: int, num_layers: int, num_heads: int, token_size: int, grid_size: int,
                 patch_size: int, num_latent_tokens: int, num_class_tokens: int, mlp_ratio: float) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.class_embedding = _param(num_class_tokens, width, scale=width ** -0.5)
        self.latent_token_positional_embedding = _param(num_class_tokens + num_latent_tokens, width,
                                                        scale=width ** -0.5)
        self.decoder_embed = nn.Linear(token_size, width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(num_layers))
        self.ln_post = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Conv2d(width, patch_size * patch_size * 3, kernel_size=1),
                                 PatchUnpack(patch_size))
        self.conv_out = nn.Conv2d(3, 3, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, token_size, 1, L] -> image [B, 3, H, W] in (0, 1)."""
        B = z.shape[0]
        x = self.decoder_embed(z.flatten(1, 2).transpose(1, 2))
        x = torch.cat([self.class_embedding.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.latent_token_positional_embedding)
        for block in self.transformer:
            x = block(x)
        # Only the grid positions carry pixels: the class tokens and the 17 prefix tokens are dropped.
        x = self.ln_post(x[:, -self.grid_size ** 2:])
        # Contiguous NCHW as in the reference: a strided map would pick another conv kernel.
        x = x.transpose(1, 2).reshape(B, -1, self.grid_size, self.grid_size).contiguous()
        return torch.sigmoid(self.conv_out(self.ffn(x)))


class VectorQuantizer(nn.Module):
    """Plain (no l2 norm) codebook: nearest entry by squared L2 distance."""

    def __init__(self, codebook_size: int, token_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> z [B, token_size, 1, L], the layout the decoder takes."""
        # Materialised in this layout, like the reference, so decoder_embed sees the same strides.
        return self.embedding(tokens).transpose(1, 2).unsqueeze(2).contiguous()

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, token_size, 1, L] -> indices [B, L]."""
        B, C = z.shape[:2]
        flat = z.float().reshape(B, C, -1).transpose(1, 2).reshape(-1, C)
        codes = self.embedding.weight.float()
        # |z|^2 + |e|^2 - 2 z.e, in float32, the expansion the reference ranks by (ties matter).
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        return dist.argmin(dim=1).view(B, -1)


class AliTokTokenizer(nn.Module):
    """The AliTok tokenizer. Defaults are the published sizes (389,899,308 parameters)."""

    def __init__(self, *, encoder_width: int = 768, encoder_layers: int = 12, encoder_heads: int = 12,
                 decoder_width: int = 1024, decoder_layers: int = 24, decoder_heads: int = 16,
                 token_size: int = 32, codebook_size: int = 4096, image_size: int = 256,
                 patch_size: int = 16, num_prefix_tokens: int = 17, num_class_tokens: int = 32,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        for name, width, heads in (("encoder", encoder_width, encoder_heads),
                                   ("decoder", decoder_width, decoder_heads)):
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.codebook_size = image_size, codebook_size
        grid = image_size // patch_size
        self.num_latent_tokens = num_prefix_tokens + grid ** 2
        self.architecture = (f"encoder width {encoder_width}, depth {encoder_layers}, {encoder_heads} heads; "
                             f"decoder width {decoder_width}, depth {decoder_layers}, {decoder_heads} heads; "
                             f"token_size {token_size}, codebook {codebook_size}")

        self.latent_tokens = _param(self.num_latent_tokens, encoder_width, scale=encoder_width ** -0.5)
        self.encoder = Encoder(encoder_width, encoder_layers, encoder_heads, token_size, grid,
                               patch_size, self.num_latent_tokens, mlp_ratio)
        self.decoder = Decoder(decoder_width, decoder_layers, decoder_heads, token_size, grid,
                               patch_size, self.num_latent_tokens, num_class_tokens, mlp_ratio)
        self.quantize = VectorQuantizer(codebook_size, token_size)

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> "AliTokTokenizer":
        """Build from a nested {encoder, decoder, quantizer} dict, as in
        tests/fixtures/alitok_tokenizer_tiny_config.json."""
        return cls(**sizes_from_config_dict(config))

    # -- inference ---------------------------------------------------------------------
    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] or [B, 1, L] -> codebook vectors z [B, token_size, 1, L]."""
        return self.quantize.lookup(self._check_tokens(tokens))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """tokens [B, 273] or [B, 1, 273] -> images [B, 3, 256, 256] in (0, 1).

        Runs without autocast (the reference decodes in full precision); `max_batch` bounds
        peak memory by decoding that many images at a time.
        """
        tokens = self._check_tokens(tokens)
        with torch.autocast(tokens.device.type, enabled=False):
            return torch.cat([self.decoder(self.quantize.lookup(t))
                              for t in tokens.split(max_batch or max(len(tokens), 1))])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """images [B, 3, 256, 256], float RGB in [0, 1] -> token ids [B, 273] (int64)."""
        images = self._check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            return torch.cat([self.quantize.nearest(self.encoder(x, self.latent_tokens))
                              for x in images.split(max_batch or max(len(images), 1))])

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 3 and tokens.shape[1] == 1:
            tokens = tokens.squeeze(1)
        if tokens.dim() != 2 or tokens.shape[1] != self.num_latent_tokens:
            raise ValueError(f"expected token ids of shape [B, {self.num_latent_tokens}] or "
                             f"[B, 1, {self.num_latent_tokens}], got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got "
                             f"[{tokens.min().item()}, {tokens.max().item()}]")
        return tokens.long()

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        shape = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, shape))}] (NCHW), "
                             f"got {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise ValueError(f"expected float images in [0, 1], got {images.dtype}; divide uint8 "
                             f"images by 255")
        lo, hi = images.min().item(), images.max().item()
        if lo < -0.5 or hi > 2.0:  # tolerate resampling overshoot, catch [-1, 1] and [0, 255] inputs
            raise ValueError(f"expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return images.to(self.encoder.patch_embed.weight.dtype)


def sizes_from_config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from the nested tokenizer config, checking what the architecture fixes."""
    enc, dec, vq = config["encoder"], config["decoder"], config["quantizer"]
    if vq.get("use_l2_norm", False):
        raise ValueError("AliTok's quantizer has use_l2_norm=False; the l2-normalised variant is not supported")
    for key in ("patch_size", "image_size", "num_latent_tokens"):
        if enc.get(key, dec.get(key)) != dec.get(key, enc.get(key)):
            raise ValueError(f"encoder and decoder disagree on {key}: {enc.get(key)} vs {dec.get(key)}")
    token_sizes = {enc.get("token_size"), dec.get("token_size"), vq.get("token_size")} - {None}
    if len(token_sizes) > 1:
        raise ValueError(f"encoder, decoder and quantizer disagree on token_size: {sorted(token_sizes)}")
    sizes = {"encoder_width": enc["width"], "encoder_layers": enc["num_layers"],
             "encoder_heads": enc["num_heads"], "decoder_width": dec["width"],
             "decoder_layers": dec["num_layers"], "decoder_heads": dec["num_heads"],
             "codebook_size": vq["codebook_size"]}
    if token_sizes:
        sizes["token_size"] = token_sizes.pop()
    for key, arg in (("patch_size", "patch_size"), ("image_size", "image_size"),
                     ("num_class_embedding_tokens", "num_class_tokens")):
        if key in dec:
            sizes[arg] = dec[key]
    if "num_latent_tokens" in dec:
        grid = sizes.get("image_size", 256) // sizes.get("patch_size", 16)
        sizes["num_prefix_tokens"] = dec["num_latent_tokens"] - grid ** 2
    return sizes


def load_tokenizer(path: str | Path, *, source: str = UNKNOWN_SOURCE, **sizes: Any) -> AliTokTokenizer:
    """Build an AliTokTokenizer (published sizes unless overridden) and strictly load `path` into it.

    Accepts .safetensors, or .pth/.bin/.pt read with torch.load(weights_only=True); a state dict
    wrapped under 'state_dict'/'model'/'ema' or prefixed 'module.' is unwrapped. Raises
    FileNotFoundError for a missing file and ValueError for an unreadable or mismatched one.
    """
    known = set(inspect.signature(AliTokTokenizer.__init__).parameters) - {"self"}
    if set(sizes) - known:
        raise TypeError(f"unknown AliTokTokenizer size argument(s) {sorted(set(sizes) - known)}; "
                        f"valid: {sorted(known)}")
    return load_model(lambda: AliTokTokenizer(**sizes), path, what="AliTok tokenizer", source=source)


def image_decoder(config, path: str | Path, device: torch.device,
                  source: str = UNKNOWN_SOURCE) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens [B, 273] -> uint8 images [B, 256, 256, 3] with the tokenizer at `path`; the codebook
    is the generator's (model.vq_model) unless model.tokenizer overrides the sizes."""
    vq = config.model.vq_model
    sizes = {"codebook_size": vq.codebook_size, **({"token_size": vq.token_size} if vq.get("token_size") else {}),
             **dict(config.model.get("tokenizer") or {})}
    tokenizer = load_tokenizer(path, source=source, **sizes).to(device)
    return lambda tokens: unit_to_uint8_hwc(tokenizer.decode_tokens(tokens))
