"""The ``conceptguard`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

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
        _fail(f"Got {str(out)!r} for --out. A {'video' if video else 'image'} is written as {' or '.join(allowed)}; change the file name.")
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
        frames = np.asarray(pipe(prompt, num_videos_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np").frames)
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
