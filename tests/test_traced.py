"""Traced denoiser calls (serve.traced) on a tiny real pipeline: same outputs as eager, and
never stale weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from serve.traced import TracedDenoiser, trace_pipeline, untrace_pipeline
from unlearn.patch import Patch, PatchMetadata, PatchStack, fingerprint, pipeline_components, select_parameters

# traced against eager: a trace recorded with the direct convolution kernel (picked by
# conv_kernels="auto" when it replays faster) sums in another order, so it matches to rounding
TRACE_ATOL = 1e-5


def images(pipe, n: int = 2, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return pipe("a red star on stripes", num_images_per_prompt=n, num_inference_steps=4, guidance_scale=5.0, generator=gen, output_type="np").images


def eager_images(pipe, **kw) -> np.ndarray:
    tracer = pipe.unet.__dict__.get("forward")
    untrace_pipeline(pipe)
    try:
        return images(pipe, **kw)
    finally:
        if tracer is not None:
            pipe.unet.forward = tracer


def test_traced_pipeline_gives_the_eager_images_and_replays_every_step(tiny_pipeline):
    pipe = tiny_pipeline()
    expected = images(pipe)
    tracer = trace_pipeline(pipe)
    assert trace_pipeline(pipe) is tracer  # idempotent
    got = images(pipe)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TRACE_ATOL)
    assert tracer.traces == 1 and tracer.calls == {"traced": 4, "eager": 0}
    images(pipe, n=3)  # another batch size: a second trace
    assert tracer.traces == 2
    untrace_pipeline(pipe)
    assert "forward" not in pipe.unet.__dict__


def test_patches_applied_and_removed_in_place_take_effect_in_the_trace(tiny_pipeline):
    pipe = tiny_pipeline()
    base = images(pipe)
    tracer = trace_pipeline(pipe)
    images(pipe)
    comps = pipeline_components(pipe)
    params = select_parameters(comps, "cross_attn_kv")
    before = {k: p.detach().clone() for k, p in params.items()}
    after = {k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in before.items()}
    meta = PatchMetadata(
        method="test", options={}, concepts=("c",), concept_hashes=("h",), base_fingerprints={"unet": fingerprint(comps["unet"])}, version="0"
    )
    stack = PatchStack(comps)
    stack.apply(Patch.from_weights(before, after, meta))
    patched = images(pipe)
    assert np.abs(patched - base).max() > 1e-3  # the trace runs the patched weights
    np.testing.assert_allclose(patched, eager_images(pipe), rtol=0, atol=TRACE_ATOL)
    stack.remove_all()
    np.testing.assert_allclose(images(pipe), base, rtol=0, atol=TRACE_ATOL)
    assert tracer.traces == 1  # in-place changes need no new trace


def test_a_replaced_weight_drops_the_traces(tiny_pipeline):
    pipe = tiny_pipeline()
    tracer = trace_pipeline(pipe)
    base = images(pipe)
    conv = pipe.unet.conv_in
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 1.5)
    changed = images(pipe)
    assert tracer.traces == 2
    assert np.abs(changed - base).max() > 1e-3
    np.testing.assert_allclose(changed, eager_images(pipe), rtol=0, atol=TRACE_ATOL)


def test_a_new_attention_processor_is_traced_anew(tiny_pipeline):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_pipeline()
    tracer = trace_pipeline(pipe)
    images(pipe)
    pipe.unet.set_attn_processor(AttnProcessor())
    images(pipe)
    assert tracer.traces == 2


def test_hooks_gradients_and_extra_arguments_run_eagerly(tiny_pipeline):
    pipe = tiny_pipeline()
    unet = pipe.unet
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 24, 16)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=e).sample
    tracer = trace_pipeline(pipe)
    with torch.no_grad():
        seen = []
        handle = unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(1))
        unet(x, t, encoder_hidden_states=e)
        handle.remove()
        assert seen == [1] and tracer.calls["eager"] == 1
        unet(x, t, encoder_hidden_states=e, cross_attention_kwargs={"scale": 1.0})
        assert tracer.calls["eager"] == 2
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=e).sample, expected, rtol=0, atol=TRACE_ATOL)
        assert tracer.calls["traced"] == 1
    out = unet(x, t, encoder_hidden_states=e).sample
    assert out.requires_grad and tracer.calls["eager"] == 3
    out.sum().backward()
    assert unet.conv_in.weight.grad is not None


def test_a_deep_copy_of_a_traced_pipeline_runs_eagerly_and_alone(tiny_pipeline):
    pipe = tiny_pipeline()
    tracer = trace_pipeline(pipe)
    base = images(pipe)
    twin = copy.deepcopy(pipe)
    assert not isinstance(twin.unet.__dict__.get("forward"), TracedDenoiser)
    with torch.no_grad():
        twin.unet.conv_in.weight.mul_(2.0)  # the copy's weights are its own
    np.testing.assert_allclose(images(pipe), base, rtol=0, atol=1e-6)
    assert np.abs(images(twin) - base).max() > 1e-3
    assert tracer.calls["eager"] == 0


def _recorded_ops(tracer: TracedDenoiser) -> str:
    ((trace, _, _),) = tracer._entries.values()
    return str(trace.inlined_graph)


def test_direct_convolution_kernels_are_recorded_and_give_the_eager_images(tiny_pipeline):
    pipe = tiny_pipeline()
    expected = images(pipe)
    tracer = trace_pipeline(pipe, conv_kernels="direct")
    got = images(pipe)
    ops = _recorded_ops(tracer)
    assert "aten::thnn_conv2d" in ops and "aten::_convolution" not in ops
    assert set(tracer.kernels.values()) == {"direct"}
    np.testing.assert_allclose(got, expected, rtol=0, atol=TRACE_ATOL)
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)  # in place: the direct kernels read the same tensor
    changed = images(pipe)
    assert np.abs(changed - got).max() > 1e-3 and tracer.traces == 1
    np.testing.assert_allclose(changed, eager_images(pipe), rtol=0, atol=TRACE_ATOL)
    # eager calls made while the tracer is installed keep the stock kernels
    with torch.no_grad():
        x, t, e = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 24, 16)
        hooked = pipe.unet.conv_in.register_forward_hook(lambda m, i, o: None)
        eager_out = pipe.unet(x, t, encoder_hidden_states=e).sample
        hooked.remove()
        untrace_pipeline(pipe)
        assert torch.equal(eager_out, pipe.unet(x, t, encoder_hidden_states=e).sample)


def test_stock_kernels_only_and_automatic_choice(tiny_pipeline):
    pipe = tiny_pipeline()
    tracer = trace_pipeline(pipe, conv_kernels="onednn")
    images(pipe)
    ops = _recorded_ops(tracer)
    assert "aten::_convolution" in ops and "aten::thnn_conv2d" not in ops
    untrace_pipeline(pipe)
    tracer = trace_pipeline(pipe)  # auto: both recorded and checked, the faster kept
    images(pipe)
    (kind,) = tracer.kernels.values()
    assert kind in ("onednn", "direct") and tracer.traces == 1
    assert ("aten::thnn_conv2d" in _recorded_ops(tracer)) == (kind == "direct")


def test_an_unknown_kernel_choice_is_refused():
    with pytest.raises(ValueError, match="conv_kernels must be one of auto, onednn, direct"):
        TracedDenoiser(torch.nn.Linear(2, 2), conv_kernels="cudnn")
