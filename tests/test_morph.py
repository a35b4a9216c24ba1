import functools
import math
import warnings

import imageio.v2 as imageio

import numpy as np
import pytest
import torch
from PIL import Image

import morphkit
from cli.main import app
from morphkit import train as train_module
from morphkit.inversion import Inversion, ddim_schedule, eps_model, invert_exact, latent_error, sample_ddim
from morphkit.lora import LoraShape, add_lora, adapter_weights
from morphkit.lora_blend import factor_blend, factor_delta, factor_layers, lora_blend
from morphkit.metrics import get_distance, images_to_tensor, neighbour_distances, pdv
from morphkit.models import encode_prompt
from morphkit.morph import (ADAPTERS, AttentionStore, adain, alpha_schedule, attention_steps, channel_stats,
                            even_alphas, interp, lerp, moved_frames, render_frames, slerp, start_latents,
                            up_block_self_attention)
from tests.conftest import make_photo, unet_probe

FAST = dict(model="tiny", frames=5, steps=10, lora_steps=30, lora_lr=1e-3, progress=False)


# ---- slerp ---------------------------------------------------------------------------------

def test_slerp_ends_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn((4, 8, 8), generator=g), torch.randn((4, 8, 8), generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    batch = slerp(a, b, torch.tensor([0.0, 0.3, 1.0]))
    assert batch.shape == (3, 4, 8, 8) and torch.equal(batch[0], a) and torch.equal(batch[2], b)


def test_slerp_keeps_unit_vectors_on_the_sphere():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(256, generator=g), torch.randn(256, generator=g)
    a, b = a / a.norm(), b / b.norm()
    norms = slerp(a, b, torch.linspace(0, 1, 11)).norm(dim=1)
    assert torch.allclose(norms, torch.ones(11), atol=1e-5)
    # and the angle grows linearly in t
    angles = torch.arccos((slerp(a, b, torch.linspace(0, 1, 11)) @ a).clamp(-1, 1))
    assert torch.allclose(angles.diff(), angles.diff().mean().expand(10), atol=1e-4)


def test_slerp_of_near_parallel_vectors_falls_back_to_lerp_without_nan():
    a = torch.randn(64, generator=torch.Generator().manual_seed(2))
    for b in (a.clone(), a + 1e-7, -a):
        out = slerp(a, b, torch.linspace(0, 1, 5))
        assert torch.isfinite(out).all()
    assert torch.allclose(slerp(a, a + 1e-7, 0.5), a + 0.5e-7, atol=1e-6)


# ---- AdaIN and pacing: numbers --------------------------------------------------------------

def test_adain_moves_each_channel_to_the_given_statistics():
    g = torch.Generator().manual_seed(5)
    x = torch.randn((3, 4, 8, 8), generator=g) * 0.5 + 2
    mean, std = torch.randn((3, 4, 1, 1), generator=g), torch.rand((3, 4, 1, 1), generator=g) + 0.5
    got_mean, got_std = channel_stats(adain(x, mean, std))
    assert torch.allclose(got_mean, mean.double(), atol=1e-6) and torch.allclose(got_std, std.double(), atol=1e-6)


def test_starting_latents_get_the_interpolated_statistics_and_the_ends_stay_exact():
    g = torch.Generator().manual_seed(6)
    scale_a, scale_b = torch.tensor([0.5, 1, 1.5, 2]).view(1, 4, 1, 1), torch.tensor([2, 0.7, 1, 0.4]).view(1, 4, 1, 1)
    a = torch.randn((1, 4, 8, 8), generator=g) * scale_a + 0.3
    b = torch.randn((1, 4, 8, 8), generator=g) * scale_b - 0.5
    alphas = torch.tensor([0, 0.25, 0.5, 0.8, 1], dtype=torch.float64)
    x = start_latents(a, b, alphas, use_adain=True)
    (mean_a, std_a), (mean_b, std_b) = channel_stats(a[0]), channel_stats(b[0])
    mean, std = channel_stats(x)
    assert torch.allclose(mean, lerp(mean_a, mean_b, alphas), atol=1e-6)
    assert torch.allclose(std, lerp(std_a, std_b, alphas), atol=1e-6)
    assert torch.equal(x[0], a[0]) and torch.equal(x[-1], b[0])
    plain = start_latents(a, b, alphas, use_adain=False)
    assert torch.equal(plain, slerp(a[0], b[0], alphas))
    assert (plain[2].std(dim=(-2, -1)) - std[2].flatten()).abs().max() > 0.05  # slerp alone misses them


def test_even_alphas_invert_the_cumulative_distance():
    alphas = alpha_schedule(5)
    # the first step is as long as the other three together: the frames must crowd into it
    paced = even_alphas(alphas, torch.tensor([3.0, 1, 1, 1]))
    assert torch.allclose(paced, torch.tensor([0, 0.125, 0.25, 0.625, 1], dtype=torch.float64))
    assert torch.equal(even_alphas(alphas, torch.ones(4)), alphas)  # already even: nothing moves
    assert torch.equal(even_alphas(alphas, torch.zeros(4)), alphas)  # no distance at all: nothing moves
    assert moved_frames(alphas, paced).tolist() == [False, True, True, True, False]
    symmetric = even_alphas(alphas, torch.tensor([2.0, 1, 1, 2]))  # slow at both ends: the middle frame stays
    assert torch.allclose(symmetric, torch.tensor([0, 0.1875, 0.5, 0.8125, 1], dtype=torch.float64))
    assert moved_frames(alphas, symmetric).tolist() == [False, True, False, True, False]
    assert moved_frames(alphas, alphas + 0.02, tolerance=0.05).sum() == 5  # 0.02 > 5 % of the 0.25 spacing
    assert moved_frames(alphas, alphas + 0.02, tolerance=0.1).sum() == 0
    xp, fp = torch.tensor([0.0, 1, 1, 3]), torch.tensor([0.0, 2, 5, 6])
    x = torch.linspace(-1, 4, 23)
    assert np.allclose(interp(x, xp, fp).numpy(), np.interp(x.numpy(), xp.numpy(), fp.numpy()))
    assert attention_steps(0.6, 50) == 30 and attention_steps(0.6, 10) == 6 and attention_steps(0, 50) == 0
    assert attention_steps(1, 7) == 7 and attention_steps(0.25, 10) == 3


# ---- LoRA blends ---------------------------------------------------------------------------

def test_factor_delta_is_the_product_of_the_interpolated_factors():
    g = torch.Generator().manual_seed(7)
    a0, a1 = torch.randn((3, 6), generator=g), torch.randn((3, 6), generator=g)
    b0, b1 = torch.randn((5, 3), generator=g), torch.randn((5, 3), generator=g)
    s0, s1 = 0.5, 2.0
    x, alphas = torch.randn((3, 4, 6), generator=g), torch.tensor([0.0, 0.3, 1.0])
    got = factor_delta(x, alphas, [(a0, b0, s0), (a1, b1, s1)])
    for i, t in enumerate(alphas.tolist()):
        product = ((1 - t) * s0 * b0 + t * s1 * b1) @ ((1 - t) * a0 + t * a1)
        assert torch.allclose(got[i], x[i] @ product.T, atol=1e-5)
    one_sided = factor_delta(x, alphas, [(a0, b0, s0), None])  # a layer only LoRA 0 touches: (1-α)² of it
    assert torch.allclose(one_sided[1], 0.7**2 * s0 * x[1] @ (b0 @ a0).T, atol=1e-5)


def test_factor_blend_ends_are_each_lora_and_its_middle_is_not_the_adapter_blend(tiny_pipe):
    unet = two_adapters(tiny_pipe).unet
    probes = {}
    for label, (mode, alpha) in {"f0": ("factors", 0.0), "f1": ("factors", 1.0), "fh": ("factors", 0.5),
                                 "ah": ("adapters", 0.5), "mixed": ("factors", torch.tensor([0.0, 1.0]))}.items():
        with lora_blend(unet, ADAPTERS, alpha, mode):
            probes[label] = unet_probe(unet)
    for name, end in (("img0", "f0"), ("img1", "f1")):
        with adapter_weights(unet, {name: 1.0}):
            only = unet_probe(unet)
        assert (probes[end] - only).abs().max() <= 1e-6 * only.abs().max()
    scale = probes["ah"].abs().max()
    assert (probes["fh"] - probes["ah"]).abs().max() > 1e-3 * scale
    # one α per sample in one batch: sample 0 at α = 0, sample 1 at α = 1
    assert torch.allclose(probes["mixed"][0], probes["f0"][0], atol=1e-6 * scale)
    assert torch.allclose(probes["mixed"][1], probes["f1"][1], atol=1e-6 * scale)
    with adapter_weights(unet, {"img0": 1.0}):
        assert torch.equal(unet_probe(unet), unet_probe(unet))  # the hooks are gone afterwards


def test_factor_blend_refuses_loras_of_different_ranks(tiny_pipe):
    add_lora(tiny_pipe.unet, LoraShape(rank=4), "img0")
    add_lora(tiny_pipe.unet, LoraShape(rank=8), "img1")
    with pytest.raises(morphkit.ConfigError, match="same rank"):
        factor_layers(tiny_pipe.unet, ADAPTERS)
    with pytest.raises(morphkit.ConfigError, match="same rank"):
        with factor_blend(tiny_pipe.unet, ADAPTERS, 0.5):
            pass


# ---- adapters ------------------------------------------------------------------------------

def two_adapters(pipe):
    """img0 and img1 with random (non-zero) weights, so that each visibly changes the UNet."""
    torch.manual_seed(0)
    for name in ("img0", "img1"):
        add_lora(pipe.unet, LoraShape(rank=4), name)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pipe


def test_adapter_blend_ends_equal_the_single_adapter(tiny_pipe):
    unet = two_adapters(tiny_pipe).unet
    outputs = {}
    for label, weights in {"only0": {"img0": 1.0}, "only1": {"img1": 1.0}, "blend0": {"img0": 1.0, "img1": 0.0},
                           "blend1": {"img0": 0.0, "img1": 1.0}, "half": {"img0": 0.5, "img1": 0.5}}.items():
        with adapter_weights(unet, weights):
            outputs[label] = unet_probe(unet)
    assert torch.equal(outputs["blend0"], outputs["only0"])
    assert torch.equal(outputs["blend1"], outputs["only1"])
    assert (outputs["only0"] - outputs["only1"]).abs().max() > 1e-3
    assert (outputs["half"] - outputs["only0"]).abs().max() > 1e-4


def test_per_sample_adapter_weights_equal_set_adapters_per_frame(tiny_pipe):
    unet = two_adapters(tiny_pipe).unet
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 77, 32), generator=g)
    t = torch.tensor([400, 400, 400])
    alphas = [0.0, 0.25, 1.0]
    with torch.no_grad():
        with adapter_weights(unet, {"img0": torch.tensor([1 - a for a in alphas]), "img1": torch.tensor(alphas)}):
            batched = unet(x, t, emb).sample
        for i, a in enumerate(alphas):
            with adapter_weights(unet, {"img0": 1 - a, "img1": a}):
                single = unet(x[i:i + 1], t[i:i + 1], emb[i:i + 1]).sample
            assert (batched[i] - single[0]).abs().max() < 1e-5


