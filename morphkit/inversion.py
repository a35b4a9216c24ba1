"""DDIM sampling and DDIM inversion as small functions over a model callable.

In the manner of k-diffusion's `sampling.py`: each function takes a noise-prediction callable
`model(x, t) -> eps`, a starting tensor and a schedule, and returns a tensor. Prompt, guidance and
LoRA weights live inside the callable (see `eps_model`), not here.

The schedule is the one `DDIMScheduler` walks for the same config and step count, so
`sample_ddim` reproduces diffusers' DDIM sampling (eta = 0) and `invert_ddim` walks exactly its
reversed timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from .progress import tqdm

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DDIMSchedule:
    timesteps: torch.Tensor  # (N,) descending, as sampling visits them
    alphas: torch.Tensor  # (N,) alpha-bar at each timestep
    alphas_prev: torch.Tensor  # (N,) alpha-bar of the level each sampling step moves to

    def __len__(self):
        return len(self.timesteps)


def ddim_schedule(scheduler_config, steps: int) -> DDIMSchedule:
    """The timesteps and noise levels of `DDIMScheduler` with this config and `steps` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    check_steps(steps, scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.long()
    ratio = scheduler.config.num_train_timesteps // steps
    alphas_cumprod = scheduler.alphas_cumprod.double()
    prev = timesteps - ratio
    alphas_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)],
                              torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64))
    return DDIMSchedule(timesteps, alphas_cumprod[timesteps], alphas_prev)


def check_steps(steps, num_train_timesteps: int = 1000) -> int:
    from .errors import ConfigError

    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"steps must be an integer from 1 to {num_train_timesteps}; got {steps!r}.")
    return steps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from, alpha_to) -> torch.Tensor:
    """Move `x` from noise level `alpha_from` to `alpha_to` along the deterministic DDIM path."""
    alpha_from = torch.as_tensor(alpha_from, dtype=torch.float64)
    alpha_to = torch.as_tensor(alpha_to, dtype=torch.float64)
    x0 = (x - (1 - alpha_from).sqrt().to(x.dtype) * eps) / alpha_from.sqrt().to(x.dtype)
    return alpha_to.sqrt().to(x.dtype) * x0 + (1 - alpha_to).sqrt().to(x.dtype) * eps


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, schedule: DDIMSchedule, callback=None, disable: bool = True,
                desc: str = "sampling") -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) from noise `x` to a clean latent."""
    for i in tqdm(range(len(schedule)), disable=disable, desc=desc, leave=False):
        eps = model(x, schedule.timesteps[i])
        x = ddim_step(x, eps, schedule.alphas[i], schedule.alphas_prev[i])
        if callback is not None:
            callback({"i": i, "t": schedule.timesteps[i], "x": x, "eps": eps})
    return x


@torch.no_grad()
def invert_ddim(model: Model, x: torch.Tensor, schedule: DDIMSchedule, callback=None, disable: bool = True,
                desc: str = "inverting") -> torch.Tensor:
    """DDIM inversion: from a clean latent back to the noise that `sample_ddim` maps onto it.

    Walks the sampling steps in reverse; each step evaluates the model at the current latent and the
    timestep it moves to (the usual approximation, exact as the step count grows).
    """
    for i in tqdm(reversed(range(len(schedule))), total=len(schedule), disable=disable, desc=desc, leave=False):
        eps = model(x, schedule.timesteps[i])
        x = ddim_step(x, eps, schedule.alphas_prev[i], schedule.alphas[i])
        if callback is not None:
            callback({"i": i, "t": schedule.timesteps[i], "x": x, "eps": eps})
    return x


def eps_model(unet, embeds: torch.Tensor, negative: torch.Tensor | None = None, guidance: float = 1.0,
              prediction_type: str = "epsilon", alphas_cumprod: torch.Tensor | None = None) -> Model:
    """A callable `model(x, t) -> eps` for `unet` conditioned on `embeds` (one per sample).

    With `guidance` > 1, classifier-free guidance against `negative` (one UNet call on the doubled
    batch). v-prediction UNets are converted to eps with `alphas_cumprod`.
    """
    dtype = unet.dtype  # looked up once: `unet.dtype` walks every module, which costs ~2 ms per call
    if guidance != 1.0:
        neg = negative if negative is not None else torch.zeros_like(embeds)
        context = torch.cat([neg, embeds]).to(dtype)
    else:
        context = embeds.to(dtype)

    def model(x, t):
        t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
        if guidance != 1.0:
            out = unet(torch.cat([x, x]).to(dtype), torch.cat([t_batch, t_batch]), context).sample.to(x.dtype)
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = unet(x.to(dtype), t_batch, context).sample.to(x.dtype)
        if prediction_type == "v_prediction":
            a = alphas_cumprod[t].to(x.device, x.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * x
        return out

    return model


# ---------------------------------------------------------------------------------------------
# the command-level job: `morphkit invert`


@dataclass
class InversionResult:
    noise: torch.Tensor  # (1, 4, h, w): the starting noise that DDIM sampling maps back onto the image
    latent: torch.Tensor  # (1, 4, h, w): the image's own VAE latent
    reconstruction: Image.Image  # the image regenerated from `noise`
    latent_error: float  # ||regenerated latent - latent|| / ||latent||
    psnr: float  # of the reconstruction against the VAE's own round trip of the image, in dB
    paths: dict


def latent_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance ||a - b|| / ||b||: comparable across models whose latents differ in scale."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def image_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (values outside are clipped, as a saved image would be)."""
    from .metrics import psnr

    return float(psnr(a.float().clamp(-1, 1), b.float().clamp(-1, 1), data_range=2.0)[0])


