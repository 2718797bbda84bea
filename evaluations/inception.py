"""FID Inception-v3: the 2015-12-05 TensorFlow Inception graph, as used by FID, sFID and IS.

The architecture is torchvision's Inception3 with the "FID" patches that make it follow the
TF graph (pool branches that ignore padding, a max pool in the last block, BN eps 1e-3,
1008 classes). Module and key names equal the published PyTorch port, so
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) and
`weights-inception-2015-12-05-6726825d.pth` (torch-fidelity) load with strict=True.

    net = FIDInception()                  # finds the weights (see find_weights), eval mode
    out = net(images_uint8_nhwc)          # {"pool": [N,2048], "spatial": [N,2023], "logits": [N,1008]}

Pre-processing defaults to what the ADM evaluator runs inside the TF graph: TF1's bilinear
resize to 299x299 (no half-pixel offset) on 0..255 pixels, then (x - 128) / 128.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from softcfg_patch.checkpoint import CheckpointError, load_state, read_state_dict
from softcfg_patch.precision import tf32

WEIGHT_FILES = {  # published file name -> where to download it by hand
    "pt_inception-2015-12-05-6726825d.pth":
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth":
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
}
WEIGHTS_ENV = "SOFTCFG_INCEPTION_WEIGHTS"
RESIZE_MODES = ("tf1", "torch")
NORMALIZE_MODES = ("adm", "pytorch_fid")
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM keeps channels 0..6 of mixed_6/conv for sFID


class InceptionWeightsError(CheckpointError):
    """A weight file that exists but is not the FID Inception network."""


# ----------------------------------------------------------------------------- blocks

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool divides by the number of real pixels, not the padded window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17; Mixed_6d.branch1x1 is ADM's sFID tensor
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        # branch1x1 comes first, so channels 0..191 of the output are its post-ReLU map
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (average pool branch) and Mixed_7c (max pool branch)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool  # the TF graph's last block max-pools; a quirk FID inherits
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


# ----------------------------------------------------------------------------- pre-processing

def _tf1_taps(n_in: int, n_out: int, dtype: torch.dtype, device) -> tuple:
    """Source indices and weights of TF1's legacy bilinear resize (align_corners=False).

    TF1 maps output index i to source coordinate i * (n_in / n_out) with no half-pixel
    shift; the scale is a float32 in TF (kept float32-rounded even for float64 runs).
    """
    scale = float(np.float32(n_in) / np.float32(n_out))
    pos = torch.arange(n_out, dtype=dtype, device=device) * torch.tensor(scale, dtype=dtype, device=device)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.long()
    hi = torch.clamp(lo + 1, max=n_in - 1)
    return lo, hi, frac


def resize_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of NCHW float `x` to size x size exactly as TF1's ResizeBilinear."""
    lo_y, hi_y, fy = _tf1_taps(x.shape[2], size, x.dtype, x.device)
    lo_x, hi_x, fx = _tf1_taps(x.shape[3], size, x.dtype, x.device)
    # Along the width first, then the height: the same operation order as TF (bit-exact in fp32).
    left, right = x[..., lo_x], x[..., hi_x]
    rows = left + (right - left) * fx
    top, bottom = rows[:, :, lo_y, :], rows[:, :, hi_y, :]
    return top + (bottom - top) * fy[:, None]


