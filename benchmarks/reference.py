"""The straightforward morph morphkit is measured against, written the way the DiffusersExample `LoRA`
project (and many notebooks) do it: batch 1, fp32 LoRA training that re-encodes the image with the VAE
and the prompt with CLIP at every step, DDIM inversion through diffusers' `DDIMInverseScheduler`, and
one full pipeline call per frame with `set_adapters` before each.

It is correct (it produces the same kind of morph) but makes no effort to be fast. It is not part of
the library; it exists so that the benchmark can report a ratio measured in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_fit_lora(pipe, image_tensor, prompt, adapter_name, rank=16, steps=200, lr=2e-4, seed=0):
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet = pipe.unet
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and adapter_name in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    device = unet.device
    for _ in range(steps):
        with torch.no_grad():  # re-encoded every step, as the reference scripts do
            latents = pipe.vae.encode(image_tensor.to(device)).latent_dist.sample() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            embeds = pipe.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), device=device)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, embeds).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unet.requires_grad_(False)


@torch.no_grad()
def reference_invert(pipe, image_tensor, prompt, adapter_name, steps=50):
    from diffusers import DDIMInverseScheduler

    pipe.set_adapters([adapter_name], [1.0])
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    device = pipe.unet.device
    latents = pipe.vae.encode(image_tensor.to(device)).latent_dist.mean * pipe.vae.config.scaling_factor
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    for t in inverse.timesteps:
        eps = pipe.unet(latents, t, embeds).sample
        latents = inverse.step(eps, t, latents).prev_sample
    return latents


def _slerp(a, b, t):
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = (a_flat @ b_flat) / (a_flat.norm() * b_flat.norm())
    if cos.abs() > 0.9995:
        return ((1 - t) * a + t * b).to(a.dtype)
    theta = torch.arccos(cos)
    return ((torch.sin((1 - t) * theta) * a.double() + torch.sin(t * theta) * b.double()) / torch.sin(theta)).to(a.dtype)


@torch.no_grad()
def reference_render(pipe, noise_a, noise_b, prompt_a, prompt_b, frames=16, steps=50):
    device = pipe.unet.device
    emb_a, _ = pipe.encode_prompt(prompt_a, device, 1, False)
    emb_b, _ = pipe.encode_prompt(prompt_b, device, 1, False)
    images = []
    for i in range(frames):
        alpha = i / (frames - 1)
        pipe.set_adapters(["ref0", "ref1"], [1 - alpha, alpha])
        out = pipe(prompt_embeds=(1 - alpha) * emb_a + alpha * emb_b, latents=_slerp(noise_a, noise_b, alpha),
                   num_inference_steps=steps, guidance_scale=1.0, output_type="pil")
        images.append(out.images[0])
    return images


def reference_morph(pipe, image_a, image_b, prompt_a, prompt_b, frames, steps, lora_steps, lora_rank=16, seed=0):
    """The whole straightforward morph; returns its frames."""
    for name in ("ref0", "ref1"):
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
    reference_fit_lora(pipe, image_a, prompt_a, "ref0", lora_rank, lora_steps, seed=seed)
    reference_fit_lora(pipe, image_b, prompt_b, "ref1", lora_rank, lora_steps, seed=seed)
    noise_a = reference_invert(pipe, image_a, prompt_a, "ref0", steps)
    noise_b = reference_invert(pipe, image_b, prompt_b, "ref1", steps)
    return reference_render(pipe, noise_a, noise_b, prompt_a, prompt_b, frames, steps)


def main():
    """The whole straightforward morph as a script (what `bench_summary.py` times as a process): imports, the
    model, the two photos, the morph, a GIF."""
    import argparse
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="A diffusers folder (the tiny model's, for the benchmark).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lora-steps", type=int, default=200)
    args = parser.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    photos = Path(__file__).resolve().parent.parent / "dataset" / "photos"
    tensors = []
    for name in ("astronaut.jpg", "chelsea.jpg"):
        img = Image.open(photos / name).convert("RGB").resize((args.resolution, args.resolution))
        tensors.append(torch.from_numpy(__import__("numpy").asarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    frames = reference_morph(pipe, *tensors, "a photo of an astronaut", "a photo of a cat", args.frames, args.steps,
                             args.lora_steps)
    frames[0].save(args.out, save_all=True, append_images=frames[1:], duration=100, loop=0)


if __name__ == "__main__":
    main()
