"""DDIM sampling and DDIM inversion as small functions over a model callable.

In the manner of k-diffusion's `sampling.py`: each function takes a noise-prediction callable
`model(x, t) -> eps`, a starting tensor and a schedule, and returns a tensor. Prompt, guidance and
LoRA weights live inside the callable (see `eps_model`), not here.

The schedule is the one `DDIMScheduler` walks for the same config and step count, so
`sample_ddim` reproduces diffusers' DDIM sampling (eta = 0) and `invert_ddim` walks exactly its
reversed timesteps.

Two inversions: `invert_ddim`, the usual one-evaluation approximation, and `invert_fixed_point`,
which solves each step's implicit equation so that `sample_ddim` maps the noise back onto the latent
(to the solve's tolerance). `Inversion` names one of them with its settings, and `invert_latents` runs it.
`invert_exact` also returns each step's remaining residual as a correction: sampling with them lands on the
latent to fp32 rounding, however far the solve got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from PIL import Image

from .families import PromptEmbeds
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


def coarse_schedule(schedule: DDIMSchedule, steps: int) -> DDIMSchedule:
    """About `steps` of `schedule`'s steps, evenly picked, each going on to the next picked one: the same path from
    the same starting noise level to the same end, in fewer and larger DDIM steps (even pacing's probe pass)."""
    stride = max(1, round(len(schedule) / max(1, steps)))
    picked = torch.arange(0, len(schedule), stride)
    alphas_prev = torch.cat([schedule.alphas[picked[1:]], schedule.alphas_prev[-1:]])
    return DDIMSchedule(schedule.timesteps[picked], schedule.alphas[picked], alphas_prev)


def check_steps(steps, num_train_timesteps: int = 1000) -> int:
    from .errors import ConfigError

    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"--steps must be an integer from 1 to {num_train_timesteps}; got {steps!r}.")
    return steps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from, alpha_to) -> torch.Tensor:
    """Move `x` from noise level `alpha_from` to `alpha_to` along the deterministic DDIM path."""
    alpha_from = torch.as_tensor(alpha_from, dtype=torch.float64)
    alpha_to = torch.as_tensor(alpha_to, dtype=torch.float64)
    x0 = (x - (1 - alpha_from).sqrt().to(x.dtype) * eps) / alpha_from.sqrt().to(x.dtype)
    return alpha_to.sqrt().to(x.dtype) * x0 + (1 - alpha_to).sqrt().to(x.dtype) * eps


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, schedule: DDIMSchedule, callback=None, disable: bool = True,
                desc: str = "sampling", corrections: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) from noise `x` to a clean latent.

    `corrections` (steps, *x.shape), where given, is added after each step: `invert_exact`'s, which put the
    sample back onto the inversion's path, so that the noise comes back exactly as the latent it was inverted from.
    """
    for i in tqdm(range(len(schedule)), disable=disable, desc=desc, leave=False):
        eps = model(x, schedule.timesteps[i])
        x = ddim_step(x, eps, schedule.alphas[i], schedule.alphas_prev[i])
        if corrections is not None:
            x = x + corrections[i].to(x.device, x.dtype)
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


@torch.no_grad()
def invert_fixed_point(model: Model, x: torch.Tensor, schedule: DDIMSchedule, iterations: int = 10,
                       tolerance: float = 1e-5, callback=None, disable: bool = True, desc: str = "inverting", *,
                       history: int = 3, corrected: bool = False) -> torch.Tensor:
    """Exact DDIM inversion: each step solves the implicit DDIM equation by accelerated fixed-point iteration.

    Sampling step i maps x_t to x_prev = ddim_step(x_t, eps(x_t, t)); inverting it means finding the x_t
    with x_t = g(x_t), g(z) = ddim_step(x_prev, eps(z, t)), where eps is taken at the unknown x_t.
    `invert_ddim` evaluates eps at x_prev instead, an error that shrinks only as the step count grows.

    Each step starts from the plain DDIM guess made with the eps of the step before (no model call; the first
    step starts at x_prev itself) and runs `solve_fixed_point`: at most 1 + `iterations` model calls, Anderson
    acceleration over the last `history` iterates (0: plain iteration), each sample stopping as soon as its
    residual ||g(z) - z|| / ||z|| is below `tolerance`. So a batch gives what inverting each sample alone gives.

    Each step ends at the iterate with the lowest residual: its image g(z), the better estimate of the noise
    alone; with `corrected`, the iterate z itself, whose eps is known, and `callback` also gets the step's
    "correction": what sampling from z must add to land on x_prev exactly (see `invert_exact`).
    """
    Inversion(iterations=iterations, tolerance=tolerance, history=history).check()
    eps = None
    for i in tqdm(reversed(range(len(schedule))), total=len(schedule), disable=disable, desc=desc, leave=False):
        t, alpha_from, alpha_to = schedule.timesteps[i], schedule.alphas_prev[i], schedule.alphas[i]
        start = x if eps is None else ddim_step(x, eps, alpha_from, alpha_to)

        def step_map(z, x=x, t=t, alpha_from=alpha_from, alpha_to=alpha_to):
            e = model(z, t)
            return ddim_step(x, e, alpha_from, alpha_to), e

        z, g, eps, runs = solve_fixed_point(step_map, start, 1 + iterations, tolerance, history)
        step = {"i": i, "t": t, "iterations": runs - 1}
        if corrected:  # sampling's step from z, and where it must land
            step["correction"] = x - ddim_step(z, eps, alpha_to, alpha_from)
        x = z if corrected else g
        if callback is not None:
            callback({**step, "x": x})
    return x


def solve_fixed_point(step_map, z: torch.Tensor, calls: int, tolerance: float, history: int = 3):
    """Solve z = g(z) sample by sample, where `step_map(z)` returns (g(z), extra), in at most `calls` calls.

    Anderson acceleration (type II, the last `history` differences, least squares in float64) picks each next
    iterate; a sample stops once ||g(z) - z|| / ||z|| is below `tolerance`. Returns, per sample, the iterate z
    with the lowest residual (the safeguard where a step converges slowly or not at all), its g(z), its `extra`
    (the eps made at z), and how many calls each sample ran.
    """
    n = len(z)
    active = torch.ones(n, dtype=torch.bool, device=z.device)
    runs = torch.zeros(n, dtype=torch.long)
    best_residual = torch.full((n,), float("inf"), device=z.device)
    best = best_g = best_extra = None
    zs, gs = [], []
    for call in range(calls):
        g, extra = step_map(z)
        residual = relative_change(g, z)
        runs += active.cpu()
        better = active & (residual < best_residual)
        best = z if best is None else torch.where(_per_sample(better, z), z, best)
        best_g = g if best_g is None else torch.where(_per_sample(better, g), g, best_g)
        best_extra = extra if best_extra is None else torch.where(_per_sample(better, extra), extra, best_extra)
        best_residual = torch.where(better, residual, best_residual)
        active &= ~(residual < tolerance)  # a NaN residual is not convergence
        if not active.any() or call == calls - 1:
            break
        z = torch.where(_per_sample(active, z), anderson(zs, gs, z, g, history), z)
    return best, best_g, best_extra, runs


def anderson(zs: list, gs: list, z: torch.Tensor, g: torch.Tensor, history: int) -> torch.Tensor:
    """The next iterate of Anderson-accelerated fixed-point iteration, per sample; `zs` and `gs` hold the past
    iterates and their images (flattened, float64) and are updated here. With no history it is plain g(z)."""
    zs.append(z.flatten(1).double())
    gs.append(g.flatten(1).double())
    del zs[:-(history + 1)], gs[:-(history + 1)]
    if len(zs) < 2:
        return g
    f = [gk - zk for zk, gk in zip(zs, gs)]  # residuals
    d_f = torch.stack([f[k + 1] - f[k] for k in range(len(f) - 1)], dim=-1)  # (B, n, m)
    d_g = torch.stack([gs[k + 1] - gs[k] for k in range(len(gs) - 1)], dim=-1)
    gram = d_f.mT @ d_f
    ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
    gram = gram + ridge[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gamma, info = torch.linalg.solve_ex(gram, d_f.mT @ f[-1][..., None])  # min || f - dF gamma ||
    nxt = gs[-1] - (d_g @ gamma)[..., 0]
    usable = torch.isfinite(nxt).all(dim=1, keepdim=True) & (info == 0).view(-1, 1)
    return torch.where(usable, nxt, gs[-1]).view_as(z).to(z.dtype)  # plain g(z) for a sample whose solve failed


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """||new - old|| / ||old|| of each sample: (B,) float32."""
    diff = (new.float() - old.float()).flatten(1).norm(dim=1)
    return diff / old.float().flatten(1).norm(dim=1).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# the choice of inversion, as one settings object

INVERSION_METHODS = ("fixed-point", "ddim")
# Chosen by measurement (benchmarks/bench_inversion.py; table in benchmarks/README.md). On the tiny model at 50
# steps, with and without a LoRA and guided: at most 5e-5 round-trip latent error (plain DDIM: 0.24 to 0.50) for
# about 4x plain DDIM's UNet calls, as the tolerance stops most steps after 2 or 3 iterations; 10 is the cap for
# the steps that converge slowest (the noisiest). Tolerance 1e-6 reaches 3e-6 for 20 % more calls.
DEFAULT_ITERATIONS = 10
DEFAULT_TOLERANCE = 1e-5
# Anderson acceleration over the last 3 iterates: at 4 to 8 steps, where plain iteration crawls, it leaves 3x to 5x
# less round-trip error in the same calls; at 25 and 50 steps, where two or three calls converge, it changes little
# (benchmarks/bench_anderson.py). Starting each step from the step before's eps saves a call per step there.
DEFAULT_HISTORY = 3


@dataclass(frozen=True)
class Inversion:
    """How latents are inverted to noise: "fixed-point" (exact, `invert_fixed_point`) or "ddim" (plain,
    `invert_ddim`). `iterations`, `tolerance` and `history` are the fixed-point solve's, per inversion step."""

    method: str = "fixed-point"
    iterations: int = DEFAULT_ITERATIONS
    tolerance: float = DEFAULT_TOLERANCE
    history: int = DEFAULT_HISTORY  # Anderson acceleration's iterates (0: plain fixed-point iteration)

    def check(self) -> "Inversion":
        """Raise `ConfigError` naming the CLI option for a setting out of range; return self."""
        from .errors import ConfigError

        if self.method not in INVERSION_METHODS:
            raise ConfigError(f"Unknown --inversion {self.method!r}; choose fixed-point (exact: each inversion step "
                              "solved by fixed-point iteration) or ddim (plain DDIM inversion, one model call per "
                              "step, less exact).")
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ConfigError(f"--inversion-iterations must be a whole number of at least 0; got {it!r}. It is the "
                              "most fixed-point iterations per inversion step after its first model call; for plain "
                              "DDIM inversion use --inversion ddim.")
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ConfigError(f"--inversion-tolerance must be a finite number of at least 0; got {tol!r}. A step "
                              "stops iterating once the relative change of its latent is below it (0 always runs "
                              "every iteration).")
        h = self.history
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ConfigError(f"The inversion's Anderson history must be a whole number of at least 0; got {h!r}.")
        return self

    def key(self) -> dict:
        """What a cache key needs: plain DDIM ignores the fixed-point settings, so they are left out of it."""
        if self.method == "ddim":
            return {"method": "ddim"}
        return {"method": self.method, "iterations": self.iterations, "tolerance": float(self.tolerance),
                "anderson": self.history}

    def describe(self) -> str:
        """For summaries: "fixed-point (at most 10 iterations per step, tolerance 1e-05)" or "plain DDIM"."""
        if self.method == "ddim":
            return "plain DDIM"
        if self.iterations == 0:
            return "fixed-point start only (one model call per step, no iterations)"
        return (f"fixed-point (at most {self.iterations} iterations per step, tolerance {self.tolerance:g}, Anderson "
                f"acceleration, history {self.history})" if self.history else
                f"fixed-point (at most {self.iterations} iterations per step, tolerance {self.tolerance:g})")


