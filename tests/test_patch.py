"""The shared patch mechanism, on tiny real diffusers/transformers models."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_text_encoder, tiny_unet
from unlearn.patch import (
    BaseModelMismatchError,
    Patch,
    PatchError,
    PatchMetadata,
    PatchStack,
    fingerprint,
    select_parameters,
)


def tiny_components(seed: int = 0) -> dict:
    return {"unet": tiny_unet(seed), "text_encoder": tiny_text_encoder(seed)}


def state(components) -> dict[str, torch.Tensor]:
    return {f"{c}/{k}": v.clone() for c, m in components.items() for k, v in m.state_dict().items()}


def make_patch(components, group: str = "cross_attn_kv", scale: float = 0.01, seed: int = 1, concept: str = "c1") -> Patch:
    params = select_parameters(components, group)
    before = {k: p.detach().clone() for k, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    after = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in before.items()}
    comps = {k.split("/")[0] for k in before}
    meta = PatchMetadata(
        method="test",
        options={"scale": scale},
        concepts=(concept,),
        concept_hashes=("h" + concept,),
        base_fingerprints={c: fingerprint(components[c]) for c in comps},
        version="0.1.0",
    )
    return Patch.from_weights(before, after, meta)


def test_parameter_groups_select_by_diffusers_names():
    comps = tiny_components()
    kv = select_parameters(comps, "cross_attn_kv")
    assert kv and all(k.startswith("unet/") and ("attn2.to_k" in k or "attn2.to_v" in k) for k in kv)
    ca = select_parameters(comps, "cross_attn")
    assert set(kv) < set(ca) and any("attn2.to_out.0.bias" in k for k in ca)
    emb = select_parameters(comps, "embedding")
    assert len(emb) == 1 and next(iter(emb)).endswith("embeddings.token_embedding.weight")
    with pytest.raises(PatchError, match=r"Got 'attn' for parameters\. It must be one of"):
        select_parameters(comps, "attn")
    with pytest.raises(PatchError, match="does not have"):
        select_parameters({"unet": comps["unet"]}, "embedding")
    with pytest.raises(PatchError, match="matched no parameter"):
        select_parameters({"unet": torch.nn.Linear(2, 2)}, "cross_attn_kv")


def test_cross_attention_groups_skip_motion_module_attn2():
    """AnimateDiff's motion modules name a temporal self-attention ``attn2``; it must not be
    edited as if it read the text (it has another input width: the edit would crash or corrupt)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet2d = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    )
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2, motion_norm_num_groups=8)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    motion_attn2 = [n for n, _ in unet.named_parameters() if "motion_modules" in n and "attn2.to_k" in n]
    assert motion_attn2  # the trap exists in this architecture
    kv = select_parameters({"unet": unet}, "cross_attn_kv")
    assert kv and not any("motion_modules" in k for k in kv)
    assert all(p.shape[1] == 24 for p in kv.values())  # every one reads the text width
    ca = select_parameters({"unet": unet}, "cross_attn")
    assert not any("motion_modules" in k for k in ca) and any("attn2.to_out.0.bias" in k for k in ca)


def test_apply_then_remove_restores_weights_bit_for_bit():
    comps = tiny_components()
    before = state(comps)
    patch = make_patch(comps)
    stack = PatchStack(comps)
    stack.apply(patch)
    changed = state(comps)
    assert any(not torch.equal(before[k], changed[k]) for k in patch.deltas)
    assert all(torch.equal(before[k], changed[k]) for k in before if k not in patch.deltas)
    stack.remove_all()
    after = state(comps)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_patch_saves_and_loads_exactly(tmp_path):
    comps = tiny_components()
    patch = make_patch(comps, group="embedding")
    path = patch.save(tmp_path / "p.safetensors")
    loaded = Patch.load(path)
    assert loaded.metadata == patch.metadata
    assert loaded.patch_id == patch.patch_id
    assert all(torch.equal(loaded.deltas[k], patch.deltas[k]) for k in patch.deltas)
    assert not list(tmp_path.glob("*.tmp"))


def test_patch_for_another_base_model_is_refused():
    patch = make_patch(tiny_components(seed=0))
    other = tiny_components(seed=1)
    before = state(other)
    with pytest.raises(BaseModelMismatchError, match="Rebuild the patch for this base model"):
        PatchStack(other).apply(patch)
    assert all(torch.equal(before[k], v) for k, v in state(other).items())


def test_patches_compose_in_order_and_are_checked_against_the_base():
    comps = tiny_components()
    base = state(comps)
    p1 = make_patch(comps, "cross_attn_kv", seed=1, concept="a")
    p2 = make_patch(comps, "cross_attn", seed=2, concept="b")  # overlaps p1 on to_k/to_v
    p3 = make_patch(comps, "embedding", seed=3, concept="c")
    stack = PatchStack(comps)
    stack.apply_all([p1, p2, p3])
    now = state(comps)
    key = next(k for k in p1.deltas if k in p2.deltas)
    assert torch.equal(now[key], base[key] + p1.deltas[key] + p2.deltas[key])
    stack.remove_all()
    assert all(torch.equal(base[k], v) for k, v in state(comps).items())


def test_a_failing_patch_in_a_set_restores_everything():
    comps = tiny_components()
    base = state(comps)
    good = make_patch(comps, seed=1)
    bad = make_patch(tiny_components(seed=5), seed=2)  # built on other weights
    with pytest.raises(BaseModelMismatchError):
        PatchStack(comps).apply_all([good, bad])
    assert all(torch.equal(base[k], v) for k, v in state(comps).items())


def test_patch_that_changes_nothing_is_an_error():
    comps = tiny_components()
    params = select_parameters(comps, "cross_attn_kv")
    before = {k: p.detach().clone() for k, p in params.items()}
    meta = PatchMetadata("test", {}, ("c",), ("h",), {"unet": fingerprint(comps["unet"])}, "0")
    with pytest.raises(PatchError, match="changed no weight"):
        Patch.from_weights(before, params, meta)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a safetensors file at all", "not a readable safetensors patch"),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}", "not a readable safetensors patch"),
    ],
)
def test_corrupt_patch_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(PatchError, match=message):
        Patch.load(path)


def test_safetensors_without_patch_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"unet/x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(PatchError, match="no conceptguard metadata"):
        Patch.load(tmp_path / "plain.safetensors")
