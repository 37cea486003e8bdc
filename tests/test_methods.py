"""Every unlearning method builds a real patch on a tiny real pipeline, through one mechanism."""

from __future__ import annotations

import pytest
import torch

from policies import load_policy_text
from unlearn import PatchCache, PatchError, PatchStack, build_patches, get_method, pipeline_components, plan, register_method, registered_methods
from unlearn.methods import UnlearnMethod

POLICY = """
apiVersion: conceptguard.dev/v1
kind: ConceptPolicy
metadata: {{name: tiny, version: 1.0.0, owner: tests}}
spec:
  models:
    text_to_image: {{builtin: conceptworld}}
    text_to_video: {{builtin: conceptworld}}
  concepts:
{concepts}
"""

METHODS = {
    "ablation": "{name: ablation, steps: 3, learning_rate: 0.001, batch_size: 2, anchor_images: 4, regularization_weight: 0.5}",
    "ablation_context": "{name: ablation, steps: 3, learning_rate: 0.001, batch_size: 2, anchor_images: 4, context_prompts: 6, preserve_weight: 1.0}",
    "ablation_text_space": "{name: ablation, steps: 3, learning_rate: 0.001, batch_size: 2, anchor_images: 4, text_space_weight: 1.0, preserve_vocabulary: 8}",
    "ablation_noise": "{name: ablation, variant: noise, parameters: embedding, steps: 3, learning_rate: 0.001, batch_size: 2, anchor_images: 4}",
    "forget_me_not": "{name: forget_me_not, steps: 3, learning_rate: 0.001, reference_images: 2, parameters: cross_attn}",
    "forget_me_not_text_space": "{name: forget_me_not, steps: 3, learning_rate: 0.001, reference_images: 2, parameters: cross_attn, text_space_weight: 1.0, preserve_vocabulary: 8}",
    "forget_me_not_keys": "{name: forget_me_not, steps: 3, learning_rate: 0.001, reference_images: 2, parameters: cross_attn_k, attention_loss: mass, following_tokens: true, preserve_weight: 1.0, preserve_vocabulary: 8}",
    "forget_me_not_preserve": "{name: forget_me_not, steps: 3, learning_rate: 0.001, reference_images: 2, parameters: cross_attn, preserve_weight: 1.0, preserve_vocabulary: 8}",
    "forget_me_not_embedding": "{name: forget_me_not, steps: 3, learning_rate: 0.01, reference_images: 2, parameters: embedding, attention_loss: mass, following_tokens: true}",
    "forget_me_not_encoder_attention": "{name: forget_me_not, steps: 3, learning_rate: 0.01, reference_images: 2, parameters: embedding, attention_loss: mass, following_tokens: true, encoder_attention_weight: 1.0}",
    "text_encoder": "{name: text_encoder, steps: 3, learning_rate: 0.001, images: 2}",
    "text_encoder_context": "{name: text_encoder, steps: 3, learning_rate: 0.001, images: 2, context_prompts: 6}",
    "text_encoder_encoding": "{name: text_encoder, steps: 3, learning_rate: 0.001, images: 2, context_prompts: 6, encoding_weight: 1.0, preserve_vocabulary: 8, typo_variants: true}",
    "closed_form": "{name: closed_form}",
    "closed_form_context": "{name: closed_form, context_prompts: 6, typo_variants: true}",
}
EXPECTED_COMPONENT = {"ablation": "unet", "ablation_context": "unet", "ablation_text_space": "unet", "ablation_noise": "text_encoder", "forget_me_not": "unet", "forget_me_not_text_space": "unet", "forget_me_not_keys": "unet", "forget_me_not_preserve": "unet", "forget_me_not_embedding": "text_encoder", "forget_me_not_encoder_attention": "text_encoder", "text_encoder": "text_encoder", "text_encoder_context": "text_encoder", "text_encoder_encoding": "text_encoder", "closed_form": "unet", "closed_form_context": "unet"}


def concept_yaml(cid: str, target: str, anchor: str, method: str, scope: str = "both") -> str:
    return (
        f"    - id: {cid}\n      target: {{text: {target}, phrasings: [the {target}]}}\n      anchor: {anchor}\n"
        f"      category: instance\n      scope: {scope}\n      preserve: [a green square, quibbit]\n      method: {method}\n"
    )


