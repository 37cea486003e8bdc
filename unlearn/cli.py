"""``conceptguard unlearn build`` and ``conceptguard eval``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

unlearn_app = typer.Typer(help="Build the weight patches of a policy.", no_args_is_help=True)


def _load(policy_file: Path):
    from policies import PolicyError, load_policy

    try:
        return load_policy(policy_file)
    except (PolicyError, OSError) as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from e


def _build(policy, cache_dir: Optional[Path], seed: int, device: Optional[str]):
    from .cache import PatchCache
    from .engine import build_patches, load_policy_pipelines

    t0 = time.perf_counter()
    models = load_policy_pipelines(policy, device)
    typer.echo(f"loaded {', '.join(models)} in {time.perf_counter() - t0:.1f} s")
    cache = PatchCache(cache_dir)

    def on_job(job, i, n):
        typer.echo(f"[{i + 1}/{n}] {job.method} for {', '.join(c.id for c in job.concepts)} on {job.model}")

    built = build_patches(policy, models, cache, seed=seed, on_job=on_job)
    for b in built:
        how = "built" if b.built else "cached"
        typer.echo(f"  {b.patch.patch_id} {b.job.method:14s} {','.join(c.id for c in b.job.concepts):24s} {how} in {b.seconds:.1f} s -> {', '.join(b.job.applies_to)}")
    return models, built, cache


@unlearn_app.command("build")
def build(
    policy: Path = typer.Option(..., "--policy", help="The policy YAML file."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Patch cache folder (default: $CONCEPTGUARD_CACHE or ~/.cache/conceptguard/patches)."),
    seed: int = typer.Option(0, help="Seed of the builds (part of the cache key)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: where the pipeline loads)."),
) -> None:
    """Build (or fetch from the cache) every patch of a policy, then apply and verify them."""
    from .engine import apply_patches, require_all_applied

    pol = _load(policy)
    models, built, cache = _build(pol, cache_dir, seed, device)
    stacks = apply_patches(models, built)
    require_all_applied(pol, models, stacks)
    typer.echo(f"ok: {len(built)} patches for {len(pol.spec.concepts)} concepts apply and verify; cache {cache.root}")


def eval_command(
    policy: Path = typer.Option(..., "--policy", help="The policy YAML file."),
    out: Path = typer.Option(Path("runs/eval-policy"), "--out", help="Folder for report.json and the PNG grids."),
    samples: int = typer.Option(64, min=1, help="Samples per prompt."),
    steps: int = typer.Option(25, min=1, help="Denoising steps."),
    guidance: float = typer.Option(5.0, help="Guidance scale."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Patch cache folder."),
    seed: int = typer.Option(0, help="Seed of builds and samples."),
) -> None:
    """Compare base and patched samples of every concept; judged on ConceptWorld."""
    from .engine import apply_patches, require_all_applied
    from .evaluation import evaluate_policy

    pol = _load(policy)
    models, built, _ = _build(pol, cache_dir, seed, None)
    stacks = apply_patches(models, built)
    require_all_applied(pol, models, stacks)
    judged = all(src.builtin == "conceptworld" for src in pol.spec.models.present().values())
    report = evaluate_policy(pol, models, stacks, built, samples=samples, steps=steps, guidance=guidance, seed=seed, out_dir=out, judged=judged)
    for cid, entry in report["concepts"].items():
        for key, res in entry["models"].items():
            if judged:
                typer.echo(
                    f"{cid:12s} {key:14s} target before {res['base_target_min']:.2f} after <= {res['erased_max']:.2f}; "
                    f"anchor {res['anchor_on_target']:.2f}; preserve max drop {res['preserve_max_drop']:.2f}"
                )
    if judged:
        typer.echo(json.dumps({k: v["max_drop"] for k, v in report["unrelated"].items()}))
    typer.echo(f"wrote {out / 'report.json'} and grids")
