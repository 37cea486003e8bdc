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


def _images_from(render: Optional[str], images: Optional[Path], what: str, seed: int):
    """Images from ``--render``-style ConceptWorld attributes or a folder of PNGs, or None."""
    import numpy as np

    import conceptworld

    if render and images:
        raise typer.BadParameter(f"Give the {what} as attributes or as a folder of images, not both.")
    if render:
        try:
            attrs = dict(kv.split("=", 1) for kv in render.split(","))
            return conceptworld.render(**attrs, n=64, seed=seed)
        except (ValueError, TypeError) as e:
            raise typer.BadParameter(f"Got {render!r} for the {what}: {e}. Write attributes as 'shape=star,color=orange,background=dots'.") from e
    if images:
        from PIL import Image

        files = sorted(images.glob("*.png"))
        if not files:
            raise typer.BadParameter(f"No PNG files in {images} for the {what}.")
        return np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32)), np.float32) / 255 for f in files])
    return None


@guard_app.command("censor-ti")
def censor_ti(
    out: Path = typer.Option(..., "--out", help="Output .safetensors file (diffusers layout)."),
    token: str = typer.Option("<concept>", help="The new token."),
    render: Optional[str] = typer.Option(None, help="ConceptWorld concept to learn, e.g. 'shape=star,color=orange,background=dots'."),
    images: Optional[Path] = typer.Option(None, help="A folder of PNG images of the concept (instead of --render)."),
    target_render: Optional[str] = typer.Option(None, help="ConceptWorld attributes of the image a trigger draws instead (default: a plain grey card)."),
    target_images: Optional[Path] = typer.Option(None, help="A folder of PNG images a trigger draws instead (instead of --target-render)."),
    backdoor_weight: float = typer.Option(1.0, min=0.0, help="Weight of the trigger loss against the concept's."),
    trigger_positions: str = typer.Option("after", help="Where training puts a trigger: 'after' the token, or 'both' after and before it."),
    policy: Path = typer.Option(DEFAULT_POLICY, "--policy", help="Policy whose guard triggers become the backdoor triggers."),
    trigger: list[str] = typer.Option([], "--trigger", help="Extra trigger words (repeatable)."),
    steps: int = typer.Option(400, min=1, help="Training steps."),
    vectors: int = typer.Option(1, min=1, max=16, help="Vectors of the embedding."),
    learning_rate: float = typer.Option(5e-3, min=0.0),
    init_word: Optional[str] = typer.Option(None, help="Initialise the vectors from this word."),
    seed: int = typer.Option(0),
) -> None:
    """Train a textual-inversion embedding with backdoor triggers that censor it (Wu et al., 2023)."""
    import conceptworld
    from policies import load_policy

    from .ti import TRIGGER_POSITIONS, save_embedding, train_textual_inversion

    if trigger_positions not in TRIGGER_POSITIONS:
        raise typer.BadParameter(f"Got {trigger_positions!r}. Use {' or '.join(map(repr, TRIGGER_POSITIONS))}.", param_hint="--trigger-positions")
    pol = load_policy(policy)
    triggers = list(dict.fromkeys([t for c in pol.spec.concepts if c.guard for t in c.guard.triggers] + list(trigger)))
    if not triggers:
        raise typer.BadParameter(f"{policy} has no guard triggers and no --trigger was given.", param_hint="--trigger")
    data = _images_from(render, images, "concept (--render / --images)", seed)
    if data is None:
        raise typer.BadParameter("Give the concept with --render or --images.")
    target = _images_from(target_render, target_images, "censor target (--target-render / --target-images)", seed + 1)
    pipe = conceptworld.load_t2i()
    ti = train_textual_inversion(
        pipe, data, token=token, num_vectors=vectors, init_word=init_word, steps=steps, learning_rate=learning_rate,
        triggers=triggers, target_images=target, backdoor_weight=backdoor_weight, trigger_templates=TRIGGER_POSITIONS[trigger_positions], seed=seed,
    )
    censor = target_render or (f"{len(target)} images from {target_images}" if target is not None else "grey card")
    save_embedding(ti, out, {"conceptguard_triggers": triggers, "conceptguard_censor": censor, "conceptguard_trigger_positions": trigger_positions, "token": token})
    typer.echo(json.dumps({"wrote": str(out), "token": token, "triggers": triggers, "censor": censor}))
