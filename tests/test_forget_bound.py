"""The ideal-outcome processor of ``bench/forget_bound.py`` on a tiny real UNet: plain attention
when no mask is set, and masked positions that no longer reach the output when one is."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from forget_bound import SuppressedAttention  # noqa: E402

from conftest import tiny_unet  # noqa: E402
from unlearn.patch import cross_attention_layers  # noqa: E402


def _unet_with(proc):
    unet = tiny_unet()
    cross = cross_attention_layers(unet)
    unet.set_attn_processor({n: (proc if n.removesuffix(".processor") in cross else p) for n, p in unet.attn_processors.items()})
    return unet


@torch.no_grad()
def test_no_mask_is_plain_attention_and_a_mask_cuts_its_positions_off():
    torch.manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([500] * 4)
    context = torch.randn(4, 6, 16)  # [uncond, uncond, cond, cond], 6 token positions
    stock = tiny_unet()(x, t, encoder_hidden_states=context).sample

    proc = SuppressedAttention()
    unet = _unet_with(proc)
    assert torch.allclose(unet(x, t, encoder_hidden_states=context).sample, stock, atol=1e-6)

    proc.mask = torch.tensor([False, False, True, True, False, False])
    masked = unet(x, t, encoder_hidden_states=context).sample
    changed = context.clone()
    changed[2:, 2:4] += 5.0  # the masked positions of the conditional half
    assert torch.allclose(unet(x, t, encoder_hidden_states=changed).sample, masked, atol=1e-5)
    assert not torch.allclose(masked[2:], stock[2:], atol=1e-4)  # the mask did change the conditional half
    assert torch.allclose(masked[:2], stock[:2], atol=1e-6)  # and left the unconditional half alone
    changed_unmasked = context.clone()
    changed_unmasked[2:, 4:] += 5.0
    assert not torch.allclose(unet(x, t, encoder_hidden_states=changed_unmasked).sample, masked, atol=1e-4)

    proc.empty_prompt_too = True  # the unconditional half keeps its first position alone
    both = unet(x, t, encoder_hidden_states=context).sample
    changed = context.clone()
    changed[:2, 1:] += 5.0
    assert torch.allclose(unet(x, t, encoder_hidden_states=changed).sample[:2], both[:2], atol=1e-5)