def invert_latents(model: Model, x: torch.Tensor, schedule: DDIMSchedule, inversion: Inversion = Inversion(),
                   callback=None, disable: bool = True, desc: str = "inverting") -> torch.Tensor:
    """Invert `x` to noise with the method and settings of `inversion` (checked first)."""
    inversion.check()
    if inversion.method == "ddim":
        return invert_ddim(model, x, schedule, callback=callback, disable=disable, desc=desc)
    return invert_fixed_point(model, x, schedule, inversion.iterations, inversion.tolerance, callback=callback,
                              disable=disable, desc=desc, history=inversion.history)


class ExactInversion(NamedTuple):
    """What `invert_exact` returns: the noise, each step's correction, and the path the inversion walked."""

    noise: torch.Tensor  # (B, ...)
    corrections: torch.Tensor | None  # (steps, B, ...) in sampling order; None for plain DDIM
    path: torch.Tensor  # (steps, B, ...): the latent each sampling step starts from (path[0] is the noise)


def invert_exact(model: Model, x: torch.Tensor, schedule: DDIMSchedule, inversion: Inversion = Inversion(),
                 disable: bool = True, desc: str = "inverting") -> ExactInversion:
    """`invert_latents`, with the corrections that make the way back exact: for the fixed-point method,
    `sample_ddim(model, noise, schedule, corrections=corrections)` returns `x` to fp32 rounding however far each
    step's solve got (a few steps, a model that barely contracts). Each correction is its step's residual, so
    where the solve converges they are tiny. Plain DDIM gives None: it is the approximation by choice.

    Also returns the path: the latent at each of the schedule's noise levels, which `corrections_along` needs
    to make a coarser schedule exact too.
    """
    path: list = [None] * len(schedule)
    corrections: list = [None] * len(schedule)

    def keep(step):
        path[step["i"]] = step["x"]
        corrections[step["i"]] = step.get("correction")

    if inversion.check().method == "ddim":
        noise = invert_ddim(model, x, schedule, callback=keep, disable=disable, desc=desc)
        return ExactInversion(noise, None, torch.stack(path))
    noise = invert_fixed_point(model, x, schedule, inversion.iterations, inversion.tolerance, callback=keep,
                               disable=disable, desc=desc, history=inversion.history, corrected=True)
    return ExactInversion(noise, torch.stack(corrections), torch.stack(path))


