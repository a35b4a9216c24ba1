"""Where weights come from, and on which device and in which precision they run.

`load_pipeline(model)` accepts:

- a hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`), taken from the local Hugging
  Face cache when it is there, downloaded otherwise (unless `HF_HUB_OFFLINE=1`);
- a local diffusers folder (one with `model_index.json`);
- a single-file checkpoint `.safetensors` as A1111 and civitai users have, loaded offline with the
  component configs shipped in `morphkit/configs/sd15` and `morphkit/configs/sdxl`;
- `tiny` / `tiny-sdxl`: the small SD- and SDXL-architecture models of `morphkit.tiny` and
  `morphkit.tiny_sdxl`, built in code and loaded from their cache folders by the same code as any local folder.

SD 1.x or SDXL: the family is read from the checkpoint (`morphkit.families`).

Pickled checkpoints (`.ckpt`, `.pt`, `.bin`, `.pth`) can run code when loaded; they are refused unless
`allow_pickle=True`, and then loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConfigError, ModelNotFoundError, brief
from .families import SD15, SDXL, family_of, family_of_folder, family_of_single_file
from .tiny import TINY_NAME, TINY_UNET_CHANNELS, tiny_model_path
from .tiny_sdxl import TINY_SDXL_NAME, TINY_SDXL_UNET_CHANNELS, tiny_sdxl_model_path

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = "lllyasviel/sd-controlnet-canny"
SD15_CONFIG = Path(__file__).parent / "configs" / "sd15"
SD15_CONTROLNET_CONFIG = Path(__file__).parent / "configs" / "sd15-controlnet"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | None = None) -> torch.device:
    """`None`/"auto": CUDA if present, else Apple MPS, else CPU. Otherwise the named device."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"Unknown device {device!r}. Use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU here (is a CUDA build of torch installed?).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for, but Apple MPS is not available on this machine.")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (Intel AMX or AVX512-BF16), where bf16 runs faster than fp32;
    elsewhere torch emulates it, slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA GPUs that support it, else fp16; fp32 on MPS and CPU. Or fp32, fp16, bf16
    (bf16 on a CPU only where it computes bf16 natively: `cpu_has_native_bf16`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError(f"Unknown dtype {dtype!r}. Use auto, fp32, fp16 or bf16.")
    if device.type == "cpu" and dtype == "fp16":
        raise ConfigError("--dtype fp16 is not supported on the CPU; use fp32 (the default on CPU), or bf16 on a "
                          "CPU with AMX or AVX512-BF16.")
    if device.type == "cpu" and dtype == "bf16" and not cpu_has_native_bf16():
        raise ConfigError("--dtype bf16 on this CPU would be emulated (it has neither AMX nor AVX512-BF16) and slower "
                          "than fp32; use fp32 (the default on CPU).")
    return DTYPES[dtype]


def _is_hub_id(name: str) -> bool:
    """`owner/name` with no path syntax: what the Hugging Face hub calls a repo id."""
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "~"))
        and Path(name).suffix.lower() not in PICKLE_SUFFIXES | {".safetensors"}
    )


def _one_line(error: BaseException) -> str:
    """The first line of an error, in our words where torch's pickle advice would mislead (it suggests
    weights_only=False, which runs the file's code)."""
    text = str(error).strip().splitlines()
    if "weights_only" in str(error):
        return ("the pickle holds more than tensors, and torch.load(weights_only=True) refuses it; morphkit never "
                "loads a pickle with code in it")
    return text[0] if text else type(error).__name__


def check_pickle_allowed(path: Path, allow_pickle: bool, what: str = "checkpoint"):
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelNotFoundError(
            f"{path} is a pickled {what} ({path.suffix}); loading a pickle can run arbitrary code, so morphkit "
            "refuses it by default. Prefer a .safetensors file. If you trust its source, pass --allow-pickle: it "
            "is then loaded with torch.load(weights_only=True), which refuses anything but tensors."
        )