def invert(
    image,
    prompt: str = "",
    *,
    lora: str | None = None,
    model: str | None = None,
    steps: int = 50,
    resolution: int | None = None,
    output_dir: str | None = None,
    save: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    pipe=None,
    progress: bool = True,
) -> InversionResult:
    """DDIM-invert `image` (under `prompt` and, if given, a LoRA) to its starting noise.

    Regenerates the image from that noise to measure the round trip, and with `save` writes
    `<stem>.noise.safetensors` and `<stem>.reconstruction.png` into `output_dir`
    (default `outputs/invert/<stem>`).
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from .errors import ConfigError, OutputExistsError
    from .images import check_resolution, open_image, resize_to_policy, save_image, to_pil
    from .io import atomic_write, check_can_write
    from .lora import adapter_weights, load_lora
    from .models import DEFAULT_MODEL, decode_latents, encode_image, encode_prompt, load_pipeline

    check_steps(steps)
    if lora is not None and not Path(lora).is_file():
        raise ConfigError(f"The LoRA file {lora} does not exist (or is not a file).")
    if resolution is not None:
        check_resolution(resolution)
    original = open_image(image)
    stem = Path(image).stem
    out = Path(output_dir or Path("outputs") / "invert" / stem)
    noise_path, recon_path = out / f"{stem}.noise.safetensors", out / f"{stem}.reconstruction.png"
    if save:
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"The output folder {out} is a file. Choose another --output-dir.")
        check_can_write(noise_path, overwrite, "inverted noise")
        check_can_write(recon_path, overwrite, "reconstruction")
    if pipe is None:
        pipe = load_pipeline(model or DEFAULT_MODEL, device=device, dtype=dtype, allow_pickle=allow_pickle)
    img = resize_to_policy(original, resolution or 8 * pipe.unet.config.sample_size)
    z0 = encode_image(pipe, img)
    embeds = encode_prompt(pipe, prompt)
    schedule = ddim_schedule(pipe.scheduler.config, steps)
    if "inverted" in getattr(pipe.unet, "peft_config", {}):
        pipe.unet.delete_adapters("inverted")
    if lora is not None:
        load_lora(pipe.unet, lora, "inverted", allow_pickle=allow_pickle)
    model_fn = eps_model(pipe.unet, embeds, prediction_type=pipe.scheduler.config.prediction_type,
                         alphas_cumprod=pipe.scheduler.alphas_cumprod)
    try:  # under this LoRA alone, or the base model alone: never under adapters a reused `pipe` holds
        with adapter_weights(pipe.unet, {"inverted": 1.0} if lora is not None else {}):
            noise = invert_ddim(model_fn, z0, schedule, disable=not progress)
            regenerated = sample_ddim(model_fn, noise, schedule, disable=not progress, desc="regenerating")
    finally:
        if lora is not None:
            pipe.unet.delete_adapters("inverted")
    decoded = decode_latents(pipe, regenerated)
    round_trip = decode_latents(pipe, z0)
    reconstruction = to_pil(decoded)[0]
    paths = {}
    if save:
        meta = {"prompt": prompt, "steps": str(steps), "model": str(model), "lora": str(lora or ""),
                "size": f"{img.width}x{img.height}"}
        with atomic_write(check_can_write(noise_path, overwrite, "inverted noise")) as tmp:
            save_file({"noise": noise.cpu().contiguous(), "latent": z0.cpu().contiguous()}, str(tmp), metadata=meta)
        paths = {"noise": noise_path, "reconstruction": save_image(reconstruction, recon_path, overwrite)}
    return InversionResult(noise, z0, reconstruction, latent_error(regenerated, z0), image_psnr(decoded, round_trip), paths)