def test_fused_per_sample_route_equals_peft_route_with_a_float_weighted_adapter_too(tiny_pipe, monkeypatch):
    """Per-sample weights on plain LoRAs go through `lora.fused_update` with PEFT's own path off; the result is
    PEFT's per-sample-scaled path, output and gradients alike, also with an adapter weighted by a float."""
    import morphkit.lora as lora

    unet = two_adapters(tiny_pipe).unet
    g = torch.Generator().manual_seed(4)
    x, emb, t = torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 77, 32), generator=g), torch.tensor([300] * 3)
    weights = {"img0": torch.tensor([1.0, 0.3, 0.0]), "img1": 0.5}
    params = [p for n, p in unet.named_parameters() if "lora_B.img0" in n]

    def run():
        layer = next(m for m in unet.modules() if hasattr(m, "lora_A") and "img0" in m.lora_A)
        with adapter_weights(unet, weights):
            for p in params:  # after activating, which freezes adapters (as `fit_loras` does)
                p.requires_grad_(True)
                p.grad = None
            peft_off = layer.disable_adapters
            out = unet(x, t, emb).sample
        out.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.requires_grad_(False)
        return out.detach(), grads, peft_off

    fused, fused_grads, fused_off = run()
    monkeypatch.setattr(lora, "_is_plain_linear", lambda module, names: False)
    scaled, scaled_grads, scaled_off = run()
    assert fused_off and not scaled_off  # each route taken
    assert (fused - scaled).abs().max() < 1e-5
    assert scaled_grads.abs().max() > 0
    assert (fused_grads - scaled_grads).abs().max() <= 1e-5 * scaled_grads.abs().max()


