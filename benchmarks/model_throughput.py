"""Training throughput (forward + backward images/s) of the model presets.

Both devices run the presets at their own image sizes with a small batch and compare a
candidate with the same model in plain fp32, measured in the same run. CPU: channels_last
(and, with --cpu-bf16, bf16 autocast too). GPU (when CUDA is present): bf16 autocast +
channels_last. --cpu-scale < 1 shrinks the CPU images for a quick look (it says so). Weights are randomly initialised (throughput does not
depend on them). Throughput is batch / median step time. Prints a table, then one JSON
line with the numbers and the ratios.

Examples:
  python benchmarks/model_throughput.py
  python benchmarks/model_throughput.py --presets earthloc,r18-cosplace512 --batch-size 8 --steps 5
  python benchmarks/model_throughput.py --cpu-scale 0.5 --presets earthloc2-dinov2-b-salad
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.models import build_model, list_presets, model_preset  # noqa: E402

DEFAULT_PRESETS = "earthloc,gsv-convap-r50,r18-cosplace512,earthloc2-dinov2-s-salad,earthloc2-dinov2-b-salad"


def scaled_size(cfg, scale: float) -> tuple[int, int]:
    """Scale an image size, keeping DINOv2 sizes multiples of 14 (and >= 98 for SALAD)."""
    multiple = 14 if cfg.backbone.startswith(("dinov2", "vit")) else 16
    h, w = cfg.image_hw
    return tuple(max(98 if multiple == 14 else 64, int(round(s * scale / multiple)) * multiple) for s in (h, w))


def images_per_s(model, size, batch: int, steps: int, warmup: int, device: str,
                 bf16: bool = False) -> float:
    model.train()
    x = torch.randn(batch, 3, *size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = (out @ out.T).mean()  # touches every descriptor, like a pairwise loss
        loss.backward()
        for p in params:
            p.grad = None

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)  # the median resists a busy neighbour on a shared host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help=f"comma-separated preset names or 'all' (default: %(default)s); "
                             f"available: {', '.join(list_presets())}")
    parser.add_argument("--batch-size", type=int, default=2, help="CPU batch size (default: %(default)s)")
    parser.add_argument("--gpu-batch-size", type=int, default=32, help="GPU batch size (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--cpu-scale", type=float, default=1.0,
                        help="CPU image size as a fraction of the preset's (default: %(default)s)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="CPU candidate also uses bf16 autocast (slow without AMX/AVX512-BF16)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements")
    args = parser.parse_args(argv)

    names = list_presets() if args.presets == "all" else [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in list_presets()]
    if unknown:
        parser.error(f"unknown presets: {', '.join(unknown)}")
    scale = args.cpu_scale
    has_gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"GPU: {torch.cuda.get_device_name(0) if has_gpu else 'none'}; random init; "
          f"forward+backward images/s")
    if not args.no_cpu and scale != 1.0:
        print(f"CPU runs use REDUCED image sizes ({scale:g} x preset)")

    rows, result = [], {"benchmark": "model_throughput", "cpu": {}, "gpu": {}}
    for name in names:
        cfg = model_preset(name, pretrained=None)
        dim = None
        if not args.no_cpu:
            size = cfg.image_hw if scale == 1.0 else scaled_size(cfg, scale)
            torch.manual_seed(0)
            model = build_model(cfg.replace(image_size=size))
            dim = model.descriptor_dim
            ips = images_per_s(model, size, args.batch_size, args.steps, args.warmup, "cpu")
            del model
            torch.manual_seed(0)
            fast = build_model(cfg.replace(image_size=size, channels_last=True))
            cand = images_per_s(fast, size, args.batch_size, args.steps, args.warmup, "cpu",
                                bf16=args.cpu_bf16)
            del fast
            label = "bf16+CL" if args.cpu_bf16 else "fp32+CL"
            rows.append((name, "cpu", "fp32", f"{size[0]}x{size[1]}", args.batch_size, ips, "1.00x"))
            rows.append((name, "cpu", label, f"{size[0]}x{size[1]}", args.batch_size, cand,
                         f"{cand / ips:.2f}x"))
            result["cpu"][name] = {"size": list(size), "batch": args.batch_size,
                                   "fp32": round(ips, 3), label: round(cand, 3),
                                   "speedup": round(cand / ips, 3)}
        if has_gpu:
            size = cfg.image_hw
            torch.manual_seed(0)
            base = build_model(cfg).cuda()
            dim = base.descriptor_dim
            fp32 = images_per_s(base, size, args.gpu_batch_size, args.steps, args.warmup + 2, "cuda")
            del base
            torch.cuda.empty_cache()
            fast = build_model(cfg.replace(channels_last=True)).cuda()
            bf16 = images_per_s(fast, size, args.gpu_batch_size, args.steps, args.warmup + 2, "cuda", bf16=True)
            del fast
            torch.cuda.empty_cache()
            ratio = bf16 / fp32
            rows.append((name, "cuda", "fp32", f"{size[0]}x{size[1]}", args.gpu_batch_size, fp32, "1.00x"))
            rows.append((name, "cuda", "bf16+CL", f"{size[0]}x{size[1]}", args.gpu_batch_size, bf16, f"{ratio:.2f}x"))
            result["gpu"][name] = {"size": list(size), "batch": args.gpu_batch_size, "fp32": round(fp32, 2),
                                   "bf16_channels_last": round(bf16, 2), "speedup": round(ratio, 3)}
        print(f"  done {name} ({dim}-d)", flush=True)

    header = ("preset", "device", "precision", "size", "batch", "img/s", "vs fp32")
    widths = [max(len(str(r[i])) if i != 5 else 9 for r in rows + [header]) for i in range(len(header))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        cells = [r[0], r[1], r[2], r[3], str(r[4]), f"{r[5]:.2f}", r[6]]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    speedups = [v["speedup"] for v in result["gpu"].values()]
    result["gpu_speedup_geomean"] = (round(math.exp(sum(map(math.log, speedups)) / len(speedups)), 3)
                                     if speedups else None)
    result["cpu_reduced_size"] = scale != 1.0 and not args.no_cpu
    cpu_speedups = [v["speedup"] for v in result["cpu"].values()]
    result["cpu_speedup_geomean"] = (round(math.exp(sum(map(math.log, cpu_speedups))
                                                    / len(cpu_speedups)), 3) if cpu_speedups else None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
