"""Exact end frames: a morph's first and last frames come back as its inputs' latents (issue: exact ends).

At the defaults (50 steps, LoRAs fitted with rank 16, 200 steps, lr 2e-4), with fixed-point inversion, each
end frame's latent is within 1e-3 (relative) of its image's own latent: unguided, guided with a negative
prompt, and with no LoRA at all. Plain DDIM inversion, for comparison, leaves a much larger error.
"""

import pytest
import torch

from morphkit.inversion import latent_error
from morphkit.morph import MorphSettings, prepare_pair
from morphkit.morph.sampling import render_frames
from tests.conftest import make_photo

DEFAULTS = dict(model="tiny", prompt="a photo", frames=3, formats=(), device="cpu", pacing="linear")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("ends")
    return make_photo(d / "a.png", seed=1), make_photo(d / "b.png", size=(64, 80), seed=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ends-cache"))  # the fitted LoRAs are shared by the tests below


def end_errors(pair, cache, **options) -> list[float]:
    settings = MorphSettings(**DEFAULTS, cache_dir=cache, **options).validate()
    p = prepare_pair(*pair, settings, progress=False)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    latents = render_frames(p.pipe, p.noises[0], p.noises[1], p.embeds[0], p.embeds[1], ends, p.schedule,
                            settings.guidance, p.negative, 8, p.adapters)
    return [latent_error(latents[i:i + 1], p.latents[i]) for i in range(2)]


def test_ends_are_exact_with_default_loras(pair, cache):
    exact = end_errors(pair, cache)
    plain = end_errors(pair, cache, inversion="ddim")
    assert max(exact) <= 1e-3, exact
    assert min(plain) > 20 * max(exact), (plain, exact)  # the old error, so the tests show the difference


def test_ends_are_exact_guided_with_a_negative_prompt(pair, cache):
    assert max(end_errors(pair, cache, guidance=7.5, negative_prompt="blurry, low quality")) <= 1e-3


def test_ends_are_exact_with_no_lora(pair, cache):
    assert max(end_errors(pair, cache, tuning_free=True)) <= 1e-3