def policy_with(*concepts: str):
    return load_policy_text(POLICY.format(concepts="".join(concepts)), "test.yaml")


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}/{k}": v.clone() for c, m in pipeline_components(pipe).items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("label", sorted(METHODS))
def test_each_method_builds_a_patch_and_leaves_the_pipeline_unchanged(tiny_pipeline, label):
    pipe = tiny_pipeline()
    pol = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", METHODS[label]))
    concept = pol.spec.concepts[0]
    before = weights(pipe)
    patch = get_method(concept.method.name)(concept.method).build(pipe, [concept], seed=0, progress=False)
    after = weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # building changes nothing in place
    assert patch.components == {EXPECTED_COMPONENT[label]}
    assert patch.metadata.concepts == ("zorblax",) and patch.metadata.method == concept.method.name
    assert patch.metadata.concept_hashes == (concept.spec_hash(),)
    assert all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in patch.deltas.values())
    stack = PatchStack(pipeline_components(pipe))
    stack.apply(patch)
    assert any(not torch.equal(before[k], v) for k, v in weights(pipe).items())
    stack.remove_all()
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())


def test_text_encoder_encoding_term_moves_the_target_encoding_onto_the_anchor(tiny_pipeline):
    from unlearn.denoiser import Denoiser
    from unlearn.methods.base import aligned_positions

    pipe = tiny_pipeline()
    den = Denoiser(pipe)
    t_pos, a_pos = aligned_positions(den, "zorblax", "a green circle")
    with torch.no_grad():
        goal = den.encode(["a green circle"])[0, a_pos]
        held = den.encode(["a green square", "quibbit"])

    def distances(weight: float, preserve_weight: float = 1.0) -> tuple[float, float]:
        method = f"{{name: text_encoder, steps: 40, learning_rate: 0.003, images: 2, encoding_weight: {weight}, preserve_weight: {preserve_weight}}}"
        concept = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", method)).spec.concepts[0]
        patch = get_method("text_encoder")(concept.method).build(pipe, [concept], seed=0, progress=False)
        stack = PatchStack(pipeline_components(pipe))
        stack.apply(patch)
        with torch.no_grad():
            moved = float((den.encode(["zorblax"])[0, t_pos] - goal).pow(2).mean())
            drift = float((den.encode(["a green square", "quibbit"]) - held).pow(2).mean())
        stack.remove_all()
        return moved, drift

    with torch.no_grad():
        start = float((den.encode(["zorblax"])[0, t_pos] - goal).pow(2).mean())
    plain, _ = distances(0.0)
    pulled, _ = distances(10.0)
    assert pulled < 0.5 * min(start, plain), (start, plain, pulled)
    _, drift = distances(10.0, preserve_weight=10.0)
    _, loose_drift = distances(10.0, preserve_weight=0.0)
    assert drift < 0.5 * loose_drift, (drift, loose_drift)  # the preserve term holds the preserve prompts


def test_builds_are_seeded(tiny_pipeline):
    pipe = tiny_pipeline()
    pol = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", METHODS["ablation"]))
    c = pol.spec.concepts[0]
    a = get_method("ablation")(c.method).build(pipe, [c], seed=3, progress=False)
    b = get_method("ablation")(c.method).build(pipe, [c], seed=3, progress=False)
    assert a.patch_id == b.patch_id
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)


def test_closed_form_removes_many_concepts_in_one_edit(tiny_pipeline):
    pipe = tiny_pipeline()
    pol = policy_with(
        concept_yaml("zorblax", "zorblax", "a green circle", METHODS["closed_form"]),
        concept_yaml("mordak", "mordak", "a blue square", METHODS["closed_form"]),
        concept_yaml("stripes", "stripes", "a plain background", METHODS["closed_form"]),
    )
    models = {"text_to_image": pipe}
    jobs = plan(pol, models)
    assert len(jobs) == 1 and [c.id for c in jobs[0].concepts] == ["zorblax", "mordak", "stripes"]
    patch = get_method("closed_form")(pol.spec.concepts[0].method).build(pipe, jobs[0].concepts, progress=False)
    assert patch.metadata.concepts == ("zorblax", "mordak", "stripes")


def test_single_concept_methods_refuse_several_concepts(tiny_pipeline):
    pol = policy_with(
        concept_yaml("zorblax", "zorblax", "a green circle", METHODS["ablation"]),
        concept_yaml("mordak", "mordak", "a blue square", METHODS["ablation"]),
    )
    with pytest.raises(PatchError, match="one concept per patch"):
        get_method("ablation")(pol.spec.concepts[0].method).build(tiny_pipeline(), pol.spec.concepts, progress=False)


