"""softcfg_patch.hf: the SoftCFG caches and drivers for Hugging Face transformers.

Tiny random configs only (LlamaConfig MHA, Qwen2Config GQA, JanusConfig); nothing is
downloaded. Skipped when transformers (the optional `hf` extra) is not installed.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("softcfg_patch.hf")  # also skips on transformers < 5.22

from transformers import (  # noqa: E402
    AutoModelForCausalLM, DynamicCache, GenerationConfig, JanusConfig,
    JanusForConditionalGeneration, LlamaConfig, LogitsProcessorList, Qwen2Config, StaticCache,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from softcfg_patch import Guidance  # noqa: E402
from softcfg_patch.guidance import guidance_schedule  # noqa: E402
from softcfg_patch.rule import aligned_multipliers, token_confidence  # noqa: E402
from softcfg_patch.step import next_multipliers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(kind: str = "llama", attn: str = "sdpa", seed: int = 0):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=None, pad_token_id=0)
    if kind == "llama":
        config = LlamaConfig(num_key_value_heads=4, **common)  # MHA
    else:
        config = Qwen2Config(num_key_value_heads=2, **common)  # GQA: 2 query heads per KV head
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    return model


def cache_kw(module, cache) -> dict:
    return {hf.cache_argument(module): cache}


def stock_cache(kind: str, model, max_len: int):
    if kind == "dynamic":
        return DynamicCache()
    return StaticCache(config=model.config, max_cache_len=max_len)


def soft_cache(kind: str, model, max_len: int, target: str = "v"):
    if kind == "dynamic":
        return hf.SoftCFGCache(target=target)
    return hf.SoftCFGStaticCache(model.config, max_len, target=target)


def run_steps(model, cache, ids, steps, before_step=None):
    """Prefill then feed `steps` [R, n] one column at a time; returns the list of last logits."""
    R, P = ids.shape
    mask = torch.ones(R, P + steps.shape[1], dtype=torch.long)
    out = [model(input_ids=ids, attention_mask=mask[:, :P], use_cache=True,
                 **cache_kw(model, cache)).logits[:, -1]]
    for j in range(steps.shape[1]):
        if before_step is not None:
            before_step(cache, P, j)
        out.append(model(input_ids=steps[:, j:j + 1], attention_mask=mask[:, :P + j + 1],
                         position_ids=torch.full((R, 1), P + j), use_cache=True,
                         **cache_kw(model, cache)).logits[:, -1])
    return out


# ------------------------------------------------------------ the cache itself

@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_unit_multipliers_give_stock_logits_exactly(kind, attn, cache_kind):
    model = tiny_lm(kind, attn)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (4, 5), generator=g)
    steps = torch.randint(2, VOCAB, (4, 3), generator=g)

    def ones_for_uncond(cache, start, j):  # scaling on, every multiplier written as 1
        cache.set_multipliers([2, 3], start, torch.ones(2, j + 1))

    with torch.no_grad():
        ref = run_steps(model, stock_cache(cache_kind, model, 16), ids, steps)
        ours = run_steps(model, soft_cache(cache_kind, model, 16, "kv"), ids, steps,
                         ones_for_uncond)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


@pytest.mark.parametrize("target", ["v", "k", "kv"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_attention_output_matches_hand_computation(kind, attn, target):
    model = tiny_lm(kind, attn)
    layer = model.model.layers[0].self_attn
    cfg = model.config
    R, P, heads, kv_heads = 4, 6, cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    g = torch.Generator().manual_seed(2)
    k_past, v_past = (torch.randn(R, kv_heads, P, d, generator=g) for _ in range(2))
    x = torch.randn(R, 1, cfg.hidden_size, generator=g)
    cos, sin = model.model.rotary_emb(x, torch.full((R, 1), P))
    uncond = torch.tensor([1, 3])  # interleaved layout: rows 0, 2 conditional
    m = torch.ones(R, P + 1)
    m[uncond, 1:P] = torch.rand(2, P - 1, generator=g) * 0.9 + 0.05

    ours, plain = hf.SoftCFGCache(target=target), DynamicCache()
    for cache in (ours, plain):
        cache.update(k_past, v_past, 0)
    ours.set_multipliers(uncond, 0, m[uncond])
    with torch.no_grad():
        out = layer(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None,
                    **cache_kw(layer, ours))[0]
        out_plain = layer(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None,
                          **cache_kw(layer, plain))[0]

        q = layer.q_proj(x).view(R, 1, heads, d).transpose(1, 2)
        k = layer.k_proj(x).view(R, 1, kv_heads, d).transpose(1, 2)
        v = layer.v_proj(x).view(R, 1, kv_heads, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)
        stored_keys, stored_values = keys.clone(), values.clone()
        w = m[:, None, :, None]
        keys = keys * w if "k" in target else keys
        values = values * w if "v" in target else values
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # GQA: head h reads KV head h // n
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        probs = torch.softmax(q @ keys.transpose(-1, -2) / d ** 0.5, dim=-1)
        hand = layer.o_proj((probs @ values).transpose(1, 2).reshape(R, 1, heads * d))

    torch.testing.assert_close(out, hand, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[[0, 2]], out_plain[[0, 2]])  # conditional rows untouched
    assert not torch.allclose(out[[1, 3]], out_plain[[1, 3]])  # the multipliers did act
    # the cache stores K/V unscaled, so multipliers never compound across steps
    torch.testing.assert_close(ours.layers[0].keys, stored_keys, rtol=0, atol=0)
    torch.testing.assert_close(ours.layers[0].values, stored_values, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_cache_matches_dynamic_under_multipliers(kind):
    model = tiny_lm(kind, "sdpa")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (4, 5), generator=g)
    steps = torch.randint(2, VOCAB, (4, 3), generator=g)
    weights = torch.rand(2, 8, generator=g)

    def write(cache, start, j):
        cache.set_multipliers([2, 3], start, weights[:, : j + 1])

    with torch.no_grad():
        dyn = run_steps(model, soft_cache("dynamic", model, 12), ids, steps, write)
        sta = run_steps(model, soft_cache("static", model, 12), ids, steps, write)
        plain = run_steps(model, DynamicCache(), ids, steps)
    for a, b, c in zip(dyn, sta, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a[:2], c[:2])
    assert not torch.allclose(dyn[-1][2:], plain[-1][2:])


def test_static_cache_rejects_sliding_layers_and_early_multipliers():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(NotImplementedError, match="full-attention"):
        hf.SoftCFGStaticCache(config, 16)
    with pytest.raises(RuntimeError, match="first forward"):
        hf.SoftCFGCache().set_multipliers([1], 0, torch.ones(1, 2))
    with pytest.raises(ValueError, match="SoftCFGCache"):
        hf.SoftCFGSampler(Guidance(softcfg_strength=1.0), 4, [0], [1], cache=None)


@pytest.mark.e2e
def test_static_compile_reads_live_multipliers_without_recompiling():
    # backend "aot_eager" exercises dynamo capture, guards and functionalisation of the
    # in-place cache writes in a few seconds; inductor takes ~90 s on 2 CPU cores (checked
    # by hand: same tokens, no recompiles).
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_lm("llama", "sdpa")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, VOCAB, (4, 5), generator=g)
    steps = torch.randint(2, VOCAB, (4, 4), generator=g)
    weights = torch.rand(4, 2, 9, generator=g)  # new multipliers at every step
    eager_forward = model.forward
    torch._dynamo.reset()
    compiled_forward = torch.compile(eager_forward, backend="aot_eager", dynamic=False)

    def decode(forward, cache, j, R=4, P=5, L=12):
        cache.set_multipliers([2, 3], P, weights[j, :, : j + 1])
        return forward(input_ids=steps[:, j:j + 1],
                       attention_mask=torch.ones(R, L, dtype=torch.long),
                       position_ids=torch.full((R, 1), P + j), use_cache=True,
                       **cache_kw(model, cache)).logits[:, -1]

    caches = [hf.SoftCFGStaticCache(model.config, 12) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:  # prefill eagerly, as generate does
            eager_forward(input_ids=ids, use_cache=True, **cache_kw(model, cache))
        table = caches[1].multiplier_table
        address = table.data_ptr()
        ref = [decode(eager_forward, caches[0], j) for j in range(4)]
        got = [decode(compiled_forward, caches[1], 0)]
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            got += [decode(compiled_forward, caches[1], j) for j in range(1, 4)]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompiles as multipliers change
    assert caches[1].multiplier_table is table and table.data_ptr() == address  # updated in place
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref[1], ref[2])


# --------------------------------------------------------------- bookkeeping

def test_structural_positions_keep_weight_one_and_leave_the_normalisation():
    g = Guidance(softcfg_strength=1.0, step_norm=True)
    history = torch.rand(2, 7, generator=torch.Generator().manual_seed(5)) * 0.9 + 0.05
    structural = torch.zeros(2, 7, dtype=torch.bool)
    structural[:, [2, 5]] = True
    weights = next_multipliers(history, g, structural)
    keep = [0, 1, 3, 4, 6]
    assert torch.equal(weights[:, [2, 5]], torch.ones(2, 2))
    torch.testing.assert_close(weights[:, keep],
                               aligned_multipliers(history[:, keep], 1.0, True))
    # rows with markers at different steps are compressed one by one
    structural[1] = False
    structural[1, 3] = True
    weights = next_multipliers(history, g, structural)
    torch.testing.assert_close(
        weights[0], next_multipliers(history[:1], g, structural[:1])[0])
    keep1 = [0, 1, 2, 4, 5, 6]
    torch.testing.assert_close(weights[1, keep1],
                               aligned_multipliers(history[1:, keep1], 1.0, True)[0])
    assert weights[1, 3] == 1
    # without markers it is exactly the rule
    assert torch.equal(next_multipliers(history, g, None),
                       aligned_multipliers(history, 1.0, True))


def test_sampler_records_conditional_confidence_and_sets_next_multipliers():
    """Crafted logits: the sampled token, its confidence and the table written after each step."""
    g = Guidance(guidance_scale=3.0, guidance_scale_pow=1.0, randomize_temperature=0.7,
                 softcfg_strength=1.0)
    R, P, V, N, marker = 4, 3, 10, 5, 7
    cache = hf.SoftCFGCache()
    cache.update(torch.zeros(R, 1, P, 2), torch.zeros(R, 1, P, 2), 0)  # the prompt is in the cache
    cond_rows, uncond_rows = [0, 1], [2, 3]
    gen = torch.Generator().manual_seed(6)
    sampler = hf.SoftCFGSampler(g, N, cond_rows, uncond_rows, cache,
                                generator=torch.Generator().manual_seed(7),
                                structural_token_ids=[marker])
    twin = torch.Generator().manual_seed(7)
    confidences, is_marker = [], []
    for t in range(N):
        logits = torch.randn(R, V, generator=gen)
        if t == 2:
            logits[cond_rows, marker] += 50  # a structural token wins at step 2
        token = sampler(logits)
        scale = guidance_schedule(t, N, 3.0, 1.0)
        guided = logits[uncond_rows] + (logits[cond_rows] - logits[uncond_rows]) * scale
        expected = torch.multinomial(torch.softmax(guided / 0.7, -1), 1, generator=twin)[:, 0]
        assert torch.equal(token, expected)
        confidences.append(torch.softmax(logits[cond_rows] / 0.7, -1)[torch.arange(2), token])
        is_marker.append(token == marker)
        hist, markers = torch.stack(confidences, 1), torch.stack(is_marker, 1)
        want = torch.ones(2, t + 1)
        for row in range(2):  # each row's rule runs on its own non-structural positions
            keep = (~markers[row]).nonzero()[:, 0]
            want[row, keep] = aligned_multipliers(hist[row:row + 1, keep], 1.0, True)[0]
        table = cache.multiplier_table
        torch.testing.assert_close(table[uncond_rows, P:P + t + 1], want)
        assert torch.equal(table[cond_rows], torch.ones_like(table[cond_rows]))
        assert torch.equal(table[:, :P], torch.ones(R, P))
    assert is_marker[2].all() and sampler.tokens.shape == (2, N)


# ------------------------------------------------------------------- drivers

def reference_cfg_loop(model, ids, mask, B, N, guidance, generator):
    """Plain CFG written out with the stock DynamicCache (what strength 0 must reproduce)."""
    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   **cache_kw(model, cache)).logits[:, -1]
    tokens = []
    for t in range(N):
        scale = guidance_schedule(t, N, guidance.guidance_scale, guidance.guidance_scale_pow)
        guided = logits[B:] + (logits[:B] - logits[B:]) * scale
        x = torch.multinomial(torch.softmax(guided.float() / guidance.randomize_temperature, -1), 1,
                              generator=generator)[:, 0]
        tokens.append(x)
        mask = torch.cat([mask, torch.ones(2 * B, 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        logits = model(input_ids=torch.cat([x, x])[:, None], attention_mask=mask, position_ids=pos,
                       use_cache=True, **cache_kw(model, cache)).logits[:, -1]
    return torch.stack(tokens, 1)


def greedy(max_new_tokens: int) -> GenerationConfig:
    # the processor forces its own sample; eos None so no row stops early
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                            eos_token_id=None)


def prompts():
    g = torch.Generator().manual_seed(8)
    return torch.randint(3, VOCAB, (2, 6), generator=g), torch.tensor([[1, 2]])


def test_cfg_batch_left_pads_the_shorter_prompt():
    cond, uncond = prompts()
    ids, mask = hf.cfg_batch(cond, uncond, pad_token_id=0)
    assert ids.shape == (4, 6) and torch.equal(ids[:2], cond)
    assert torch.equal(ids[2:], torch.tensor([[0, 0, 0, 0, 1, 2]] * 2))
    assert torch.equal(mask[2:], torch.tensor([[0, 0, 0, 0, 1, 1]] * 2))
    assert torch.equal(mask[:2], torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_strength_zero_is_plain_cfg(cache_kind):
    model = tiny_lm("llama", "sdpa")
    cond, uncond = prompts()
    guidance = Guidance(guidance_scale=4.0, guidance_scale_pow=1.0, randomize_temperature=0.9)
    with torch.no_grad():
        ours = hf.generate(model, cond, uncond, guidance, 8,
                           generator=torch.Generator().manual_seed(9),
                           cache_implementation=cache_kind)
        ids, mask = hf.cfg_batch(cond, uncond)
        ref = reference_cfg_loop(model, ids, mask, 2, 8, guidance, torch.Generator().manual_seed(9))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_batched_loop_and_stock_generate_give_identical_tokens(cache_kind):
    model = tiny_lm("llama", "sdpa")
    cond, uncond = prompts()
    B, N = 2, 10
    guidance = Guidance(guidance_scale=4.0, guidance_scale_pow=1.0, softcfg_strength=1.0)
    loop = hf.generate(model, cond, uncond, guidance, N,
                       generator=torch.Generator().manual_seed(10),
                       structural_token_ids=[5], cache_implementation=cache_kind)

    ids, mask = hf.cfg_batch(cond, uncond)
    cache = hf.make_cache(model, guidance, cache_kind, ids.shape[1] + N)
    processor = hf.SoftCFGLogitsProcessor(guidance, N, torch.arange(B), torch.arange(B, 2 * B),
                                          cache, torch.Generator().manual_seed(10),
                                          structural_token_ids=[5])
    out = model.generate(input_ids=ids, attention_mask=mask,
                         logits_processor=LogitsProcessorList([processor]),
                         generation_config=greedy(N), **cache_kw(model, cache))
    new = out[:, ids.shape[1]:]
    assert torch.equal(new[:B], loop) and torch.equal(new[B:], loop)  # both branches share tokens
    assert torch.equal(processor.tokens, loop)
    table = cache.multiplier_table[:, : ids.shape[1] + N]
    assert (table[B:, ids.shape[1]:ids.shape[1] + N - 1] < 1).any()  # SoftCFG did act ...
    assert torch.equal(table[:B], torch.ones_like(table[:B]))  # ... on the unconditional rows only
    prompt = table[:, : ids.shape[1]]
    assert torch.equal(prompt, torch.ones_like(prompt))  # prompt positions: weight 1


def test_explicit_rows_interleaved_layout_matches_stacked():
    model = tiny_lm("qwen2", "eager")
    cond, uncond = prompts()
    N = 6
    guidance = Guidance(guidance_scale=3.0, softcfg_strength=1.0)
    ids, mask = hf.cfg_batch(cond, uncond)

    def run(order, cond_rows, uncond_rows):
        cache = hf.SoftCFGCache()
        processor = hf.SoftCFGLogitsProcessor(guidance, N, cond_rows, uncond_rows, cache,
                                              torch.Generator().manual_seed(11))
        model.generate(input_ids=ids[order], attention_mask=mask[order],
                       logits_processor=LogitsProcessorList([processor]),
                       generation_config=greedy(N), **cache_kw(model, cache))
        return processor.tokens, cache.multiplier_table

    stacked, _ = run([0, 1, 2, 3], [0, 1], [2, 3])
    interleaved, table = run([0, 2, 1, 3], [0, 2], [1, 3])  # [c0, u0, c1, u1]
    assert torch.equal(stacked, interleaved)
    assert torch.equal(table[[0, 2]], torch.ones_like(table[[0, 2]]))
    assert (table[[1, 3]] < 1).any()


# ---------------------------------------------------------------------- Janus

JANUS_SPECIAL = ["<pad>", "<bos>", "<eos>", "<image_placeholder>", "<begin_of_image>",
                 "<end_of_image>", "<unk>"]
JANUS_WORDS = "a red fox in the snow cat dog".split()


def tiny_janus(seed: int = 0):
    text = dict(model_type="llama", vocab_size=len(JANUS_SPECIAL) + len(JANUS_WORDS),
                hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    # 16 image tokens = (16 / 4) ** 2 patches; the VQ decoder upsamples 4x4 codes to 8x8 pixels
    vision = dict(image_size=16, patch_size=4, num_image_tokens=16, hidden_size=32,
                  projection_dim=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2)
    vq = dict(embed_dim=8, num_embeddings=24, latent_channels=8, base_channels=32,
              channel_multiplier=[1, 1], projection_dim=32, image_token_embed_dim=32,
              num_res_blocks=1)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=3)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0, eos_token_id=2,
                                               guidance_scale=5.0,
                                               generation_kwargs={"boi_token_id": 4})
    return model


def tiny_janus_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import JanusProcessor, PreTrainedTokenizerFast

    image_processor_cls = (getattr(transformers, "JanusImageProcessorPil", None)
                           or transformers.JanusImageProcessor)
    vocab = {t: i for i, t in enumerate(JANUS_SPECIAL + JANUS_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_placeholder>",
                              "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
    return JanusProcessor(image_processor_cls(size={"height": 16, "width": 16}), tokenizer,
                          num_image_tokens=16)


JANUS_IDS = torch.tensor([[1, 7, 8, 9, 4], [1, 0, 10, 11, 4]])  # second prompt left-padded
JANUS_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])


def test_janus_strength_zero_reproduces_stock_janus_cfg():
    model = tiny_janus()
    torch.manual_seed(12)
    stock = model.generate(input_ids=JANUS_IDS, attention_mask=JANUS_MASK, generation_mode="image",
                           do_sample=True, guidance_scale=5.0)
    torch.manual_seed(12)  # generator=None: the global RNG, drawn exactly like Janus draws it
    plain_cfg = Guidance(guidance_scale=5.0, guidance_scale_pow=0.0)  # Janus: constant scale
    ours = hf.janus_generate_images(model, JANUS_IDS, plain_cfg, JANUS_MASK)
    assert stock.shape == (2, 16) and torch.equal(ours, stock)


def test_janus_image_mode_with_softcfg_cache_decodes_to_pixels():
    model = tiny_janus()
    guidance = Guidance(guidance_scale=5.0, guidance_scale_pow=0.0, softcfg_strength=1.0)
    tokens = {}
    for kind in ("static", "dynamic"):
        cache, processor = hf.janus_softcfg(model, guidance, 2, JANUS_IDS.shape[1],
                                            torch.Generator().manual_seed(13), kind)
        out = model.generate(input_ids=JANUS_IDS, attention_mask=JANUS_MASK,
                             generation_mode="image", do_sample=False,
                             logits_processor=LogitsProcessorList([processor]),
                             **cache_kw(model, cache))
        assert torch.equal(out, processor.tokens)
        table = cache.multiplier_table
        assert torch.equal(table[:2], torch.ones_like(table[:2]))  # rows [0, B): conditional
        assert (table[2:, 5:5 + 15] < 1).all() and torch.equal(table[2:, :5], torch.ones(2, 5))
        tokens[kind] = out
    assert torch.equal(tokens["static"], tokens["dynamic"])
    assert tokens["static"].min() >= 0 and tokens["static"].max() < 24
    with torch.no_grad():
        pixels = model.decode_image_tokens(tokens["static"])
    assert pixels.shape == (2, 8, 8, 3) and torch.isfinite(pixels).all()
    # several images per prompt: the driver expands the batch before sizing the processor
    many = hf.janus_generate_images(model, JANUS_IDS, guidance, JANUS_MASK,
                                    torch.Generator().manual_seed(13), num_return_sequences=2)
    assert many.shape == (4, 16)


# ------------------------------------------------------------------------ CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "t2i_janus.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_cli_missing_model_says_how_to_get_it(tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("--model", str(tmp_path / "no-such-model"), "--prompt", "a fox",
                     "--out", str(out))
    assert result.returncode != 0
    assert "huggingface-cli download deepseek-community/Janus-Pro-1B" in result.stderr
    assert "--model" in result.stderr and not out.exists()


@pytest.mark.e2e
def test_cli_end_to_end_on_tiny_janus(tmp_path):
    from PIL import Image

    model_dir = tmp_path / "tiny-janus"
    tiny_janus().save_pretrained(model_dir)
    tiny_janus_processor().save_pretrained(model_dir)
    out = tmp_path / "side_by_side.png"
    result = run_cli("--model", str(model_dir), "--prompt", "a red fox in the snow",
                     "--softcfg-strength", "1", "--guidance-scale", "5", "--seed", "0",
                     "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (8 + 8 + 8, 8) and image.mode == "RGB"  # two 8x8 images and an 8-pixel gap


def test_generate_without_uncond_ids_names_it():
    model = tiny_lm("llama", "sdpa")
    cond, _ = prompts()
    with pytest.raises(ValueError, match="uncond_ids"):
        hf.generate(model, cond, None, Guidance(guidance_scale=3.0), 4)
    tokens = hf.generate(model, cond, None, Guidance(guidance_scale=0.0), 4)  # no CFG: allowed
    assert tokens.shape == (2, 4)


def test_on_step_hook_has_the_sampler_signature():
    """hf.generate calls on_step(step, cond, uncond, guided, tokens, cache) like the ImageNet loop."""
    model = tiny_lm("llama", "sdpa")
    cond, uncond = prompts()
    g = Guidance(guidance_scale=3.0, guidance_scale_pow=1.0, randomize_temperature=0.8,
                 softcfg_strength=1.0, top_k=5)
    seen = []

    def hook(step, c, u, guided, tokens, cache):
        scale = guidance_schedule(step, 4, 3.0, 1.0)
        want = (u + (c - u) * scale) / 0.8
        kept = torch.isfinite(guided)
        assert torch.equal(kept.sum(-1), torch.full((2,), 5))  # top-k acted on the guided logits
        torch.testing.assert_close(guided[kept], want[kept])
        assert kept.gather(1, tokens[:, None]).all()  # the token was drawn from what was kept
        seen.append((step, isinstance(cache, hf.SoftCFGCache)))

    tokens = hf.generate(model, cond, uncond, g, 4, generator=torch.Generator().manual_seed(3),
                         on_step=hook)
    assert seen == [(t, True) for t in range(4)] and tokens.shape == (2, 4)


@pytest.mark.e2e
def test_janus_glue_imports_first_or_through_hf():
    code = ("import softcfg_patch.hf.janus as j, softcfg_patch.hf as h; "
            "assert h.janus_generate_images is j.janus_generate_images and h.janus_softcfg is j.janus_softcfg")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
