"""Serving overhead and replica start-up on this CPU, in one run.

    python bench/serve.py [--clients 4] [--requests 64] [--replicas 1] [--out runs/bench_serve.json]
    python bench/serve.py --clients 32 --requests 256 --replicas 2     # the README's figures

1. Throughput and p50/p99 latency of ``POST /v1/images`` (real Ray Serve app, local Ray,
   ConceptWorld + the demo policy's patches) under concurrent clients, against calling the same
   patched pipeline in-process with the same batches (the replica's batch size per call), with every
   core's torch threads (the bar: overhead <= 10% once the CPU is saturated) and with the replica's
   threads; with several replicas, also as many plain processes with a replica's threads each
   (the replicas' compute without Serve). It prints the cores each process used while serving
   and the mean batch the replicas formed (from ``/metrics``).
2. Replica start-up with all patches in the cache against loading the same pipeline with no
   policy, two ways: in this process (the policy's own cost against a 0.07 s model load) and
   as a replica starts, a fresh process from spawn to ready (imports and weights included).
   Bar: <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red star on stripes", "zorblax on dots", "a blue circle on a checkerboard", "a yellow cross on a plain background"]


def request(i: int) -> dict:
    """The i-th request as the image replica receives it (what POST /v1/images fills in)."""
    return {"prompt": PROMPTS[i % len(PROMPTS)], "negative_prompt": "", "n": 1, "steps": 25, "guidance": 5.0, "seed": i, "width": None, "height": None}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(latencies: list[float], wall: float) -> dict:
    return {
        "requests": len(latencies),
        "throughput_rps": len(latencies) / wall,
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "mean_s": statistics.mean(latencies),
    }


def load_run(fn, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        fn(i)
        with lock:
            latencies.append(time.perf_counter() - t0)

    for i in range(clients):  # warm-up
        fn(i)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    return summarize(latencies, time.perf_counter() - t0)


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by every process on the machine, with a short label."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            t = proc.cpu_times()
            cmd = " ".join(proc.info["cmdline"] or [])[:80] or proc.info["name"]
            label = "this benchmark (clients)" if proc.pid == os.getpid() else cmd.split(" ")[0] if cmd.startswith("ray::") else proc.info["name"]
            out[proc.pid] = (label, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_breakdown(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float) -> dict[str, float]:
    """Cores used on average during ``wall`` seconds, per process label (labels summed)."""
    used: dict[str, float] = {}
    for pid, (label, t1) in after.items():
        t0 = before.get(pid, (label, 0.0))[1]
        if t1 - t0 > 0.01 * wall:
            used[label] = used.get(label, 0.0) + (t1 - t0) / wall
    return {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}


def batch_figures(metrics_text: str) -> dict[str, float]:
    """From the app's /metrics: the mean batch a request was generated in, and the mean time
    its batch took to generate (both request-weighted, image endpoint)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("endpoint") == "/v1/images" and sample.name.endswith(("_sum", "_count")):
                sums[sample.name] = sample.value
    out = {}
    for key, name in (("mean_batch_size", "conceptguard_batch_size"), ("mean_batch_generation_s", "conceptguard_generation_duration_seconds")):
        if sums.get(name + "_count"):
            out[key] = round(sums[name + "_sum"] / sums[name + "_count"], 3)
    return out


_WORKER = """
import json, sys, time
import torch
from bench.serve import request as req
from serve.model import PatchedModel
policy, cache, threads, n, batch, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
model = PatchedModel("text_to_image", open(policy).read(), cache_dir=cache)
model.generate([req(i) for i in range(batch)])
print("ready", flush=True)
sys.stdin.readline()
t0 = time.time()
for s in range(first, first + n, batch):
    model.generate([req(i) for i in range(s, min(s + batch, first + n))])
print(json.dumps({"start": t0, "end": time.time()}), flush=True)
"""


