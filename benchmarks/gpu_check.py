"""One prepared device check (see gpu_check.sh): parity, sampler and Inception speed, roofline.

    bash benchmarks/gpu_check.sh                        # on a GPU machine, < 5 minutes
    bash benchmarks/gpu_check.sh --device cpu --tiny    # end to end on CPU, no compiling (CI)

1. Teacher-forced logits on the device (fp32, TF32 off) equal the CPU golden logits of
   the tiny AliTok and RAR runs (logits, not sampled tokens: CUDA's random stream
   differs from the CPU's). Tolerance 1e-4 absolute.
2. Sampler images/s at AliTok-XL and RAR-XL sizes (random weights, upstream batch sizes
   125 and 50 per GPU, x2 rows with CFG): ~32 warm steps timed and scaled to the full
   N, CFG and SoftCFG, eager tf32 vs eager bf16 vs compiled bf16 (SoftCFG; one compile
   per model; --compile-cfg adds the CFG graph).
3. Inception feature extraction images/s (fp32, TF32 off).
4. Fraction of the memory-bandwidth roofline: (weight bytes + KV bytes read) per step /
   step time / the peak bandwidth of a quick device copy.
5. One whole sampling run end to end (runner.main in this process, bench_pipeline.py's
   `none` route): AliTok-XL size with random weights, 250 images at batch 125 (--tiny: the
   tiny golden AliTok, 4 images; CPU: 4), sample.images=none with evaluation while sampling
   (seeded random Inception, random reference): images/s and each stage's share of the run.
Writes <out>/gpu_check.json and <out>/gpu_check.md (a table for the README).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import softcfg_patch as sp  # noqa: E402
from softcfg_patch.guidance import method  # noqa: E402
from softcfg_patch.precision import store_linear_weights, tf32  # noqa: E402
from softcfg_patch.run import registry  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
CFG = sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5)
SOFTCFG = sp.Guidance(guidance_scale=9.0, guidance_scale_pow=1.5, softcfg_strength=1.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiny_model(family: str, device: torch.device):
    if family == "alitok":
        from alitok.model import ARModel as cls
        config, weights = "alitok_ar_tiny_config.yaml", "alitok_ar_tiny_weights.safetensors"
    else:
        from rar.model import RAR as cls
        config, weights = "rar_tiny_config.yaml", "rar_tiny_weights.safetensors"
    model = cls(OmegaConf.load(FIXTURES / config)).eval()
    model.load_state_dict(load_file(FIXTURES / weights), strict=True)
    return model.to(device)


def check_logits(device: torch.device) -> dict:
    """Section 1: teacher-forced [cond; uncond] logits of every step vs the CPU golden (TF32 off)."""
    out = {}
    for family, io in (("alitok", "alitok_ar_tiny_io.safetensors"), ("rar", "rar_tiny_io.safetensors")):
        golden = load_file(FIXTURES / io)
        model, steps = tiny_model(family, device), []
        sp.decode_loop(model, golden["labels"].to(device), sp.Guidance(guidance_scale=3.0),
                       forced_tokens=golden["tokens"].to(device),
                       on_step=lambda t, c, u, *rest: steps.append(torch.cat([c, u]).cpu()))
        diff = (torch.stack(steps, 1) - golden["logits_kv"]).abs().max().item()
        out[family] = {"max_abs_diff": diff, "ok": diff <= 1e-4}
    return out


def xl_model(family: str, device: torch.device, tiny: bool):
    """Random weights (std 0.02) of the XL architecture, built directly on the device."""
    if tiny:
        return tiny_model(family, device)
    config = OmegaConf.load(ROOT / "configs" / f"{family}_xl.yaml")
    with torch.device(device):
        model = registry.get(family).resolve("generator_class")(config)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


def step_time(model, labels, guidance, warm_steps: int, compile: bool, device: torch.device) -> float:
    """Seconds per decode step over `warm_steps` steps (after one untimed run, the compile)."""
    full = model.num_image_tokens
    model.num_image_tokens = warm_steps
    try:
        run = lambda: sp.generate(model, labels, guidance, compile=compile)  # noqa: E731
        run()
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        return (time.perf_counter() - start) / warm_steps
    finally:
        model.num_image_tokens = full


def sampler_speed(device: torch.device, tiny: bool, compile_cfg: bool) -> list:
    """Section 2 (and the numbers section 4 needs)."""
    rows = []
    for family, batch in (("alitok", 125), ("rar", 50)):
        model = xl_model(family, device, tiny)
        batch = 2 if tiny else batch
        labels = torch.arange(batch, device=device) % model.num_classes
        N = model.num_image_tokens
        variants = [("eager tf32", False, False, CFG), ("eager tf32", False, False, SOFTCFG),
                    ("eager bf16", True, False, CFG), ("eager bf16", True, False, SOFTCFG)]
        if not tiny:  # --tiny never compiles (CI)
            variants += [("compiled bf16", True, True, SOFTCFG)]
            variants += [("compiled bf16", True, True, CFG)] if compile_cfg else []
        for name, bf16, compile, guidance in variants:  # float32 rows first: the bf16 cast is for good
            if bf16:  # as sample.precision=bf16: linear weights stored in bf16, autocast
                store_linear_weights(model, torch.bfloat16)
            with tf32(not bf16), torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                seconds = step_time(model, labels, guidance, 4 if tiny else 32, compile, device)
            rows.append({"model": f"{family}_xl" if not tiny else f"{family}_tiny", "path": name,
                         "method": method(guidance), "batch": batch,
                         "step_s": seconds, "images_per_s": batch / (seconds * N),
                         "weight_bytes": weight_bytes(model), "bytes_per_step": step_bytes(model, batch, bf16, compile)})
        del model
    return rows


def weight_bytes(model) -> int:
    """Bytes of the parameters as stored (bf16 linear weights on the bf16 rows)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_bytes(model, batch: int, bf16: bool, fixed_shape: bool) -> int:
    """Weights read once per step + the K/V read by every layer (average length, or the whole
    cache on the fixed-shape path), in the activation dtype."""
    length = model.num_prefix_positions + (model.num_image_tokens if fixed_shape else model.num_image_tokens // 2)
    kv = 2 * model.num_layers * 2 * batch * model.num_heads * length * model.head_dim * (2 if bf16 else 4)
    return weight_bytes(model) + kv


def copy_bandwidth(device: torch.device, tiny: bool) -> float:
    """Peak bytes/s of a device-to-device copy (read + write)."""
    n = (16 if tiny else 512) * 2 ** 20 // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    sync(device)
    start, reps = time.perf_counter(), 5 if tiny else 20
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * 4 * n * reps / (time.perf_counter() - start)


def inception_speed(device: torch.device, tiny: bool) -> dict:
    """Section 3: FID Inception (random weights) on uint8 256x256 images, fp32, TF32 off."""
    sys.path.insert(0, str(ROOT))
    from evaluations.inception import FIDInception
    model = FIDInception(weights=None).to(device)
    batch = 2 if tiny else 200
    images = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8, device=device)
    with torch.no_grad():
        model(images)
        sync(device)
        start = time.perf_counter()
        model(images)
        sync(device)
    seconds = time.perf_counter() - start
    return {"batch": batch, "images_per_s": batch / seconds}


