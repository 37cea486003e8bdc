"""Textual-inversion files: three formats load; malicious and malformed files are refused with
their rule and never run code; a request's embedding never reaches other requests."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from conftest import tiny_text_encoder
from guard.embeddings import EmbeddingLimits, EmbeddingRejected, encode_prompt, load_embedding


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def model(world_tokenizer):
    return world_tokenizer, tiny_text_encoder(0, len(world_tokenizer))


def vec(te, n=1, scale=1.0, seed=0):
    w = te.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(seed)
    return w[torch.randint(0, len(w), (n,), generator=g)].clone() * scale


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_three_formats_load(model):
    tok, te = model
    v = vec(te, 2)
    a = load_embedding(st_save({"<zorb>": v}), tok, te)
    b = load_embedding(torch_bytes({"<zorb>": v}), tok, te)
    c = load_embedding(torch_bytes({"string_to_param": {"*": v}, "string_to_token": {"*": 265}, "name": "<zorb>", "step": 500}), tok, te)
    for e, fmt in ((a, "diffusers"), (b, "diffusers"), (c, "a1111")):
        assert e.token == "<zorb>" and e.num_vectors == 2 and e.source_format == fmt
        assert torch.equal(e.vectors, v)
    d = load_embedding(st_save({"emb_params": v}), tok, te, token="<zorb>")
    assert d.num_vectors == 2


def test_code_executing_pickles_are_refused_without_running(model, tmp_path):
    tok, te = model
    marker = tmp_path / "pwned"
    evil_zip = torch_bytes({"<zorb>": _RunsCode(str(marker))})
    with pytest.raises(EmbeddingRejected, match="could run code"):
        load_embedding(evil_zip, tok, te)
    raw = pickle.dumps({"<zorb>": _RunsCode(str(marker))}, protocol=4)
    with pytest.raises(EmbeddingRejected, match="neither safetensors nor a torch file"):
        load_embedding(raw, tok, te)
    raw2 = pickle.dumps({"<zorb>": _RunsCode(str(marker))}, protocol=2)
    with pytest.raises(EmbeddingRejected):
        load_embedding(raw2, tok, te)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, rule",
    [
        (lambda te: st_save({"<zorb>": torch.zeros(3, 7)}), "dimension 7"),
        (lambda te: st_save({"<zorb>": vec(te, 17)}), "at most 16"),
        (lambda te: st_save({"<zorb>": vec(te).index_fill_(1, torch.tensor([0]), float("nan"))}), "NaN"),
        (lambda te: st_save({"<zorb>": vec(te) * 1e4}), "plausible range"),
        (lambda te: st_save({"<zorb>": vec(te) * 1e-6}), "plausible range"),
        (lambda te: st_save({"star": vec(te)}), "shadows a word"),
        (lambda te: st_save({"a": vec(te), "b": vec(te)}), "match no embedding layout"),
        (lambda te: torch_bytes({"string_to_param": {"*": vec(te)}, "evil": 1}), "unexpected keys"),
        (lambda te: torch_bytes([vec(te)]), "holds a list"),
        (lambda te: b"\x00" * (2 << 20), "over the limit"),
        (lambda te: b"garbage", "neither safetensors nor a torch file"),
        (lambda te: st_save({"<zorb>": vec(te)})[:-7], "not a valid safetensors"),
    ],
)
def test_malformed_files_are_rejected_with_their_rule(model, make, rule):
    tok, te = model
    with pytest.raises(EmbeddingRejected, match=rule):
        load_embedding(make(te), tok, te)


def test_file_size_is_checked_before_reading(model, tmp_path):
    tok, te = model
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\x00" * 4096)
    with pytest.raises(EmbeddingRejected, match="over the limit"):
        load_embedding(big, tok, te, limits=EmbeddingLimits(max_file_bytes=1024))


def test_embedding_applies_to_its_request_only(model):
    tok, te = model

    class Pipe:
        tokenizer, text_encoder = tok, te

    before = {k: v.clone() for k, v in te.state_dict().items()}
    vocab = len(tok)
    e = load_embedding(st_save({"<zorb>": vec(te, 2, seed=4)}), tok, te)
    with_e = encode_prompt(Pipe, "a picture of <zorb> on dots", [e])
    plain = encode_prompt(Pipe, "a picture of <zorb> on dots")
    assert not torch.allclose(with_e, plain)
    assert torch.allclose(encode_prompt(Pipe, "a red star"), te(tok("a red star", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)[0])
    assert len(tok) == vocab and all(torch.equal(before[k], v) for k, v in te.state_dict().items())
    assert not te.get_input_embeddings()._forward_hooks
