"""Time SoftCFG against plain CFG (and optionally against the upstream sampler), side by side.

    python benchmarks/bench_sampler.py                       # AliTok-B size, CPU
    python benchmarks/bench_sampler.py --model rar_b         # RAR-B size
    python benchmarks/bench_sampler.py --upstream-alitok ~/src/alitok   # + upstream generate()

Random weights of the real architecture; every setting runs `--repeats` times,
interleaved, and the printed ratios are medians of per-repeat ratios, so slow
drift of the machine cancels. `--upstream-alitok` points at a local checkout of
ali-vilab/alitok (never vendored here); its `ARModel.generate` is timed on the same
weights, labels and settings.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import softcfg_patch as sp  # noqa: E402


def build(model_name: str, device: torch.device) -> torch.nn.Module:
    config = OmegaConf.load(ROOT / "configs" / f"{model_name}.yaml")
    if model_name.startswith("alitok"):
        from alitok.model import ARModel
        model = ARModel(config)
    else:
        from rar.model import RAR
        model = RAR(config)
    torch.manual_seed(0)
    for p in model.parameters():  # upstream zero-inits some heads; random weights keep sampling honest
        p.data.normal_(0, 0.02)
    return model.to(device).eval(), config


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def upstream_generate(path: str, config, state_dict, device):
    """Import ali-vilab/alitok's ARModel from a user checkout and return its sampler."""
    sys.path.insert(0, str(Path(path).resolve()))
    from modeling.ar import ARModel as UpstreamARModel  # noqa: the user's checkout
    model = UpstreamARModel(config)
    model.load_state_dict(state_dict, strict=True)
    model = model.to(device).eval()
    return lambda labels, g: model.generate(condition=labels, guidance_scale=g.guidance_scale,
                                            randomize_temperature=g.randomize_temperature,
                                            guidance_scale_pow=g.guidance_scale_pow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="alitok_b", help="config name under configs/ (alitok_*, rar_*)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--upstream-alitok", default=None, help="path to a local ali-vilab/alitok checkout")
    args = parser.parse_args()

    device = torch.device(args.device)
    model, config = build(args.model, device)
    labels = torch.arange(args.batch_size, device=device) * 7 % model.num_classes
    settings = {
        "cfg": sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5),
        "softcfg": sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5, softcfg_strength=1.0, step_norm=True),
    }
    runners = {name: (lambda g=g: sp.generate(model, labels, g)) for name, g in settings.items()}
    if args.upstream_alitok:
        upstream = upstream_generate(args.upstream_alitok, config, model.state_dict(), device)
        runners["upstream_cfg"] = lambda: upstream(labels, settings["cfg"])

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    times = {name: [] for name in runners}
    with torch.no_grad(), autocast:
        for name, fn in runners.items():  # warm-up
            print(f"  warm-up: {name} {timed(fn, device):.3f} s", flush=True)
        for r in range(args.repeats):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                times[name].append(timed(runners[name], device))
                print(f"  repeat {r}: {name} {times[name][-1]:.3f} s", flush=True)

    print(f"{args.model}, batch {args.batch_size} (x2 rows with CFG), {model.num_image_tokens} steps, "
          f"{args.device}, {args.precision}, {args.repeats} repeats")
    for name, ts in times.items():
        print(f"  {name:13s} median {statistics.median(ts):8.3f} s")
    ratio = statistics.median(s / c for s, c in zip(times["softcfg"], times["cfg"]))
    print(f"SoftCFG / CFG time ratio: {ratio:.3f}  (target <= 1.02)")
    if "upstream_cfg" in times:
        speedup = statistics.median(u / c for u, c in zip(times["upstream_cfg"], times["cfg"]))
        print(f"upstream CFG / ours CFG time ratio: {speedup:.2f}x  (target >= 1.5)")


if __name__ == "__main__":
    main()
