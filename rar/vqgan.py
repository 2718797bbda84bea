"""The MaskGIT-VQGAN image tokenizer that RAR generates tokens for, architecture only.

A convolutional VQGAN without attention layers: the encoder takes a 256x256 RGB image
in [0, 1] down to a 16x16 grid of 256-d vectors, each snapped to the nearest entry of a
1024 x 256 codebook; the decoder maps a 16x16 grid of codebook vectors back to pixels.
The decoder has no output activation; `decode_tokens` clamps to [0, 1] as the reference does.

State-dict keys and shapes equal the published `maskgit-vqgan-imagenet-f16-256.bin`
(encoder.*, decoder.*, quantize.embedding.weight), so it loads with strict=True.

One upstream quirk is kept on purpose, because the checkpoint was trained with it: in a
ResNet block that changes the channel count, the 1x1 `nin_shortcut` is applied to the
block's own conv2 output, not to its input (see ResnetBlock.forward).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcfg_patch.checkpoint import UNKNOWN_SOURCE, load_model
from softcfg_patch.layers import unit_to_uint8_hwc

WEIGHTS_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
GN_GROUPS, GN_EPS = 32, 1e-6


def conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> nn.Conv2d:
    """Stride-1 'same' conv. Odd kernels pad symmetrically, so built-in padding equals TF 'SAME'."""
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), conv(c_in, c_out, 3, bias=False)
        self.norm2, self.conv2 = norm(c_out), conv(c_out, c_out, 3, bias=False)
        if c_in != c_out:
            # out -> out, not in -> out: it maps the conv2 output (quirk, see forward).
            self.nin_shortcut = conv(c_out, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 / identity at inference
        if hasattr(self, "nin_shortcut"):
            # Checkpoint-exact quirk: no skip from x at all; the block returns h + W h.
            return h + self.nin_shortcut(h)
        return h + x


class Level(nn.Module):
    """num_res_blocks ResNet blocks at one resolution (keys `<i>.block.<j>`), optionally
    followed by a nearest 2x upsample and a 3x3 conv (key `<i>.upsample_conv`)."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, upsample: bool = False) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks))
        if upsample:
            self.upsample_conv = conv(c_out, c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if hasattr(self, "upsample_conv"):
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """image [B, 3, R, R] -> z [B, z_channels, R/2^(L-1), R/2^(L-1)]; avg-pool between levels."""

    def __init__(self, hidden: int, mult: Sequence[int], num_blocks: int, z_channels: int,
                 num_channels: int) -> None:
        super().__init__()
        widths = [hidden * m for m in mult]
        self.conv_in = conv(num_channels, hidden, 3, bias=False)
        self.down = nn.ModuleList(Level(([hidden] + widths)[i], widths[i], num_blocks) for i in range(len(mult)))
        self.mid = nn.ModuleList(ResnetBlock(widths[-1], widths[-1]) for _ in range(num_blocks))
        self.norm_out = norm(widths[-1])
        self.conv_out = conv(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.down):
            x = level(x)
            if i < len(self.down) - 1:
                x = F.avg_pool2d(x, kernel_size=2, stride=2)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] -> raw image [B, 3, h*2^(L-1), w*2^(L-1)] (no output activation)."""

    def __init__(self, hidden: int, mult: Sequence[int], num_blocks: int, z_channels: int,
                 num_channels: int) -> None:
        super().__init__()
        widths = [hidden * m for m in mult]
        self.conv_in = conv(z_channels, widths[-1], 3)
        self.mid = nn.ModuleList(ResnetBlock(widths[-1], widths[-1]) for _ in range(num_blocks))
        # up[i] runs at level i's resolution; it is entered from level i+1 (or from mid for the last).
        self.up = nn.ModuleList(Level((widths + widths[-1:])[i + 1], widths[i], num_blocks, upsample=i > 0)
                                for i in range(len(mult)))
        self.norm_out = norm(widths[0])
        self.conv_out = conv(widths[0], num_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for level in reversed(self.up):  # coarsest first
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """Plain codebook (no l2 norm): lookup by index, and nearest entry by squared L2 distance."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def lookup(self, grid: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> z_q [B, C, h, w]."""
        return self.embedding(grid).permute(0, 3, 1, 2)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> indices [B, h*w] in raster order."""
        B, C = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        codes = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e in one addmm, the expansion the reference ranks by: near-ties
        # between codebook entries must resolve the same way for the indices to match exactly.
        dist = torch.addmm(flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1), flat, codes.T, alpha=-2.0)
        return dist.argmin(dim=1).view(B, -1)


class MaskGITVQGAN(nn.Module):
    """MaskGIT-VQGAN (f16, 1024 codes). Defaults are the published sizes (54,515,587 parameters)."""

    def __init__(self, hidden_channels: int = 128, channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, num_embeddings: int = 1024,
                 embedding_dim: int = 256, resolution: int = 256, num_channels: int = 3) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        _check_sizes(hidden_channels, channel_mult, num_res_blocks, z_channels, embedding_dim, resolution)
        self.resolution, self.num_channels, self.num_embeddings = resolution, num_channels, num_embeddings
        self.grid = resolution // 2 ** (len(channel_mult) - 1)  # 16 at full size: 256 tokens
        self.architecture = (f"MaskGIT-VQGAN: hidden_channels {hidden_channels}, channel_mult "
                             f"{list(channel_mult)}, num_res_blocks {num_res_blocks}, z_channels "
                             f"{z_channels}, codebook {num_embeddings} x {embedding_dim}, resolution {resolution}")
        args = (hidden_channels, channel_mult, num_res_blocks, z_channels, num_channels)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)
        self.quantize = VectorQuantizer(num_embeddings, embedding_dim)

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> "MaskGITVQGAN":
        """Build from {decoder_encoder_config, quantizer} (tests/fixtures/maskgit_vqgan_tiny_config.json)."""
        return cls(**sizes_from_config_dict(config))

    # -- inference ---------------------------------------------------------------------
    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 256] (raster order) or [B, 16, 16] -> codebook vectors z_q [B, C, 16, 16]."""
        return self.quantize.lookup(self._check_tokens(tokens))

    @torch.no_grad()
    def decode_raw(self, tokens: torch.Tensor, max_batch: int | None = 32) -> torch.Tensor:
        """tokens -> decoder output [B, 3, 256, 256] before the clamp (values roughly in [-0.5, 1.5]).

        Decodes `max_batch` images at a time (None: all at once) to bound peak activation
        memory, and without autocast: the reference decodes in the weights' precision.
        """
        grid = self._check_tokens(tokens)
        with torch.autocast(grid.device.type, enabled=False):
            return torch.cat([self.decoder(self.quantize.lookup(g)) for g in _chunks(grid, max_batch)])

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, max_batch: int | None = 32) -> torch.Tensor:
        """tokens [B, 256] or [B, 16, 16] -> images [B, 3, 256, 256] clamped to [0, 1]."""
        return self.decode_raw(tokens, max_batch).clamp_(0.0, 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, max_batch: int | None = 32) -> torch.Tensor:
        """images [B, 3, 256, 256], float RGB in [0, 1] (fed as is, no normalisation, like the
        reference) -> token ids [B, 256] (int64, raster order)."""
        images = self._check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            return torch.cat([self.quantize.nearest(self.encoder(x)) for x in _chunks(images, max_batch)])

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validate ids and return them as an int64 [B, grid, grid] tensor."""
        g, n = self.grid, self.grid ** 2
        if not torch.is_tensor(tokens):
            raise TypeError(f"token ids must be a torch.Tensor, got {type(tokens).__name__}")
        if not ((tokens.dim() == 2 and tokens.shape[1] == n) or
                (tokens.dim() == 3 and tuple(tokens.shape[1:]) == (g, g))):
            raise ValueError(f"expected token ids of shape [B, {n}] or [B, {g}, {g}], got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.num_embeddings):
            raise ValueError(f"token ids must lie in [0, {self.num_embeddings}), got "
                             f"[{tokens.min().item()}, {tokens.max().item()}]")
        return tokens.long().reshape(-1, g, g)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        shape = (self.num_channels, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, shape))}] (NCHW), "
                             f"got {tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise ValueError(f"expected float images in [0, 1], got {images.dtype}; divide uint8 images by 255")
        if images.numel():
            lo, hi = images.min().item(), images.max().item()
            if lo < -0.5 or hi > 2.0:  # tolerate resampling overshoot, catch [-1, 1] and [0, 255] inputs
                raise ValueError(f"expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return images.to(self.encoder.conv_in.weight.dtype)


def _chunks(x: torch.Tensor, max_batch: int | None) -> tuple[torch.Tensor, ...]:
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch}")
    return x.split(max_batch or max(len(x), 1))


def _check_sizes(hidden: int, mult: tuple[int, ...], num_blocks: int, z_channels: int,
                 embedding_dim: int, resolution: int) -> None:
    if not mult or num_blocks < 1:
        raise ValueError(f"need at least one level and one res block, got channel_mult {mult}, "
                         f"num_res_blocks {num_blocks}")
    if any((hidden * m) % GN_GROUPS for m in (1, *mult)):
        raise ValueError(f"every width hidden_channels * channel_mult must be a multiple of {GN_GROUPS} "
                         f"(GroupNorm groups), got hidden_channels {hidden}, channel_mult {list(mult)}")
    if z_channels != embedding_dim:
        raise ValueError(f"z_channels ({z_channels}) must equal embedding_dim ({embedding_dim}): the "
                         f"encoder output is quantized and the codebook vectors enter the decoder directly")
    if resolution % 2 ** (len(mult) - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2^{len(mult) - 1} (one halving per level)")


def sizes_from_config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments from {decoder_encoder_config: {...}, quantizer: {...}}."""
    try:
        net, vq = config["decoder_encoder_config"], config["quantizer"]
    except KeyError as err:
        raise ValueError(f"MaskGIT-VQGAN config needs 'decoder_encoder_config' and 'quantizer' sections, "
                         f"got keys {sorted(config)}") from err
    mult = list(net["channel_mult"])
    if net.get("num_resolutions", len(mult)) != len(mult):
        raise ValueError(f"num_resolutions {net['num_resolutions']} != len(channel_mult) {len(mult)}")
    sizes = {k: net[k] for k in ("hidden_channels", "num_res_blocks", "z_channels", "resolution", "num_channels")
             if k in net}
    sizes.update(channel_mult=tuple(mult), num_embeddings=vq["num_embeddings"], embedding_dim=vq["embedding_dim"])
    return sizes