@torch.no_grad()
def corrections_along(model: Model, path: torch.Tensor, end: torch.Tensor, schedule: DDIMSchedule,
                      coarse: DDIMSchedule) -> torch.Tensor:
    """Corrections that keep sampling on an inversion's path along `coarse`, a subset of `schedule`'s steps
    (`coarse_schedule`): each coarse step starts on the path (`path`, the latents at `schedule`'s levels, from
    `invert_exact`) and, corrected, lands on it again, so the end (`end`, the clean latents) comes back exactly
    at any step count. One model call per coarse step. Returns (coarse steps, B, ...)."""
    index = {int(t): i for i, t in enumerate(schedule.timesteps)}
    picked = [index[int(t)] for t in coarse.timesteps]
    out = []
    for k, i in enumerate(picked):
        target = path[picked[k + 1]] if k + 1 < len(picked) else end
        eps = model(path[i], coarse.timesteps[k])
        out.append(target - ddim_step(path[i], eps, coarse.alphas[k], coarse.alphas_prev[k]))
    return torch.stack(out)


def eps_model(unet, embeds, negative=None, guidance: float = 1.0, prediction_type: str = "epsilon",
              alphas_cumprod: torch.Tensor | None = None) -> Model:
    """A callable `model(x, t) -> eps` for `unet` conditioned on `embeds` (one per sample).

    `embeds` and `negative` are token embeddings (tensors) or `morphkit.families.PromptEmbeds`, which carry
    SDXL's pooled embeddings and time ids too; the UNet's family turns them into its extra conditioning. With
    `guidance` > 1, classifier-free guidance against `negative` (one UNet call on the doubled batch).
    v-prediction UNets are converted to eps with `alphas_cumprod`.
    """
    from .families import as_prompt_embeds, family_of

    dtype = unet.dtype  # looked up once: `unet.dtype` walks every module, which costs ~2 ms per call
    family, cond = family_of(unet), as_prompt_embeds(embeds)
    if guidance != 1.0:
        neg = as_prompt_embeds(negative) if negative is not None else cond.zeros_like()
        cond = PromptEmbeds.cat([neg, cond])
    context, added = cond.embeds.to(dtype), family.added_cond_kwargs(cond, dtype)
    extra = {} if added is None else {"added_cond_kwargs": added}

    def model(x, t):
        t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
        if guidance != 1.0:
            out = unet(torch.cat([x, x]).to(dtype), torch.cat([t_batch, t_batch]), context, **extra).sample.to(x.dtype)
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = unet(x.to(dtype), t_batch, context, **extra).sample.to(x.dtype)
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
    settings: dict = field(default_factory=dict)  # what was inverted how: steps, inversion, guidance, negative prompt, precision, ...
    model_calls: int = 0  # UNet calls of the inversion (steps for plain DDIM; up to steps x (1 + iterations))
    seconds: float = 0.0  # time of the inversion alone