def test_fused_route_keeps_stacked_factors_only_while_they_are_unchanged(tiny_pipe, monkeypatch):
    """Without autograd the fused route keeps each layer's stacked factors between calls; a factor changed in
    place (as an optimizer step changes it) is seen at the next call, as PEFT's route sees it."""
    import morphkit.lora as lora

    unet = two_adapters(tiny_pipe).unet
    g = torch.Generator().manual_seed(6)
    x, emb, t = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 32), generator=g), torch.tensor([500] * 2)
    weights = {"img0": torch.tensor([1.0, 0.0]), "img1": torch.tensor([0.0, 1.0])}
    factor = next(p for n, p in unet.named_parameters() if "lora_B.img1" in n)
    original = factor.detach().clone()

    def twice():
        with torch.no_grad(), adapter_weights(unet, weights):
            before = unet(x, t, emb).sample
            factor.add_(0.5)  # in place, inside the context
            after = unet(x, t, emb).sample
            factor.copy_(original)
        return before, after

    try:
        fused = twice()
        monkeypatch.setattr(lora, "_is_plain_linear", lambda module, names: False)
        peft = twice()
    finally:
        with torch.no_grad():
            factor.copy_(original)
    assert (fused[1] - fused[0]).abs().max() > 1e-3  # the change shows
    for ours, theirs in zip(fused, peft):
        assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_update_is_the_weighted_sum_of_the_updates_in_the_factors_dtype(dtype):
    from morphkit.lora import fused_update

    g = torch.Generator().manual_seed(8)
    x = torch.randn((3, 5, 8), generator=g)
    downs = [torch.randn((4, 8), generator=g).to(dtype), torch.randn((2, 8), generator=g).to(dtype)]  # ranks 4, 2
    ups = [torch.randn((6, 4), generator=g).to(dtype), torch.randn((6, 2), generator=g).to(dtype)]
    scales = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 2.0]])
    out = fused_update(x, downs, ups, scales)
    expected = sum(scales[:, k].view(-1, 1, 1) * (x @ downs[k].float().T @ ups[k].float().T) for k in range(2))
    assert out.dtype == dtype and out.shape == (3, 5, 6)
    assert (out.float() - expected).abs().max() <= (1e-5 if dtype == torch.float32 else 0.1) * expected.abs().max()


