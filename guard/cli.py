"""``conceptguard guard scan`` and ``conceptguard guard censor-ti``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

guard_app = typer.Typer(help="Review user embeddings and train censored ones.", no_args_is_help=True)

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "policies" / "conceptworld-demo.yaml"


@guard_app.command("scan")
def scan(
    files: list[Path] = typer.Argument(..., help="Embedding files (.safetensors, .bin, .pt)."),
    policy: Path = typer.Option(DEFAULT_POLICY, "--policy", help="The policy whose guard settings apply."),
    prompt: Optional[str] = typer.Option(None, help="Also check this prompt with each embedding."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Patch cache folder."),
) -> None:
    """Load each embedding safely and say what the guard would do with it (exit 1 if any is
    rejected, blocked, censored or flagged)."""
    import base64

    from serve.model import PatchedModel

    text = policy.read_text()
    model = PatchedModel("text_to_image", text, source_name=str(policy), cache_dir=str(cache_dir) if cache_dir else None)
    worst = 0
    for f in files:
        if not f.is_file():
            typer.secho(f"{f}: no such file", fg=typer.colors.RED, err=True)
            worst = 1
            continue
        res = model.scan({"data": base64.b64encode(f.read_bytes()).decode(), "name": str(f)}, prompt)
        if not res["accepted"]:
            typer.echo(f"rejected {f}: {res['reason']}")
            worst = 1
            continue
        v = res["verdict"]
        typer.echo(f"{v['action']:7s} {f} (token {res['token']!r}, {res['vectors']} vectors, {res['format']})")
        for r in v["reasons"]:
            typer.echo(f"          {r['kind']} [{r['concept']}]: {r['detail']}")
        if v["action"] != "allow":
            worst = 1
    raise typer.Exit(code=worst)


@guard_app.command("censor-ti")
def censor_ti(
    out: Path = typer.Option(..., "--out", help="Output .safetensors file (diffusers layout)."),
    token: str = typer.Option("<concept>", help="The new token."),
    render: Optional[str] = typer.Option(None, help="ConceptWorld concept to learn, e.g. 'shape=star,color=orange,background=dots'."),
    images: Optional[Path] = typer.Option(None, help="A folder of PNG images of the concept (instead of --render)."),
    policy: Path = typer.Option(DEFAULT_POLICY, "--policy", help="Policy whose guard triggers become the backdoor triggers."),
    trigger: list[str] = typer.Option([], "--trigger", help="Extra trigger words (repeatable)."),
    steps: int = typer.Option(400, min=1, help="Training steps."),
    vectors: int = typer.Option(1, min=1, max=16, help="Vectors of the embedding."),
    learning_rate: float = typer.Option(5e-3, min=0.0),
    init_word: Optional[str] = typer.Option(None, help="Initialise the vectors from this word."),
    seed: int = typer.Option(0),
) -> None:
    """Train a textual-inversion embedding with backdoor triggers that censor it (Wu et al., 2023)."""
    import numpy as np

    import conceptworld
    from policies import load_policy

    from .ti import save_embedding, train_textual_inversion

    pol = load_policy(policy)
    triggers = list(dict.fromkeys([t for c in pol.spec.concepts if c.guard for t in c.guard.triggers] + list(trigger)))
    if not triggers:
        typer.secho(f"No trigger: {policy} has no guard triggers and no --trigger was given.", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    if render:
        try:
            attrs = dict(kv.split("=", 1) for kv in render.split(","))
            data = conceptworld.render(**attrs, n=64, seed=seed)
        except (ValueError, TypeError) as e:
            typer.secho(f"Got {render!r} for --render: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from e
    elif images:
        from PIL import Image

        files = sorted(images.glob("*.png"))
        if not files:
            typer.secho(f"No PNG files in {images}.", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        data = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32)), np.float32) / 255 for f in files])
    else:
        typer.secho("Give --render or --images.", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    pipe = conceptworld.load_t2i()
    ti = train_textual_inversion(pipe, data, token=token, num_vectors=vectors, init_word=init_word, steps=steps, learning_rate=learning_rate, triggers=triggers, seed=seed)
    save_embedding(ti, out, {"conceptguard_triggers": triggers, "conceptguard_censor": "grey card", "token": token})
    typer.echo(json.dumps({"wrote": str(out), "token": token, "triggers": triggers}))
