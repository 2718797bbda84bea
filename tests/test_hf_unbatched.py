"""SoftCFGUnbatchedLogitsProcessor (softcfg_patch.hf.unbatched) and scripts/t2i_emu3.py.

Tiny random Llama (MHA), Emu3 (GQA, full Emu3ForConditionalGeneration) and Chameleon
(GQA) built in process; nothing is downloaded. The reference for the guided logits is
our batched driver (softcfg_patch.hf.generate), both teacher-forced on the same tokens.
"""
from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("softcfg_patch.hf")  # also skips on transformers < 5.22

from transformers import (  # noqa: E402
    AutoModelForCausalLM, ChameleonConfig, ChameleonForConditionalGeneration, LlamaConfig,
    LogitsProcessor,
)
from transformers.generation.logits_process import (  # noqa: E402
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)

from softcfg_patch import Guidance  # noqa: E402
from softcfg_patch.guidance import guidance_schedule  # noqa: E402
from softcfg_patch.hf import SoftCFGUnbatchedLogitsProcessor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
EOL = 9  # a "structural" token (end-of-line) in the forced sequences


def load_script():
    spec = importlib.util.spec_from_file_location("t2i_emu3", REPO / "scripts" / "t2i_emu3.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


t2i_emu3 = load_script()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    torch.manual_seed(0)
    if kind == "llama":  # MHA
        return AutoModelForCausalLM.from_config(LlamaConfig(num_key_value_heads=4, **common)).eval()
    if kind == "chameleon":  # GQA; its forward masks the image-token logits to finfo.min
        vq = dict(embed_dim=4, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1],
                  num_res_blocks=1, attn_resolutions=[])
        vocabulary_map = {"<image>": 3, **{f"IMGIMG{c}Z": 40 + i for i, c in enumerate("ABCD")}}
        config = ChameleonConfig(num_key_value_heads=2, vq_config=vq,
                                 vocabulary_map=vocabulary_map, **common)
        return ChameleonForConditionalGeneration(config).eval()
    return t2i_emu3.tiny_emu3()[0]  # Emu3ForConditionalGeneration, GQA


COND = torch.tensor([[1, 10, 11, 12, 13], [1, 14, 15, 16, 17]])
UNCOND = {"rows": torch.tensor([[1, 20, 21], [1, 22, 23]]),
          "one": torch.tensor([[1, 20, 21]]),
          "none": None}


class Force(LogitsProcessor):
    """Teacher forcing: only tokens[:, t] stays finite at the t-th call."""

    def __init__(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, self.tokens[:, t:t + 1].to(scores.device), 0.0)


def forced_tokens(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(24, 40, (rows, n), generator=torch.Generator().manual_seed(seed))
    tokens[:, 2::3] = EOL  # structural tokens at some steps
    tokens[-1, 2] = 30  # ... and not at the same steps in every row
    return tokens


def unbatched_forced(model, guidance, uncond, tokens, copies=1, use_cache=True, tell_length=True):
    """Per-step log_softmax(guided / T) of the unbatched processor in stock generate, forced."""
    seen = []
    processor = SoftCFGUnbatchedLogitsProcessor(
        guidance, model, unconditional_ids=uncond, use_cache=use_cache,
        max_new_tokens=tokens.shape[1] if tell_length else None, structural_token_ids=[EOL],
        on_step=lambda t, c, u, guided, x, cache: seen.append(guided.clone()))
    # sampling (num_return_sequences needs it) from one finite token: the forced one
    out = model.generate(input_ids=COND, attention_mask=torch.ones_like(COND), do_sample=True,
                         temperature=guidance.randomize_temperature,
                         max_new_tokens=tokens.shape[1], num_return_sequences=copies,
                         logits_processor=[processor, Force(tokens, COND.shape[1])],
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[:, COND.shape[1]:], tokens)
    return [torch.log_softmax(g / guidance.randomize_temperature, -1) for g in seen]


def batched_forced(model, guidance, uncond, tokens, copies=1):
    """The same from our batched driver (hf.generate), forced through its logits_processor hook."""
    cond = COND.repeat_interleave(copies, 0)
    if uncond is None:
        uncond = cond[:, -1:]  # transformers' default: each row's last prompt token
    elif uncond.shape[0] == COND.shape[0]:
        uncond = uncond.repeat_interleave(copies, 0)  # one per prompt: follows its copies
    seen = []

    def hook(t, c, u, guided, x, cache):
        scale = guidance_schedule(t, tokens.shape[1], guidance.guidance_scale,
                                  guidance.guidance_scale_pow)
        seen.append(torch.log_softmax((u + (c - u) * scale) / guidance.randomize_temperature, -1))

    out = hf.generate(model, cond, uncond, guidance, tokens.shape[1], structural_token_ids=[EOL],
                      on_step=hook, logits_processor=Force(tokens, cond.shape[1]))
    assert torch.equal(out, tokens)
    return seen


def assert_same_steps(got, want, atol=1e-4):
    assert len(got) == len(want)
    for t, (a, b) in enumerate(zip(got, want)):
        finite = torch.isfinite(b) & (b > -1e30)  # Chameleon's masked image tokens: both ~ -inf
        assert torch.equal(finite, torch.isfinite(a) & (a > -1e30)), t
        torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=0, msg=f"step {t}")


