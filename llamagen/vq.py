"""LlamaGen's VQ-16 image tokenizer (tokenizer/tokenizer_image/vq_model.py), inference only.

A taming-style convolutional VQGAN: the encoder takes an image in [-1, 1] down by 16 to a
grid of z_channels, `quant_conv` maps it to 8-d, and each vector snaps to the nearest
entry of a 16384 x 8 codebook; both the vectors and the codebook are l2-normalised
(cosine distance). The decoder maps codebook vectors back to an image nominally in
[-1, 1], unclamped. State-dict keys equal the published `vq_ds16_c2i.pt` ("model"),
including the training-time usage buffer `quantize.codebook_used`.

Differences from the MaskGIT-VQGAN in rar/vqgan.py: attention blocks at the coarsest
level and in the middle, ordinary shortcuts, biased convs, strided-conv downsampling
with (0, 1, 0, 1) padding, three ResNet blocks per decoder level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from softcfg_patch.checkpoint import UNKNOWN_SOURCE, load_model
from softcfg_patch.layers import signed_to_uint8_hwc

BASE_CHANNELS, NUM_RES_BLOCKS, GN_GROUPS, GN_EPS = 128, 2, 32, 1e-6
CODEBOOK_USAGE_LEN = 65536  # length of the (inference-unused) codebook_used buffer


def conv3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1 if stride == 1 else 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), conv3(c_in, c_out)
        self.norm2, self.conv2 = group_norm(c_out), conv3(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with 1x1 conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as upstream
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, then a valid stride-2 conv


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResNet blocks at one resolution (`res.<j>`), each followed by attention at the coarsest
    level (`attn.<j>`), then an optional resampler (`downsample` / `upsample`)."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, attention: bool,
                 resample: type[nn.Module] | None = None, resample_name: str = "") -> None:
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(num_blocks if attention else 0))
        self.resample_name = resample_name if resample is not None else None  # the upstream key name
        if resample is not None:
            setattr(self, resample_name, resample(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    def __init__(self, ch_mult: Sequence[int], z_channels: int) -> None:
        super().__init__()
        widths = [BASE_CHANNELS * m for m in ch_mult]
        last = len(widths) - 1
        self.conv_in = conv3(3, BASE_CHANNELS)
        self.conv_blocks = nn.ModuleList(
            Level(([BASE_CHANNELS] + widths)[i], widths[i], NUM_RES_BLOCKS, attention=i == last,
                  resample=Downsample if i < last else None, resample_name="downsample")
            for i in range(len(widths)))
        self.mid = _middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3(widths[-1], z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, ch_mult: Sequence[int], z_channels: int) -> None:
        super().__init__()
        widths = [BASE_CHANNELS * m for m in reversed(ch_mult)]  # coarsest level first
        last = len(widths) - 1
        self.conv_in = conv3(z_channels, widths[0])
        self.mid = _middle(widths[0])
        self.conv_blocks = nn.ModuleList(
            Level(([widths[0]] + widths)[i], widths[i], NUM_RES_BLOCKS + 1, attention=i == 0,
                  resample=Upsample if i < last else None, resample_name="upsample")
            for i in range(len(widths)))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3(widths[-1], 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """l2-normalised codebook: lookup by index, nearest entry by cosine distance."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        # Training-time usage history; kept only so the published file loads strictly.
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_LEN))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> indices [B, h*w] in raster order."""
        B, C = z.shape[:2]
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, C), p=2, dim=-1)
        codes = self.codebook()
        # |z|^2 + |e|^2 - 2 z.e, the expansion upstream ranks by (near-ties must break alike).
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        return dist.argmin(dim=1).view(B, -1)


class VQModel(nn.Module):
    """LlamaGen VQ (defaults: VQ-16 of vq_ds16_c2i.pt, 16384 x 8 codebook, downsampling 16)."""

    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8,
                 encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 z_channels: int = 256) -> None:
        super().__init__()
        self.codebook_size, self.codebook_embed_dim = codebook_size, codebook_embed_dim
        self.downsample = 2 ** (len(decoder_ch_mult) - 1)
        self.architecture = (f"LlamaGen VQ: codebook {codebook_size} x {codebook_embed_dim}, encoder_ch_mult "
                             f"{list(encoder_ch_mult)}, decoder_ch_mult {list(decoder_ch_mult)}, "
                             f"z_channels {z_channels}")
        self.encoder = Encoder(encoder_ch_mult, z_channels)
        self.decoder = Decoder(decoder_ch_mult, z_channels)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """codes [B, h*w] (raster order) or [B, h, w] -> images [B, 3, 16h, 16w], nominally in
        [-1, 1] but NOT clamped (signed_to_uint8_hwc clamps). `shape` is upstream's
        [B, codebook_embed_dim, h, w]; without it the grid is taken as square."""
        codes = self._check_codes(codes)
        B = codes.shape[0]
        if shape is None:
            side = round(codes[0].numel() ** 0.5)
            shape = (B, self.codebook_embed_dim, side, side)
        if len(shape) != 4 or shape[0] * shape[2] * shape[3] != codes.numel() or shape[1] != self.codebook_embed_dim:
            raise ValueError(f"shape must be [B, {self.codebook_embed_dim}, h, w] with B*h*w = {codes.numel()} "
                             f"codes, got {list(shape)}")
        z = self.quantize.codebook()[codes.reshape(-1)].view(shape[0], shape[2], shape[3], -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] (H, W multiples of 16) -> code indices [B, (H/16)*(W/16)].

        Upstream's encode returns (quant, loss, info); these are its info[2] per image.
        """
        f = self.downsample
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"expected images [B, 3, H, W] with H and W multiples of {self.downsample}, "
                             f"got {tuple(images.shape)}")
        return self.quantize.nearest(self.quant_conv(self.encoder(images.float())))

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        integer = torch.is_tensor(codes) and not (codes.dtype.is_floating_point or codes.dtype == torch.bool)
        if not integer or codes.dim() not in (2, 3):
            raise ValueError(f"codes must be an integer tensor [B, h*w] or [B, h, w], got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes.long()


def resize_for_eval(images: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Upstream's FID protocol for the 384 checkpoints: bicubic resize (no antialias) of the
    unclamped decoder output to size x size, before the uint8 conversion. A no-op at `size`."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic")


def load_vq(path: str | Path, *, source: str = UNKNOWN_SOURCE, **sizes) -> VQModel:
    """Build a VQModel (VQ-16 unless overridden) and strictly load `path` (its "model" entry)."""
    return load_model(lambda: VQModel(**sizes), path, what="LlamaGen VQ tokenizer", source=source)


def image_decoder(config, path: str | Path, device: torch.device,
                  source: str = UNKNOWN_SOURCE) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens [B, h*w] -> uint8 images [B, 256, 256, 3]: decoded at the model's resolution (16 h),
    resized to sample.image_size_eval with bicubic before the uint8 conversion, as upstream."""
    vq = load_vq(path, source=source, **config.model.vq_model).to(device)
    size = int(config.sample.image_size_eval)
    return lambda tokens: signed_to_uint8_hwc(resize_for_eval(vq.decode_code(tokens), size))


def random_weights(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded, default-initialised VQ of `config.model.vq_model`'s sizes (SMOKE runs: the
    tiny config ships no VQ weights; the images it decodes mean nothing)."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
        torch.manual_seed(seed)
        return VQModel(**config.model.vq_model).state_dict()