def test_text_encoder_patch_is_shared_by_models_with_the_same_encoder(tiny_pipeline, tmp_path):
    image, video = tiny_pipeline(0), tiny_pipeline(0)
    video.unet = type(video.unet).from_config(video.unet.config)  # another denoiser, same encoder weights
    pol = policy_with(
        concept_yaml("zorblax", "zorblax", "a green circle", METHODS["text_encoder"]),
        concept_yaml("mordak", "mordak", "a blue square", METHODS["ablation"]),
    )
    models = {"text_to_image": image, "text_to_video": video}
    jobs = plan(pol, models)
    assert [(j.method, j.model, j.applies_to) for j in jobs] == [
        ("text_encoder", "text_to_image", ["text_to_image", "text_to_video"]),
        ("ablation", "text_to_image", ["text_to_image"]),
        ("ablation", "text_to_video", ["text_to_video"]),
    ]
    cache = PatchCache(tmp_path)
    first = build_patches(pol, models, cache, progress=False)
    assert all(b.built for b in first)
    again = build_patches(pol, models, cache, progress=False)
    assert not any(b.built for b in again)
    assert [b.patch.patch_id for b in again] == [b.patch.patch_id for b in first]


def test_registry_rejects_duplicates_and_unknown_names():
    assert set(registered_methods()) == {"ablation", "forget_me_not", "text_encoder", "closed_form"}
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Again(UnlearnMethod):
            name = "ablation"

            def edit(self, *a, **k):
                pass

    with pytest.raises(PatchError, match="Known methods"):
        get_method("esd")


def test_ablation_context_pairs_put_target_and_anchor_in_the_same_context(tiny_pipeline):
    from unlearn.denoiser import Denoiser
    from unlearn.methods.ablation import context_pairs

    concept = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", METHODS["ablation_context"])).spec.concepts[0]
    pairs = context_pairs(Denoiser(tiny_pipeline()), concept, 20, seed=3)
    assert len(pairs) == 20 and len(set(pairs)) > 10
    for target, anchor in pairs:
        phrase = next(p for p in ("the zorblax", "zorblax") if p in target)
        assert anchor == target.replace(phrase, "a green circle", 1)
        assert target.split().count("zorblax") == 1  # the context never names the target itself
    assert any(not t.startswith(("zorblax", "the zorblax")) for t, _ in pairs)  # context before it
    assert any(not t.endswith("zorblax") for t, _ in pairs)  # and after it


def test_diffusion_losses_follow_the_schedulers_prediction_type(tiny_pipeline):
    """A v-prediction model (SD 2 768-v, the ConceptWorld video model) is trained towards the
    velocity, an epsilon model towards the noise; any other type is refused by name."""
    from diffusers import DDPMScheduler

    from unlearn.denoiser import Denoiser, prediction_target

    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(beta_schedule="scaled_linear")
    v = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert torch.equal(prediction_target(eps, x0, noise, t), noise)
    assert torch.allclose(prediction_target(v, x0, noise, t), v.get_velocity(x0, noise, t))
    # at zero terminal SNR the last step's velocity is minus the clean sample: nothing of it is left in x_t
    last = torch.tensor([999, 999])
    assert torch.allclose(prediction_target(v, x0, noise, last), -x0, atol=1e-6)
    with pytest.raises(ValueError, match="'flow'.*prediction_type"):
        prediction_target(DDPMScheduler.from_config(eps.config, prediction_type="flow"), x0, noise, t)

    pipe = tiny_pipeline()
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    den = Denoiser(pipe, seed=0)
    x_t, target, t = den.noised(x0)
    assert torch.allclose(target, den.train_scheduler.get_velocity(x0, (x_t - den.train_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * x0) / (1 - den.train_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1), t), atol=1e-5)
    # noise-based ablation (the diffusion loss itself) builds on such a model
    pol = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", METHODS["ablation_noise"]))
    concept = pol.spec.concepts[0]
    patch = get_method("ablation")(concept.method).build(pipe, [concept], seed=0, progress=False)
    assert all(torch.isfinite(d).all() for d in patch.deltas.values())