def load_pipeline(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    vae: str | None = None,
):
    """Load a Stable Diffusion 1.x or SDXL pipeline with a DDIM scheduler, ready on `device`.

    The family (`morphkit.families`) is read from the checkpoint: a folder's model_index.json and UNet config,
    a single file's key names; `family_of(pipe)` tells it afterwards. The checkpoint's own scheduler (PNDM
    for SD 1.5, Euler for SDXL) is replaced by DDIM with the same betas, so that sampling and DDIM inversion
    walk the same timesteps. The safety checker is not loaded. `vae`: another VAE for the model (a folder, a
    hub id such as madebyollin/sdxl-vae-fp16-fix, or a single .safetensors file).
    """
    _quiet_loading()
    from diffusers import DDIMScheduler

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = str(model)
    kind, where, family = model_source(model, allow_pickle)
    common = dict(dtype=dtype, **family.pipeline_kwargs())
    if vae is not None:
        common["vae"] = load_vae(vae, family, dtype, allow_pickle)
    cls = family.pipeline_class("txt2img")
    if kind == "folder":
        pipe = _from_folder(cls, where, common)
    elif kind == "file":
        pipe = _from_single_file(cls, where, common, family)
    else:
        pipe = _from_hub(cls, where, common)
    family_of(pipe)  # a refiner loaded from the hub is refused here
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe


def model_source(model: str, allow_pickle: bool = False):
    """What `--model` names: ("folder" | "file" | "hub", path or id, family), checked before anything loads."""
    path = Path(model).expanduser()
    if model == TINY_NAME:
        return "folder", tiny_model_path(), SD15
    if model == TINY_SDXL_NAME:
        return "folder", tiny_sdxl_model_path(), SDXL
    if path.is_dir():
        _check_diffusers_folder(path)
        return "folder", path, family_of_folder(path)
    if path.is_file():
        check_pickle_allowed(path, allow_pickle)
        if path.suffix.lower() not in PICKLE_SUFFIXES | {".safetensors"}:
            raise ModelNotFoundError(
                f"{path} is not a model morphkit can load: a single-file checkpoint must be a .safetensors file.")
        # a pickle's keys cannot be read without loading it: taken as SD 1.x, as before SDXL support
        return "file", path, SD15 if path.suffix.lower() in PICKLE_SUFFIXES else family_of_single_file(path)
    if not _is_hub_id(model):
        raise ModelNotFoundError(
            f"The model {model} does not exist. --model takes a hub id (like {DEFAULT_MODEL} or "
            f"{SDXL.default_model}), a local diffusers folder, a single-file .safetensors checkpoint, or 'tiny' / "
            f"'{TINY_SDXL_NAME}' for the built-in test models."
        )
    return "hub", model, _hub_family(model)


def _hub_family(repo_id: str):
    """The family of a hub model, from its model_index.json in the local cache (or downloaded, unless offline).
    When neither is possible, SD 1.x: loading then fails with the message that says what was tried."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "model_index.json")
        if not isinstance(cached, str) and os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
            cached = hf_hub_download(repo_id, "model_index.json")
    except Exception:
        cached = None
    if isinstance(cached, str):
        return family_of_folder(Path(cached).parent)
    return SD15


def _check_diffusers_folder(folder: Path):
    if not (folder / "model_index.json").exists():
        raise ModelNotFoundError(
            f"{folder} is a folder but not a diffusers model: it has no model_index.json. Point --model at the "
            "folder that holds model_index.json, unet/, vae/, text_encoder/ and tokenizer/, or at a single-file "
            ".safetensors checkpoint."
        )


def load_vae(vae: str, family, dtype: torch.dtype, allow_pickle: bool = False):
    """`--vae`: an AutoencoderKL from a folder (config.json), a hub id, or a single file read with the family's
    shipped VAE config."""
    from diffusers import AutoencoderKL

    path = Path(str(vae)).expanduser()
    kwargs = dict(dtype=dtype)
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(path, local_files_only=True, **kwargs)
        if path.is_file():
            check_pickle_allowed(path, allow_pickle, "VAE")
            return AutoencoderKL.from_single_file(str(path), config=str(family.config_folder / "vae"),
                                                  local_files_only=True, **kwargs)
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise ModelNotFoundError(f"The VAE {path} (--vae) could not be loaded: {_one_line(e)}") from None
    if not _is_hub_id(str(vae)):
        raise ModelNotFoundError(f"The VAE {vae} (--vae) does not exist. --vae takes a diffusers VAE folder, a hub id "
                                 f"(like {SDXL.default_vae}, SDXL's VAE fixed to run in fp16) or a .safetensors file.")
    return _from_hub(AutoencoderKL, str(vae), kwargs)


def _quiet_loading():
    """Loading bars and notices from diffusers/transformers are noise next to morphkit's own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _from_folder(cls, folder: Path, kwargs: dict):
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelNotFoundError(f"The diffusers folder {folder} could not be loaded: {_one_line(e)}") from None


