"""Shared fixtures: tiny real diffusers pipelines (seeded), never mocks."""

from __future__ import annotations

import pytest
import torch


def tiny_unet(seed: int = 0, cross_dim: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def tiny_text_encoder(seed: int = 0, vocab_size: int = 64):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="session")
def world_tokenizer(tmp_path_factory):
    """A real CLIPTokenizer over the ConceptWorld words, built from scratch."""
    from conceptworld import world
    from conceptworld.tokenizer import build_tokenizer

    return build_tokenizer(world.vocabulary()["words"], tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def tiny_pipeline(world_tokenizer):
    """A tiny, seeded StableDiffusionPipeline (8x8 images, 8x8 latents)."""

    def make(seed: int = 0):
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
        ).eval()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=tiny_text_encoder(seed, len(world_tokenizer)),
            tokenizer=world_tokenizer,
            unet=tiny_unet(seed),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make
