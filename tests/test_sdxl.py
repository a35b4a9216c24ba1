"""SDXL on tiny-sdxl: the family layer, invert, morph, stylize, LoRA files, single files and bad inputs.

Every test runs the real code on the tiny SDXL-architecture model (two text encoders, a text_time UNet, a VAE
that downsamples by 8, a ControlNet), loaded from its cache folder as any local folder is.
"""

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_photo
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from morphkit.errors import LoRAError, ModelNotFoundError
from morphkit.families import SD15, SDXL, PromptEmbeds, family_of, family_of_folder, family_of_single_file

runner = CliRunner()


@pytest.fixture(scope="session")
def tiny_sdxl_path(morphkit_cache):
    from morphkit.tiny_sdxl import tiny_sdxl_model_path

    return tiny_sdxl_model_path()


@pytest.fixture
def xl_pipe(tiny_sdxl_path):
    from morphkit.models import load_pipeline

    return load_pipeline("tiny-sdxl", device="cpu")


def cli(*args):
    from cli.main import app

    return runner.invoke(app, [str(a) for a in args])


def random_lora(model, targets, rank, alpha, seed):
    """A LoRA adapter on `model` with random factors (both nonzero); returns (PEFT state dict, config dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), adapter_name="t")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="t").items()}
    config = model.peft_config["t"].to_dict()
    model.delete_adapters("t") if hasattr(model, "delete_adapters") else model.delete_adapter("t")
    return state, config


@pytest.fixture
def xl_lora(xl_pipe, tmp_path):
    """A kohya SDXL LoRA written by morphkit from PEFT adapters on the UNet and both text encoders."""
    from morphkit.lora_files import lora_from_peft_parts, save_lora_file

    parts = {"unet": random_lora(xl_pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 2.0, 1),
             "text_encoder": random_lora(xl_pipe.text_encoder, ["q_proj", "v_proj", "out_proj"], 2, 2.0, 2),
             "text_encoder_2": random_lora(xl_pipe.text_encoder_2, ["q_proj", "k_proj", "out_proj"], 2, 1.0, 3)}
    lora = lora_from_peft_parts(parts)
    path = save_lora_file(tmp_path / "xl.safetensors", lora, "kohya", family=SDXL, unet_config=xl_pipe.unet.config)
    return path, lora


# ---------------------------------------------------------------------------------------------- the family

def test_family_encodes_prompts_as_stock_sdxl_and_says_what_the_unet_needs(xl_pipe, tiny_path, tiny_sdxl_path):
    assert family_of(xl_pipe) is SDXL and family_of_folder(tiny_sdxl_path) is SDXL
    assert family_of_folder(tiny_path) is SD15
    cond = SDXL.encode_prompt(xl_pipe, "a photo of a cat", (64, 80))
    embeds, _, pooled, _ = xl_pipe.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    assert torch.equal(cond.embeds, embeds.float()) and torch.equal(cond.pooled, pooled.float())
    assert cond.embeds.shape == (1, 77, 32 + 48) == (1, 77, xl_pipe.unet.config.cross_attention_dim) and cond.pooled.shape == (1, 32)
    assert cond.time_ids.tolist() == [[64, 80, 0, 0, 64, 80]]  # original size, crop, target size
    # as SDXL's pipelines do, an empty negative prompt is zeros (time ids are not text: kept)
    neg = SDXL.encode_negative(xl_pipe, "", (64, 80))
    assert neg.embeds.abs().sum() == 0 and neg.pooled.abs().sum() == 0 and torch.equal(neg.time_ids, cond.time_ids)
    added = SDXL.added_cond_kwargs(cond, torch.float32)
    unet = xl_pipe.unet
    width = unet.config.addition_time_embed_dim * added["time_ids"].shape[1] + added["text_embeds"].shape[1]
    assert width == unet.add_embedding.linear_1.in_features
    assert [te.kohya_prefix for te in SDXL.text_encoders] == ["lora_te1_", "lora_te2_"]
    assert [te.embedding_key for te in SDXL.text_encoders] == ["clip_l", "clip_g"]
    assert SDXL.default_resolution == 1024 and SD15.default_resolution == 512
    assert SDXL.kohya_unet_name("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", SDXL.unet_config()) \
        == "input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    assert SDXL.kohya_unet_name("up_blocks.0.attentions.2.proj_out", SDXL.unet_config()) == "output_blocks_2_1_proj_out"
    assert SDXL.kohya_unet_name("mid_block.attentions.0.proj_in", SDXL.unet_config()) == "middle_block_1_proj_in"


def test_prompt_embeds_interpolate_every_part_per_sample():
    from morphkit.morph.interpolation import lerp

    a = PromptEmbeds(torch.zeros(1, 3, 2), torch.zeros(1, 4), torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    b = PromptEmbeds(torch.ones(1, 3, 2), torch.ones(1, 4) * 2, torch.tensor([[128.0, 128, 0, 0, 128, 128]]))
    mixed = a.lerp(b, torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), lerp)
    assert mixed.embeds[:, 0, 0].tolist() == [0, 0.25, 1] and mixed.pooled[:, 0].tolist() == [0, 0.5, 2]
    assert mixed.time_ids[:, 0].tolist() == [64, 80, 128]


# ---------------------------------------------------------------------------------------------- invert, morph

def test_invert_round_trip_on_sdxl_is_exact_and_plain_ddim_is_not(xl_pipe, photo, tmp_path):
    import morphkit
    from morphkit.inversion import Inversion

    exact = morphkit.invert(photo, "a photo", pipe=xl_pipe, steps=8, inversion=Inversion(iterations=20, tolerance=1e-7),
                            output_dir=tmp_path, progress=False)
    plain = morphkit.invert(photo, "a photo", pipe=xl_pipe, steps=8, inversion=Inversion("ddim"), save=False,
                            progress=False)
    assert exact.latent_error < 1e-4 < 1e-2 < plain.latent_error
    assert exact.psnr > 60 and exact.settings["family"] == "sdxl"
    assert json.loads((tmp_path / "photo.inversion.json").read_text())["latent_error"] == exact.latent_error


def test_morph_on_sdxl_writes_gif_mp4_png_with_exact_ends_and_per_frame_pooled_embeds(xl_pipe, tmp_path):
    import imageio

    import morphkit
    from morphkit.models import decode_latents, encode_image
    from morphkit.similarity import psnr

    a, b = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=5)
    seen = []  # the pooled embeddings and time ids the UNet is given, per call
    hook = xl_pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    result = morphkit.morph(a, b, pipe=xl_pipe, prompt_a="a photo of a cat", prompt_b="a dog", tuning_free=True,
                            steps=6, frames=4, pacing="even", distance="l2", output_dir=tmp_path / "m", cache=False,
                            progress=False)
    hook.remove()
    assert Image.open(result.paths["gif"]).n_frames == 4
    assert len(imageio.mimread(result.paths["mp4"])) == 4
    assert sorted(p.name for p in result.paths["png"].glob("*.png")) == [f"frame_{i:03d}.png" for i in range(4)]
    # the ends come back as the images (exact inversion), as the VAE's own round trip of each image
    for frame, img in ((result.frames[0], a), (result.frames[-1], b)):
        sized = Image.open(img).convert("RGB").resize(frame.size)
        ref = decode_latents(xl_pipe, encode_image(xl_pipe, sized))
        got = torch.from_numpy(np.asarray(frame)).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert float(psnr(got, ref.clamp(-1, 1), data_range=2.0)[0]) > 35
    # every UNet call got one pooled embedding per sample, each on the line from A's prompt to B's, and the frames'
    # own alphas are among them: the pooled embeddings are interpolated per frame
    pa = morphkit.models.encode_conditioning(xl_pipe, "a photo of a cat", (64, 80)).pooled[0]
    pb = morphkit.models.encode_conditioning(xl_pipe, "a dog", (64, 80)).pooled[0]
    rows = torch.cat([t["text_embeds"] for t in seen])
    along = ((rows - pa) @ (pb - pa)) / (pb - pa).dot(pb - pa)
    assert torch.allclose(rows, pa + along[:, None] * (pb - pa), atol=1e-5)
    for alpha in result.alphas:
        assert (along - alpha).abs().min() < 1e-5
    assert all(row == [64, 80, 0, 0, 64, 80] for t in seen for row in t["time_ids"].tolist())


def test_attention_interpolation_runs_on_sdxl_up_blocks_and_keeps_the_ends(xl_pipe):
    from morphkit.inversion import ddim_schedule
    from morphkit.models import encode_conditioning
    from morphkit.morph.attention import AttentionStore, up_block_self_attention
    from morphkit.morph.sampling import render_frames

    layers = up_block_self_attention(xl_pipe.unet)
    assert len(layers) == 6  # up_blocks.0: three attentions of two transformer blocks each (tiny-sdxl)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn((1, 4, 8, 10), generator=g) for _ in range(2)]
    cond = [encode_conditioning(xl_pipe, p, (64, 80)) for p in ("a cat", "a dog")]
    schedule, alphas = ddim_schedule(xl_pipe.scheduler.config, 5), torch.tensor([0, 0.5, 1], dtype=torch.float64)
    plain = render_frames(xl_pipe, *noise, *cond, alphas, schedule, adapters=())
    store = AttentionStore(steps=3, keep=True)
    mixed = render_frames(xl_pipe, *noise, *cond, alphas, schedule, adapters=(), attention=store)
    assert torch.equal(plain[[0, 2]], mixed[[0, 2]]) and not torch.allclose(plain[1], mixed[1], atol=1e-4)
    assert store.peak_bytes > 0 and {k[0] for k in store.states} <= {name for name, _ in layers}
    # the store can live elsewhere than the UNet (the CPU, beside a GPU): a later call reads it back, same frames
    frames = []
    for where in (None, "cpu"):
        kept = AttentionStore(steps=3, keep=True, device=where)
        render_frames(xl_pipe, *noise, *cond, alphas[[0, 2]], schedule, adapters=(), attention=kept)
        frames.append(render_frames(xl_pipe, *noise, *cond, alphas[[1]], schedule, adapters=(), attention=kept))
        assert all(t.device.type == "cpu" for t in kept.states.values()) and kept.peak_bytes == store.peak_bytes
    assert torch.equal(*frames) and torch.allclose(frames[0], mixed[1:2], atol=1e-3)


# ---------------------------------------------------------------------------------------------- stylize

def test_stylize_on_sdxl_uses_the_tiny_sdxl_controlnet(xl_pipe, photo, tmp_path):
    import morphkit

    result = cli("stylize", photo, "--model", "tiny-sdxl", "--controlnet", "tiny", "--steps", "6", "-o",
                 tmp_path / "s", "-q")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "s" / "photo.png").size == (80, 64)
    draw = dict(model="tiny-sdxl", steps=6, save=False, progress=False, pipe=xl_pipe, controlnet="tiny")
    with_edges = morphkit.stylize(photo, controlnet_scale=1.0, **draw).images[0]
    without = morphkit.stylize(photo, controlnet_scale=0.0, **draw).images[0]
    again = morphkit.stylize(photo, controlnet_scale=1.0, **draw).images[0]
    pixels = [torch.from_numpy(np.asarray(img)).float() for img in (with_edges, without, again)]
    assert (pixels[0] - pixels[1]).abs().mean() > 0.5 and torch.equal(pixels[0], pixels[2])


# ---------------------------------------------------------------------------------------------- LoRA files

def test_kohya_sdxl_lora_names_and_lora_info_counts_each_text_encoder(xl_lora):
    from cli.main import app

    path, lora = xl_lora
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".alpha")}
    for prefix in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "lora_unet_middle_block_1_",
                   "lora_unet_output_blocks_0_1_", "lora_te1_text_model_encoder_layers_0_self_attn_v_proj",
                   "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"):
        assert any(m.startswith(prefix) for m in modules), prefix
    assert not any(m.startswith(("lora_te_", "lora_unet_down_blocks")) for m in modules)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    n1, n2, nu = len(lora.part("text_encoder")), len(lora.part("text_encoder_2")), len(lora.part("unet"))
    assert (n1, n2) == (2 * 3, 2 * 3)  # two layers: q, v, out in te1; q, k, out in te2
    out = runner.invoke(app, ["lora", "info", str(path)]).output
    assert f"{nu} UNet, {n1 + n2} text encoder: {n1} te1, {n2} te2" in out and "made for:      SDXL" in out


def test_kohya_sdxl_lora_loads_in_stock_diffusers_and_changes_weights_by_its_update(xl_lora, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    from morphkit.lora_files import find_layer, read_lora_file

    path, written = xl_lora
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    before = {n: find_layer(getattr(stock, n.partition(".")[0]), n.partition(".")[2]).weight.detach().clone()
              for n in written.modules}
    stock.load_lora_weights(str(path))
    stock.fuse_lora(lora_scale=0.5)
    for name, m in written.modules.items():
        part, _, inner = name.partition(".")
        after = find_layer(getattr(stock, part), inner).weight.detach()
        expected = 0.5 * (m.alpha / m.rank) * (m.up.flatten(1) @ m.down.flatten(1)).reshape(after.shape)
        assert torch.allclose(after - before[name], expected, atol=1e-6), name
    # and morphkit reads its own file back to the same factors, UNet names mapped onto the diffusers layout
    back = read_lora_file(path)
    from morphkit.lora_files import for_unet

    back = for_unet(back, stock.unet)
    assert set(back.modules) == set(written.modules)
    assert all(torch.equal(back.modules[n].up, m.up) and back.modules[n].alpha == m.alpha
               for n, m in written.modules.items())


def test_lora_convert_of_an_sdxl_file_gives_diffusers_names_and_back_kohya_sdxl_names(xl_lora, tmp_path):
    import warnings

    from morphkit.lora_files import LoraCompatibilityWarning, convert_lora, read_lora_file

    path, written = xl_lora
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraCompatibilityWarning)
        diffusers_file = convert_lora(path, tmp_path / "d.safetensors", to="diffusers")
    back = convert_lora(diffusers_file, tmp_path / "k.safetensors", to="kohya")
    as_diffusers = read_lora_file(diffusers_file)
    assert set(as_diffusers.modules) == set(written.modules)  # diffusers' block names: what diffusers loads
    with safe_open(str(path), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_sd15_lora_on_sdxl_and_sdxl_lora_on_sd15_are_refused_and_mix_refuses_families(xl_lora, tiny_pipe, xl_pipe,
                                                                                     photo, tmp_path):
    from morphkit.lora import load_lora
    from morphkit.lora_files import lora_from_peft_parts, mix_loras, save_lora_file

    xl_path, _ = xl_lora
    sd_lora = lora_from_peft_parts({"unet": random_lora(tiny_pipe.unet, ["to_q", "to_v"], 4, 4.0, 7)})
    sd_path = save_lora_file(tmp_path / "sd.safetensors", sd_lora, "kohya")
    with pytest.raises(LoRAError, match="made for SD 1.x, and the model it is applied to is SDXL"):
        load_lora(xl_pipe.unet, sd_path, "img0")
    with pytest.raises(LoRAError, match="made for SDXL, and the model it is applied to is SD 1.x"):
        load_lora(tiny_pipe.unet, xl_path, "img0")
    result = cli("invert", photo, "--model", "tiny-sdxl", "--lora", sd_path, "--steps", "2", "-o", tmp_path / "i")
    assert result.exit_code == 2 and "--model" in result.output and "Traceback" not in result.output
    with pytest.raises(LoRAError, match="different models"):
        mix_loras([str(sd_path), str(xl_path)], tmp_path / "mixed.safetensors")


# ---------------------------------------------------------------------------------------------- single files

def test_tiny_sdxl_saved_in_ldm_layout_loads_back_bit_for_bit_and_fuses(xl_lora, tmp_path):
    from morphkit.checkpoint import save_single_file
    from morphkit.models import load_pipeline

    xl_pipe = load_pipeline("tiny-sdxl", device="cpu")  # not the fixture's, which carried the LoRA's adapters
    path = save_single_file(xl_pipe, tmp_path / "model.safetensors", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:  # (diffusers' xl_base key is resblocks.9: tiny has 2 layers)
        keys = set(f.keys())
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"} <= keys
    assert family_of_single_file(path) is SDXL
    back = load_pipeline(str(path), device="cpu")
    assert family_of(back) is SDXL
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(xl_pipe, part).state_dict(), getattr(back, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    lora_path, _ = xl_lora
    fused = cli("lora", "fuse", "--model", "tiny-sdxl", "--lora", f"{lora_path}:0.5", "--out", tmp_path / "f.safetensors",
                "--dtype", "fp32")
    assert fused.exit_code == 0 and "into 96 UNet and 12 text-encoder layers" in fused.output, fused.output


def test_full_size_sdxl_ldm_layout_round_trips_through_diffusers_converters():
    """The shipped SDXL configs and morphkit's LDM writer agree with diffusers' single-file converters at full size
    (built on the meta device, never run)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from morphkit.checkpoint import open_clip_to_ldm, unet_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL.config_folder / "unet"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL.config_folder / "text_encoder_2"))
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    assert set(sfu.convert_ldm_unet_checkpoint(ldm, unet.config)) == set(unet.state_dict())
    ldm_te = open_clip_to_ldm(te2.state_dict())
    assert sfu.infer_diffusers_model_type({**ldm, **{k: v for k, v in ldm_te.items()},
                                          "conditioner.embedders.0.transformer.x": None}) == "xl_base"
    back = sfu.convert_open_clip_checkpoint(te2, ldm_te, prefix="conditioner.embedders.1.model.")
    assert {k.removeprefix("text_model.") for k in back} == {k.removeprefix("text_model.") for k in te2.state_dict()}