def latent_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance ||a - b|| / ||b||: comparable across models whose latents differ in scale."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def image_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (values outside are clipped, as a saved image would be)."""
    from .similarity import psnr

    return float(psnr(a.float().clamp(-1, 1), b.float().clamp(-1, 1), data_range=2.0)[0])


def check_guidance(guidance) -> float:
    from .errors import ConfigError

    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance <= 0:
        raise ConfigError(f"--guidance must be a finite number above 0; got {guidance!r}. 1 is no guidance "
                          "(DiffMorpher's default); 7.5 is the usual for text-to-image.")
    return float(guidance)


def counted(model: Model) -> tuple[Model, list[int]]:
    """`model`, counting its calls in the returned one-element list."""
    calls = [0]

    def wrapped(x, t):
        calls[0] += 1
        return model(x, t)

    return wrapped, calls


def invert(
    image,
    prompt: str = "",
    *,
    lora: str | None = None,
    model: str | None = None,
    steps: int = 50,
    inversion: Inversion | None = None,
    guidance: float = 1.0,
    negative_prompt: str = "",
    resolution: int | None = None,
    output_dir: str | None = None,
    save: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    allow_pickle: bool = False,
    vae: str | None = None,
    pipe=None,
    progress: bool = True,
) -> InversionResult:
    """Invert `image` (under `prompt` and, if given, a LoRA) to the noise that DDIM sampling maps back onto it.

    `inversion` chooses the method (default: fixed-point, exact); with `guidance` above 1 the inversion uses
    the same guided eps (against `negative_prompt`) that sampling uses, so the round trip closes at any
    guidance. Inversion and regeneration run with the UNet in fp32 whatever the pipeline's dtype
    (`models.stage_precision`). Regenerates the image from the noise to measure the round trip, and with
    `save` writes `<stem>.noise.safetensors`, `<stem>.reconstruction.png` and `<stem>.inversion.json` (the
    error and the settings) into `output_dir` (default `outputs/invert/<stem>`).
    """
    import time

    from .images import open_image, resize_to_policy, to_pil
    from .lora import adapter_weights, remove_adapters
    from .models import DEFAULT_MODEL, decode_latents, encode_image, load_pipeline, stage_precision

    # 1. every input checked before the model loads
    inversion = (inversion or Inversion()).check()
    guidance = check_guidance(guidance)
    original = open_image(image)
    paths = _invert_paths(image, steps, lora, resolution, output_dir, save, overwrite)

    # 2. model, latent, prompt embeddings
    if pipe is None:
        pipe = load_pipeline(model or DEFAULT_MODEL, device=device, dtype=dtype, allow_pickle=allow_pickle, vae=vae)
    img = resize_to_policy(original, resolution or 8 * pipe.unet.config.sample_size)
    z0 = encode_image(pipe, img)
    embeds, negative = _conditioning(pipe, prompt, negative_prompt if guidance != 1.0 else None, img.size)
    schedule = ddim_schedule(pipe.scheduler.config, steps)
    _attach_lora(pipe, lora, allow_pickle)

    # 3. invert and regenerate, under this LoRA alone (or the base model alone: never under adapters a
    #    reused `pipe` holds), with the UNet in fp32
    try:
        with adapter_weights(pipe.unet, {"inverted": 1.0} if lora is not None else {}), \
                stage_precision(pipe.unet) as precision:
            model_fn = eps_model(pipe.unet, embeds, negative, guidance, pipe.scheduler.config.prediction_type,
                                 pipe.scheduler.alphas_cumprod)
            inverting, calls = counted(model_fn)
            start = time.perf_counter()
            noise = invert_latents(inverting, z0, schedule, inversion, disable=not progress)
            seconds = time.perf_counter() - start
            regenerated = sample_ddim(model_fn, noise, schedule, disable=not progress, desc="regenerating")
    finally:
        if lora is not None:
            remove_adapters(pipe.unet, ["inverted"])

    # 4. measure the round trip, write the files
    decoded, round_trip = decode_latents(pipe, regenerated), decode_latents(pipe, z0)
    reconstruction = to_pil(decoded)[0]
    error, psnr_db = latent_error(regenerated, z0), image_psnr(decoded, round_trip)
    settings = _recorded_settings(pipe, prompt, steps, inversion, guidance, negative_prompt, model, lora, img.size,
                                  precision)
    report = {"latent_error": error, "psnr": psnr_db, "model_calls": calls[0], "seconds": seconds, **settings}
    if save:
        paths = _write_inversion(paths, noise, z0, reconstruction, settings, report, overwrite)
    return InversionResult(noise, z0, reconstruction, error, psnr_db, paths if save else {}, settings, calls[0],
                           seconds)


