"""Time our sampler (eager and compiled, CFG and SoftCFG) against upstream, side by side.

    python benchmarks/bench_sampler.py --model alitok_b --batch-size 8
    python benchmarks/bench_sampler.py --model rar_b --upstream-rar ~/src/1d-tokenizer
    python benchmarks/bench_sampler.py --upstream-alitok ~/src/alitok --steps 32   # quick

Random weights of the real architecture (configs/<model>.yaml). Every path runs
`--repeats` times, interleaved (the order alternates), and each printed ratio is the
median of per-repeat ratios, so slow drift of a shared machine cancels. Paths:

    eager_cfg, eager_softcfg        softcfg_patch.generate(...)
    compiled_cfg, compiled_softcfg  softcfg_patch.generate(..., compile=True), compiled once
                                    before timing (fixed-shape step, inductor; CUDA graphs on GPU)
    upstream_cfg                    upstream generate() on the same weights, labels, settings,
                                    from a local checkout (--upstream-alitok: ali-vilab/alitok,
                                    --upstream-rar: bytedance/1d-tokenizer); never vendored here;
                                    float32 as upstream ships it
    upstream_cfg_autocast           (--precision bf16) the same under bf16 autocast, for reference

`--precision bf16` runs ours as `sample.precision=bf16` does: linear weights stored in bf16
and autocast (fast on CPUs with AVX512-BF16/AMX and on GPUs; float32 stays the default).

`--steps N` decodes only the first N image tokens in every path (quick runs; per-step
costs and ratios stay comparable). With `--steps` up to 64, a per-op profile of one eager
and one compiled SoftCFG run prints the share of time in matrix multiplications beside the
ratios (the profiler holds every event in memory: a full image would take tens of GB).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import softcfg_patch as sp  # noqa: E402
from softcfg_patch.precision import store_linear_weights  # noqa: E402
from softcfg_patch.run import registry  # noqa: E402

PROFILE_MAX_STEPS = 64  # the profiler keeps every event in memory
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "mkldnn", "mkl_", "aten::_scaled_dot_product", "cpp_fused_mm", "extern_kernels")


def load_config(args):
    """configs/<model>.yaml, optionally narrowed/shallowed (--hidden-size/--layers) in memory."""
    config = OmegaConf.load(ROOT / "configs" / f"{args.model}.yaml")
    gen = config.model.generator
    if args.hidden_size:
        gen.hidden_size, gen.num_attention_heads = args.hidden_size, max(1, args.hidden_size // 64)
        if "intermediate_size" in gen:
            gen.intermediate_size = 4 * args.hidden_size
    if args.layers:
        gen.num_hidden_layers = args.layers
    return config


def build(family: str, config, device: torch.device, steps: int | None):
    model = registry.get(family).resolve("generator_class")(config)
    torch.manual_seed(0)
    for p in model.parameters():  # upstream zero-inits some heads; random weights keep sampling honest
        p.data.normal_(0, 0.02)
    if steps:
        model.num_image_tokens = steps
    return model.to(device).eval()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _stub_module(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules.setdefault(name, module)


def _stub_rar_training_stack() -> None:
    """bytedance/1d-tokenizer's `modeling` package imports its training stack (LPIPS via
    torchvision, timm, open_clip) at import time; sampling uses none of it except timm's
    two-layer Mlp. Stub only what is not installed."""
    import importlib.util
    if importlib.util.find_spec("timm") is None:
        class Mlp(nn.Module):  # timm.layers.Mlp's parameters and forward, for the RAR blocks
            def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0, **_):
                super().__init__()
                self.fc1, self.act = nn.Linear(in_features, hidden_features), act_layer()
                self.fc2 = nn.Linear(hidden_features, in_features)

            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))
        _stub_module("timm")
        _stub_module("timm.layers", Mlp=Mlp)
    for root, subs in (("torchvision", ()), ("open_clip", ("open_clip.transformer",))):
        if root not in sys.modules and importlib.util.find_spec(root) is None:
            for name in (root, *subs):
                _stub_module(name, models=None, text_global_pool=None)


def upstream_generate(family: str, path: str, config, state_dict, device, steps: int | None):
    """Import the upstream generator from a user checkout and return its sampler."""
    sys.path.insert(0, str(Path(path).expanduser().resolve()))
    if family == "alitok":
        from modeling.ar import ARModel as Upstream  # noqa: the user's ali-vilab/alitok checkout
    else:
        _stub_rar_training_stack()
        from modeling.rar import RAR as Upstream  # noqa: the user's bytedance/1d-tokenizer checkout
    model = Upstream(config)
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device).eval()
    if steps:
        model.image_seq_len = steps
    return lambda labels, g: model.generate(condition=labels, guidance_scale=g.guidance_scale,
                                            randomize_temperature=g.randomize_temperature,
                                            guidance_scale_pow=g.guidance_scale_pow)


def profile_share(fn) -> tuple[float, list]:
    """(share of self CPU time in matmul-like ops, top 6 ops) over one call of fn."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in MATMUL_OPS))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    return matmul / total, [(e.key, e.self_cpu_time_total / total) for e in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alitok_b", help="config name under configs/ (alitok_*, rar_*)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (x2 rows with CFG)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per path (median)")
    parser.add_argument("--steps", type=int, default=None, help="decode only N tokens (quick mode)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled paths")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-op profile")
    parser.add_argument("--freezing", action="store_true",
                        help="inductor freezing for the compiled paths (weights folded as constants, "
                             "prepacked for the CPU GEMMs)")
    parser.add_argument("--hidden-size", type=int, default=None, help="override width (overhead study)")
    parser.add_argument("--layers", type=int, default=None, help="override depth (overhead study)")
    parser.add_argument("--upstream-alitok", default=None, help="path to a local ali-vilab/alitok checkout")
    parser.add_argument("--upstream-rar", default=None, help="path to a local bytedance/1d-tokenizer checkout")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.freezing:
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
    family = registry.get(args.model).name
    config = load_config(args)
    model = build(family, config, device, args.steps)
    labels = torch.arange(args.batch_size, device=device) * 7 % model.num_classes
    settings = {"cfg": sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5),
                "softcfg": sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5,
                                       softcfg_strength=1.0, step_norm=True)}
    bf16 = args.precision == "bf16"
    upstream_path = args.upstream_alitok if family == "alitok" else args.upstream_rar
    runners = {}
    if upstream_path:  # float32 weights, as upstream ships; under autocast too when ours runs bf16
        upstream = upstream_generate(family, upstream_path, config, model.state_dict(), device, args.steps)
        runners["upstream_cfg"] = in_precision(False, device, lambda: upstream(labels, settings["cfg"]))
        if bf16:
            runners["upstream_cfg_autocast"] = in_precision(True, device, lambda: upstream(labels, settings["cfg"]))
    if bf16:  # what sample.precision=bf16 does: linear weights stored in bf16, autocast
        store_linear_weights(model, torch.bfloat16)
    runners.update({f"eager_{n}": in_precision(bf16, device, lambda g=g: sp.generate(model, labels, g))
                    for n, g in settings.items()})
    if not args.no_compile:
        runners.update({f"compiled_{n}": in_precision(bf16, device,
                                                      lambda g=g: sp.generate(model, labels, g, compile=True))
                        for n, g in settings.items()})

    times = {name: [] for name in runners}
    with torch.no_grad():
        for name, fn in runners.items():  # warm-up (and the one compile per path)
            print(f"  warm-up: {name} {timed(fn, device):.3f} s", flush=True)
        for r in range(args.repeats):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                times[name].append(timed(runners[name], device))
                print(f"  repeat {r}: {name} {times[name][-1]:.3f} s", flush=True)
        shares = {}
        if not args.no_profile and device.type == "cpu" and (args.steps or 10 ** 9) > PROFILE_MAX_STEPS:
            print(f"  (no per-op profile: it records every op of a run, tens of GB over a full image; "
                  f"use --steps {PROFILE_MAX_STEPS} for one)")
        elif not args.no_profile and device.type == "cpu":
            for name in ("eager_softcfg", "compiled_softcfg", "upstream_cfg"):
                if name in runners:
                    shares[name] = profile_share(runners[name])
    report(args, model, times, shares)


