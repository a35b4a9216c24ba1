import pytest
import torch

import morphkit
from morphkit.inversion import ddim_schedule, eps_model, invert_ddim, sample_ddim
from morphkit.models import encode_prompt


def test_sample_ddim_matches_diffusers_ddim_pipeline(tiny_pipe):
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    schedule = ddim_schedule(tiny_pipe.scheduler.config, 20)
    for guidance in (1.0, 5.0):
        ref = tiny_pipe("a photo", latents=x.clone(), num_inference_steps=20, guidance_scale=guidance,
                        negative_prompt="" if guidance > 1 else None, output_type="latent").images
        model = eps_model(tiny_pipe.unet, encode_prompt(tiny_pipe, "a photo"), encode_prompt(tiny_pipe, ""), guidance)
        ours = sample_ddim(model, x.clone(), schedule)
        assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()


def test_inversion_walks_the_reversed_ddim_timesteps(tiny_pipe):
    """Same result as stepping diffusers' DDIMInverseScheduler with the same config and step count."""
    from diffusers import DDIMInverseScheduler

    z0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    model = eps_model(tiny_pipe.unet, encode_prompt(tiny_pipe, "a photo"))
    visited = []
    ours = invert_ddim(model, z0.clone(), ddim_schedule(tiny_pipe.scheduler.config, 10),
                       callback=lambda info: visited.append(int(info["t"])))
    inverse = DDIMInverseScheduler.from_config(tiny_pipe.scheduler.config)
    inverse.set_timesteps(10)
    x = z0.clone()
    for t in inverse.timesteps:
        x = inverse.step(model(x, t), t, x).prev_sample
    assert visited == inverse.timesteps.tolist()
    assert (ours - x).abs().max() < 1e-5 * x.abs().max()


@pytest.fixture(scope="module")
def fitted_lora(tmp_path_factory, morphkit_cache):
    from tests.conftest import make_photo

    folder = tmp_path_factory.mktemp("inv")
    photo = make_photo(folder / "photo.png", size=(64, 64))
    result = morphkit.train_lora(photo, "a photo", model="tiny", steps=200, learning_rate=1e-3,
                                 output_dir=folder, progress=False)
    return photo, result.lora_path


def test_inversion_error_shrinks_with_steps(fitted_lora, tiny_pipe):
    photo, lora = fitted_lora
    errors = {steps: morphkit.invert(photo, "a photo", lora=lora, steps=steps, pipe=tiny_pipe, save=False,
                                     progress=False).latent_error for steps in (10, 50)}
    assert errors[50] < errors[10]
    # The stated bound: the noise regenerates the image's latent within 5 % (relative L2) at 50 steps.
    assert errors[50] < 0.05, errors


def test_invert_writes_noise_and_reconstruction(fitted_lora, tmp_path):
    from safetensors.torch import load_file

    photo, lora = fitted_lora
    result = morphkit.invert(photo, "a photo", lora=lora, model="tiny", steps=10, output_dir=tmp_path, progress=False)
    saved = load_file(str(result.paths["noise"]))
    assert torch.equal(saved["noise"], result.noise) and saved["noise"].shape == (1, 4, 8, 8)
    assert result.paths["reconstruction"].is_file()
    with pytest.raises(morphkit.OutputExistsError):
        morphkit.invert(photo, "a photo", model="tiny", steps=2, output_dir=tmp_path, progress=False)