def test_both_images_inverted_in_one_batch_equal_each_inverted_alone(tiny_pipe):
    from morphkit.morph import invert_under_loras

    pipe = two_adapters(tiny_pipe)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn((2, 4, 8, 8), generator=g)
    embeds = torch.cat([encode_prompt(pipe, "a photo of a cat"), encode_prompt(pipe, "a dog")])
    schedule = ddim_schedule(pipe.scheduler.config, 8)
    for inversion in (Inversion("ddim"), Inversion()):  # plain and fixed-point (the default)
        together, corrections, _ = invert_under_loras(pipe, latents, embeds, ["img0", "img1"], schedule,
                                                      inversion=inversion)
        for i, name in enumerate(("img0", "img1")):
            with adapter_weights(pipe.unet, {name: 1.0}):
                model = eps_model(pipe.unet, embeds[i:i + 1])
                alone, alone_corrections, _ = invert_exact(model, latents[i:i + 1], schedule, inversion)
                if corrections is not None:  # sampling with them lands on the latent, far closer than without
                    back = sample_ddim(model, together[i:i + 1], schedule, corrections=corrections[:, i:i + 1])
                    plain = sample_ddim(model, together[i:i + 1], schedule)
                    assert latent_error(back, latents[i:i + 1]) < 1e-5
                    assert latent_error(back, latents[i:i + 1]) < latent_error(plain, latents[i:i + 1]) / 10
            assert (together[i] - alone[0]).abs().max() < 1e-5 * alone.abs().max()
            assert (corrections is None) == (alone_corrections is None) == (inversion.method == "ddim")
        assert (together[0] - together[1]).abs().max() > 0.1  # different images, adapters and prompts


def test_batched_rendering_equals_one_frame_at_a_time(tiny_pipe):
    pipe = two_adapters(tiny_pipe)
    g = torch.Generator().manual_seed(4)
    noise = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(2)]
    embeds = [encode_prompt(pipe, "a photo of a cat"), encode_prompt(pipe, "a dog")]
    schedule = ddim_schedule(pipe.scheduler.config, 8)
    alphas = torch.linspace(0, 1, 5, dtype=torch.float64)
    batched = render_frames(pipe, *noise, *embeds, alphas, schedule, batch_size=5)
    single = render_frames(pipe, *noise, *embeds, alphas, schedule, batch_size=1)
    assert (batched - single).abs().max() < 1e-4 * single.abs().max()
    # the first frame is exactly a plain DDIM sample from A's noise under A's adapter and prompt
    with adapter_weights(pipe.unet, {"img0": 1.0}):
        first = sample_ddim(eps_model(pipe.unet, embeds[0]), noise[0], schedule)
    assert (batched[0] - first[0]).abs().max() < 1e-4 * first.abs().max()


def render_inputs(pipe, steps=6):
    g = torch.Generator().manual_seed(4)
    noise = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(2)]
    embeds = [encode_prompt(pipe, "a photo of a cat"), encode_prompt(pipe, "a dog")]
    return noise, embeds, ddim_schedule(pipe.scheduler.config, steps)


def attention_bytes(unet, steps, tokens=16):
    """fp16 inputs of the two ends for every up-block self-attention layer and interpolated step (8x8 latent)."""
    return 2 * steps * sum(tokens * m.query_dim * 2 for _, m in up_block_self_attention(unet))


def test_attention_interpolation_changes_the_in_between_frames_only(tiny_pipe):
    pipe = two_adapters(tiny_pipe)
    noise, embeds, schedule = render_inputs(pipe)
    alphas = alpha_schedule(5)
    plain = render_frames(pipe, *noise, *embeds, alphas, schedule)
    off = render_frames(pipe, *noise, *embeds, alphas, schedule, attention=AttentionStore(steps=0))
    assert torch.equal(off, plain)  # λ = 0: the processors are in place and change nothing
    store = AttentionStore(steps=attention_steps(0.6, len(schedule)))
    on = render_frames(pipe, *noise, *embeds, alphas, schedule, attention=store)
    assert torch.equal(on[[0, -1]], plain[[0, -1]])
    assert (on[1:-1] - plain[1:-1]).abs().amax(dim=(1, 2, 3)).min() > 1e-3 * plain.abs().max()
    assert store.peak_bytes == 0 and not store.states  # one batch, nothing to keep for later
    layers = up_block_self_attention(pipe.unet)
    assert len(layers) == 2 and all(type(m.processor).__name__ == "AttnProcessor2_0" for _, m in layers)