def test_closed_form_aligns_a_phrase_in_context_with_the_anchor_in_the_same_context(tiny_pipeline):
    from unlearn.denoiser import Denoiser
    from unlearn.methods.base import aligned_pairs

    den = Denoiser(tiny_pipeline())
    target, anchor = "big stripes on red", "big a plain background on red"
    emb = den.encode([target, anchor])
    c, a = aligned_pairs(den, target, anchor, after="on red")
    # BOS big | stripes | on red EOS pad...  ->  BOS big | a plain background | on red EOS pad...
    # "stripes" onto "background" (position 4), "on red EOS" onto "on red EOS"; padding onto the
    # anchor's at the same position, or onto its EOS (7) while the anchor's words still run there
    length = emb.shape[1]
    assert c.shape == a.shape == (length - 2, emb.shape[2])
    assert torch.equal(c[0], emb[0, 2]) and torch.equal(a[0], emb[1, 4])
    assert torch.equal(c[1], emb[0, 3]) and torch.equal(a[1], emb[1, 5])  # "on" onto "on"
    assert torch.equal(c[3], emb[0, 5]) and torch.equal(a[3], emb[1, 7])  # EOS onto EOS
    assert torch.equal(c[4], emb[0, 6]) and torch.equal(a[4], emb[1, 7])  # padding where the anchor says "red"
    assert torch.equal(c[6], emb[0, 8]) and torch.equal(a[6], emb[1, 8])  # padding onto padding, same position
    assert torch.equal(c[-1], emb[0, length - 1]) and torch.equal(a[-1], emb[1, length - 1])
    # a bare phrasing: its words onto the anchor's last word, EOS onto EOS, then by position
    c, a = aligned_pairs(den, "the zorblax", "a green circle")
    emb = den.encode(["the zorblax", "a green circle"])
    assert torch.equal(c[0], emb[0, 1]) and torch.equal(a[0], emb[1, 3])  # "the" onto "circle"
    assert torch.equal(c[1], emb[0, 2]) and torch.equal(a[1], emb[1, 3])  # "zorblax" onto "circle"
    assert torch.equal(c[2], emb[0, 3]) and torch.equal(a[2], emb[1, 4])  # EOS onto EOS
    assert torch.equal(c[3], emb[0, 4]) and torch.equal(a[3], emb[1, 4])
    assert torch.equal(c[4], emb[0, 5]) and torch.equal(a[4], emb[1, 5])
    # a phrasing longer than the anchor: its padding onto the anchor's padding at the same position
    c, a = aligned_pairs(den, "a picture of zorblax", "a green circle")
    emb = den.encode(["a picture of zorblax", "a green circle"])
    assert torch.equal(c[0], emb[0, 2]) and torch.equal(a[0], emb[1, 3])  # "picture" onto "circle" ("a" shared)
    assert torch.equal(c[3], emb[0, 5]) and torch.equal(a[3], emb[1, 4])  # EOS onto EOS
    assert torch.equal(c[4], emb[0, 6]) and torch.equal(a[4], emb[1, 6])
    # a phrasing ending in a word the anchor shares is still a phrase: all of it onto the anchor's last word
    c, a = aligned_pairs(den, "stripy background", "a plain background")
    emb = den.encode(["stripy background", "a plain background"])
    assert torch.equal(c[0], emb[0, 1]) and torch.equal(a[0], emb[1, 3])
    assert torch.equal(c[1], emb[0, 2]) and torch.equal(a[1], emb[1, 3])


def test_closed_form_typo_variants_erase_misspellings_too(tiny_pipeline):
    from unlearn.denoiser import Denoiser
    from unlearn.methods.base import aligned_pairs, typo_variants

    pipe = tiny_pipeline()
    plain = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", "{name: closed_form, erase_weight: 16.0}")).spec.concepts[0]
    typos = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", "{name: closed_form, erase_weight: 16.0, typo_variants: true}")).spec.concepts[0]
    den = Denoiser(pipe)
    assert "zorbax" in typo_variants("zorblax") and "the zroblax" in typo_variants("the zorblax")  # one letter dropped; two swapped
    assert "zorblax" not in typo_variants("zorblax") and len(typo_variants("zorblax")) == 7 + 6
    c, a = aligned_pairs(den, "zorbax", "a green circle")
    components = pipeline_components(pipe)
    name = next(k for k in components["unet"].state_dict() if k.endswith("attn2.to_k.weight"))

    def miss(concept) -> float:
        patch = get_method("closed_form")(concept.method).build(pipe, [concept], seed=0, progress=False)
        stack = PatchStack(components)
        stack.apply(patch)
        w_new = components["unet"].state_dict()[name].clone()
        stack.remove_all()
        w = components["unet"].state_dict()[name]
        return float((c @ w_new.T - a @ w.T).detach().norm())

    assert miss(typos) < 0.5 * miss(plain)  # the misspelling's keys land on the anchor's


def test_typo_variants_leave_out_words_of_the_vocabulary(world_tokenizer):
    from unlearn.denoiser import vocabulary_words
    from unlearn.methods.base import typo_variants

    vocab = set(vocabulary_words(world_tokenizer)) - {"stars"}
    assert "star" in typo_variants("stars") and "sars" in typo_variants("stars")
    variants = typo_variants("the stars", vocab)
    assert "the sars" in variants and "the star" not in variants  # "star" is a word of its own
    assert typo_variants("a red car") == []  # no word of four letters


