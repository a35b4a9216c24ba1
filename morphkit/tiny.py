"""A tiny Stable-Diffusion-architecture model, built in code from a fixed seed.

It has every part of SD 1.5 (CLIP tokenizer and text encoder, UNet with cross-attention, a VAE
that downsamples by 8, a DDIM scheduler with SD 1.5's betas, and a matching ControlNet) at about
a thousandth of the size, so that tests, CI and the offline demo run the real code paths in
seconds on a CPU. Its weights are random: its pictures are noise-like, but every number that
flows through it is computed by the same code as for the real model.

`tiny_model_path()` builds it once into the cache folder and returns that folder; from there it is
loaded like any local diffusers folder by `morphkit.models.load_pipeline`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .io import cache_dir

TINY_NAME = "tiny"
TINY_VERSION = "tiny-v2"  # v2: no gap in the tokenizer's ids (same weights, same tokens)
TINY_SEED = 0
TINY_RESOLUTION = 64
TINY_UNET_CHANNELS = (32, 64)  # its first width also tells a tiny single-file checkpoint from SD 1.5's 320

# A handful of merges so that common words become single tokens; the rest falls back to bytes.
_MERGES = [
    "t h", "th e</w>", "a </w>", "o f</w>", "i n", "a n", "an d</w>", "o n</w>", "e r", "p h",
    "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "d o", "do g</w>", "s t", "st y", "sty l",
    "styl e</w>", "p a", "pa i", "pai n", "pain t", "paint in", "paintin g</w>", "i n</w>",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _write_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in _MERGES]
    tokens += ["</w>", "<|startoftext|>", "<|endoftext|>"]  # transformers' BPE wants the bare suffix too
    # A merge that spells an existing token ("a </w>" is "a</w>") keeps its later id; its first place gets a
    # placeholder, so that ids run 0..n-1 without a gap, as in CLIP's own vocabulary (tools that add tokens,
    # such as diffusers' load_textual_inversion, count on len(tokenizer) being the next free id).
    last = {t: i for i, t in enumerate(tokens)}
    tokens = [t if last[t] == i else f"<|unused{i}|>" for i, t in enumerate(tokens)]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer, len(tokens)


def build_tiny_pipeline(folder: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Build the tiny model from `seed` and save it, diffusers-style, into `folder` (which must not exist)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    tokenizer, vocab_size = _write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    text_encoder = _tiny_text_encoder(tokenizer, vocab_size, seed)
    unet = _tiny_unet(seed + 1)
    vae = _tiny_vae(seed + 2)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_tiny(folder, pipe, _tiny_controlnet(unet, seed + 3), f"{TINY_VERSION} seed={seed}")


def save_tiny(folder: Path, pipe, controlnet, stamp: str) -> Path:
    """Save a tiny model's pipeline, its ControlNet (in `controlnet/`) and the stamp that names what built it."""
    pipe.save_pretrained(folder)
    controlnet.save_pretrained(folder / "controlnet")
    (folder / "MORPHKIT_TINY").write_text(stamp + "\n")
    return folder


def _tiny_text_encoder(tokenizer, vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=TINY_UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        sample_size=TINY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    # A random VAE's latents are far smaller than a trained one's. Choose the scaling factor so that
    # scaled latents of a smooth test pattern have unit std, as SD's 0.18215 does for real images.
    with torch.no_grad():
        ramp = torch.linspace(-1, 1, TINY_RESOLUTION)
        pattern = torch.stack([ramp[None, :].expand(TINY_RESOLUTION, -1), ramp[:, None].expand(-1, TINY_RESOLUTION),
                               (ramp[None, :] * ramp[:, None])])[None]
        std = vae.encode(pattern).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    return vae


def _tiny_controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    # from_unet copies the UNet's weights; its zero convolutions start at zero, which would make the
    # tiny ControlNet a no-op. Give them small random weights so that edges change the output.
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                param.normal_(0, 0.05)
    return controlnet


def tiny_model_path() -> Path:
    """The tiny model's folder in the cache, built on first use (about a second)."""
    return built_in_cache(TINY_VERSION, build_tiny_pipeline)


def built_in_cache(version: str, build) -> Path:
    """`cache_dir() / version`, made by `build(folder)` on first use; processes racing to build it agree on one."""
    target = cache_dir() / version
    if (target / "MORPHKIT_TINY").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
    try:
        build(staging / "model")
        if target.exists():  # a half-built folder from an interrupted build
            shutil.rmtree(target)
        os.replace(staging / "model", target)
    except OSError:
        if not (target / "MORPHKIT_TINY").exists():  # not another process that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_controlnet_path() -> Path:
    return tiny_model_path() / "controlnet"