def test_kept_attention_inputs_serve_a_later_call_and_are_needed(tiny_pipe):
    pipe = two_adapters(tiny_pipe)
    noise, embeds, schedule = render_inputs(pipe)
    store = AttentionStore(steps=4, keep=True)
    render_frames(pipe, *noise, *embeds, alpha_schedule(5), schedule, attention=store)
    assert store.nbytes == store.peak_bytes == attention_bytes(pipe.unet, 4) > 0
    later = render_frames(pipe, *noise, *embeds, torch.tensor([0.3], dtype=torch.float64), schedule, attention=store)
    together = render_frames(pipe, *noise, *embeds, torch.tensor([0, 0.3, 1], dtype=torch.float64), schedule,
                             attention=AttentionStore(steps=4))
    assert (later[0] - together[1]).abs().max() < 1e-4 * together.abs().max()
    with pytest.raises(ValueError, match="render the end frames"):
        render_frames(pipe, *noise, *embeds, torch.tensor([0.3], dtype=torch.float64), schedule,
                      attention=AttentionStore(steps=4))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_batched_rendering_equals_one_frame_at_a_time_with_every_refinement(tiny_pipe, guidance):
    pipe = two_adapters(tiny_pipe)
    noise, embeds, schedule = render_inputs(pipe)
    negative = encode_prompt(pipe, "blurry") if guidance != 1.0 else None
    alphas = alpha_schedule(5)
    opts = dict(guidance=guidance, negative=negative, adain=True, blend="factors")
    batched = render_frames(pipe, *noise, *embeds, alphas, schedule, batch_size=5, attention=AttentionStore(4), **opts)
    store = AttentionStore(4)
    single = render_frames(pipe, *noise, *embeds, alphas, schedule, batch_size=1, attention=store, **opts)
    assert (batched - single).abs().max() < 1e-4 * single.abs().max()
    groups = 1 if guidance == 1.0 else 2  # a guided batch keeps the negative half's inputs too
    assert store.peak_bytes == groups * attention_bytes(pipe.unet, 4) and not store.states


# ---- the whole morph -----------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    return make_photo(tmp_path / "a.png", seed=1), make_photo(tmp_path / "b.png", size=(64, 96), seed=2)


def test_morph_fitting_the_loras_together_or_one_by_one_gives_the_same_frames(pair, tiny_pipe):
    common = dict(FAST, prompt="a photo", formats=(), cache=False, pipe=tiny_pipe, pacing="linear")
    together = morphkit.morph(*pair, fit_together=True, **common)
    apart = morphkit.morph(*pair, fit_together=False, **common)
    a = np.stack([np.asarray(f, dtype=np.int16) for f in together.frames])
    b = np.stack([np.asarray(f, dtype=np.int16) for f in apart.frames])
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05  # 8-bit rounding of near-equal frames
    assert np.abs(a[0] - a[-1]).mean() > 5  # and the frames are a morph, not a constant


def test_morph_writes_gif_mp4_and_frames(pair, tmp_path):
    out = tmp_path / "morph"
    result = morphkit.morph(*pair, prompt="a photo", output_dir=out, frame_duration_ms=120, **FAST)
    assert len(result.frames) == 5 and result.alphas[0] == 0 and result.alphas[-1] == 1
    assert result.frames[0].size == (80, 64)  # A's frame; B (64x96) was scaled to cover it and center-cropped

    gif = Image.open(out / "morph.gif")
    assert gif.n_frames == 5 and gif.info["duration"] == 120
    assert len(imageio.mimread(out / "morph.mp4")) == 5
    pngs = sorted((out / "frames").iterdir())
    assert [p.name for p in pngs] == [f"frame_{i:03d}.png" for i in range(5)]
    assert Image.open(pngs[2]).size == (80, 64)
    assert set(result.timings) == {"load", "fit", "invert", "render", "export"}
    assert all(s >= 0 for s in result.timings.values()) and result.peak_memory == {}  # GPU memory is CUDA-only


def test_end_frames_reproduce_the_inputs(pair, tiny_pipe):
    """With guidance 1 the first and last frames regenerate each input (as the VAE sees it)."""
    from morphkit.images import resize_to_policy, open_image, to_tensor
    from morphkit.inversion import image_psnr as psnr
    from morphkit.models import decode_latents, encode_image
    from morphkit.images import cover_resize

    result = morphkit.morph(*pair, prompt="a photo", formats=(), pipe=tiny_pipe, cache=False,
                            **{**FAST, "lora_steps": 150, "steps": 25})
    img_a = resize_to_policy(open_image(pair[0]), 64)
    img_b = cover_resize(open_image(pair[1]), img_a.size)
    for frame, img in ((result.frames[0], img_a), (result.frames[-1], img_b)):
        vae_view = decode_latents(tiny_pipe, encode_image(tiny_pipe, img))
        assert psnr(to_tensor(frame), vae_view) > 30
    middle = to_tensor(result.frames[2])
    assert psnr(middle, to_tensor(result.frames[0])) < 30 and psnr(middle, to_tensor(result.frames[-1])) < 30