def _recorded_settings(pipe, prompt, steps, inversion, guidance, negative_prompt, model, lora, size, precision) -> dict:
    """What an inversion's report and file record of how it was made."""
    from .families import family_of

    return {"family": family_of(pipe).name, "prompt": prompt, "steps": steps, "inversion": inversion.key(),
            "guidance": guidance, "negative_prompt": negative_prompt if guidance != 1.0 else "", "model": str(model),
            "lora": str(lora or ""), "size": f"{size[0]}x{size[1]}", "precision": precision}


def _conditioning(pipe, prompt: str, negative_prompt: str | None, size: tuple[int, int]):
    """The prompt's and (when guided) the negative prompt's conditioning for an image of `size` (width, height)."""
    from .models import encode_conditioning

    hw = (size[1], size[0])
    negative = None if negative_prompt is None else encode_conditioning(pipe, negative_prompt, hw, negative=True)
    return encode_conditioning(pipe, prompt, hw), negative


def _attach_lora(pipe, lora, allow_pickle: bool) -> None:
    """The LoRA to invert under, as adapter "inverted" (replacing one a reused pipeline holds); a LoRA made for
    another model family is refused."""
    from .lora import load_lora, remove_adapters

    unet = pipe.unet
    remove_adapters(unet, ["inverted"])
    if lora is not None:
        load_lora(unet, lora, "inverted", allow_pickle=allow_pickle)