def in_precision(bf16: bool, device: torch.device, fn: Callable[[], object]) -> Callable[[], object]:
    """fn under bf16 autocast (or plain float32)."""
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return fn()
    return run


def report(args, model, times: dict, shares: dict) -> None:
    steps = model.num_image_tokens
    size = f" (hidden {args.hidden_size or 'as config'}, layers {args.layers or 'as config'})" \
        if args.hidden_size or args.layers else ""
    print(f"\n{args.model}{size}, batch {args.batch_size} (x2 rows with CFG), {steps} steps, {args.device}, "
          f"{args.precision}, median of {args.repeats} interleaved repeats (shared machine: noisy)")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name:17s} {median:8.3f} s   {args.batch_size / median:7.2f} images/s")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    rows = [("eager_softcfg", "eager_cfg", "SoftCFG / CFG time, eager", "<= 1.02"),
            ("compiled_softcfg", "compiled_cfg", "SoftCFG / CFG time, compiled", "<= 1.02"),
            ("upstream_cfg", "eager_cfg", "speed-up of ours eager over upstream (CFG)", ">= 1.0"),
            ("upstream_cfg", "compiled_cfg", "speed-up of ours compiled over upstream (CFG)", ">= 1.5"),
            ("upstream_cfg_autocast", "eager_cfg", "ours eager over upstream under autocast (CFG)", ""),
            ("upstream_cfg_autocast", "compiled_cfg", "ours compiled over upstream under autocast (CFG)", ""),
            ("eager_cfg", "compiled_cfg", "speed-up of compiled over eager (CFG)", "")]
    for a, b, what, target in rows:
        if a in times and b in times:
            print(f"  {what:46s} {ratio(a, b):6.3f}x  {('target ' + target) if target else ''}")
    for name, (share, top) in shares.items():
        print(f"  profile {name}: {100 * share:.0f} % of CPU time in matmul-like ops; top: " +
              ", ".join(f"{k} {100 * s:.0f}%" for k, s in top))


if __name__ == "__main__":
    main()
