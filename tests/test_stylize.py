"""`morphkit stylize`: edges, LoRA weighting, sizes, batches with failures, and refusals, on the tiny model."""

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import morphkit
from cli.main import app
from morphkit.images import open_image, resize_to_policy, to_tensor
from morphkit.inversion import image_psnr as psnr
from morphkit.lora import LoraShape, adapter_metadata, add_lora, lora_state_dict, save_lora
from morphkit.models import SD15_CONFIG, SD15_CONTROLNET_CONFIG, decode_latents, encode_image, load_controlnet
from morphkit.stylize import (
    auto_canny_thresholds,
    canny_edges,
    canny_thresholds,
    check_controlnet_fits,
    check_thresholds,
    controlnet_pipeline,
    render,
)
from tests.conftest import make_photo

FAST = dict(steps=10, save=False, progress=False)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def style_loras(tmp_path_factory, tiny_path):
    """Two diffusers-format LoRA files for the tiny UNet, rank 4 with alpha 8, with random non-zero factors."""
    from morphkit.models import load_pipeline

    folder = tmp_path_factory.mktemp("loras")
    unet = load_pipeline("tiny", device="cpu").unet
    torch.manual_seed(0)
    paths = []
    for name in ("style_a", "style_b"):
        add_lora(unet, LoraShape(rank=4, alpha=8), name)
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if f"lora_B.{name}." in n:
                    p.normal_(0, 0.3)
        path = folder / f"{name}.safetensors"
        paths.append(save_lora(path, lora_state_dict(unet, name), adapter_metadata(unet, name)))
    return paths


@pytest.fixture
def cn_pipe(tiny_pipe):
    return controlnet_pipeline(tiny_pipe, load_controlnet("tiny", device="cpu"))


# ---- edges ---------------------------------------------------------------------------------