def test_second_run_hits_the_cache_and_a_changed_image_misses(pair, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = morphkit.morph(*pair, cache_dir=cache, formats=(), **FAST)
    assert not any(first.cache_hits.values())

    def no_training(*args, **kwargs):
        raise AssertionError("a cached morph must not train")

    monkeypatch.setattr(train_module, "fit_lora", no_training)
    second = morphkit.morph(*pair, cache_dir=cache, formats=(), **FAST)
    assert all(second.cache_hits.values())
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first.frames, second.frames))
    monkeypatch.undo()

    make_photo(pair[1], size=(64, 96), seed=99)  # same file name, new content
    third = morphkit.morph(*pair, cache_dir=cache, formats=(), **FAST)
    assert third.cache_hits == {"lora_a": True, "lora_b": False, "inversion_a": True, "inversion_b": False}
    fourth = morphkit.morph(*pair, cache_dir=cache, formats=(), **{**FAST, "lora_steps": 31})
    assert not fourth.cache_hits["lora_a"]  # a changed setting never reuses a stale entry


def test_morph_refinements_end_to_end(pair, tmp_path, monkeypatch):
    """One set of LoRAs and inversions (cached), four morphs: plain, + attention, + AdaIN, + even pacing."""
    common = dict(FAST, frames=7, formats=(), cache_dir=tmp_path / "cache", prompt="a photo")
    plain = morphkit.morph(*pair, attn_lambda=0, adain=False, pacing="linear", **common)
    assert plain.attention_steps == 0 and plain.distance is None and plain.rerendered == []
    attn = morphkit.morph(*pair, adain=False, pacing="linear", **common)
    assert attn.attention_steps == 6 and attn.attention_bytes == 0  # all 7 frames in one batch: nothing kept
    arrays = [[np.asarray(f, dtype=np.int16) for f in r.frames] for r in (plain, attn)]
    assert all(np.array_equal(arrays[0][i], arrays[1][i]) for i in (0, -1))
    assert all(np.abs(arrays[0][i] - arrays[1][i]).max() > 2 for i in range(1, 6))

    linear = morphkit.morph(*pair, pacing="linear", **common)
    even = morphkit.morph(*pair, **common)  # the defaults: attention 0.6, AdaIN, even pacing
    assert even.pacing == "even" and even.distance in ("lpips", "l2")
    measured = neighbour_distances(images_to_tensor(linear.frames), get_distance(even.distance)[1])
    assert np.allclose(even.first_distances, measured.numpy())  # the first pass is the linear morph
    assert pdv(torch.tensor(even.distances)) < pdv(measured)
    assert 0 < len(even.rerendered) < 7 and 0 not in even.rerendered and 6 not in even.rerendered
    assert even.attention_bytes > 0  # eager: the ends' inputs are kept for the second pass
    for i in set(range(7)) - set(even.rerendered):
        assert np.array_equal(np.asarray(even.frames[i]), np.asarray(linear.frames[i]))
        assert even.alphas[i] == linear.alphas[i]
    assert even.alphas[0] == 0 and even.alphas[-1] == 1 and all(np.diff(even.alphas) > 0)


    # Compiled, with all 7 frames in one call, the second pass renders the ends along instead: nothing kept, the
    # same frames (dynamo's eager backend: the graphs without inductor's code generation).
    from morphkit.morph import job

    with monkeypatch.context() as m:
        m.setattr(job, "compiled", functools.partial(job.compiled, backend="eager"))
        along = morphkit.morph(*pair, **{**common, "compile_unet": True})
    torch._dynamo.reset()
    assert along.attention_bytes == 0 and along.rerendered == even.rerendered
    assert np.allclose(along.alphas, even.alphas)
    assert all(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2
               for a, b in zip(along.frames, even.frames))


def test_same_image_twice(pair, tmp_path):
    with pytest.raises(morphkit.ConfigError, match="nothing to morph"):
        morphkit.morph(pair[0], pair[0], formats=(), **FAST)
    result = morphkit.morph(pair[0], pair[0], prompt_a="a photo of a cat", prompt_b="a dog", formats=(),
                            cache_dir=tmp_path, **FAST)
    assert len(result.frames) == 5 and result.cache_hits["lora_a"] is False


