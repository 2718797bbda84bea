"""FID Inception port vs tests/fixtures/inception (made with pytorch-fid 0.3.0 and torch-fidelity
0.4.0 on seeded recipe weights): key layout, strict loading, pre-processing, golden features."""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluations import inception as I
from evaluations.inception import FIDInception, InceptionWeightsError
from softcfg_patch.checkpoint import CheckpointError, read_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEYS = json.loads((FIXTURES / "inception" / "keys_fid_inception.json").read_text())
RECIPE = json.loads((FIXTURES / "inception" / "weights_recipe.json").read_text())


def recipe_state_dict() -> dict[str, torch.Tensor]:
    """The golden weights, rebuilt from the recipe in weights_recipe.json (float64 draws, sorted keys)."""
    g = torch.Generator(device="cpu").manual_seed(RECIPE["seed"])
    state = {}
    for key in sorted(KEYS["keys"]):
        shape = KEYS["keys"][key]["shape"]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.int64)
            continue
        if key.endswith("bn.running_var"):
            state[key] = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(torch.float32)
            continue
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        if key.endswith("conv.weight"):
            r = r * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        elif key == "fc.weight":
            r = r * math.sqrt(1.0 / 2048)
        elif key.endswith("bn.weight"):
            r = r * 0.1 + 1.0
        else:  # bn.bias, bn.running_mean, fc.bias
            r = r * 0.1
        state[key] = r.to(torch.float32)
    return state


def _sha(state: dict, skip_counters: bool) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        if not (skip_counters and key.endswith("num_batches_tracked")):
            h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def recipe() -> dict[str, torch.Tensor]:
    return recipe_state_dict()


