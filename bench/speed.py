"""Generation speed of the ConceptWorld models on this machine: one image, one clip, 25 steps.

    python bench/speed.py [--repeats 10] [--rest 30] [--out runs/speed.json]

Times each model with its denoiser traced (``serve.traced``, what ``conceptguard serve`` runs on
a CPU) and eager (the stock pipeline), median of ``--repeats`` calls after ``--rest`` idle
seconds and right away, compares their outputs (bit for bit, and as 8-bit pixels: a trace with
the direct convolution kernel matches to float rounding), and prints the figures and JSON.
Bars (ConceptWorld issue): one image <= 0.3 s, one clip <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARS = {"seconds_per_image": 0.3, "seconds_per_clip": 3.0}


def to_8bit(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure (median)")
    parser.add_argument("--rest", type=float, default=30.0, help="idle seconds before the rested timing")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    from conceptworld import load_t2i, load_t2v
    from conceptworld.evaluate import generate_clips, generate_images, time_modes
    from serve.traced import trace_pipeline, untrace_pipeline

    jobs = [("seconds_per_image", load_t2i, lambda p: generate_images(p, "a red star on stripes", 1, args.steps, 5.0, 0))]
    if not args.skip_video:
        jobs.append(("seconds_per_clip", load_t2v, lambda p: generate_clips(p, "a red star moving left on stripes", 1, args.steps, 5.0, 0)))
    report: dict = {"steps": args.steps, "repeats": args.repeats, "rest_s": args.rest}
    for name, load, gen in jobs:
        pipe = load()
        pipe.set_progress_bar_config(disable=True)
        eager_out = gen(pipe)
        tracer = trace_pipeline(pipe)
        traced_out = gen(pipe)
        kernels = sorted(set(tracer.kernels.values()))
        untrace_pipeline(pipe)
        figures = time_modes(pipe, name, lambda: gen(pipe), args.repeats, args.rest)
        figures["identical_outputs"] = bool(np.array_equal(eager_out, traced_out))
        figures["max_abs_difference"] = float(np.abs(eager_out - traced_out).max())
        figures["identical_8bit_pixels"] = bool(np.array_equal(to_8bit(eager_out), to_8bit(traced_out)))
        figures["conv_kernels"] = kernels
        figures["bar"] = BARS[name]
        figures["met"] = figures[name] <= BARS[name]
        report[name] = figures
        print(
            f"{name}: traced {figures[name]:.3f} s rested, {figures[name + '_sustained']:.3f} s right away; "
            f"eager {figures[name + '_eager']:.3f} / {figures[name + '_eager_sustained']:.3f} s; "
            f"bar {BARS[name]} ({'met' if figures['met'] else 'NOT met'}); {'/'.join(kernels)} convolutions; "
            f"same outputs: {figures['identical_outputs']} (max difference {figures['max_abs_difference']:.2g}, "
            f"same 8-bit pixels: {figures['identical_8bit_pixels']})",
            flush=True,
        )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