def run_cli(*args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_morph_and_its_bad_inputs(pair, tmp_path):
    out = tmp_path / "o"
    common = ["--model", "tiny", "--frames", "3", "--steps", "4", "--lora-steps", "5", "-q", "--cache-dir", tmp_path / "c"]
    ok = run_cli("morph", *pair, "-o", out, *common)
    assert ok.exit_code == 0, ok.output
    assert "gif:" in ok.output and "Time:" in ok.output
    gif_bytes = (out / "morph.gif").read_bytes()

    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 40)
    cases = [
        (["morph", *pair, "-o", out, *common], "already holds a morph"),
        (["morph", *pair, "-o", tmp_path / "x", *common, "--frames", "1"], "at least 2 frames"),
        (["morph", pair[0], tmp_path / "missing.png", "-o", tmp_path / "y", *common], "does not exist"),
        (["morph", pair[0], tmp_path / "corrupt.jpg", "-o", tmp_path / "z", *common], "corrupt"),
        (["morph", pair[0], pair[0], "-o", tmp_path / "w", *common], "nothing to morph"),
        (["morph", *pair, "-o", tmp_path / "v", *common, "--formats", "gif,avi"], "Unknown output format"),
        (["morph", *pair, "-o", tmp_path / "u", *common, "--formats", ""], "--formats is empty"),
        (["morph", *pair, "-o", tmp_path / "t", *common, "--fps", "5000"], "fps"),
        (["morph", *pair, "-o", tmp_path / "s", *common, "--steps", "2000"], "steps"),
        (["morph", *pair, "-o", tmp_path / "r", *common, "--gif-loops", "-1"], "gif-loops"),
        (["morph", *pair, "-o", tmp_path / "q", *common, "--resolution", "0"], "resolution"),
        (["morph", *pair, "-o", tmp_path / "p", *common, "--resolution", "4096"], "resolution"),
        (["morph", *pair, "-o", tmp_path / "n", *common, "--cache-dir", pair[0]], "is a file"),
        (["morph", *pair, "-o", tmp_path / "m", *common, "--lora-a", tmp_path / "nope.safetensors"], "does not exist"),
    ]
    for argv, words in cases:
        result = run_cli(*argv)
        assert result.exit_code != 0 and words in result.output, (argv, result.output)
        assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert (out / "morph.gif").read_bytes() == gif_bytes  # the existing morph was left alone
    for name in "xyzwvutsrqpnm":
        assert not (tmp_path / name).exists()
    again = run_cli("morph", *pair, "-o", out, *common, "--overwrite", "--back-and-forth")
    assert again.exit_code == 0 and Image.open(out / "morph.gif").n_frames == 5  # A→B in 3 frames, then back to A


def test_cli_morph_refinement_options_and_report(pair, tmp_path):
    common = ["--model", "tiny", "--frames", "4", "--steps", "4", "--lora-steps", "5", "-q",
              "--cache-dir", tmp_path / "c"]
    ok = run_cli("morph", *pair, "-o", tmp_path / "o", *common, "--attn-lambda", "0.5", "--lora-blend", "factors",
                 "--no-adain", "--batch-size", "2", "--formats", "png")
    assert ok.exit_code == 0, ok.output
    assert "Attention interpolation: first 2 of 4 steps; kept" in ok.output and "KiB" in ok.output
    assert "Pacing: even by" in ok.output and "re-rendered" in ok.output and "PDV" in ok.output
    off = run_cli("morph", *pair, "-o", tmp_path / "o2", *common, "--attn-lambda", "0", "--pacing", "linear")
    assert off.exit_code == 0 and "Attention interpolation: off." in off.output and "Pacing: linear." in off.output
    for option, value, words in [("--attn-lambda", "1.5", "attn_lambda"), ("--attn-lambda", "-0.1", "attn_lambda"),
                                 ("--pacing", "zigzag", "Unknown pacing"), ("--distance", "cosine", "Unknown distance"),
                                 ("--lora-blend", "mix", "Unknown LoRA blend")]:
        result = run_cli("morph", *pair, "-o", tmp_path / "bad", *common, option, value)
        assert result.exit_code == 2 and words in result.output, (option, result.output)
        assert not (tmp_path / "bad").exists()