def _single_file_config(path: Path, family) -> Path:
    """The shipped config folder that fits a single-file checkpoint: the family's, or its tiny model's (as written
    by `morphkit lora fuse --model tiny`), told apart by the width of the UNet's first convolution."""
    tiny = {SD15.name: (TINY_UNET_CHANNELS[0], tiny_model_path), SDXL.name: (TINY_SDXL_UNET_CHANNELS[0],
                                                                             tiny_sdxl_model_path)}[family.name]
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                key = "model.diffusion_model.input_blocks.0.0.weight"
                if key in f.keys() and f.get_slice(key).get_shape()[0] == tiny[0]:
                    return tiny[1]()
        except Exception:
            pass  # diffusers gives the better message about a broken file
    return family.config_folder


def _from_single_file(cls, path: Path, kwargs: dict, family):
    try:
        # `config` must be a str: the component loaders reject a Path. Passing a config folder makes
        # diffusers read every component config from it and ask no hub.
        with warnings.catch_warnings():  # torch's notices about pickles are not for the user: our messages say it
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
            pipe = cls.from_single_file(str(path), config=str(_single_file_config(path, family)),
                                        local_files_only=True, **kwargs)
    except Exception as e:
        raise ModelNotFoundError(
            f"The single-file checkpoint {path} could not be loaded as {family.label}: {_one_line(e)}. "
            "morphkit reads A1111/civitai-style SD 1.x and SDXL checkpoints; SD 2.x and other architectures are "
            "not supported."
        ) from None
    # The text encoders are loaded non-strictly: weights missing from the file would stay on the meta device.
    for part in family.part_names() + ("vae",):
        if any(p.is_meta for p in getattr(pipe, part).parameters()):
            raise ModelNotFoundError(f"The checkpoint {path} has no weights for the {part}; it is not a complete "
                                     f"{family.label} model.")
    return pipe