def _invert_paths(image, steps, lora, resolution, output_dir, save: bool, overwrite: bool) -> dict:
    """Check the step count, the LoRA path, the resolution and the output files; return the output paths."""
    from pathlib import Path

    from .errors import ConfigError, OutputExistsError
    from .images import check_resolution
    from .io import check_can_write

    check_steps(steps)
    if lora is not None and not Path(lora).is_file():
        raise ConfigError(f"The LoRA file {lora} does not exist (or is not a file).")
    if resolution is not None:
        check_resolution(resolution)
    stem = Path(image).stem
    out = Path(output_dir or Path("outputs") / "invert" / stem)
    paths = {"noise": out / f"{stem}.noise.safetensors", "reconstruction": out / f"{stem}.reconstruction.png",
             "report": out / f"{stem}.inversion.json"}
    if save:
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"The output folder {out} is a file. Choose another --output-dir.")
        for kind, path in paths.items():
            check_can_write(path, overwrite, {"noise": "inverted noise"}.get(kind, kind))
    return paths


def _write_inversion(paths: dict, noise, z0, reconstruction, settings: dict, report: dict, overwrite: bool) -> dict:
    """Write the noise (with the latent), the reconstruction and the report, each atomically."""
    import json

    from safetensors.torch import save_file

    from .images import save_image
    from .io import atomic_write, check_can_write, write_json

    from .stages import check_finite

    check_finite(noise, "inversion", "Lower --guidance, or run in fp32 (--dtype fp32); nothing was written.")
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in settings.items()}
    with atomic_write(check_can_write(paths["noise"], overwrite, "inverted noise")) as tmp:
        save_file({"noise": noise.cpu().contiguous(), "latent": z0.cpu().contiguous()}, str(tmp), metadata=meta)
    save_image(reconstruction, paths["reconstruction"], overwrite)
    write_json(check_can_write(paths["report"], overwrite, "report"), report)
    return paths