def pipeline_speed(device: torch.device, tiny: bool, num_images: int | None = None) -> dict:
    """Section 5: a whole run, sample.images=none + evaluation while sampling (bench_pipeline)."""
    size = "tiny" if tiny else "alitok_xl"
    n = num_images or (250 if device.type == "cuda" and not tiny else bench_pipeline.MIN_IMAGES)
    batch = min(n, 2 if tiny else 125)
    measured = bench_pipeline.measure(size, n, batch, str(device), routes=("none",))
    route = measured["routes"]["none"]
    return {"model": size, "route": "sample.images=none + evaluation", "num_images": n, "batch": batch,
            "images_per_s": route["images_per_s"], "run_s": route["run_s"], "wall_s": route["wall_s"],
            "setup_s": measured["setup_s"], "seconds": route["seconds"], "shares": route["shares"],
            "bytes_per_image": route["bytes_per_image"]["total"]}


def pipeline_line(p: dict) -> str:
    shares = ", ".join(f"{stage} {100 * share:.1f} %" for stage, share in p["shares"].items())
    return (f"End to end ({p['model']}, {p['num_images']} images, batch {p['batch']}, {p['route']}): "
            f"{p['images_per_s']:.2f} images/s over {p['run_s']:.1f} s (models built in {p['setup_s']:.1f} s "
            f"before); shares: {shares}")


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device_name']} (torch {result['torch']}); "
             f"copy bandwidth {result['copy_gb_s']:.0f} GB/s", "",
             "| model | path | method | batch | images/s | step ms | roofline |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["sampler"]:
        lines.append(f"| {r['model']} | {r['path']} | {r['method']} | {r['batch']} | "
                     f"{r['images_per_s']:.2f} | {1000 * r['step_s']:.1f} | {100 * r['roofline']:.0f} % |")
    lines += ["", f"Inception (fp32, TF32 off): {result['inception']['images_per_s']:.1f} images/s",
              "Logits parity vs CPU golden: " + ", ".join(
                  f"{k} max |diff| {v['max_abs_diff']:.1e} ({'ok' if v['ok'] else 'FAIL'})"
                  for k, v in result["logits"].items()),
              pipeline_line(result["pipeline"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny golden models, batch 2, no compiling")
    parser.add_argument("--compile-cfg", action="store_true", help="also compile the CFG graph")
    parser.add_argument("--pipeline-images", type=int, default=None,
                        help="images of the end-to-end run (default 250 on GPU, 4 with --tiny or on CPU)")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json / .md")
    args = parser.parse_args()
    if args.pipeline_images is not None and args.pipeline_images < bench_pipeline.MIN_IMAGES:
        parser.error(f"--pipeline-images must be at least {bench_pipeline.MIN_IMAGES} (the metrics need them)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu --tiny", file=sys.stderr)
        return 2
    started = time.time()
    result = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    with tf32(False):  # the sampler rows set their own
        result["logits"] = check_logits(device)
        print("logits parity:", result["logits"], flush=True)
        result["copy_gb_s"] = copy_bandwidth(device, args.tiny) / 1e9
        result["sampler"] = sampler_speed(device, args.tiny, args.compile_cfg)
        for r in result["sampler"]:
            r["roofline"] = r["bytes_per_step"] / r["step_s"] / (result["copy_gb_s"] * 1e9)
        result["inception"] = inception_speed(device, args.tiny)
    print("end-to-end run (sample.images=none + evaluation) ...", flush=True)
    result["pipeline"] = pipeline_speed(device, args.tiny, args.pipeline_images)  # the runner sets its own TF32
    result["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(v["ok"] for v in result["logits"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