def spatial_features(mixed_6d: torch.Tensor) -> torch.Tensor:
    """ADM's sFID vector from an NCHW map: channels 0..6, flattened in (h, w, c) order (TF is NHWC)."""
    if mixed_6d.ndim != 4 or mixed_6d.shape[1] < SPATIAL_CHANNELS:
        raise ValueError(f"expected an NCHW map with >= {SPATIAL_CHANNELS} channels, got {tuple(mixed_6d.shape)}")
    kept = mixed_6d[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return kept.reshape(kept.shape[0], -1)


# ----------------------------------------------------------------------------- the network

class FIDInception(nn.Module):
    """The FID Inception network. forward(uint8 [N, H, W, 3]) -> dict of pool, spatial, logits.

    weights: "auto" (default) finds the published file (see `find_weights`) and fails with
             instructions if it is absent; a path loads that file; None leaves the
             architecture uninitialised (load a state dict yourself).
    resize: "tf1" (default, as the ADM evaluator / TF graph) or "torch" (F.interpolate
            bilinear, half-pixel centres, as pytorch-fid).
    normalize: "adm" (default): 0..255 pixels, resize, then (x - 128) / 128, as the TF graph;
               "pytorch_fid": x / 255, resize, then 2x - 1.
    Outputs are float tensors on the model's device and dtype; `logits` are the 1008-way
    logits without the fc bias (what ADM's Inception Score uses).
    """

    def __init__(self, weights: str | os.PathLike | None = "auto", resize: str = "tf1",
                 normalize: str = "adm"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        self.resize, self.normalize = resize, normalize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.weights_path: Path | None = None
        self._identity: str | None = None
        self.register_load_state_dict_post_hook(_forget_identity)
        if weights is not None:
            self.load_weights(find_weights(None if weights == "auto" else weights))
        self.eval()

    def load_weights(self, path: str | os.PathLike) -> "FIDInception":
        """Strictly load a published FID Inception file (with or without num_batches_tracked)."""
        load_state_dict_strict(self, read_weight_file(path), source=str(path))
        self.weights_path = Path(path)
        return self

    def identity(self) -> str:
        """SHA-256 of the float tensors in sorted key order: names the weights, whatever the file format.

        Hashed once (the evaluator names every cache and its JSON with it); loading a state dict
        or converting the network (.to / .half) forgets it.
        """
        if self._identity is None:
            self._identity = _weights_sha256(self.state_dict())
        return self._identity

    def _apply(self, fn, recurse=True):
        self._identity = None  # a dtype change changes the float32 view that is hashed
        return super()._apply(fn, recurse)

    def preprocess(self, images) -> torch.Tensor:
        """uint8 [N, H, W, 3] (RGB) -> the float NCHW 299x299 tensor that enters Conv2d_1a_3x3."""
        images = _check_images(images)
        param = self.fc.weight
        x = images.to(param.device).permute(0, 3, 1, 2).to(param.dtype).contiguous()
        if self.normalize == "pytorch_fid":
            x = x / 255  # as torchvision's ToTensor: scale before the resize
        if self.resize == "tf1":
            x = resize_tf1(x, INPUT_SIZE)
        else:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return (x - 128) / 128 if self.normalize == "adm" else 2 * x - 1

    def forward(self, images) -> dict[str, torch.Tensor]:
        with tf32(False):
            x = self.preprocess(images)
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
                x = getattr(self, name)(x)
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
            x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
            spatial = spatial_features(x)  # mixed_6/conv: Mixed_6d.branch1x1 after its ReLU
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
            pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool_3: global 8x8 average
            logits = pool @ self.fc.weight.t()  # no bias: ADM reads the MatMul input, not the output
        return {"pool": pool, "spatial": spatial, "logits": logits}


def _forget_identity(model: FIDInception, incompatible_keys) -> None:
    model._identity = None


def _weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key, value in sorted(state.items()):
        if not key.endswith("num_batches_tracked"):
            h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a uint8 numpy array or tensor [N, H, W, 3], got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 RGB in 0..255 [N, H, W, 3], got dtype {images.dtype}; "
                         f"convert float images in [0, 1] with (x * 255).round().clamp(0, 255).to(torch.uint8)")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3] (channels last, RGB), got {tuple(images.shape)}")
    return images


# ----------------------------------------------------------------------------- weight files

def _search_places() -> list[Path]:
    root = Path(__file__).resolve().parents[1]
    dirs = [Path.cwd() / "weights", root / "weights", Path(torch.hub.get_dir()) / "checkpoints"]
    return [d / name for d in dict.fromkeys(dirs) for name in WEIGHT_FILES]


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """The weight file to use: `path`, else $SOFTCFG_INCEPTION_WEIGHTS, else a published file name
    in ./weights/, <repo>/weights/ or torch.hub's checkpoints folder. Never downloads."""
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        raise FileNotFoundError(f"Inception weights not found: '{path}'. " + _how_to_get())
    for candidate in _search_places():
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(p.parent) for p in _search_places()[::len(WEIGHT_FILES)])
    raise FileNotFoundError(f"Inception weights not found (looked in {looked}). " + _how_to_get())


def _how_to_get() -> str:
    urls = " or ".join(f"{name} from {url}" for name, url in WEIGHT_FILES.items())
    return (f"Download {urls} (the PyTorch port of TensorFlow's inception-2015-12-05 graph) and pass "
            f"its path with --inception-weights PATH or the {WEIGHTS_ENV} environment variable, or put it "
            f"in ./weights/. Nothing is downloaded automatically.")


def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors only (safetensors, or torch.load with weights_only=True), via the project's loader."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights not found: '{path}'. " + _how_to_get())
    return read_state_dict(path, what="Inception weights", source=_sources(), error=InceptionWeightsError)


def _sources() -> str:
    return " or ".join(f"{name} from {url}" for name, url in WEIGHT_FILES.items())


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """load_state_dict(strict=True, assign=True), with missing BN counters filled in and readable errors."""
    # torch-fidelity's converter writes no counters; they never affect eval-mode outputs
    load_state(model, state, path=source, what="FID Inception network", source=_sources(),
               error=InceptionWeightsError, zero_fill=("num_batches_tracked",))


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the FID network (recipe: tests/fixtures/inception/README.md
    section 2), for SMOKE runs: He-normal convs keep activations well scaled, so metrics are
    finite but meaningless. The BN counters are left out (the loader fills them in)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FIDInception(weights=None).state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    gen, state = torch.Generator().manual_seed(seed), {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("bn.running_var"):
            r = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        else:
            r = torch.randn(shape, generator=gen, dtype=torch.float64)
            scale, shift = (math.sqrt(2.0 / shape[1:].numel()), 0.0) if key.endswith("conv.weight") else \
                (math.sqrt(1.0 / 2048), 0.0) if key == "fc.weight" else \
                (0.1, 1.0) if key.endswith("bn.weight") else (0.1, 0.0)
            r = r * scale + shift
        state[key] = r.to(torch.float32)
    return state
