"""The AliTok tokenizer against the upstream golden vectors (tiny sizes) and the full-size
key list of the official AliTok.pth; plus the safe loader's errors and input checks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from alitok.tokenizer import AliTokTokenizer, load_tokenizer, sizes_from_config_dict
from softcfg_patch.layers import unit_to_uint8_hwc as to_uint8_hwc
from conftest import FIXTURES, load_golden
from softcfg_patch.run import registry

IO = load_golden("alitok_tokenizer_tiny_io.safetensors")
WEIGHTS = load_golden("alitok_tokenizer_tiny_weights.safetensors")
CONFIG = json.loads((FIXTURES / "alitok_tokenizer_tiny_config.json").read_text())
TINY = sizes_from_config_dict(CONFIG)
# where the file is published: the registry's text, which the runner hands every loader
SOURCE = registry.get("alitok").source("experiment.tokenizer_checkpoint")
# uint8 conversion truncates, so a 1-ulp difference in float32 can flip a pixel that sits on an
# integer boundary (an fp64 run of the same model flips 2). Allow |diff| <= 1 on a handful.
MAX_FLIPPED_PIXELS = 8


@pytest.fixture(scope="module")
def tiny() -> AliTokTokenizer:
    model = AliTokTokenizer.from_config_dict(CONFIG).eval()
    model.load_state_dict(WEIGHTS, strict=True)
    return model


def assert_uint8_close(ours: torch.Tensor, golden: torch.Tensor) -> None:
    assert ours.dtype == torch.uint8 and ours.shape == golden.shape
    diff = (ours.int() - golden.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).sum() <= MAX_FLIPPED_PIXELS


# ------------------------------------------------------------------ architecture
def test_full_size_keys_shapes_and_counts_equal_official_checkpoint():
    spec = json.loads((FIXTURES / "keys_alitok_tokenizer.json").read_text())
    with torch.device("meta"):
        model = AliTokTokenizer()
    state = model.state_dict()
    assert list(state) == list(spec["keys"])  # same names, same order
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in spec["keys"].items()}
    assert len(state) == spec["num_keys"] == 456
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"] == 389_899_308
    assert sum(p.numel() for p in model.decoder.parameters()) == spec["num_parameters_decoder"]
    assert sum(p.numel() for p in model.encoder.parameters()) == spec["num_parameters_encoder"]
    # the rest: the encoder's learned latent tokens (273 x 768) and the codebook (4096 x 32)
    rest = spec["num_parameters"] - spec["num_parameters_encoder"] - spec["num_parameters_decoder"]
    assert rest == model.latent_tokens.numel() + model.quantize.embedding.weight.numel() == 273 * 768 + 4096 * 32


def test_tiny_weights_load_strictly_with_tiny_config():
    model = AliTokTokenizer.from_config_dict(CONFIG)
    assert set(model.state_dict()) == set(WEIGHTS) and len(WEIGHTS) == 60
    assert not model.load_state_dict(WEIGHTS, strict=True).missing_keys
    assert model.num_latent_tokens == 273


def test_config_dict_inconsistency_is_rejected():
    bad = json.loads(json.dumps(CONFIG))
    bad["quantizer"]["token_size"] = 16
    with pytest.raises(ValueError, match="token_size"):
        AliTokTokenizer.from_config_dict(bad)
    bad = json.loads(json.dumps(CONFIG))
    bad["quantizer"]["use_l2_norm"] = True
    with pytest.raises(ValueError, match="use_l2_norm"):
        AliTokTokenizer.from_config_dict(bad)


# ------------------------------------------------------------------ golden numerics
def test_codebook_lookup_equals_golden_decoder_input(tiny):
    torch.testing.assert_close(tiny.tokens_to_latents(IO["tokens"]), IO["z_quantized"], atol=0, rtol=0)
    # a [B, 1, 273] input is squeezed
    torch.testing.assert_close(tiny.tokens_to_latents(IO["tokens"][:, None]), IO["z_quantized"], atol=0, rtol=0)


def test_decode_equals_golden_image_and_ln_post(tiny):
    seen = {}
    hook = tiny.decoder.ln_post.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    try:
        image = tiny.decode_tokens(IO["tokens"])
    finally:
        hook.remove()
    torch.testing.assert_close(seen["out"], IO["ln_post_out"], atol=1e-5, rtol=1e-5)
    assert image.shape == (2, 3, 256, 256) and image.dtype == torch.float32
    torch.testing.assert_close(image, IO["image"], atol=1e-5, rtol=0)
    assert_uint8_close(to_uint8_hwc(image), IO["image_uint8_hwc"])


def test_uint8_rule_is_exact_on_golden_image():
    assert torch.equal(to_uint8_hwc(IO["image"]), IO["image_uint8_hwc"])
    # truncation, not rounding; out-of-range values clamp
    x = torch.tensor([-0.5, 0.0, 0.999, 254.9 / 255, 1.0, 7.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8_hwc(x)[0, 0, :, 0].tolist() == [0, 0, 254, 254, 255, 255]
    assert to_uint8_hwc(x.bfloat16()).dtype == torch.uint8


def test_encode_of_golden_image_is_exact(tiny):
    tokens = tiny.encode(IO["image"])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 273)
    assert torch.equal(tokens, IO["encode_indices_of_image"])


def test_sample_fn_tokens_decode_to_golden_uint8(tiny):
    assert_uint8_close(to_uint8_hwc(tiny.decode_tokens(IO["run1_tokens"])), IO["run1_sample_fn_uint8_hwc"])


def test_decode_and_encode_do_not_depend_on_batching(tiny):
    torch.testing.assert_close(tiny.decode_tokens(IO["tokens"], max_batch=1), tiny.decode_tokens(IO["tokens"]),
                               atol=1e-6, rtol=0)
    assert torch.equal(tiny.encode(IO["image"], max_batch=1), IO["encode_indices_of_image"])


# ------------------------------------------------------------------ input checks
def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"\[B, 273\]"):
        tiny.decode_tokens(IO["tokens"][:, :256])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode_tokens(IO["tokens"] + 64)
    with pytest.raises(ValueError, match="integer"):
        tiny.decode_tokens(IO["tokens"].float())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny.encode(IO["image"] * 255)
    with pytest.raises(ValueError, match="255"):
        tiny.encode(IO["image_uint8_hwc"].permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="NCHW"):
        tiny.encode(IO["image"][:, :, :128])


# ------------------------------------------------------------------ loader
def test_load_tokenizer_reads_safetensors_and_wrapped_pth(tmp_path):
    model = load_tokenizer(FIXTURES / "alitok_tokenizer_tiny_weights.safetensors", **TINY)
    assert torch.equal(model.quantize.embedding.weight, WEIGHTS["quantize.embedding.weight"])
    wrapped = tmp_path / "AliTok.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in WEIGHTS.items()}}, wrapped)
    model = load_tokenizer(wrapped, **TINY).eval()
    torch.testing.assert_close(model.decode_tokens(IO["tokens"]), IO["image"], atol=1e-5, rtol=0)
    half = tmp_path / "half.safetensors"  # a reduced-precision file still gives a float32 model
    save_file({k: v.half() for k, v in WEIGHTS.items()}, str(half))
    model = load_tokenizer(half, **TINY)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.latent_tokens, WEIGHTS["latent_tokens"].half().float())


def test_missing_file_names_it_and_the_official_source(tmp_path):
    path = tmp_path / "weights" / "AliTok.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(path, source=SOURCE)
    assert str(path) in str(err.value)
    assert "ali-vilab/alitok" in str(err.value) and "AliTok.pth" in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".safetensors":
        save_file(WEIGHTS, str(whole))
    else:
        torch.save(WEIGHTS, whole)
    cut = tmp_path / f"AliTok_cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        load_tokenizer(cut, source=SOURCE, **TINY)
    message = str(err.value)
    assert str(cut) in message and "truncated" in message and "ali-vilab/alitok" in message


class _NotATensor:  # a pickled object that weights_only loading must refuse
    pass


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"latent_tokens": _NotATensor()}, path)
    with pytest.raises(ValueError, match="could not read"):
        load_tokenizer(path, **TINY)


def test_wrong_model_weights_list_missing_and_unexpected_keys():
    rar = FIXTURES / "rar_tiny_weights.safetensors"
    with pytest.raises(ValueError) as err:
        load_tokenizer(rar, source=SOURCE, **TINY)
    message = str(err.value)
    assert str(rar) in message and "AliTok tokenizer" in message
    assert "missing keys" in message and "unexpected keys" in message
    assert "decoder.class_embedding" in message or "encoder." in message
    assert "encoder width 64, depth 1, 4 heads" in message  # the expected architecture
    assert "ali-vilab/alitok" in message


def test_wrong_sizes_list_shape_mismatches():
    with pytest.raises(ValueError) as err:
        load_tokenizer(FIXTURES / "alitok_tokenizer_tiny_weights.safetensors", **{**TINY, "codebook_size": 128})
    message = str(err.value)
    assert "shape mismatches" in message and "quantize.embedding.weight" in message
    assert "(64, 8)" in message and "(128, 8)" in message


def test_unknown_size_argument_lists_valid_ones():
    with pytest.raises(TypeError, match="decoder_width"):
        load_tokenizer(FIXTURES / "alitok_tokenizer_tiny_weights.safetensors", width=64)
