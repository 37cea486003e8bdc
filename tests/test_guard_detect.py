"""Guard decisions on a tiny real pipeline: terms, misspellings, triggers, actions, caching."""

from __future__ import annotations

import pytest
import torch

from guard.detect import Guard, TermMatcher, edit_distance
from guard.embeddings import TextualInversion
from policies import load_policy_text

POLICY = """\
apiVersion: conceptguard.dev/v1
kind: ConceptPolicy
metadata: {{name: guarded, version: 1.0.0, owner: tests}}
spec:
  models:
    text_to_image: {{builtin: conceptworld}}
  concepts:
    - id: zorblax
      category: instance
      target: zorblax
      anchor: a green circle
      method: {{name: closed_form}}
      guard:
        action: {action}
        triggers: [on fire, burning, weapon]
        blocked_terms: [blood]
"""


def test_edit_distance():
    assert edit_distance("burning", "burning") == 0
    assert edit_distance("burnig", "burning") == 1
    assert edit_distance("brunign", "burning", cap=3) == 2  # two transpositions
    assert edit_distance("weapon", "cat", cap=2) == 3


def test_term_matcher_finds_phrases_misspellings_and_synonyms():
    m = TermMatcher(["on fire", "burning"], {"burning": {"flames"}}, max_edit=1)
    assert m.find("a cat on fire".split())
    assert m.find("a burnng house".split())  # misspelling
    assert m.find("flames everywhere".split())  # synonym
    assert not m.find("a cat on a fir tree".split())
    assert not m.find("a burn".split())


@pytest.fixture
def guard_for(tiny_pipeline):
    def make(action="block"):
        pol = load_policy_text(POLICY.format(action=action), "g.yaml")
        return Guard(pol, tiny_pipeline())

    return make


def test_trigger_needs_an_embedding(guard_for):
    g = guard_for("block")
    ti = TextualInversion("<me>", torch.randn(1, 16), "diffusers")
    assert g.check("<me> on fire").action == "allow"  # no embedding attached
    v = g.check("<me> on fire", [ti])
    assert v.action == "block" and [r.kind for r in v.reasons if r.kind == "trigger"] and v.concepts == ["zorblax"]
    assert g.check("<me> burnig in the sun", [ti]).action == "block"  # misspelt trigger
    assert g.check("<me> on dots", [ti]).action == "allow"


def test_blocked_terms_without_embeddings_and_the_policy_action(guard_for):
    assert guard_for("flag").check("a red star with blood").action == "flag"
    assert guard_for("censor").check("a red star with bloood").action == "censor"
    assert guard_for("block").check("a red star on stripes").action == "allow"


def test_embedding_scans_are_cached(guard_for):
    g = guard_for()
    ti = TextualInversion("<me>", torch.randn(2, 16), "diffusers")
    first = g.scan_embedding(ti)
    assert len(g._scans) == 1
    assert g.scan_embedding(ti) == first and len(g._scans) == 1


def test_synonyms_come_from_the_text_encoder_and_unknown_words_match_by_spelling_only():
    """On ConceptWorld's encoder: a world word's synonyms are found by text-encoder similarity,
    while a word it never learnt (every unknown word looks alike to it) gets no synonyms, so
    benign words are not blocked as its 'synonyms'."""
    import conceptworld

    text = POLICY.format(action="block").replace("blocked_terms: [blood]", "blocked_terms: [blood, crimson]")
    assert "crimson" in text
    g = Guard(load_policy_text(text, "g.yaml"), conceptworld.load_t2i())
    _, blocked = g.matchers["zorblax"]
    assert {"scarlet", "red"} <= blocked.synonyms["crimson"]
    assert "blood" not in blocked.synonyms and g.undistinguished["blood"] > 12
    assert g.check("a scarlet star on dots").action == "block"  # synonym
    assert g.check("a yellow cross on a plain background").action == "allow"
    assert g.check("a star with bloood").action == "block"  # misspelling still matches


def test_vocabulary_signatures_are_cached_per_text_encoder_and_a_bad_cache_file_is_rewritten(tmp_path):
    import conceptworld
    from safetensors.torch import load_file

    text = POLICY.format(action="block").replace("blocked_terms: [blood]", "blocked_terms: [blood, crimson]")
    pipe = conceptworld.load_t2i()
    first = Guard(load_policy_text(text, "g.yaml"), pipe, cache_dir=tmp_path)
    [path] = (tmp_path / "guard").glob("words-*.safetensors")
    assert load_file(str(path))["signatures"].shape[0] == len(first.vocab_words)
    path.write_bytes(b"not a safetensors file")
    again = Guard(load_policy_text(text, "g.yaml"), pipe, cache_dir=tmp_path)
    assert again.matchers["zorblax"][1].synonyms == first.matchers["zorblax"][1].synonyms
    assert load_file(str(path))["signatures"].shape[0] == len(first.vocab_words)  # rewritten
    reused = Guard(load_policy_text(text, "g.yaml"), pipe, cache_dir=tmp_path)
    assert reused.matchers["zorblax"][1].synonyms == first.matchers["zorblax"][1].synonyms
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[5] += 1.0  # another text encoder
    Guard(load_policy_text(text, "g.yaml"), pipe, cache_dir=tmp_path)
    assert len(list((tmp_path / "guard").glob("words-*.safetensors"))) == 2