@pytest.fixture(scope="module")
def model(recipe) -> FIDInception:
    net = FIDInception(weights=None)
    net.load_state_dict(recipe, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def golden() -> tuple[torch.Tensor, dict]:
    return (load_file(FIXTURES / "inception" / "inputs.safetensors")["images"],
            load_file(FIXTURES / "inception" / "expected_outputs.safetensors"))


def _with_modes(model: FIDInception, resize: str = "tf1", normalize: str = "adm",
                dtype: torch.dtype = torch.float32) -> FIDInception:
    """A copy of the shared model in another pre-processing mode / dtype (saves rebuilding it)."""
    net = copy.deepcopy(model).to(dtype)
    net.resize, net.normalize = resize, normalize
    return net


def test_recipe_weights_match_golden_hashes(recipe):
    bad = [k for k, digest in RECIPE["per_key_sha256"].items()
           if hashlib.sha256(recipe[k].contiguous().numpy().tobytes()).hexdigest() != digest]
    assert bad == []
    assert _sha(recipe, skip_counters=False) == RECIPE["sha256_all_566_keys"]
    assert _sha(recipe, skip_counters=True) == RECIPE["sha256_472_float_keys"]
    assert recipe[RECIPE["first_key"]][:4].tolist() == RECIPE["first_key_first4"]


def test_state_dict_layout_equals_published_port():
    state = FIDInception(weights=None).state_dict()
    assert list(state) == list(KEYS["keys"])  # names and registration order
    for key, meta in KEYS["keys"].items():
        assert list(state[key].shape) == meta["shape"] and str(state[key].dtype) == f"torch.{meta['dtype']}", key
    model = FIDInception(weights=None)
    assert sum(p.numel() for p in model.parameters()) == KEYS["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == KEYS["num_buffer_elements"]
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_strict_loading_of_both_published_layouts(recipe, tmp_path):
    floats_only = {k: v for k, v in recipe.items() if not k.endswith("num_batches_tracked")}
    torch.save(recipe, tmp_path / "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid style
    torch.save(floats_only, tmp_path / "weights-inception-2015-12-05-6726825d.pth")  # torch-fidelity: 472 keys
    save_file(floats_only, str(tmp_path / "inception.safetensors"))
    for name in ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth",
                 "inception.safetensors"):
        model = FIDInception(weights=tmp_path / name)
        assert model.identity() == RECIPE["sha256_472_float_keys"], name
        assert not model.training and model.weights_path == tmp_path / name


def test_loading_rejects_wrong_files(recipe, tmp_path):
    model = FIDInception(weights=None)
    with pytest.raises(InceptionWeightsError, match=r"missing keys: fc\.bias"):
        I.load_state_dict_strict(model, {k: v for k, v in recipe.items() if k != "fc.bias"})
    with pytest.raises(InceptionWeightsError, match=r"unexpected keys: AuxLogits\.fc\.weight"):
        I.load_state_dict_strict(model, {**recipe, "AuxLogits.fc.weight": torch.zeros(1000, 768)})
    with pytest.raises(InceptionWeightsError, match=r"shape mismatches: fc\.weight: file \(1000, 2048\)"):
        I.load_state_dict_strict(model, {**recipe, "fc.weight": torch.zeros(1000, 2048)})
    (tmp_path / "html.pth").write_text("<html>404</html>")  # a failed download
    with pytest.raises(InceptionWeightsError, match="it looks like an HTML page") as err:
        FIDInception(weights=tmp_path / "html.pth")
    assert "html.pth" in str(err.value) and "pt_inception-2015-12-05-6726825d.pth" in str(err.value)
    torch.save({"fc.weight": torch.zeros(2), "obj": _Evil()}, tmp_path / "code.pth")
    with pytest.raises(InceptionWeightsError, match="could not read"):  # weights_only refuses arbitrary objects
        FIDInception(weights=tmp_path / "code.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("should never run",))


def _assert_explains_the_pickle_refusal(text: str, path: Path) -> None:
    """Our own whole sentence, not torch's cut in half: why, what is accepted, how to convert."""
    assert str(path) in text and "\n" not in text and "\x1b" not in text, text
    assert "holds pickled objects" in text and "(it needs 'print', which" in text  # the refused global
    assert "can run arbitrary code" in text and "safetensors" in text and "weights_only=True" in text
    assert "only if you trust" in text and ".state_dict()" in text
    assert "In PyTorch 2.6" not in text and "`False` to `True`" not in text and "two options" not in text


def test_a_full_pickle_is_refused_with_our_own_explanation(tmp_path):
    torch.save({"fc.weight": torch.zeros(2), "obj": _Evil()}, tmp_path / "code.pth")
    with pytest.raises(InceptionWeightsError) as err:  # the Inception loader
        FIDInception(weights=tmp_path / "code.pth")
    _assert_explains_the_pickle_refusal(str(err.value), tmp_path / "code.pth")
    assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value)
    torch.save({"x": torch.zeros(1), "obj": _Evil()}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as err:  # the generic loader every model uses; the legacy format too
        read_state_dict(tmp_path / "old.bin", what="test generator", source="https://example.org/weights")
    _assert_explains_the_pickle_refusal(str(err.value), tmp_path / "old.bin")
    assert str(err.value).startswith("could not read test generator checkpoint") and "example.org" in str(err.value)


def test_a_file_that_is_no_checkpoint_quotes_no_half_sentence_of_torch(tmp_path):
    (tmp_path / "noise.pth").write_bytes(b"\x80\x02not a checkpoint" * 50)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "noise.pth", what="test generator", source="https://example.org/weights")
    text = str(err.value)
    assert "could not read test generator checkpoint" in text and "download it again" in text
    assert "In PyTorch 2.6" not in text and "`False` to `True`" not in text and "\n" not in text, text


def test_missing_weights_names_the_published_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        FIDInception(weights=tmp_path / "nope.pth")
    text = str(err.value)
    for needle in ("nope.pth", "pt_inception-2015-12-05-6726825d.pth", "mseitzer/pytorch-fid/releases",
                   "weights-inception-2015-12-05-6726825d.pth", "SOFTCFG_INCEPTION_WEIGHTS", "--inception-weights"):
        assert needle in text
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setenv(I.WEIGHTS_ENV, str(tmp_path / "w.pth"))
    assert I.find_weights() == tmp_path / "w.pth"
    monkeypatch.setenv(I.WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        I.find_weights()


def test_preprocessing_reproduces_net_input_exactly(model, golden):
    images, expected = golden
    for mode, kwargs in {"tf1": {}, "ptfid": dict(resize="torch", normalize="pytorch_fid")}.items():
        x = _with_modes(model, **kwargs).preprocess(images[:1])
        assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
        diff = (x[0] - expected[f"{mode}.fp32.net_input_img0"]).abs().max().item()
        # ours is bit-exact; torch's own bilinear kernel moves 1 ulp with the thread count
        assert diff == 0 if mode == "tf1" else diff <= 1e-6, (mode, diff)
    # TF1's resize is the identity at 299: only the (x - 128) / 128 map remains
    img = torch.randint(0, 256, (1, 299, 299, 3), dtype=torch.uint8)
    expected_identity = (img.permute(0, 3, 1, 2).float() - 128) / 128
    assert torch.equal(model.preprocess(img), expected_identity)


def _check_features(out: dict, expected: dict, prefix: str, atol: float, rows=slice(None)) -> None:
    for name, key in (("pool", "pool"), ("spatial", "spatial"), ("logits", "logits_unbiased")):
        got, exp = out[name].double(), expected[f"{prefix}.{key}"][rows].double()
        assert got.shape == exp.shape, name
        assert (got - exp).abs().max().item() <= atol, (prefix, name, (got - exp).abs().max().item())


def test_golden_features_tf1_float64(model, golden):
    images, expected = golden
    net = _with_modes(model, dtype=torch.float64)
    rows = [0, 3]  # noise and hard-edged tiles: where the TF1 resize differs most from torch's
    with torch.inference_mode():
        out = net(images[rows])
        biased = out["pool"] @ net.fc.weight.t() + net.fc.bias  # the fc bias came through the loader too
    _check_features(out, expected, "tf1.fp64", atol=1e-9, rows=rows)
    assert (biased - expected["tf1.fp64.logits"][rows]).abs().max().item() <= 1e-9


def test_golden_features_tf1_float32_default_path(model, golden):
    images, expected = golden
    with torch.inference_mode():
        out = model(images[1:3].numpy())  # numpy input, as the evaluator passes it
    assert all(v.dtype == torch.float32 for v in out.values())
    _check_features(out, expected, "tf1.fp32", atol=1e-4, rows=slice(1, 3))


def test_golden_features_pytorch_fid_mode(model, golden):
    images, expected = golden
    net = _with_modes(model, resize="torch", normalize="pytorch_fid")
    with torch.inference_mode():
        out = net(images[:1])
    _check_features(out, expected, "ptfid.fp32", atol=1e-4, rows=slice(0, 1))
    tf1 = expected["tf1.fp32.pool"][:1]  # and the mode matters: far more than the tolerance
    assert (out["pool"] - tf1).abs().max().item() > 1e-2


def test_spatial_layout_matches_adm_order():
    data = np.load(FIXTURES / "evaluator" / "evaluator_golden.npz")
    got = I.spatial_features(torch.from_numpy(data["layout_nchw"]))
    assert np.array_equal(got.numpy(), data["layout_expected"])


def test_bad_images_and_options_are_explained(model):
    with pytest.raises(ValueError, match="uint8"):
        model(torch.rand(1, 64, 64, 3))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(1, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="numpy array or tensor"):
        model([[0]])
    with pytest.raises(ValueError, match="resize must be one of"):
        FIDInception(weights=None, resize="bicubic")
    with pytest.raises(ValueError, match="normalize must be one of"):
        FIDInception(weights=None, normalize="imagenet")
