"""``conceptguard policy ...``: validate, explain and compare policy files, and print the schema.

``serve/cli.py`` mounts :data:`policy_app` with ``app.add_typer(policy_app, name="policy")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .loader import PolicyError, load_policy
from .schema import ConceptSpec, FieldChange, Policy, diff_policies, export_json_schema, json_schema

policy_app = typer.Typer(help="Validate, explain and compare concept-removal policies.", no_args_is_help=True)

# Rough GPU-seconds for an SD-1.5-class model on one data-centre GPU: (fixed, per optimisation
# step). Only meant to tell a 10-second edit from a 10-minute fine-tune; ConceptWorld is far faster.
_COST_S: dict[str, tuple[float, float]] = {
    "ablation": (0.0, 1.0),
    "forget_me_not": (0.0, 1.0),
    "text_encoder": (0.0, 0.3),
    "closed_form": (10.0, 0.0),
}
_SCOPE_MODELS = {"image": ("text_to_image",), "video": ("text_to_video",), "both": ("text_to_image", "text_to_video")}


def _load(path: Path) -> Policy:
    """Load ``path`` or print its issues and exit with code 1."""
    try:
        return load_policy(path)
    except PolicyError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(code=1) from e


def _targeted_models(policy: Policy, concept: ConceptSpec) -> list[str]:
    present = policy.spec.models.present()
    return [m for m in _SCOPE_MODELS[concept.scope] if m in present]


def _cost_estimate_s(policy: Policy, concept: ConceptSpec) -> float:
    """Rough GPU-seconds to apply ``concept``: per targeted model, fixed + steps x per-step."""
    fixed, per_step = _COST_S[concept.method.name]
    return len(_targeted_models(policy, concept)) * (fixed + per_step * concept.method.optimisation_steps)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"~{seconds:.0f} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def _value(value: Any, limit: int = 70) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _change(change: FieldChange) -> str:
    return f"{change.field}: {_value(change.old)} -> {_value(change.new)}"


@policy_app.command()
def validate(files: list[Path] = typer.Argument(..., help="Policy YAML files.", show_default=False)) -> None:
    """Check policy files; exit code 0 when all are valid, 1 otherwise."""
    failed = 0
    for path in files:
        try:
            policy = load_policy(path)
        except PolicyError as e:
            failed += 1
            for issue in e.issues:
                typer.echo(str(issue))
            continue
        count = len(policy.spec.concepts)
        typer.echo(f"ok {path} ({policy.metadata.name} v{policy.metadata.version}, {count} concept{'s' * (count != 1)})")
    if failed:
        typer.echo(f"{failed} of {len(files)} file{'s' * (len(files) != 1)} invalid", err=True)
        raise typer.Exit(code=1)


@policy_app.command()
def explain(file: Path = typer.Argument(..., help="A policy YAML file.", show_default=False)) -> None:
    """Describe what a policy does: its models, and per concept the method, weights and cost."""
    policy = _load(file)
    meta = policy.metadata
    typer.echo(f"policy {meta.name} v{meta.version} (owner: {meta.owner}; fingerprint {policy.fingerprint()[:12]})")
    if meta.description:
        typer.echo(f"  {meta.description}")
    typer.echo("models:")
    for role, model in policy.spec.models.present().items():
        typer.echo(f"  {role}: {model.describe()}")
    typer.echo(f"concepts ({len(policy.spec.concepts)}):")
    total = 0.0
    for concept in policy.spec.concepts:
        method = concept.method
        cost = _cost_estimate_s(policy, concept)
        total += cost
        steps = f"{method.optimisation_steps} steps" if method.optimisation_steps else "closed form, no training"
        phrasings = len(concept.target.phrasings)
        typer.echo(f"  {concept.id} [{concept.category}]: {concept.target.text!r}" + (f" (+{phrasings} phrasings)" if phrasings else ""))
        typer.echo(f"    method: {method.name} (parameters: {method.parameter_group}; {steps})")
        typer.echo(f"    scope: {concept.scope} -> {', '.join(_targeted_models(policy, concept)) or 'no model'}")
        typer.echo(f"    anchor: {concept.anchor!r}")
        typer.echo(f"    preserve: {len(concept.preserve)} prompt{'s' * (len(concept.preserve) != 1)}")
        if concept.guard is not None:
            typer.echo(f"    guard: {'on' if concept.guard.enabled else 'off'}")
        typer.echo(f"    cost estimate: {_duration(cost)} GPU time")
    typer.echo(f"total cost estimate: {_duration(total)} GPU time (rough: SD-1.5-class model, one GPU; ConceptWorld is much faster)")


@policy_app.command()
def diff(
    old: Path = typer.Argument(..., help="The earlier policy file.", show_default=False),
    new: Path = typer.Argument(..., help="The later policy file.", show_default=False),
) -> None:
    """Show what changed between two policies: metadata, models, concepts added/removed/changed."""
    before, after = _load(old), _load(new)
    result = diff_policies(before, after)
    for change in result.metadata:
        typer.echo(f"metadata.{_change(change)}")
    for change in result.models:
        typer.echo(f"spec.models.{_change(change)}")
    for cid in result.added:
        concept = after.concept(cid)
        typer.echo(f"+ concept {cid} ({concept.category}, {concept.method.name})")
    for cid in result.removed:
        typer.echo(f"- concept {cid}")
    for cid, changes in result.changed.items():
        typer.echo(f"~ concept {cid}: {', '.join(c.field for c in changes)}")
        for change in changes:
            typer.echo(f"    {_change(change)}")
    if not result.metadata and not result.content_changed:
        typer.echo("no changes")
    elif result.content_changed and result.version_change is None:
        typer.echo(f"note: the content changed but metadata.version is still {after.metadata.version}; bump it.")


@policy_app.command()
def schema(out: Optional[Path] = typer.Option(None, "--out", help="Write the schema to this file instead of printing it.")) -> None:
    """Print (or write with --out) the JSON Schema of policy documents."""
    if out is None:
        typer.echo(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return
    export_json_schema(out)
    typer.echo(f"wrote {out}")
