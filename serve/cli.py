"""The ``conceptguard`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from guard.cli import guard_app
from policies.cli import policy_app
from unlearn.cli import eval_command, unlearn_app

app = typer.Typer(
    help="conceptguard: remove concepts from diffusion models and serve them safely.",
    no_args_is_help=True,
    add_completion=False,
)
world_app = typer.Typer(help="The bundled ConceptWorld models and their judge.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(policy_app, name="policy", help="Validate, explain and compare concept-removal policies.")
app.add_typer(unlearn_app, name="unlearn")
app.add_typer(guard_app, name="guard")
app.command("eval")(eval_command)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    out: Path = typer.Option(Path("sample.png"), help="Output file: .png for images, .gif or .mp4 for videos."),
    video: bool = typer.Option(False, "--video", help="Generate a clip with the text-to-video model."),
    model: Optional[str] = typer.Option(None, help="A diffusers folder or hub id; default: the bundled ConceptWorld model."),
    n: int = typer.Option(1, min=1, max=16, help="How many samples (laid side by side)."),
    steps: int = typer.Option(25, min=1, max=200, help="Denoising steps."),
    guidance: float = typer.Option(5.0, min=0.0, max=30.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Random seed."),
    judge: bool = typer.Option(True, help="Print what the ConceptWorld judge sees (bundled model only)."),
) -> None:
    """Generate images or a clip from a prompt (no policy applied)."""
    import numpy as np
    import torch

    import conceptworld

    if not prompt.strip():
        _fail("Got an empty prompt. Write what to draw, for example 'a red star on stripes'.")
    suffix = out.suffix.lower()
    allowed = (".gif", ".mp4") if video else (".png",)
    if suffix not in allowed:
        _fail(f"Got {str(out)!r} for --out. {'A video' if video else 'An image'} is written as {' or '.join(allowed)}; change the file name.")
    try:
        if video:
            from diffusers import AnimateDiffPipeline

            pipe = AnimateDiffPipeline.from_pretrained(model) if model else conceptworld.load_t2v()
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(model) if model else conceptworld.load_t2i()
    except (OSError, ValueError) as e:
        _fail(f"Could not load the model {model or 'ConceptWorld'}: {e}")
    gen = torch.Generator().manual_seed(seed)
    if video:
        frames = np.asarray(pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").frames)
        import imageio.v3 as iio

        strip = (np.concatenate(list(frames), axis=2) * 255).round().astype(np.uint8)
        iio.imwrite(out, list(strip), **({"duration": 125, "loop": 0} if suffix == ".gif" else {"fps": 8}))
        if judge and not model:
            for i, clip in enumerate(frames):
                verdict = conceptworld.judge_video(clip)
                first = {k: v[0] for k, v in verdict["frames"][0].items()}
                typer.echo(f"clip {i}: {first}, moving {verdict['motion'][0]}")
    else:
        images = pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").images
        from PIL import Image

        Image.fromarray((np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)).save(out)
        if judge and not model:
            for i, row in enumerate(conceptworld.judge(images)):
                typer.echo(f"image {i}: " + ", ".join(f"{k}={v} ({c:.2f})" for k, (v, c) in row.items()))
    typer.echo(f"wrote {out}")


RUNTIME_FILE = Path.home() / ".cache" / "conceptguard" / "serve-settings.json"


@app.command("serve")
def serve_command(
    policy: Optional[Path] = typer.Option(None, "--policy", help="Policy YAML file (default: the shipped ConceptWorld demo policy)."),
    host: str = typer.Option("127.0.0.1", help="HTTP host."),
    port: int = typer.Option(8000, min=1, max=65535, help="HTTP port."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Patch cache folder shared by the replicas."),
    device: Optional[str] = typer.Option(None, help="Device of the model replicas (cpu, cuda)."),
    image_replicas: int = typer.Option(1, min=1, help="Replicas of the text-to-image deployment."),
    video_replicas: int = typer.Option(1, min=1, help="Replicas of the text-to-video deployment."),
    num_cpus: float = typer.Option(1.0, min=0.01, help="CPUs per model replica."),
    num_gpus: float = typer.Option(0.0, min=0.0, help="GPUs per model replica."),
    max_batch_size: int = typer.Option(8, min=1, help="Most image requests batched into one generation."),
    trace_denoiser: Optional[bool] = typer.Option(
        None, "--trace-denoiser/--no-trace-denoiser", help="Replay the denoiser through TorchScript traces (same outputs; default: on for CPU replicas)."
    ),
    ray_address: Optional[str] = typer.Option(None, help="Address of a running Ray cluster (default: start a local Ray)."),
    exit_when_ready: bool = typer.Option(False, "--exit-when-ready", help="Stop once the app is ready (for checks and benchmarks)."),
) -> None:
    """Serve the patched text-to-image and text-to-video models behind Ray Serve."""
    import os
    import time

    from .app import APP_NAME, ServeSettings, build_app

    settings = ServeSettings(
        **({"policy": str(policy.resolve())} if policy else {}),
        cache_dir=str(cache_dir.resolve()) if cache_dir else None,
        device=device,
        image_replicas=image_replicas,
        video_replicas=video_replicas,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_batch_size=max_batch_size,
        trace_denoiser=trace_denoiser,
    )
    from policies import PolicyError, load_policy

    try:
        pol = load_policy(settings.policy)
    except (PolicyError, OSError) as e:
        _fail(str(e))
    import ray
    from ray import serve

    needed = int((image_replicas + video_replicas) * num_cpus + 0.999) + 1
    t0 = time.perf_counter()
    if ray_address:
        ray.init(address=ray_address, namespace="conceptguard")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, namespace="conceptguard", log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    typer.echo(f"policy {pol.metadata.name} v{pol.metadata.version}: {len(pol.spec.concepts)} concepts; applying patches (building the missing ones)...")
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    except Exception as e:
        serve.shutdown()
        _fail(f"the application did not become ready: {e}")
    RUNTIME_FILE.parent.mkdir(parents=True, exist_ok=True)
    RUNTIME_FILE.write_text(settings.model_dump_json(indent=2))
    url = f"http://{host}:{port}"
    typer.echo(f"ready in {time.perf_counter() - t0:.1f} s at {url}  (OpenAPI: {url}/docs, metrics: {url}/metrics)")
    typer.echo(
        "example:\n"
        f"  curl -s {url}/v1/images -H 'content-type: application/json' "
        "-d '{\"prompt\": \"zorblax on dots\", \"n\": 4, \"response_format\": \"png\"}' -o sample.png"
    )
    if exit_when_ready:
        serve.shutdown()
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("shutting down")
        serve.shutdown()


@policy_app.command("apply")
def policy_apply(
    file: Path = typer.Argument(..., help="The new policy YAML file."),
    ray_address: str = typer.Option("auto", help="Address of the Ray cluster running the app."),
) -> None:
    """Roll a new policy out to the running app without downtime (validated first)."""
    from policies import PolicyError, load_policy

    from .app import APP_NAME, ServeSettings, build_app

    try:
        pol = load_policy(file)
    except (PolicyError, OSError) as e:
        _fail(f"{e}\nThe running policy is unchanged.")
    if not RUNTIME_FILE.exists():
        _fail(f"No running app found ({RUNTIME_FILE} is missing). Start one with `conceptguard serve`.")
    settings = ServeSettings.model_validate_json(RUNTIME_FILE.read_text()).model_copy(update={"policy": str(file.resolve())})
    import ray
    from ray import serve

    ray.init(address=ray_address, namespace="conceptguard", log_to_driver=False)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    RUNTIME_FILE.write_text(settings.model_dump_json(indent=2))
    typer.echo(f"rolled out {pol.metadata.name} v{pol.metadata.version}; check GET /v1/policy for the version in force")


@world_app.command("vocab")
def world_vocab() -> None:
    """Print the ConceptWorld vocabulary as JSON."""
    import conceptworld

    typer.echo(json.dumps(conceptworld.vocabulary(), indent=2))


@world_app.command("judge")
def world_judge(files: list[Path] = typer.Argument(..., help="PNG images (a horizontal strip is split into 32x32 tiles).")) -> None:
    """Say which ConceptWorld concepts each image shows."""
    import numpy as np
    from PIL import Image

    import conceptworld

    for f in files:
        if not f.is_file():
            _fail(f"Got {str(f)!r}: no such file. Pass PNG files written by `conceptguard generate`.")
        arr = np.asarray(Image.open(f).convert("RGB"))
        h, w = arr.shape[:2]
        tiles = [arr[:, i : i + h] for i in range(0, w - h + 1, h)] if w % h == 0 else [arr]
        for i, row in enumerate(conceptworld.judge(np.stack([np.asarray(Image.fromarray(t).resize((32, 32), Image.BOX)) for t in tiles]))):
            typer.echo(f"{f}[{i}]: " + ", ".join(f"{k}={v} ({c:.2f})" for k, (v, c) in row.items()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