def test_forget_me_not_following_tokens_mask_the_end_of_text_and_padding_after_the_concept(tiny_pipeline):
    from unlearn.denoiser import Denoiser
    from unlearn.methods.forget_me_not import concept_token_mask

    den = Denoiser(tiny_pipeline())
    prompts = ["the zorblax", "zorblax on stripes"]
    length = den.token_ids(prompts).shape[1]
    k = len(den.tokenizer("zorblax", add_special_tokens=False).input_ids)
    n = len(den.tokenizer("zorblax on stripes", add_special_tokens=False).input_ids)
    plain = concept_token_mask(den, prompts, {"zorblax"})
    full = concept_token_mask(den, prompts, {"zorblax"}, following=True)
    assert plain[0].nonzero().flatten().tolist() == list(range(2, 2 + k))
    assert full[0].nonzero().flatten().tolist() == list(range(2, length))  # BOS and "the" stay
    # the words after the concept are not its tokens; the end-of-text and padding after them are masked
    assert full[1].nonzero().flatten().tolist() == list(range(1, 1 + k)) + list(range(1 + n, length))


def test_forget_me_not_key_only_patch_changes_only_key_projections(tiny_pipeline):
    pipe = tiny_pipeline()
    pol = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", METHODS["forget_me_not_keys"]))
    concept = pol.spec.concepts[0]
    patch = get_method("forget_me_not")(concept.method).build(pipe, [concept], seed=0, progress=False)
    assert patch.deltas and all(k.endswith("attn2.to_k.weight") for k in patch.deltas), sorted(patch.deltas)


def test_forget_me_not_embedding_patch_changes_only_the_concept_words_rows(tiny_pipeline):
    pipe = tiny_pipeline()
    pol = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", METHODS["forget_me_not_embedding"]))
    concept = pol.spec.concepts[0]
    patch = get_method("forget_me_not")(concept.method).build(pipe, [concept], seed=0, progress=False)
    (key,) = patch.deltas
    assert key.endswith("token_embedding.weight"), key
    changed = patch.deltas[key].abs().sum(1).nonzero().flatten().tolist()
    # the concept's word alone: not the start, end-of-text or padding tokens every prompt shares
    assert changed == pipe.tokenizer("zorblax", add_special_tokens=False).input_ids, changed


def test_forget_me_not_encoder_attention_weight_re_steers_the_text_encoder(tiny_pipeline):
    from unlearn.denoiser import Denoiser
    from unlearn.methods.forget_me_not import _EagerAttention

    def later_mass(pipe) -> float:  # attention of the positions after "zorblax" on it, mean over layers
        ids = Denoiser(pipe).token_ids(["the zorblax"])
        k = len(pipe.tokenizer("zorblax", add_special_tokens=False).input_ids)
        encoder = _EagerAttention(pipe.text_encoder)
        try:
            with torch.no_grad():
                _, maps = encoder(ids)
        finally:
            encoder.restore()
        return torch.stack([a[0][:, 2 + k :, 2 : 2 + k].sum(-1).mean() for a in maps]).mean().item()

    masses = {}
    for weight in (0.0, 5.0):
        pipe = tiny_pipeline()
        method = f"{{name: forget_me_not, steps: 30, learning_rate: 0.05, reference_images: 2, parameters: embedding, attention_loss: mass, following_tokens: true, encoder_attention_weight: {weight}}}"
        concept = policy_with(concept_yaml("zorblax", "zorblax", "a green circle", method)).spec.concepts[0]
        base, kernels = later_mass(pipe), pipe.text_encoder.config._attn_implementation
        patch = get_method("forget_me_not")(concept.method).build(pipe, [concept], seed=0, progress=False)
        assert pipe.text_encoder.config._attn_implementation == kernels  # its own kernels are put back
        stack = PatchStack(pipeline_components(pipe))
        stack.apply(patch)
        masses[weight] = later_mass(pipe)
        stack.remove_all()
    assert masses[5.0] < 0.85 * base and masses[5.0] < 0.7 * masses[0.0], (base, masses)  # the UNet loss alone raises it


def test_forget_me_not_attention_losses():
    from unlearn.methods.forget_me_not import attention_loss

    # one pixel, mass 0.8 spread over four positions (0.2 each) against mass 0.8 on one position
    spread, peaked = torch.full((1, 4), 0.2), torch.tensor([[0.8, 0.0, 0.0, 0.0]])
    assert attention_loss(spread, "mass") == pytest.approx(0.64) and attention_loss(peaked, "mass") == pytest.approx(0.64)
    assert attention_loss(spread, "norm") == pytest.approx(0.16) and attention_loss(peaked, "norm") == pytest.approx(0.64)