# --------------------------------------------------------------- parity tests

@pytest.mark.parametrize("kind,layout", [("llama", "one"), ("emu3", "rows"), ("chameleon", "none")])
def test_strength_zero_gives_transformers_tokens(kind, layout):
    """softcfg_strength=0: same tokens as transformers' unbatched processor in stock generate."""
    model = tiny(kind)
    cond = COND[:1] if layout == "one" else COND  # layouts transformers' own processor handles
    uncond = UNCOND[layout]
    runs = []
    for processor in (UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model, uncond),
                      SoftCFGUnbatchedLogitsProcessor(Guidance(guidance_scale=3.0,
                                                               guidance_scale_pow=0.0), model,
                                                      uncond)):
        torch.manual_seed(7)
        runs.append(model.generate(input_ids=cond, attention_mask=torch.ones_like(cond),
                                   do_sample=True, max_new_tokens=12, eos_token_id=None,
                                   pad_token_id=0, logits_processor=[processor]))
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0][0, cond.shape[1]:].tolist())) > 2  # really sampled


PAPER_TEXT = dict(step_norm=False, softcfg_confidence="max", softcfg_align="token")


@pytest.mark.parametrize("kind,target,layout,copies,variant", [
    ("llama", "v", "rows", 1, {}),
    ("llama", "k", "one", 2, {}),
    ("llama", "v", "rows", 1, PAPER_TEXT),
    ("emu3", "v", "none", 1, {}),
    ("emu3", "kv", "rows", 2, {}),
    ("chameleon", "v", "one", 1, {}),
])
def test_strength_one_matches_batched_driver_teacher_forced(kind, target, layout, copies, variant):
    """strength 1, step norm: the guided log-softmax of every step equals the batched driver's."""
    model = tiny(kind)
    g = Guidance(**{**dict(guidance_scale=3.0, guidance_scale_pow=1.0, randomize_temperature=0.8,
                           softcfg_strength=1.0, step_norm=True, softcfg_target=target),
                    **variant})
    tokens = forced_tokens(COND.shape[0] * copies, 9)
    got = unbatched_forced(model, g, UNCOND[layout], tokens, copies)
    assert_same_steps(got, batched_forced(model, g, UNCOND[layout], tokens, copies))
    # the comparison can fail: plain CFG on the same tokens differs once multipliers act
    plain = unbatched_forced(model, Guidance(guidance_scale=3.0, guidance_scale_pow=1.0,
                                             randomize_temperature=0.8), UNCOND[layout], tokens,
                             copies)
    assert max((a - b).abs().nan_to_num(0.0).max().item() for a, b in zip(got, plain)) > 1e-2


def test_unknown_length_grows_the_confidence_history():
    """No max_new_tokens (constant scale): the history grows by doubling (2, 6, 14 columns) and
    every step still equals the batched driver's."""
    model = tiny("llama")
    g = Guidance(guidance_scale=3.0, guidance_scale_pow=0.0, randomize_temperature=0.8,
                 softcfg_strength=1.0, step_norm=True)
    tokens = forced_tokens(COND.shape[0], 9, seed=3)
    got = unbatched_forced(model, g, UNCOND["rows"], tokens, tell_length=False)
    assert_same_steps(got, batched_forced(model, g, UNCOND["rows"], tokens))


def test_no_cache_plain_cfg_matches_cached_and_scale_one_skips_the_unconditional_forward():
    model = tiny("llama")
    g = Guidance(guidance_scale=2.5, guidance_scale_pow=0.0)
    tokens = forced_tokens(2, 5)
    assert_same_steps(unbatched_forced(model, g, UNCOND["rows"], tokens, use_cache=False),
                      unbatched_forced(model, g, UNCOND["rows"], tokens), atol=1e-5)

    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        seen = unbatched_forced(model, Guidance(guidance_scale=1.0, softcfg_strength=1.0),
                                UNCOND["rows"], tokens)
    finally:
        handle.remove()
    assert len(calls) == tokens.shape[1]  # the conditional forwards only
    plain = model(input_ids=COND).logits[:, -1]
    torch.testing.assert_close(seen[0], torch.log_softmax(plain, -1))


