"""The embedded digits demo: shipped weights, a --quick run, and the metric helpers
checked against independent computations."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import softcfg_patch as sp
from softcfg_patch.guidance import runs_cfg, runs_softcfg
from demo import digits, run
from evaluations.metrics import frechet_distance, statistics


# The weights were trained and the reference run recorded with one thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg():
    return digits.load_config()


@pytest.fixture(scope="module")
def split(cfg):
    return digits.load_split(cfg)


@pytest.fixture(scope="module")
def shipped(cfg):
    return digits.load_generator(cfg), digits.load_classifier(cfg)


@pytest.fixture(scope="module")
def recorded():
    return json.loads((digits.WEIGHTS_DIR / digits.REFERENCE_FILE).read_text())


# -- data and model --------------------------------------------------------------------

def test_split_is_stratified_disjoint_and_tokenised(split):
    n_train, n_test = len(split.train_labels), len(split.test_labels)
    assert (n_train, n_test) == (1437, 360)  # 1,797 digits, 20 % held out
    assert split.train_tokens.shape == (n_train, 64) and split.train_tokens.dtype == torch.long
    for tokens in (split.train_tokens, split.test_tokens):
        assert tokens.min() == 0 and tokens.max() == digits.NUM_LEVELS - 1
    # Stratified: each class holds out 20 % of its images, up to rounding.
    per_class = torch.bincount(torch.cat([split.train_labels, split.test_labels]))
    held_out = torch.bincount(split.test_labels)
    assert (held_out.double() - 0.2 * per_class.double()).abs().max() < 1
    # Disjoint: together the two splits are exactly the 1,797 digits, each once.
    from sklearn.datasets import load_digits
    every = sorted(map(tuple, np.rint(load_digits().data).astype(int).tolist()))
    both = sorted(map(tuple, torch.cat([split.train_tokens, split.test_tokens]).tolist()))
    assert both == every


def test_config_matches_the_brief(cfg, shipped):
    model, _ = shipped
    assert model.vocab_size == 17 and model.num_classes == 10 and model.num_image_tokens == 64
    gen = cfg.model.generator
    assert (gen.rope_prefix_len, gen.rope_grid_size) == (0, 8)
    assert 0.1 <= gen.class_label_dropout <= 0.2
    size = (digits.WEIGHTS_DIR / digits.GENERATOR_FILE).stat().st_size
    assert size < 5 * 2**20


def test_label_dropout_rate_and_ids(shipped):
    model, _ = shipped
    labels = torch.arange(10).repeat(2000)
    ids = digits.drop_labels(model, labels, 0.15, torch.Generator().manual_seed(0))
    dropped = ids == model.none_condition_id
    assert abs(dropped.double().mean().item() - 0.15) < 0.01
    assert torch.equal(ids[~dropped], labels[~dropped] + model.vocab_size + 1)


def test_training_is_deterministic_and_learns(cfg, split):
    """Two short runs from the same seed give identical weights, and the loss drops."""
    small = OmegaConf.merge(cfg, {"train": {"epochs": 1, "warmup_steps": 2}})  # a copy
    sub = digits.DigitsSplit(split.train_tokens[:128], split.train_labels[:128],
                             split.test_tokens, split.test_labels)
    torch.manual_seed(small.train.seed)
    untrained = digits.build_generator(small).eval()
    a = digits.train_generator(small, sub, progress=False)
    b = digits.train_generator(small, sub, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    before = digits.heldout_bits_per_pixel(untrained, sub.train_tokens, sub.train_labels)
    after = digits.heldout_bits_per_pixel(a, sub.train_tokens, sub.train_labels)
    assert after < before - 0.1


# -- the shipped weights reproduce the recorded reference run -------------------------------

def test_shipped_weights_reproduce_recorded_numbers(split, shipped, recorded):
    model, clf = shipped
    now = digits.reference_check(model, clf, split)
    # Deterministic forward passes: held-out likelihood and classifier accuracy match closely.
    assert now["heldout_bits_per_pixel"] == pytest.approx(recorded["heldout_bits_per_pixel"], abs=1e-4)
    assert now["heldout_bits_per_pixel_uncond"] == pytest.approx(
        recorded["heldout_bits_per_pixel_uncond"], abs=1e-4)
    assert now["classifier_test_accuracy"] == pytest.approx(recorded["classifier_test_accuracy"], abs=1e-9)
    # Sampling: the same tokens on the same machine; allow a few flipped samples elsewhere.
    for key in ("cfg_sample_accuracy", "softcfg_sample_accuracy"):
        assert now[key] == pytest.approx(recorded[key], abs=0.05), key
    # The trained model is a real model: far better than uniform (log2 17 = 4.09 bits),
    # the class condition helps, and guided samples are recognised.
    assert now["heldout_bits_per_pixel"] < 2.0
    assert now["heldout_bits_per_pixel"] < now["heldout_bits_per_pixel_uncond"]
    assert now["cfg_sample_accuracy"] > 0.8 and now["classifier_test_accuracy"] > 0.9


def test_sampling_goes_through_generate_and_respects_seed(shipped):
    model, _ = shipped
    labels = digits.class_labels(2)
    guidance = digits.reference_guidances()["softcfg"]
    a = digits.sample(model, labels, guidance, seed=7, batch_size=8)
    b = digits.sample(model, labels, guidance, seed=7, batch_size=8)
    first_chunk = sp.generate(model, labels[:8], guidance, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.shape == (20, 64) and int(a.min()) >= 0 and int(a.max()) < 17
    assert torch.equal(a[:8], first_chunk)  # the demo's samples are softcfg_patch.generate's
    other_seed = digits.sample(model, labels, guidance, seed=8, batch_size=8)
    assert not torch.equal(a, other_seed)


# -- a shortened demo run -----------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_quick")
    result = run.main(["--quick", "--out", str(out), "--scales", "1.5", "5"])
    return out, result


def test_quick_demo_writes_every_output(quick_run):
    out, result = quick_run
    names = [s["setting"] for s in result["settings"]]
    assert names == ["none", "cfg_g1p5", "softcfg_sn_g1p5", "softcfg_nosn_g1p5",
                     "cfg_g5", "softcfg_sn_g5", "softcfg_nosn_g5"]
    bands = set()
    for name in names:
        grid = Image.open(out / f"grid_{name}.png")
        assert grid.size == (4 * (run.CELL + run.GAP) + run.GAP,
                             run.CAPTION_H + 10 * (run.CELL + run.GAP) + run.GAP)
        band = np.asarray(grid)[:run.CAPTION_H]
        assert (band < 128).sum() > 50  # the caption is drawn in the image, dark on white
        bands.add(band.tobytes())
    assert len(bands) == len(names)  # every setting has its own caption
    assert Image.open(out / "grid_softcfg_sn_g5.png").text["Title"] == \
        "SoftCFG (step norm) - scale=5 k=1 alpha=1 seed=0"
    assert Image.open(out / "grid_cfg_g1p5.png").text["Title"] == "CFG - scale=1.5 k=1 seed=0"
    for name in ("comparison.png", "guidance_sweep.png"):
        assert Image.open(out / name).size[0] > 200
    saved = json.loads((out / "results.json").read_text())
    assert saved["samples_per_class"] == 4 and len(saved["settings"]) == 7
    for row in saved["settings"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["frechet"] >= 0 and row["diversity"] > 0
    assert saved["table"].count("\n") == 2 + 7  # header, rule, real row + 7 settings


def test_quick_demo_frechet_intervals(quick_run):
    _, result = quick_run
    rows = {r["setting"]: r for r in result["settings"]}
    assert all(r["frechet_std"] > 0 for r in rows.values()) and result["real_train_split"]["frechet_std"] > 0
    for scale in ("g1p5", "g5"):
        cfg = rows[f"cfg_{scale}"]
        assert "frechet_vs_cfg" not in cfg
        for soft in (rows[f"softcfg_sn_{scale}"], rows[f"softcfg_nosn_{scale}"]):
            d = soft["frechet_vs_cfg"]
            assert d["delta"] == pytest.approx(soft["frechet"] - cfg["frechet"], abs=1e-9)
            assert d["ci_low"] < d["delta"] < d["ci_high"] and 0 <= d["p_value"] <= 1
            # same labels and seed: the paired interval is narrower than the two stds combined
            assert d["std"] < np.hypot(soft["frechet_std"], cfg["frechet_std"])
    line = next(line for line in result["table"].splitlines() if line.startswith("| SoftCFG (step norm) | 5 "))
    d = rows["softcfg_sn_g5"]["frechet_vs_cfg"]
    assert f"| {d['delta']:+.2f} ({d['ci_low']:+.2f} to {d['ci_high']:+.2f}) |" in line


def test_bad_options_exit_2_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for args, message in ((["--scales", "-1"], "--scales must be positive guidance scales, got -1"),
                          (["--scales", "2", "nan"], "--scales must be positive"),
                          (["--scale-pow", "-1"], "--scale-pow must be >= 0"),
                          (["--out", str(tmp_path / "file")], "is a file; give a folder"),
                          (["--out", str(tmp_path / "file" / "sub")], "cannot create the output folder"),
                          (["--samples-per-class", "1"], "at least 2")):
        with pytest.raises(SystemExit) as err:
            run.main(args)
        stderr = capsys.readouterr().err
        assert err.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert message in stderr, (message, stderr)
    assert (tmp_path / "file").read_text() == "x"


def test_bad_configs_exit_2_in_one_line(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "tag.yaml").write_text(f'demo: !!python/object/apply:os.system ["touch {marker}"]\n')
    (tmp_path / "broken.yaml").write_text("demo: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "partial.yaml").write_text(OmegaConf.to_yaml({**OmegaConf.to_container(digits.load_config()),
                                                              "demo": {"seed": 0}}))
    monkeypatch.chdir(tmp_path)  # a relative path is looked up here, then in the repository
    for config, message in (
            ("missing.yaml", "config file not found: missing.yaml (looked in "),
            ("tag.yaml", "line 1: the YAML tag '!!python/object/apply:os.system' is not allowed"),
            ("broken.yaml", "is not valid YAML"),
            ("list.yaml", "holds a list, not a digits demo config"),
            ("configs/rar_b.yaml", "is not a digits demo config (it has no data, train, classifier or demo section); "
                                   "it is a RAR sampler config: use rar/sample_imagenet.py"),
            ("configs/alitok_xl.yaml", "it is an AliTok sampler config: use alitok/sample_imagenet.py"),
            ("partial.yaml", "lacks demo.samples_per_class, demo.guidance_scales")):
        with pytest.raises(SystemExit) as err:
            run.main(["--quick", "--config", config, "--out", str(tmp_path / "out")])
        stderr = capsys.readouterr().err
        assert err.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert message in stderr and "configs/digits.yaml" in stderr, (message, stderr)
    assert not marker.exists()  # the python tag was never executed
    assert not (tmp_path / "out").exists()  # refused before any output


def test_missing_or_broken_weights_exit_2_in_one_line(cfg, tmp_path, capsys, monkeypatch):
    load_generator = digits.load_generator  # the shared checkpoint loader's errors, as elsewhere
    monkeypatch.setattr(digits, "load_generator", lambda cfg, weights_dir=tmp_path: load_generator(cfg, weights_dir))
    for content, message in ((None, "digits generator checkpoint not found"),
                             (b"version https://git-lfs.github.com/spec/v1\n", "could not read digits generator")):
        if content is not None:
            (tmp_path / digits.GENERATOR_FILE).write_bytes(content)  # e.g. a Git LFS pointer
        with pytest.raises(SystemExit) as err:
            run.main(["--quick", "--out", str(tmp_path / "out")])
        stderr = capsys.readouterr().err
        assert err.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert message in stderr and "demo/weights/" in stderr, stderr


@pytest.mark.e2e
def test_quick_demo_is_deterministic(quick_run, tmp_path):
    _, first = quick_run
    second = run.main(["--quick", "--out", str(tmp_path), "--scales", "1.5", "5"])
    assert first["settings"] == second["settings"]


def test_settings_grid():
    cfg = digits.load_config()
    settings = run.build_settings(cfg.demo, [1.5, 3.0])
    assert [s.method for s in settings] == ["none"] + ["cfg", "softcfg", "softcfg_nosn"] * 2
    none = settings[0].guidance
    assert not runs_cfg(none)
    for s in settings[1:]:
        assert s.guidance.guidance_scale == s.scale
        assert runs_softcfg(s.guidance) == (s.method != "cfg")
        if s.method != "cfg":
            assert s.guidance.step_norm == (s.method == "softcfg")


# -- metric helpers vs independent computations -------------------------------------------

def test_diversity_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    x = rng.random((30, 64))
    labels = np.repeat(np.arange(10), 3)
    expected = []
    for c in range(10):
        rows = x[labels == c]
        d = [np.sqrt(np.sum((rows[i] - rows[j]) ** 2)) for i, j in itertools.combinations(range(3), 2)]
        expected.append(np.mean(d))
    np.testing.assert_allclose(run.per_class_diversity(x, labels), expected, rtol=1e-10)
    assert run.mean_pairwise_distance(np.zeros((4, 5))) == 0.0


def test_class_accuracy_matches_manual_count():
    predicted = np.array([0, 1, 2, 3, 3, 5, 6, 0, 8, 1])
    labels = np.arange(10)
    hits = 0
    for p, y in zip(predicted, labels):
        hits += int(p == y)
    assert run.class_accuracy(predicted, labels) == hits / 10 == 0.7
    assert digits.accuracy(torch.from_numpy(predicted), torch.from_numpy(labels)) == 0.7


def test_evaluating_the_reference_against_itself(split, shipped):
    """Identical sets: Frechet distance ~0, precision = recall = 1, diversity ratio 1."""
    _, clf = shipped
    ref = run.make_reference(clf, split.test_tokens, split.test_labels)
    same = run.evaluate(clf, split.test_tokens, split.test_labels, ref)
    assert abs(same["frechet"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["diversity"] == pytest.approx(1.0, abs=1e-12)
    assert same["accuracy"] == pytest.approx(
        (digits.predict(clf, split.test_tokens) == split.test_labels).double().mean().item())


def test_frechet_against_closed_form_for_gaussians():
    """Diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    ref = run.Reference(mu2, np.diag(s2), np.zeros((4, 3)), np.ones(10))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert run.frechet(mu1, np.diag(s1), ref) == pytest.approx(expected, rel=1e-9)
    feats = np.random.default_rng(1).normal(size=(200, 3))
    mu, sigma = statistics(feats)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float32), rowvar=False), rtol=1e-6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_digit_tiles_render_ink_dark_and_upscaled():
    tokens = torch.zeros(1, 64, dtype=torch.long)
    tokens[0, 8 * 2 + 5] = 16  # row 2, column 5: full ink
    tile = run.digit_tiles(tokens)[0]
    k = run.CELL // 8
    assert tile.shape == (run.CELL, run.CELL)
    assert (tile[2 * k:3 * k, 5 * k:6 * k] == 0).all()
    assert tile.sum() == 255 * (run.CELL ** 2 - k * k)  # everything else is white


def test_precision_recall_matches_brute_force_knn():
    """Mode collapse: samples clumped around a few real points, plus a few far off. Precision
    and recall then differ a lot, and both equal a brute-force k = 3 nearest-neighbour count
    (radius = distance to the 3rd neighbour)."""
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 4))
    clumps = np.repeat(real[:3], 8, axis=0) + 0.01 * rng.normal(size=(24, 4))
    samples = np.concatenate([clumps, rng.normal(6, 0.1, (6, 4))])

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, 3]  # column 0 is the point itself

    def inside(points, centres, r):
        d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
        return (d <= r[None]).any(1)

    precision = inside(samples, real, radii(real)).mean()
    recall = inside(real, samples, radii(samples)).mean()
    got = run.manifold_precision_recall(real, samples)
    assert got == pytest.approx((precision, recall), abs=1 / 60 + 1e-9)  # fp16 distances: ties may flip
    assert precision == pytest.approx(0.8) and recall < 0.2  # swapped arguments would fail