def _from_hub(cls, repo_id: str, kwargs: dict, **extra):
    tried = []
    try:
        return cls.from_pretrained(repo_id, local_files_only=True, **kwargs, **extra)
    except Exception:
        tried.append("the local Hugging Face cache (not there)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        tried.append("no download, because HF_HUB_OFFLINE is set")
    else:
        try:
            return cls.from_pretrained(repo_id, **kwargs, **extra)
        except Exception as e:
            tried.append(f"a download from the Hugging Face hub, which failed ({brief(_one_line(e), 160)})")
    raise ModelNotFoundError(
        f"The model {repo_id!r} could not be found. Tried: {'; '.join(tried)}. If you are offline, download it "
        f"once where you have a network (`hf download {repo_id}`), pass a local diffusers folder or a single-file "
        ".safetensors checkpoint with --model, or use --model tiny to try morphkit with its built-in test model."
    )


def load_controlnet(
    controlnet: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    family=SD15,
):
    """Load a ControlNet from a hub id, a local folder, a single file, or `tiny` (the tiny model of `family`).

    By default the family's ControlNet-Canny (`family.default_controlnet`). A single file (diffusers keys, or the
    original lllyasviel/A1111 layout) is read with the architecture in `config`, a folder holding a ControlNet
    `config.json`; by default the family's, shipped in `morphkit/configs/`, so that no hub is asked.
    """
    _quiet_loading()
    from diffusers import ControlNetModel

    device = device if isinstance(device, torch.device) else resolve_device(device)
    kwargs = dict(dtype=resolve_dtype(dtype, device))
    controlnet = family.default_controlnet if controlnet is None else controlnet
    path = Path(str(controlnet)).expanduser()
    if controlnet == TINY_NAME:
        net = ControlNetModel.from_pretrained(family.tiny_controlnet(), local_files_only=True, **kwargs)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but not a ControlNet: it has no config.json.")
        try:
            net = ControlNetModel.from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as e:
            raise ModelNotFoundError(f"The ControlNet folder {path} could not be loaded: {_one_line(e)}") from None
    elif path.is_file():
        check_pickle_allowed(path, allow_pickle, "ControlNet")
        if path.suffix.lower() not in PICKLE_SUFFIXES | {".safetensors"}:
            raise ModelNotFoundError(f"{path} is not a ControlNet morphkit can load: a single-file ControlNet must be "
                                     "a .safetensors file.")
        config = str(config or family.controlnet_config_folder)
        try:
            net = ControlNetModel.from_single_file(str(path), config=config, local_files_only=True, **kwargs)
        except Exception as e:
            reason = _one_line(e).rstrip(".")
            raise ModelNotFoundError(
                f"The ControlNet file {path} could not be loaded with the architecture in {config}: {reason}. "
                f"A single-file ControlNet must be an {family.controlnet_example}; "
                "for another architecture, pass the folder that holds its config.json and weights."
            ) from None
    elif not _is_hub_id(str(controlnet)):
        raise ModelNotFoundError(
            f"The ControlNet {controlnet} does not exist. --controlnet takes a hub id (like {family.default_controlnet}), "
            "a local diffusers folder, a single-file .safetensors ControlNet, or 'tiny' (the built-in test model's)."
        )
    else:
        net = _from_hub(ControlNetModel, str(controlnet), kwargs)
    return net.to(device)


def controlnet_for(pipe, model: str | None, controlnet: str | None = None, allow_pickle: bool = False):
    """The ControlNet for a loaded `pipe` (from `model`, as --model named it): `controlnet` as `load_controlnet`
    takes it, by default `tiny` for a built-in tiny model and the family's ControlNet-Canny otherwise."""
    family = family_of(pipe)
    if controlnet is None:
        controlnet = TINY_NAME if str(model) in (TINY_NAME, TINY_SDXL_NAME) else family.default_controlnet
    return load_controlnet(controlnet, device=pipe.unet.device, dtype=pipe.unet.dtype, allow_pickle=allow_pickle,
                           family=family)


# ---------------------------------------------------------------------------------------------
# the three encoders and the decoder, as functions of a loaded pipeline


@torch.no_grad()
def encode_image(pipe, img) -> torch.Tensor:
    """PIL image -> scaled VAE latent mean (1, 4, H/8, W/8), fp32."""
    from .images import to_tensor

    x = to_tensor(img).to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean.float() * pipe.vae.config.scaling_factor


DECODE_PIXELS = 8 * 512 * 512  # decoded at once: 8 frames of 512 px, 2 of 1024 px (see benchmarks/memory_sdxl.py)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1], fp32, decoded in chunks.

    A chunk holds up to 8 frames and at most `DECODE_PIXELS` pixels (2 frames at 1024 px), which bounds the
    decoder's activations; with `pipe.vae.enable_tiling()` each frame is decoded in tiles as well. A VAE that
    overflows in fp16 (SDXL's own, `force_upcast`) decodes in fp32; the fp16-fix VAE (`--vae`) does not need to.
    """
    vae = pipe.vae
    batch_size = batch_size or max(1, min(8, DECODE_PIXELS // (64 * latents.shape[-1] * latents.shape[-2])))
    upcast = family_of(pipe).upcast_vae_in_fp16 and vae.dtype == torch.float16 and vae.config.get("force_upcast")
    out = []
    with stage_precision(vae, torch.float32, enabled=bool(upcast)):
        for chunk in latents.split(batch_size):
            z = chunk.to(vae.device, next(vae.parameters()).dtype) / vae.config.scaling_factor
            out.append(vae.decode(z).sample.float())
    return torch.cat(out)


@torch.no_grad()
def encode_prompt(pipe, prompt: str) -> torch.Tensor:
    """Prompt -> CLIP text embedding (1, 77, dim), fp32: SD 1.x's conditioning (for any family, use
    `encode_conditioning`, which gives SDXL's pooled embedding and time ids too)."""
    embeds, _ = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, False)
    return embeds.float()


def encode_conditioning(pipe, prompt: str, size: tuple[int, int] | None = None, negative: bool = False):
    """Prompt -> `morphkit.families.PromptEmbeds` for an image of `size` (height, width), fp32, as the pipeline's
    family encodes it (`negative`: as a negative prompt, which SDXL makes zeros when empty)."""
    family = family_of(pipe)
    return (family.encode_negative if negative else family.encode_prompt)(pipe, prompt, size)


@contextlib.contextmanager
def compiled(module: torch.nn.Module, enabled: bool = True, backend: str = "inductor"):
    """Inside the block, `module` runs through `torch.compile` (its forward is swapped; restored after).

    The first call compiles (a minute or more on a cold cache; torch keeps compiled graphs on disk), a
    new batch shape compiles again, and later calls run the compiled graphs. So it pays for long renders
    and repeated runs on one machine, not for one short morph on a cold cache (figures in
    benchmarks/README.md).
    """
    if not enabled:
        yield module
        return
    had_own = "forward" in module.__dict__
    original = module.forward
    module.forward = torch.compile(original, backend=backend)
    try:
        yield module
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward


# ---------------------------------------------------------------------------------------------
# precision per stage

PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# The stages that must be exact run in this precision (the measured floors of a 50-step inversion round trip
# on the tiny model: about 5e-7 in fp32, 4.6e-4 in fp16, 4.2e-3 in bf16; see benchmarks/README.md).
EXACT_STAGE_DTYPE = torch.float32


def precision_name(dtype: torch.dtype) -> str:
    """fp32, fp16, bf16 (or torch's own name for anything else)."""
    return PRECISION_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def module_precision(module: torch.nn.Module) -> str:
    """The precision most of `module`'s floating-point weights are in: "bf16" for a bf16 UNet even when it
    carries fp32 LoRA weights."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return precision_name(max(counts, key=counts.get)) if counts else "none"


@contextlib.contextmanager
def stage_precision(module: torch.nn.Module, dtype: str | torch.dtype = EXACT_STAGE_DTYPE, enabled: bool = True):
    """Run a stage with `module`'s lower-precision weights raised to `dtype` (fp32 by default), in place.

    For a pipeline loaded in fp16 or bf16 whose exact stages (inversion, end frames) should run in fp32:
    every floating-point parameter and buffer of lower precision than `dtype` is cast up on entry and back
    on exit. fp16 and bf16 values are exactly representable in fp32, so the weights come back bit for bit.
    Tensors already at `dtype` or above (an fp32 pipeline, fp32 LoRA weights) are left alone, so on a CPU
    in fp32 this costs nothing. Yields the precision the stage runs in ("fp32", or the module's own when
    nothing was cast or `enabled` is False), for the summary. Build eps callables inside the block: they
    look up the module's dtype once.

    Raised to fp32, the stage also runs without TF32 (cuDNN convolutions use it by default on Ampere and
    later GPUs, with a 10-bit mantissa): an fp32 stage is fp32 throughout, and the inversion and the end frames
    it serves compute ε the same way. A pipeline already in fp32 keeps the user's TF32 settings for every stage.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    raised = []
    if enabled:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < torch.finfo(dtype).bits:
                raised.append((tensor, tensor.dtype))
                tensor.data = tensor.data.to(dtype)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if raised and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield module_precision(module)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for tensor, original in raised:
            tensor.data = tensor.data.to(original)


def format_precisions(precisions: dict[str, str]) -> str:
    """{"fit": "bf16", "invert": "fp32"} -> "fit bf16, invert fp32": the summary line's text."""
    return ", ".join(f"{stage} {name}" for stage, name in precisions.items())
