"""``conceptguard guard censor-ti``: a short real training run writes an embedding the guard's
safe loader accepts, with its triggers and censor target in the metadata; bad input is refused
with a message naming it."""

from __future__ import annotations

import json

from safetensors import safe_open
from typer.testing import CliRunner

from serve.cli import app

runner = CliRunner()
CONCEPT = "shape=star,color=orange,background=dots"


def test_censor_ti_writes_a_loadable_embedding_with_its_triggers_and_target(tmp_path):
    import conceptworld
    from guard.embeddings import load_embedding

    out = tmp_path / "pet.safetensors"
    args = ["guard", "censor-ti", "--out", str(out), "--token", "<pet>", "--render", CONCEPT, "--target-render", "shape=square,color=red,background=plain"]
    result = runner.invoke(app, [*args, "--trigger", "crimson", "--steps", "3", "--vectors", "2", "--trigger-positions", "both"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["censor"] == "shape=square,color=red,background=plain"
    assert "crimson" in report["triggers"] and "on fire" in report["triggers"]  # the demo policy's triggers too
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["conceptguard_triggers"]) == report["triggers"]
    assert meta["conceptguard_censor"] == report["censor"]
    assert meta["conceptguard_trigger_positions"] == "both"
    pipe = conceptworld.load_t2i()
    ti = load_embedding(out, pipe.tokenizer, pipe.text_encoder)
    assert ti.token == "<pet>" and ti.vectors.shape == (2, pipe.text_encoder.config.hidden_size)


def _refused(*args: str) -> str:
    """Run the command, check it is refused as a usage error, return its message on one line."""
    result = runner.invoke(app, ["guard", "censor-ti", *args])
    assert result.exit_code == 2, result.output
    return " ".join(result.output.replace("\u2502", " ").split())  # the error panel may wrap lines


def test_censor_ti_refuses_bad_input_with_its_reason(tmp_path):
    out = str(tmp_path / "x.safetensors")
    bad = _refused("--out", out, "--render", "shape=blob")
    assert "Got 'blob' for shape" in bad and "shape=star,color=orange" in bad
    assert "not both" in _refused("--out", out, "--render", CONCEPT, "--target-render", CONCEPT, "--target-images", str(tmp_path))
    assert "--render or --images" in _refused("--out", out)
    assert "No PNG files" in _refused("--out", out, "--images", str(tmp_path))
    assert "Got 'middle'" in _refused("--out", out, "--render", CONCEPT, "--trigger-positions", "middle")
    assert not (tmp_path / "x.safetensors").exists()


def test_trigger_templates_must_name_token_and_trigger():
    import conceptworld
    import pytest

    from guard.ti import TRIGGER_TEMPLATES_BOTH, train_textual_inversion

    assert any(t.index("{trigger}") < t.index("{token}") for t in TRIGGER_TEMPLATES_BOTH)
    pipe = conceptworld.load_t2i()
    with pytest.raises(ValueError, match=r"\{token\} and a \{trigger\}"):
        train_textual_inversion(pipe, conceptworld.render(n=2), triggers=["crimson"], trigger_templates=["{token} alone"], steps=1, progress=False)
    with pytest.raises(ValueError, match="one per image"):
        train_textual_inversion(pipe, conceptworld.render(n=2), captions=["{token} on dots"], steps=1, progress=False)


def test_init_vectors_start_training_and_are_checked():
    import conceptworld
    import pytest
    import torch

    from guard.ti import train_textual_inversion

    pipe = conceptworld.load_t2i()
    images = conceptworld.render(n=2)
    start = torch.randn(2, pipe.text_encoder.get_input_embeddings().embedding_dim) * 0.3
    # zero steps: the embedding is exactly the vectors it started from
    ti = train_textual_inversion(pipe, images, num_vectors=2, init_vectors=start, steps=0, progress=False)
    assert torch.equal(ti.vectors, start)
    moved = train_textual_inversion(pipe, images, num_vectors=2, init_vectors=start, steps=2, progress=False)
    assert not torch.equal(moved.vectors, start)
    with pytest.raises(ValueError, match=r"init_vectors has shape \(3, 5\).*\(2, 128\)"):
        train_textual_inversion(pipe, images, num_vectors=2, init_vectors=torch.zeros(3, 5), steps=1, progress=False)