def test_invert_cli(pair, tmp_path):
    result = run_cli("invert", pair[0], "--model", "tiny", "--steps", "5", "-o", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    assert "latent error" in result.output and (tmp_path / "a.noise.safetensors").is_file()
    assert math.isfinite(float(result.output.split("latent error ")[1].split("%")[0]))


def test_invert_rejects_loras_that_are_not_diffusers_unet_loras(pair, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64)},
              str(tmp_path / "kohya.safetensors"))
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "random.safetensors"))
    save_file({"unet.down_blocks.9.attentions.0.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.9.attentions.0.to_q.lora_B.weight": torch.zeros(64, 4)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    for name, words in [("kohya", "kohya"), ("random", "no LoRA weights"), ("other", "does not fit"), ("trunc", "not a safetensors")]:
        result = run_cli("invert", pair[0], "--model", "tiny", "--steps", "2", "--lora", tmp_path / f"{name}.safetensors",
                         "-o", tmp_path / name, "-q")
        assert result.exit_code == 2 and words in result.output, (name, result.output)
        assert "Traceback" not in result.output


def test_a_reused_pipeline_keeps_no_adapter_state(pair, tiny_pipe, tmp_path):
    plain = morphkit.invert(pair[0], steps=5, pipe=tiny_pipe, save=False, progress=False).noise
    morphkit.morph(*pair, pipe=tiny_pipe, formats=(), cache_dir=tmp_path, **FAST)
    assert "img0" in tiny_pipe.unet.peft_config
    again = morphkit.invert(pair[0], steps=5, pipe=tiny_pipe, save=False, progress=False).noise
    assert torch.equal(plain, again)
    # a second morph replaces the first one's adapters, without PEFT's "was active which is now deleted"
    tiny_pipe.unet.set_adapters(["img0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        morphkit.morph(*pair, pipe=tiny_pipe, formats=(), cache_dir=tmp_path, **FAST)
    assert sorted(tiny_pipe.unet.peft_config) == ["img0", "img1"]


@pytest.mark.parametrize("blend", ["adapters", "factors"])
def test_rendering_through_torch_compile_gives_the_same_frames_in_one_graph_without_breaks(tiny_pipe, blend):
    # backend "eager": dynamo traces the UNet with the LoRAs, per-sample adapter weights and attention
    # interpolation, and runs the captured graphs without inductor's code generation (which takes ~40 s).
    from torch._dynamo.utils import counters

    from morphkit.models import compiled

    pipe = two_adapters(tiny_pipe)
    g = torch.Generator().manual_seed(6)
    noise = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(2)]
    embeds = [encode_prompt(pipe, "a photo of a cat"), encode_prompt(pipe, "a dog")]
    alphas = torch.linspace(0, 1, 4, dtype=torch.float64)
    graphs, breaks = {}, {}
    for steps in (3, 6) if blend == "adapters" else (3,):
        schedule = ddim_schedule(pipe.scheduler.config, steps)
        opts = dict(batch_size=4, adain=True, blend=blend)
        eager = render_frames(pipe, *noise, *embeds, alphas, schedule, attention=AttentionStore(steps - 1), **opts)
        torch._dynamo.reset()
        counters.clear()
        try:
            with compiled(pipe.unet, backend="eager") as unet:
                assert "forward" in unet.__dict__  # the compiled wrapper is in place
                traced = render_frames(pipe, *noise, *embeds, alphas, schedule, attention=AttentionStore(steps - 1),
                                       **opts)
            graphs[steps] = counters["stats"]["unique_graphs"]
            breaks[steps] = sum(counters["graph_break"].values())
        finally:
            torch._dynamo.reset()
        assert "forward" not in pipe.unet.__dict__  # the module's own forward is back
        assert (traced - eager).abs().max() < 1e-5 * eager.abs().max()
    # The ends are in the batch, so the interpolation runs inside the graph (no break), and its step is a tensor
    # set outside the UNet call, not a guard: one graph, whatever the steps.
    assert set(graphs.values()) == {1} and set(breaks.values()) == {0}, (graphs, breaks)


def test_a_coarse_schedule_walks_the_same_path_in_fewer_steps(tiny_pipe):
    from morphkit.inversion import coarse_schedule

    full = ddim_schedule(tiny_pipe.scheduler.config, 50)
    coarse = coarse_schedule(full, 10)
    assert len(coarse) == 10
    assert coarse.timesteps[0] == full.timesteps[0] and coarse.alphas_prev[-1] == full.alphas_prev[-1]
    assert torch.equal(coarse.alphas_prev[:-1], coarse.alphas[1:])  # each step lands on the next one's level
    assert torch.equal(coarse_schedule(full, 50).timesteps, full.timesteps)


def test_even_pacing_from_a_probe_pass_renders_each_frame_once_and_evens_the_morph(tiny_pipe, tmp_path):
    a, b = make_photo(tmp_path / "a.png", seed=1), make_photo(tmp_path / "b.png", seed=2)
    common = dict(pipe=tiny_pipe, prompt="a photo", tuning_free=True, steps=20, frames=8, formats=(), cache=False,
                  distance="l2", progress=False)
    result = morphkit.morph(a, b, pacing_probe_steps=5, **common)
    assert result.probe_steps == 5 and result.rerendered == [] and len(result.frames) == 8
    assert result.attention_bytes == 0  # one call renders every frame, ends included: nothing kept for later
    assert result.alphas[0] == 0 and result.alphas[-1] == 1 and result.alphas == sorted(result.alphas)
    linear = morphkit.morph(a, b, pacing="linear", **common)
    _, l2, _ = get_distance("l2", torch.device("cpu"))
    assert pdv(torch.tensor(result.distances)) < pdv(neighbour_distances(images_to_tensor(linear.frames), l2))


def test_bf16_on_a_cpu_only_where_it_computes_it_natively(monkeypatch):
    from morphkit import models

    cpu = torch.device("cpu")
    assert models.resolve_dtype(None, cpu) == torch.float32  # the default stays fp32
    with pytest.raises(morphkit.ConfigError, match="fp16 is not supported on the CPU"):
        models.resolve_dtype("fp16", cpu)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(morphkit.ConfigError, match="emulated"):
        models.resolve_dtype("bf16", cpu)