def processes_same_compute(policy_path: Path, cache: str, processes: int, threads: int, requests: int, batch: int) -> dict:
    """Throughput of ``processes`` plain Python processes that each load the patched pipeline and
    generate their share of ``requests`` in batches of ``batch`` at the same time, with
    ``threads`` torch threads each: the replicas' compute without Ray Serve."""
    share = requests // processes
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(processes)]  # stderr, for a failure's reason
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(policy_path), cache, str(threads), str(share), str(batch), str(k * share)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )
        for k, log in enumerate(logs)
    ]
    for p, log in zip(procs, logs):  # every process loaded and warmed up before any starts
        while p.stdout.readline().strip() != "ready":
            if p.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"a baseline process failed to start:\n{log.read()[-2000:]}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    runs = [json.loads(p.stdout.readline()) for p in procs]
    for p in procs:
        p.wait()
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"processes": processes, "torch_threads": threads, "requests": share * processes, "throughput_rps": share * processes / wall}


def image_only_policy(path: Path, folder: Path) -> Path:
    """A copy of the policy that governs only its text-to-image model: the benchmark measures
    ``/v1/images``, and a video replica building its patches would share the CPU with it."""
    import yaml

    data = yaml.safe_load(path.read_text())
    data["spec"]["models"].pop("text_to_video", None)
    for concept in data["spec"]["concepts"]:
        concept["scope"] = "image"
    out = folder / "policy-image-only.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the image deployment")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus of the image replica")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads of the image replica (default: Ray's)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the replica (repeatable)")
    parser.add_argument("--skip-startup", action="store_true", help="measure serving only")
    parser.add_argument("--max-batch-size", type=int, default=8, help="most image requests the replica batches")
    parser.add_argument("--batch-wait-timeout", type=float, default=0.05, help="seconds a batch waits to fill")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies" / "conceptworld-demo.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_serve.json"))
    args = parser.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="conceptguard-bench-cache-")
    policy_path = image_only_policy(args.policy, Path(cache))
    results: dict = {"clients": args.clients, "policy": str(args.policy)}

    # --- replica start-up: cached patches vs no policy -----------------------------------------
    from serve.model import PatchedModel
    from unlearn.engine import load_pipeline
    from policies import load_policy

    policy_yaml = policy_path.read_text()
    t0 = time.perf_counter()
    model = PatchedModel("text_to_image", policy_yaml, cache_dir=cache)  # builds the patches once
    results["first_start_with_builds_s"] = time.perf_counter() - t0
    if not args.skip_startup:
        del model
        starts_cached, starts_plain = [], []
        src = load_policy(policy_path).spec.models.text_to_image
        for _ in range(3):
            t0 = time.perf_counter()
            load_pipeline("text_to_image", src)
            starts_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model = PatchedModel("text_to_image", policy_yaml, cache_dir=cache)
            starts_cached.append(time.perf_counter() - t0)
        results["start_no_policy_s"] = statistics.median(starts_plain)
        results["start_cached_patches_s"] = statistics.median(starts_cached)
        ratio = results["start_cached_patches_s"] / results["start_no_policy_s"]
        results["start_ratio_in_process"] = {"measured": ratio, "bar": 1.2, "met": ratio <= 1.2}
        # A replica is a fresh process: imports, weights, then (with a policy) patches from the
        # cache, the fail-closed probes and the guard. Timed from spawn to ready, median of 3.
        fresh = {"no_policy": [], "cached_patches": []}
        code = {
            "no_policy": "from unlearn.engine import load_pipeline; from policies import load_policy_text; import sys; load_pipeline('text_to_image', load_policy_text(open(sys.argv[1]).read()).spec.models.text_to_image)",
            "cached_patches": "from serve.model import PatchedModel; import sys; PatchedModel('text_to_image', open(sys.argv[1]).read(), cache_dir=sys.argv[2])",
        }
        for _ in range(3):
            for name, src_code in code.items():
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", src_code, str(policy_path), cache], cwd=ROOT, check=True, capture_output=True)
                fresh[name].append(time.perf_counter() - t0)
        results["fresh_process_start_s"] = {k: statistics.median(v) for k, v in fresh.items()}
        ratio = results["fresh_process_start_s"]["cached_patches"] / results["fresh_process_start_s"]["no_policy"]
        results["start_ratio_fresh_process"] = {"measured": ratio, "bar": 1.2, "met": ratio <= 1.2}

    # --- in-process baseline: the same patched pipeline, batched as the server batches ------------
    # (the replica's batch size per pipeline call: the best a single process does with the CPU saturated)
    import torch

    batch = min(args.clients, args.max_batch_size)  # the batches the replica forms

    def in_process(threads: int) -> dict:
        torch.set_num_threads(threads)
        model.generate([request(i) for i in range(batch)])  # warm-up
        latencies = []
        t_start = time.perf_counter()
        for start in range(0, args.requests, batch):
            t0 = time.perf_counter()
            chunk = range(start, min(start + batch, args.requests))
            model.generate([request(i) for i in chunk])
            latencies += [time.perf_counter() - t0] * len(chunk)
        return {"torch_threads": threads, **summarize(latencies, time.perf_counter() - t_start)}

    all_threads = torch.get_num_threads()
    # the same compute as one replica: Ray gives it as many torch threads as CPUs
    replica_threads = args.torch_threads or max(1, int(args.replica_cpus))
    results["in_process_same_threads"] = in_process(replica_threads)
    results["in_process"] = in_process(all_threads)
    if args.replicas > 1:
        # the same compute as the replicas: as many plain processes, each with a replica's threads
        results["processes_same_compute"] = processes_same_compute(policy_path, cache, args.replicas, replica_threads, args.requests, batch)

    # --- through HTTP -----------------------------------------------------------------------------
    import httpx
    import ray
    from ray import serve

    from serve.app import ServeSettings, build_app

    ray.init(num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False, namespace="conceptguard-bench")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    # Ray sets a replica's torch threads from num_cpus. On this 2-core machine two replicas of one CPU
    # serve more than one replica of two, whose threads stall when the proxy takes a core (README)
    settings = ServeSettings(
        policy=str(policy_path),
        cache_dir=cache,
        num_cpus=args.replica_cpus,
        image_replicas=args.replicas,
        torch_threads=args.torch_threads,
        env_vars=dict(kv.split("=", 1) for kv in args.env),
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout,
    )
    results["replica"] = {"replicas": args.replicas, "num_cpus": args.replica_cpus, "torch_threads": args.torch_threads, "env": settings.env_vars, "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout}
    serve.run(build_app(settings), name="conceptguard", route_prefix="/")
    client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=args.clients * 2))
    url = f"http://127.0.0.1:{args.port}/v1/images"

    def over_http(i: int) -> None:
        r = client.post(url, json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
        r.raise_for_status()

    cpu_before, t_cpu = cpu_seconds_by_process(), time.perf_counter()
    results["http"] = load_run(over_http, args.clients, args.requests)
    # where the CPU went while serving: the replica's generation against everything else
    results["http"]["cores_used"] = cpu_breakdown(cpu_before, cpu_seconds_by_process(), time.perf_counter() - t_cpu)
    results["http"]["replica_batches"] = batch_figures(client.get(f"http://127.0.0.1:{args.port}/metrics").text)
    serve.shutdown()
    ray.shutdown()
    overhead = results["in_process"]["throughput_rps"] / results["http"]["throughput_rps"] - 1  # extra time per request
    results["throughput_overhead"] = {"measured": overhead, "bar": 0.10, "met": overhead <= 0.10}
    same = results["in_process_same_threads"]["throughput_rps"] / results["http"]["throughput_rps"] - 1
    results["throughput_overhead_same_threads"] = {"measured": same, "note": "against the in-process pipeline with the replica's torch threads"}
    if "processes_same_compute" in results:
        same = results["processes_same_compute"]["throughput_rps"] / results["http"]["throughput_rps"] - 1
        results["throughput_overhead_same_compute"] = {"measured": same, "note": f"against {args.replicas} plain processes running the pipeline with the replicas' threads"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