def load_vqgan(path: str | Path, *, source: str = UNKNOWN_SOURCE, **sizes: Any) -> MaskGITVQGAN:
    """Build a MaskGITVQGAN (published sizes unless overridden) and strictly load `path` into it.

    Accepts .safetensors, or .bin/.pth/.pt read with torch.load(weights_only=True); a state dict
    wrapped under 'state_dict'/'model'/... or prefixed 'module.' is unwrapped. Returns the model
    in eval mode with gradients off. Raises FileNotFoundError for a missing file and
    ValueError (CheckpointError) for an unreadable or mismatched one.
    """
    known = set(inspect.signature(MaskGITVQGAN.__init__).parameters) - {"self"}
    if set(sizes) - known:
        raise TypeError(f"unknown MaskGITVQGAN size argument(s) {sorted(set(sizes) - known)}; valid: {sorted(known)}")
    return load_model(lambda: MaskGITVQGAN(**sizes), path, what="MaskGIT-VQGAN tokenizer", source=source)


def image_decoder(config, path: str | Path, device: torch.device,
                  source: str = UNKNOWN_SOURCE) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens [B, 256] -> uint8 images [B, 256, 256, 3] with the VQGAN at `path`; the codebook is
    the generator's (model.vq_model) unless model.tokenizer overrides the sizes."""
    vq = config.model.vq_model
    sizes = {"num_embeddings": vq.codebook_size, **({"embedding_dim": vq.token_size} if vq.get("token_size") else {}),
             **dict(config.model.get("tokenizer") or {})}
    vqgan = load_vqgan(path, source=source, **sizes).to(device)
    return lambda tokens: unit_to_uint8_hwc(vqgan.decode_tokens(tokens))
