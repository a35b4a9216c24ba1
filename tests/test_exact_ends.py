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
                            settings.guidance, p.negative, 8, p.adapters, corrections=p.corrections)
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


def test_ends_are_exact_however_little_the_inversion_converged(pair, cache):
    """One fixed-point iteration per step at 4 steps leaves each step's solve far from converged; the
    corrections kept with the noise still bring each end frame back onto its latent."""
    loose = dict(steps=4, inversion_iterations=1, inversion_tolerance=0.0)
    assert max(end_errors(pair, cache, **loose)) <= 1e-4


def test_in_between_frames_take_the_corrections_lerped_by_alpha():
    from morphkit.morph.sampling import frame_corrections

    a, b = torch.randn(3, 1, 4, 8, 8), torch.randn(3, 1, 4, 8, 8)
    mixed = frame_corrections((a, b), torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), "cpu")
    assert mixed.shape == (3, 3, 4, 8, 8)
    assert torch.equal(mixed[:, 0], a[:, 0]) and torch.equal(mixed[:, 2], b[:, 0])  # each end exactly its own
    assert torch.allclose(mixed[:, 1], 0.75 * a[:, 0] + 0.25 * b[:, 0])
    assert frame_corrections(None, torch.zeros(2), "cpu") is None


def test_a_probe_pass_at_few_steps_brings_the_ends_back_too(pair, cache):
    """Even pacing's probe pass samples 5 of the 20 steps; corrections along the inversion's path at those steps
    (`job.probe_corrections`) bring its end frames back onto the inputs' latents, as the full render's are."""
    from morphkit.inversion import coarse_schedule
    from morphkit.morph.job import probe_corrections

    settings = MorphSettings(**DEFAULTS, cache_dir=cache, steps=20, tuning_free=True).validate()
    p = prepare_pair(*pair, settings, progress=False)
    probe = coarse_schedule(p.schedule, 5)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    errors = {}
    for name, corrections in (("plain", None), ("corrected", probe_corrections(p, probe))):
        latents = render_frames(p.pipe, p.noises[0], p.noises[1], p.embeds[0], p.embeds[1], ends, probe,
                                settings.guidance, p.negative, 8, p.adapters, corrections=corrections)
        errors[name] = max(latent_error(latents[i:i + 1], p.latents[i]) for i in range(2))
    assert errors["corrected"] <= 1e-4 < errors["plain"] / 100, errors
