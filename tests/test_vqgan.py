"""The MaskGIT-VQGAN tokenizer against the upstream golden vectors (tiny sizes) and the
full-size key list of the published maskgit-vqgan-imagenet-f16-256.bin; plus the safe
loader's errors and the input checks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, load_golden
from rar.vqgan import MaskGITVQGAN, ResnetBlock, load_vqgan, sizes_from_config_dict
from softcfg_patch.layers import unit_to_uint8_hwc as to_uint8_hwc
from softcfg_patch.run import registry

IO = load_golden("maskgit_vqgan_tiny_io.safetensors")
WEIGHTS_PATH = FIXTURES / "maskgit_vqgan_tiny_weights.safetensors"
WEIGHTS = load_golden(WEIGHTS_PATH.name)
CONFIG = json.loads((FIXTURES / "maskgit_vqgan_tiny_config.json").read_text())
TINY = sizes_from_config_dict(CONFIG)
# where the file is published: the registry's text, which the runner hands every loader
SOURCE = registry.get("rar").source("model.vq_model.pretrained_tokenizer_weight")
# uint8 conversion truncates, so float32 noise flips pixels that sit on an integer boundary.
# This build flips 40 of 393,216 values by 1; an fp64 run of the same model flips 123.
MAX_FLIPPED_VALUES = 200


@pytest.fixture(scope="module")
def tiny() -> MaskGITVQGAN:
    model = MaskGITVQGAN.from_config_dict(CONFIG).eval()
    model.load_state_dict(WEIGHTS, strict=True)
    return model


@pytest.fixture(scope="module")
def raw(tiny: MaskGITVQGAN) -> torch.Tensor:
    return tiny.decode_raw(IO["tokens"])


def assert_uint8_close(ours: torch.Tensor, golden: torch.Tensor) -> None:
    assert ours.dtype == torch.uint8 and ours.shape == golden.shape
    diff = (ours.int() - golden.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).sum() <= MAX_FLIPPED_VALUES


# ------------------------------------------------------------------ architecture
def test_full_size_keys_shapes_and_counts_equal_official_checkpoint():
    spec = json.loads((FIXTURES / "keys_maskgit_vqgan.json").read_text())
    with torch.device("meta"):
        model = MaskGITVQGAN()
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in spec["keys"].items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert len(state) == spec["num_keys"] == 168

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    assert count(model) == spec["num_parameters"] == 54_515_587
    assert count(model.encoder) == spec["num_parameters_encoder"] == 23_775_104
    assert count(model.decoder) == spec["num_parameters_decoder"] == 30_478_339
    assert count(model.quantize) == spec["num_parameters_quantize"] == 1024 * 256


def test_tiny_config_sizes_and_strict_load():
    assert TINY == dict(hidden_channels=32, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=2, z_channels=16,
                        resolution=256, num_channels=3, num_embeddings=64, embedding_dim=16)
    model = load_vqgan(WEIGHTS_PATH, **TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    assert len(state) == len(WEIGHTS) == 166
    assert all(torch.equal(state[k], WEIGHTS[k]) for k in WEIGHTS)


def test_channel_changing_block_shortcuts_its_own_conv2_output():
    # Upstream quirk: out = h + nin_shortcut(h) with h = conv2(...); the input has no skip path.
    torch.manual_seed(0)
    blk = ResnetBlock(32, 64).eval()
    x = torch.randn(1, 32, 8, 8)
    h = blk.conv2(torch.nn.functional.silu(blk.norm2(blk.conv1(torch.nn.functional.silu(blk.norm1(x))))))
    torch.testing.assert_close(blk(x), h + blk.nin_shortcut(h), atol=0, rtol=0)
    assert blk.nin_shortcut.weight.shape == (64, 64, 1, 1) and blk.nin_shortcut.bias is None


# ------------------------------------------------------------------ golden numerics
def test_codebook_lookup_equals_golden_z_q(tiny):
    tokens = IO["tokens"]
    assert torch.equal(tiny.tokens_to_latents(tokens), IO["z_q"])
    assert torch.equal(tiny.tokens_to_latents(tokens.view(2, 16, 16)), IO["z_q"])


def test_raw_decode_equals_golden(tiny, raw):
    assert raw.shape == (2, 3, 256, 256)
    err = (raw - IO["decoded_before_clamp"]).abs().max().item()
    assert err < 1e-4, err  # observed 4.2e-6; fp64 vs fp32 upstream spread is 1.6e-5
    # Sanity that the comparison is not vacuous: the golden leaves [0, 1] in ~2% of values.
    assert ((raw < 0) | (raw > 1)).float().mean() > 0.01


def test_decode_tokens_is_the_clamped_raw_output(tiny, raw):
    img = tiny.decode_tokens(IO["tokens"].view(2, 16, 16))
    assert torch.equal(img, raw.clamp(0, 1))
    assert img.min() == 0 and img.max() == 1


def test_uint8_conversion_equals_golden(raw):
    assert_uint8_close(to_uint8_hwc(raw), IO["decoded_uint8_hwc"])
    # Truncation, not rounding: 0.999 -> 254.
    assert to_uint8_hwc(torch.full((1, 3, 1, 1), 0.999)).flatten().tolist() == [254, 254, 254]


def test_encode_of_clamped_golden_image_equals_golden_indices(tiny):
    idx = tiny.encode(IO["decoded_before_clamp"].clamp(0, 1))
    assert idx.dtype == torch.int64 and idx.shape == (2, 256)
    assert torch.equal(idx, IO["encode_indices_of_decoded_clamped"])


def test_encode_of_our_decode_equals_golden_indices(tiny, raw):
    assert torch.equal(tiny.encode(raw.clamp(0, 1), max_batch=1), IO["encode_indices_of_decoded_clamped"])


def test_run1_tokens_decode_to_golden_sample_fn_images(tiny):
    assert_uint8_close(to_uint8_hwc(tiny.decode_tokens(IO["run1_tokens"])), IO["run1_sample_fn_uint8_hwc"])


def test_chunked_decode_matches_whole_batch(tiny, raw):
    one_at_a_time = tiny.decode_raw(IO["tokens"], max_batch=1)
    assert (one_at_a_time - raw).abs().max() < 1e-4  # conv kernels may differ by batch size


# ------------------------------------------------------------------ loader errors
def test_missing_file_names_the_official_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_vqgan(tmp_path / "nope.bin", source=SOURCE)
    msg = str(exc.value)
    assert "nope.bin" in msg and "maskgit-vqgan-imagenet-f16-256.bin" in msg
    assert "fun-research/TiTok" in msg and "huggingface.co" in msg


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".bin":
        torch.save(WEIGHTS, good)
    else:
        save_file(WEIGHTS, str(good))
    bad = tmp_path / f"truncated{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError) as exc:
        load_vqgan(bad, source=SOURCE, **TINY)
    msg = str(exc.value)
    assert str(bad) in msg and "truncated" in msg and "fun-research/TiTok" in msg


def test_other_models_weights_are_rejected_with_key_lists():
    path = FIXTURES / "rar_tiny_weights.safetensors"
    with pytest.raises(ValueError) as exc:
        load_vqgan(path, **TINY)
    msg = str(exc.value)
    assert str(path) in msg and "MaskGIT-VQGAN" in msg and "hidden_channels 32" in msg
    assert "missing keys: decoder.conv_in.bias" in msg and "(166 in all)" in msg
    assert "unexpected keys: adaln_before_head" in msg and "(45 in all)" in msg


def test_tiny_weights_into_full_size_list_shape_mismatches():
    with pytest.raises(ValueError) as exc:
        load_vqgan(WEIGHTS_PATH)  # published sizes: hidden 128, codebook 1024 x 256
    msg = str(exc.value)
    assert "hidden_channels 128" in msg and "codebook 1024 x 256" in msg
    assert "shape mismatches: decoder.conv_in.bias: file (64,) vs model (512,)" in msg
    # The full size has two more channel changes, hence two more shortcut convolutions.
    assert "missing keys: decoder.up.3.block.0.nin_shortcut.weight, encoder.down.4.block.0" in msg


def test_wrapped_bin_checkpoint_loads(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in WEIGHTS.items()}}, path)
    model = load_vqgan(path, **TINY)
    assert torch.equal(model.quantize.embedding.weight, WEIGHTS["quantize.embedding.weight"])


def test_unknown_size_argument_is_rejected():
    with pytest.raises(TypeError, match="hidden_size"):
        load_vqgan(WEIGHTS_PATH, hidden_size=32)


# ------------------------------------------------------------------ input checks
@pytest.mark.parametrize("tokens, match", [
    (torch.zeros(2, 255, dtype=torch.long), r"\[B, 256\] or \[B, 16, 16\]"),
    (torch.zeros(2, 8, 32, dtype=torch.long), r"got \(2, 8, 32\)"),
    (torch.zeros(2, 256), "integer tensor"),
    (torch.full((1, 256), 64), r"\[0, 64\)"),
    (torch.full((1, 256), -1), r"\[0, 64\)"),
])
def test_bad_tokens_are_rejected(tiny, tokens, match):
    with pytest.raises(ValueError, match=match):
        tiny.decode_tokens(tokens)


@pytest.mark.parametrize("images, match", [
    (torch.zeros(1, 3, 128, 128), r"\[B, 3, 256, 256\]"),
    (torch.zeros(1, 3, 256, 256, dtype=torch.uint8), "divide uint8"),
    (torch.full((1, 3, 256, 256), 255.0), r"\[0, 1\]"),
    (torch.full((1, 3, 256, 256), -1.0), r"\[0, 1\]"),
])
def test_bad_images_are_rejected(tiny, images, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(images)


def test_bad_max_batch_and_bad_sizes_are_rejected(tiny):
    with pytest.raises(ValueError, match="max_batch"):
        tiny.decode_raw(IO["tokens"], max_batch=0)
    with pytest.raises(ValueError, match="z_channels"):
        MaskGITVQGAN(z_channels=128, embedding_dim=256)
    with pytest.raises(ValueError, match="multiple of 32"):
        MaskGITVQGAN(hidden_channels=48)
    with pytest.raises(ValueError, match="decoder_encoder_config"):
        MaskGITVQGAN.from_config_dict({"quantizer": CONFIG["quantizer"]})