def test_batch_and_return_sequences_layouts_pair_rows():
    """B unconditional rows are repeat-interleaved for num_return_sequences, like generate's rows."""
    model = tiny("llama")
    g = Guidance(guidance_scale=3.0, guidance_scale_pow=0.0, softcfg_strength=1.0)
    tokens = forced_tokens(4, 4)
    rows = unbatched_forced(model, g, UNCOND["rows"], tokens, copies=2)
    explicit = unbatched_forced(model, g, UNCOND["rows"].repeat_interleave(2, 0), tokens, copies=2)
    assert_same_steps(rows, explicit, atol=0)
    with pytest.raises(ValueError, match="unconditional_ids has 3 rows"):
        unbatched_forced(model, g, torch.ones(3, 2, dtype=torch.long), tokens, copies=2)


# --------------------------------------------------------------- clear errors

def run_generate(model, processor, **kwargs):
    settings = dict(do_sample=True, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    settings.update(kwargs)
    return model.generate(input_ids=COND, attention_mask=torch.ones_like(COND),
                          logits_processor=[processor], **settings)


def test_wrong_temperature_pairing_is_an_error():
    model = tiny("llama")
    processor = SoftCFGUnbatchedLogitsProcessor(
        Guidance(guidance_scale=3.0, guidance_scale_pow=0.0, randomize_temperature=0.7), model)
    with pytest.raises(ValueError, match="pass temperature=0.7 to generate"):
        run_generate(model, processor, temperature=1.0)
    ok = SoftCFGUnbatchedLogitsProcessor(
        Guidance(guidance_scale=3.0, guidance_scale_pow=0.0, randomize_temperature=0.7), model)
    assert run_generate(model, ok, temperature=0.7).shape == (2, COND.shape[1] + 4)


def test_schedule_without_max_new_tokens_and_other_misuse_are_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="pass max_new_tokens"):
        SoftCFGUnbatchedLogitsProcessor(Guidance(guidance_scale_pow=1.0), model)
    with pytest.raises(ValueError, match="use_cache=True"):
        SoftCFGUnbatchedLogitsProcessor(Guidance(guidance_scale_pow=0.0, softcfg_strength=1.0),
                                        model, use_cache=False)
    with pytest.raises(ValueError, match="pass top_k/top_p to model.generate"):
        SoftCFGUnbatchedLogitsProcessor(Guidance(guidance_scale_pow=0.0, top_k=5), model)
    g = Guidance(guidance_scale_pow=1.0, softcfg_strength=1.0)
    with pytest.raises(ValueError, match="remove guidance_scale"):
        run_generate(model, SoftCFGUnbatchedLogitsProcessor(g, model, max_new_tokens=4),
                     guidance_scale=2.0)
    with pytest.raises(ValueError, match="the schedule needs the same N"):
        run_generate(model, SoftCFGUnbatchedLogitsProcessor(g, model, max_new_tokens=6))


# ------------------------------------------------------------------ t2i_emu3

def test_t2i_emu3_tiny_end_to_end(tmp_path):
    """Both drivers on the tiny random Emu3: grid layout, image shapes, and they agree."""
    args = t2i_emu3.parse_args(["--tiny", "--top-k", "8", "--guidance-scale-pow", "1",
                                "--temperature", "0.9", "--out", str(tmp_path / "emu3.png")])
    results = t2i_emu3.run(args)
    (tokens, images), (batched_tokens, batched_images) = results["unbatched"], results["batched"]
    height, width = 3, 4
    assert tokens.shape == (2, height * (width + 1) + 3)
    grid = tokens[:, :-3].view(2, height, width + 1)
    assert (grid[..., -1] == 5).all() and ((grid[..., :-1] >= 32) & (grid[..., :-1] < 48)).all()
    assert tokens[:, -3:].tolist() == [[6, 7, 2]] * 2  # eof, eoi, eos
    assert images.shape == (2, 2 * height, 2 * width, 3)
    assert torch.equal(tokens, batched_tokens)
    assert abs(images.astype(int) - batched_images.astype(int)).max() <= 1
    for name in ("unbatched", "batched"):
        assert (tmp_path / f"emu3_{name}.png").exists()


def test_t2i_emu3_needs_a_local_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as missing:
        t2i_emu3.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    assert missing.value.code == 2 and "huggingface-cli download BAAI/Emu3-Gen-hf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        t2i_emu3.main(["--tiny", "--softcfg-strength", "-1"])
    assert bad.value.code == 2 and capsys.readouterr().err.startswith("error: softcfg_strength")
    assert not list(tmp_path.iterdir())


def test_a_processor_serves_one_generate_call():
    model = tiny("llama")
    processor = SoftCFGUnbatchedLogitsProcessor(Guidance(guidance_scale_pow=0.0), model)
    run_generate(model, processor)
    with pytest.raises(RuntimeError, match="build a new one for each call"):
        run_generate(model, processor)
