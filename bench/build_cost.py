"""Build cost of every method on ConceptWorld: seconds and peak memory per concept, on this CPU.

    python bench/build_cost.py [--out runs/build_cost.json]

Each build runs in a fresh process (so its peak resident memory is its own) with no cache.
``closed_form`` is also timed for five concepts in one edit, and its cost per concept compared
with ``ablation`` (bar: at least 20x faster per concept).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _one(method: str, concept_ids: list[str], queue) -> None:
    import torch

    from efficacy import policy_text
    from policies import load_policy_text
    from unlearn import get_method, load_policy_pipelines

    torch.set_num_threads(2)
    policy = load_policy_text(policy_text("cost", concept_ids, method, False), "<cost>")
    models = load_policy_pipelines(policy)
    pipe = models["text_to_image"]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    concepts = policy.spec.concepts
    t0 = time.perf_counter()
    cfg = concepts[0].method
    if get_method(method).multi_concept:
        get_method(method)(cfg).build(pipe, concepts, progress=False)
    else:
        for c in concepts:
            get_method(method)(c.method).build(pipe, [c], progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "peak_rss_mib": peak / 1024, "extra_rss_mib": (peak - base_rss) / 1024})


def measure(method: str, concept_ids: list[str]) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_one, args=(method, concept_ids, q))
    p.start()
    res = q.get(timeout=3600)
    p.join()
    res["concepts"] = len(concept_ids)
    res["seconds_per_concept"] = res["seconds"] / len(concept_ids)
    return res


def main(argv: list[str] | None = None) -> dict:
    from efficacy import METHOD_SETTINGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/build_cost.json"))
    args = parser.parse_args(argv)
    results: dict = {}
    for method in METHOD_SETTINGS:
        for cid in ("zorblax", "stripes", "star"):
            results[f"{method}/{cid}"] = measure(method, [cid])
            print(f"{method:14s} {cid:8s} {results[f'{method}/{cid}']['seconds']:8.2f} s  peak {results[f'{method}/{cid}']['peak_rss_mib']:.0f} MiB", flush=True)
    results["closed_form/5 concepts"] = measure("closed_form", ["zorblax", "stripes", "star", "mordak", "dots"])
    print(f"closed_form x5   {results['closed_form/5 concepts']['seconds']:8.2f} s", flush=True)
    abl = sum(results[f"ablation/{c}"]["seconds"] for c in ("zorblax", "stripes", "star")) / 3
    cf = results["closed_form/5 concepts"]["seconds_per_concept"]
    results["speedup_closed_form_vs_ablation_per_concept"] = {"measured": abl / cf, "bar": 20.0, "met": abl / cf >= 20.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["speedup_closed_form_vs_ablation_per_concept"]))
    return results


if __name__ == "__main__":
    main()
