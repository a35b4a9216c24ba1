"""The CUDA paths: half precision (fp16, bf16), exact ends in fp32 on a half-precision UNet, the attention store and
LoRA fitting on the GPU. Marked `cuda`: skipped where there is no CUDA device, run by `benchmarks/gpu_check.py`.

A dry run on the CPU checks the tests that do not need a half dtype (morphkit runs the CPU in fp32):
MORPHKIT_CUDA_TESTS_DEVICE=cpu pytest -m cuda tests/test_cuda.py.
"""

import os

import pytest
import torch

from morphkit.inversion import latent_error
from morphkit.morph import MorphSettings, prepare_pair, render_morph
from morphkit.morph.sampling import render_frames
from tests.conftest import make_photo

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("MORPHKIT_CUDA_TESTS_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
DTYPES = ["fp16", "bf16"] if DEVICE == "cuda" else []


@pytest.fixture(scope="module")
def device():
    if DEVICE is None:
        pytest.skip("no CUDA device (set MORPHKIT_CUDA_TESTS_DEVICE=cpu for a dry run of these tests on the CPU)")
    return DEVICE


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    return make_photo(d / "a.png", seed=1), make_photo(d / "b.png", seed=2)


def settings(device, dtype, **changes):
    return MorphSettings(model="tiny", prompt="a photo", frames=4, steps=20, lora_steps=30, formats=(), cache=False,
                         device=device, dtype=dtype, pacing="linear", **changes).validate()


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_precision_morph_keeps_exact_ends_in_fp32(device, pair, dtype):
    """The in-between frames run in the half dtype; inversion and the ends in fp32 (fp32_ends): the ends' latents
    come back within 1e-3 of the images' own, and every frame is finite."""
    s = settings(device, dtype)
    prepared = prepare_pair(*pair, s, progress=False)
    assert prepared.pipe.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert prepared.precisions["invert"] == "fp32"
    rendered = render_morph(prepared, s, progress=False)
    assert rendered.precisions == {"end frames": "fp32", "in-between frames": dtype}
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    from morphkit.models import stage_precision

    with stage_precision(prepared.pipe.unet):
        latents = render_frames(prepared.pipe, prepared.noises[0], prepared.noises[1], prepared.embeds[0],
                                prepared.embeds[1], ends, prepared.schedule, 1.0, None, 8, prepared.adapters,
                                corrections=prepared.corrections)
    errors = [latent_error(latents[i:i + 1].float().cpu(), prepared.latents[i].float().cpu()) for i in range(2)]
    assert max(errors) <= 1e-3, errors
    assert len(rendered.frames) == 4


def test_the_gpu_renders_what_the_cpu_renders(device, pair):
    """fp32 on the device against fp32 on the CPU, with attention interpolation and AdaIN on (the attention store
    lives on the device): the same frames within a few levels of 255."""
    import numpy as np

    frames = {}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's default TF32 convolutions are not fp32: compare fp32 with fp32
    try:
        for where in (device, "cpu"):
            s = settings(where, "fp32", tuning_free=True, attn_lambda=0.6, adain=True, batch_size=2)  # store in use
            frames[where] = render_morph(prepare_pair(*pair, s, progress=False), s, progress=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert frames[device].attention_bytes > 0
    for a, b in zip(frames[device].frames, frames["cpu"].frames):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_fitting_in_half_precision_lowers_the_loss(device, pair, dtype, tmp_path):
    import morphkit

    result = morphkit.train_lora(pair[0], "a photo", model="tiny", device=device, steps=60, learning_rate=5e-3,
                                 mixed_precision=dtype if device == "cuda" else "no", output_dir=tmp_path,
                                 checkpointing_steps=0, progress=False)
    losses = torch.tensor(result.losses)
    assert torch.isfinite(losses).all()
    assert losses[-20:].mean() < losses[:20].mean()
