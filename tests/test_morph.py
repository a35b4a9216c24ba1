import math

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

import morphkit
from cli.main import app
from morphkit import train as train_module
from morphkit.inversion import ddim_schedule, sample_ddim, eps_model
from morphkit.lora import LoraShape, add_lora, adapter_weights
from morphkit.models import encode_prompt
from morphkit.morph import render_frames, slerp
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


# ---- the whole morph -----------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    return make_photo(tmp_path / "a.png", seed=1), make_photo(tmp_path / "b.png", size=(64, 96), seed=2)


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


def test_end_frames_reproduce_the_inputs(pair, tiny_pipe):
    """With guidance 1 the first and last frames regenerate each input (as the VAE sees it)."""
    from morphkit.images import resize_to_policy, open_image, to_tensor
    from morphkit.inversion import psnr
    from morphkit.models import decode_latents, encode_image
    from morphkit.morph import cover_resize

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
        (["morph", *pair, "-o", tmp_path / "r", *common, "--loop", "-1"], "loop"),
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
    for name, words in [("kohya", "kohya"), ("random", "no LoRA weights"), ("other", "does not fit"), ("trunc", "not a readable")]:
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