def test_bad_models_get_one_clear_message(tmp_path, xl_pipe, photo):
    from morphkit.checkpoint import save_single_file
    from morphkit.models import load_pipeline

    neither = tmp_path / "sd3"
    neither.mkdir()
    (neither / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                          "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    refiner = tmp_path / "refiner"
    (refiner / "unet").mkdir(parents=True)
    (refiner / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"]}))
    (refiner / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    unet_key = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file({**unet_key, "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, tmp_path / "sd2.safetensors")
    save_file({**unet_key, "conditioner.embedders.0.model.text_projection": torch.zeros(1)},
              tmp_path / "refiner.safetensors")
    whole = save_single_file(xl_pipe, tmp_path / "whole.safetensors")
    data = whole.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases = [(neither, "neither SD 1.x nor SDXL"), (refiner, "SDXL refiner"),
             (tmp_path / "sd2.safetensors", "SD 2.x checkpoint"), (tmp_path / "refiner.safetensors", "SDXL refiner"),
             (tmp_path / "cut.safetensors", "cut short or damaged")]
    for model, words in cases:
        with pytest.raises(ModelNotFoundError, match=words):
            load_pipeline(str(model), device="cpu")
    result = cli("invert", photo, "--model", tmp_path / "cut.safetensors", "-o", tmp_path / "o")
    assert result.exit_code == 3 and "cut short" in result.output and "Traceback" not in result.output


def test_vae_option_replaces_the_vae_and_enters_the_cache_key(tiny_sdxl_path, tmp_path):
    import shutil

    from morphkit.models import load_pipeline
    from morphkit.morph.pair import pair_cache
    from morphkit.morph.settings import MorphSettings

    vae = tmp_path / "vae"
    shutil.copytree(tiny_sdxl_path / "vae", vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    pipe = load_pipeline("tiny-sdxl", device="cpu", vae=str(vae))
    assert pipe.vae.config.scaling_factor == 0.5 and family_of(pipe) is SDXL
    own = pair_cache(MorphSettings(model="tiny-sdxl"), pipe, False)[1]
    other = pair_cache(MorphSettings(model="tiny-sdxl", vae=str(vae)), pipe, False)[1]
    assert ":sdxl:" in own and own != other
    with pytest.raises(ModelNotFoundError, match="--vae"):
        load_pipeline("tiny-sdxl", device="cpu", vae=str(tmp_path / "no-such-vae"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