def test_auto_thresholds_follow_the_median_and_bad_thresholds_are_refused():
    assert auto_canny_thresholds(np.full((8, 8), 100, np.uint8)) == (67, 133)
    assert auto_canny_thresholds(np.full((8, 8), 0, np.uint8)) == (0, 0)
    assert auto_canny_thresholds(np.full((8, 8), 250, np.uint8)) == (167, 255)  # high clipped to 255
    assert auto_canny_thresholds(np.array([[0, 10, 200]], np.uint8)) == (6, 13)
    for twice_median in range(511):  # every median a uint8 image can have, against exact arithmetic
        gray = np.array([[twice_median // 2, (twice_median + 1) // 2]], np.uint8)
        assert auto_canny_thresholds(gray) == (67 * twice_median // 200, min(255, 133 * twice_median // 200))
    assert check_thresholds(0, 255) == (0, 255) and check_thresholds(80, 80) == (80, 80)
    dark = np.full((8, 8), 30, np.uint8)
    assert canny_thresholds(dark) == (20, 39)
    assert canny_thresholds(dark, 100) == (100, 200) and canny_thresholds(dark, 200) == (200, 255)  # never low > high
    assert canny_thresholds(dark, None, 90) == (45, 90) and canny_thresholds(dark, 10, 20) == (10, 20)
    for low, high, words in [(200, 100, "above the high"), (-1, 10, "0 to 255"), (10, 256, "0 to 255"),
                             (1.5, 10, "integer")]:
        with pytest.raises(morphkit.ConfigError, match=words):
            check_thresholds(low, high)


def test_canny_edges_of_rgb_equal_opencv_on_its_gray(photo):
    rgb = np.asarray(Image.open(photo))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = canny_edges(Image.open(photo), 50, 120)
    assert edges.dtype == np.uint8 and edges.shape == gray.shape and set(np.unique(edges)) <= {0, 255}
    assert np.array_equal(edges, cv2.Canny(gray, 50, 120)) and edges.any()


# ---- LoRA weights ---------------------------------------------------------------------------

def test_lora_scale_and_weights(photo, style_loras, cn_pipe):
    a, b = style_loras
    plain = pixels(morphkit.stylize(photo, pipe=cn_pipe, **FAST).images[0])
    scale0 = pixels(morphkit.stylize(photo, [a], lora_scale=0.0, pipe=cn_pipe, **FAST).images[0])
    scale1 = pixels(morphkit.stylize(photo, [a], pipe=cn_pipe, **FAST).images[0])
    assert np.array_equal(scale0, plain)  # scale 0 is the base model, bit for bit
    assert np.abs(scale1 - plain).mean() > 2.0  # and scale 1 visibly differs

    one = morphkit.stylize(photo, [f"{a}:0.7"], pipe=cn_pipe, **FAST)
    two = morphkit.stylize(photo, [f"{a}:0.7", f"{b}:0"], pipe=cn_pipe, **FAST)
    halved = morphkit.stylize(photo, [f"{a}:1.4", f"{b}:0"], lora_scale=0.5, pipe=cn_pipe, **FAST)
    assert np.array_equal(pixels(two.images[0]), pixels(one.images[0]))
    assert np.array_equal(pixels(halved.images[0]), pixels(one.images[0]))
    assert halved.loras == [(a, 0.7), (b, 0.0)]
    assert np.abs(pixels(one.images[0]) - scale1).mean() > 0.5  # weight 0.7 is not weight 1
    assert not getattr(cn_pipe.unet, "peft_config", {})  # the caller's pipeline is left without our adapters


def test_text_encoder_part_of_a_lora_is_applied_and_undone(photo, style_loras, cn_pipe, tmp_path):
    from morphkit.lora_files import convert_lora

    kohya = convert_lora(style_loras[0], tmp_path / "unet_only.safetensors", to="kohya")
    tensors = load_file(str(kohya))
    g = torch.Generator().manual_seed(0)
    for proj in ("q_proj", "k_proj", "v_proj"):  # a text-encoder part, as civitai LoRAs have
        key = f"lora_te_text_model_encoder_layers_1_self_attn_{proj}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(tmp_path / "with_te.safetensors"))
    before = {k: v.clone() for k, v in cn_pipe.text_encoder.state_dict().items()}
    unet_only = pixels(morphkit.stylize(photo, [kohya], pipe=cn_pipe, **FAST).images[0])
    with_te = pixels(morphkit.stylize(photo, [tmp_path / "with_te.safetensors"], pipe=cn_pipe, **FAST).images[0])
    assert np.abs(with_te - unet_only).mean() > 0.5
    assert all(torch.equal(v, before[k]) for k, v in cn_pipe.text_encoder.state_dict().items())


def test_diffusers_and_kohya_files_give_the_same_image(photo, style_loras, cn_pipe, tmp_path):
    from morphkit.lora_files import convert_lora

    kohya = convert_lora(style_loras[0], tmp_path / "style_a.kohya.safetensors", to="kohya")
    assert any(k.startswith("lora_unet_") for k in load_file(str(kohya)))
    from_diffusers = morphkit.stylize(photo, [f"{style_loras[0]}:0.8"], pipe=cn_pipe, **FAST).images[0]
    from_kohya = morphkit.stylize(photo, [f"{kohya}:0.8"], pipe=cn_pipe, **FAST).images[0]
    assert np.abs(pixels(from_kohya) - pixels(from_diffusers)).max() <= 1


# ---- images ---------------------------------------------------------------------------------

def test_low_strength_returns_the_input_and_the_edge_map_is_opencvs(photo, cn_pipe, tmp_path):
    image = resize_to_policy(open_image(photo), 64)
    gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    twice_median = int(2 * np.median(gray))
    auto = (67 * twice_median // 200, min(255, 133 * twice_median // 200))  # (1 -/+ 0.33) x median, exactly

    near = morphkit.stylize(photo, strength=0.02, steps=50, pipe=cn_pipe, output_dir=tmp_path / "a", progress=False)
    item = near.stylized[0]
    assert item.thresholds == auto
    assert item.paths == {"image": tmp_path / "a" / "photo.png", "edges": tmp_path / "a" / "photo.edges.png"}
    assert np.array_equal(np.asarray(Image.open(item.paths["edges"])), cv2.Canny(gray, *auto))
    assert np.array_equal(np.asarray(Image.open(item.paths["image"])), np.asarray(item.image))
    # one denoising step at t=1: the input as the VAE sees it (the tiny VAE is random, so not the photo itself)
    vae_view = decode_latents(cn_pipe, encode_image(cn_pipe, image))
    far = morphkit.stylize(photo, strength=0.5, steps=50, pipe=cn_pipe, save=False, progress=False)
    assert psnr(to_tensor(item.image), vae_view) > 30 > 20 > psnr(to_tensor(far.images[0]), vae_view)

    chosen = morphkit.stylize(photo, canny_low=30, canny_high=90, steps=4, pipe=cn_pipe, output_dir=tmp_path / "b",
                              progress=False)
    assert chosen.stylized[0].thresholds == (30, 90)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "photo.edges.png")), cv2.Canny(gray, 30, 90))


def test_a_non_square_image_keeps_its_aspect_ratio(tmp_path, cn_pipe):
    wide = make_photo(tmp_path / "wide.png", size=(96, 48), seed=3)
    result = morphkit.stylize(wide, pipe=cn_pipe, **FAST)
    assert result.images[0].size == (128, 64)  # shorter side 64, 2:1 kept
    assert result.stylized[0].edges.size == (128, 64)


def test_a_folder_with_a_corrupt_image(tmp_path, style_loras):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    make_photo(folder / "a.png", seed=1)
    make_photo(folder / "b.jpg", size=(64, 80), seed=2)
    whole = make_photo(tmp_path / "whole.png", seed=3).read_bytes()
    (folder / "c.png").write_bytes(whole[: len(whole) // 2])  # a PNG cut off halfway
    args = ["stylize", folder, "--lora", f"{style_loras[0]}:0.8", "--model", "tiny", "--steps", "4", "-o", out, "-q"]
    result = run_cli(*args)
    assert result.exit_code == 1, result.output
    assert "Stylized 2 of 3 images" in result.output and "style_a.safetensors x0.8" in result.output
    assert "Error: " in result.output and "c.png is corrupt or truncated" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.edges.png", "a.png", "b.edges.png", "b.png"]
    assert Image.open(out / "b.png").size == (64, 80)

    before = (out / "a.png").read_bytes()
    again = run_cli(*args, "--seed", "1")
    assert again.exit_code == 4 and "--overwrite" in again.output
    assert (out / "a.png").read_bytes() == before
    replaced = run_cli(*args, "--seed", "1", "--overwrite")
    assert replaced.exit_code == 1 and (out / "a.png").read_bytes() != before


def test_an_image_that_fails_while_drawing_does_not_stop_the_others(tmp_path, cn_pipe, style_loras, monkeypatch):
    import importlib

    module = importlib.import_module("morphkit.stylize")  # `morphkit.stylize` itself is the function
    files = [make_photo(tmp_path / f"{name}.png", seed=i) for i, name in enumerate("abc")]

    def render_failing_on_b(pipe, image, edges, **settings):
        if len(calls) == 1:
            calls.append("b")
            raise RuntimeError("CUDA out of memory (pretend)")
        calls.append("ok")
        return render(pipe, image, edges, **settings)

    calls = []
    monkeypatch.setattr(module, "render", render_failing_on_b)
    result = morphkit.stylize(files, [style_loras[0]], pipe=cn_pipe, output_dir=tmp_path / "out", steps=4,
                              progress=False)
    assert [s.source for s in result.stylized] == [files[0], files[2]] and list(result.failed) == [files[1]]
    assert result.failed[files[1]] == "Unexpected RuntimeError: CUDA out of memory (pretend)"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.edges.png", "a.png", "c.edges.png", "c.png"]
    assert not getattr(cn_pipe.unet, "peft_config", {})


def test_a_lora_for_another_model_is_refused_before_any_image(photo, tmp_path):
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({"unet.down_blocks.9.attentions.0.to_q.lora_A.weight": torch.ones(4, 64),
               "unet.down_blocks.9.attentions.0.to_q.lora_B.weight": torch.ones(64, 4)},
              str(tmp_path / "other.safetensors"))
    save_file({f"{attn}.lora_A.weight": torch.ones(4, 320), f"{attn}.lora_B.weight": torch.ones(320, 4)},
              str(tmp_path / "sd15_sized.safetensors"))
    for name in ("other", "sd15_sized"):
        out = tmp_path / f"out_{name}"
        result = run_cli("stylize", photo, "--lora", tmp_path / f"{name}.safetensors", "--model", "tiny",
                         "--controlnet", "tiny", "--steps", "4", "-o", out, "-q")
        assert result.exit_code == 2 and "does not fit" in result.output, (name, result.output)
        assert "Traceback" not in result.output and not out.exists()
    with pytest.raises(morphkit.LoRAError, match="does not fit"):
        morphkit.stylize(photo, [tmp_path / "sd15_sized.safetensors"], model="tiny", controlnet="tiny", **FAST)


def test_bad_inputs_are_refused_before_the_model_loads(photo, tmp_path, style_loras):
    """The model named here does not exist: each error below must come first."""
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    common = ["--model", "someone/not-a-model", "-q", "-o", tmp_path / "out"]
    cases = [
        ([tmp_path / "missing.png"], "does not exist"),
        ([photo, "--strength", "0"], "strength"),
        ([photo, "--strength", "1.5"], "strength"),
        ([photo, "--strength", "0.01", "--steps", "50"], "no denoising step"),
        ([photo, "--steps", "0"], "steps"),
        ([photo, "--canny-low", "200", "--canny-high", "100"], "above the high"),
        ([photo, "--canny-high", "300"], "0 to 255"),
        ([photo, "--lora", tmp_path / "nope.safetensors"], "does not exist"),
        ([photo, "--lora", tmp_path / "trunc.safetensors"], "safetensors"),
        ([photo, "--lora", f"{tmp_path / 'trunc.safetensors'}:abc"], "is not a number"),
        ([photo, "-o", photo.parent], "one of the inputs"),
        ([photo, "--resolution", "30"], "resolution"),
        ([photo, photo.with_suffix(".jpg")], "would both be written"),
    ]
    Image.open(photo).save(photo.with_suffix(".jpg"))
    for argv, words in cases:
        result = run_cli("stylize", *common, *argv)
        assert result.exit_code == 2 and words in result.output, (argv, result.output)
        assert "could not be found" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    # and with a usable input, the missing model is what is reported
    late = run_cli("stylize", photo, "--lora", style_loras[0], *common)
    assert late.exit_code == 3 and "could not be found" in late.output


# ---- ControlNet loading ------------------------------------------------------------------------

def test_single_file_controlnet_and_a_controlnet_for_another_model(tmp_path, tiny_pipe):
    from diffusers import ControlNetModel

    from morphkit.tiny import tiny_controlnet_path

    net = load_controlnet("tiny", device="cpu")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    again = load_controlnet(tmp_path / "cn.safetensors", device="cpu", config=tiny_controlnet_path())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(morphkit.ModelNotFoundError, match="SD 1.5 ControlNet"):
        load_controlnet(tmp_path / "cn.safetensors", device="cpu")  # read with SD 1.5's architecture by default

    sd15_controlnet = SimpleNamespace(config=ControlNetModel.load_config(SD15_CONTROLNET_CONFIG))
    sd15_unet = SimpleNamespace(config=json.loads((SD15_CONFIG / "unet" / "config.json").read_text()))
    check_controlnet_fits(sd15_controlnet, sd15_unet)  # the shipped config is SD 1.5's
    with pytest.raises(morphkit.ConfigError, match="does not fit the base model"):
        check_controlnet_fits(sd15_controlnet, tiny_pipe.unet)
