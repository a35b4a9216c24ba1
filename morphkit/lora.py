"""LoRA adapters on the UNet: add, read out, save, load, and weight them per call or per sample.

Files (reading, formats, conversion) are `lora_files`' business; this module puts them on a UNet.
A diffusers-format file carries the adapter's PEFT config (rank, alpha, targets) in the safetensors
header under `lora_adapter_metadata`: without it a LoRA trained with alpha != rank reloads at the
wrong strength in stock diffusers. A kohya file carries alpha as `.alpha` tensors instead.
morphkit's own training record sits in the header under `morphkit.*` keys in both.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import LoRAError
from .io import atomic_write, check_can_write
from .lora_files import (
    DIFFUSERS_METADATA_KEY,
    LoraFile,
    LoraModule,
    describe,
    lora_from_peft,
    diffusers_state_dict,
    peft_metadata,
    read_lora_file,
    save_lora_file,
)

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_PREFIX = "unet."


@contextlib.contextmanager
def _second_adapter_is_fine():
    """peft warns whenever a second adapter is added to a model, which morph does on purpose; and diffusers
    logs a failed LoRA load at ERROR level before raising, where morphkit raises its own clearer message."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


@dataclass(frozen=True)
class LoraShape:
    """What makes two LoRAs interchangeable: rank, alpha and the modules they touch."""

    rank: int = 16
    alpha: float | None = None  # None: alpha = rank, a scale of 1
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.effective_alpha,
            init_lora_weights="gaussian",
            target_modules=list(self.targets),
        )


def add_lora(unet, shape: LoraShape, adapter_name: str = "default"):
    """Add a trainable LoRA adapter to `unet`; the base weights stay frozen and the LoRA weights are fp32."""
    unet.requires_grad_(False)
    try:
        with _second_adapter_is_fine():
            unet.add_adapter(shape.peft_config(), adapter_name=adapter_name)
    except ValueError as e:
        raise LoRAError(f"The LoRA targets {', '.join(shape.targets)} do not fit this UNet: {e}") from None
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' `unet.` keys, fp32, contiguous, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {UNET_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def adapter_metadata(unet, adapter_name: str = "default") -> dict:
    """The PEFT config of an adapter, as diffusers stores it (keys prefixed with `unet.`)."""
    config = unet.peft_config[adapter_name].to_dict()
    return {UNET_PREFIX + k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    peft_metadata: dict,
    info: dict | None = None,
    overwrite: bool = False,
    format: str = "diffusers",
) -> Path:
    """Write a LoRA trained by morphkit atomically, in `format` (`diffusers` or `kohya`).

    `state_dict` and `peft_metadata` are `lora_state_dict(unet)` and `adapter_metadata(unet)`; `info` is
    morphkit's training record, stored as strings under `morphkit.<key>` (and as kohya's `ss_*` keys).
    """
    if format == "kohya":
        lora = lora_from_peft(state_dict, peft_metadata)
        return save_lora_file(path, lora, "kohya", info, overwrite)
    if format != "diffusers":
        raise LoRAError(f"Unknown LoRA format {format!r}; choose kohya or diffusers.")
    path = check_can_write(path, overwrite, "LoRA file")
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(peft_metadata, sort_keys=True, default=str)}
    for key, value in (info or {}).items():
        header[f"morphkit.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    with atomic_write(path) as tmp:
        save_file(state_dict, str(tmp), metadata=header)
    return path


def check_fits(unet, lora: LoraFile, path) -> None:
    """Raise `LoRAError`, naming the problem, unless every UNet module of `lora` exists in `unet` with matching sizes."""
    modules = dict(unet.named_modules())
    found = describe(lora)["base"]
    made_for = f" It looks made for {found}." if found and not found.startswith("unknown") else ""
    missing = [n for n in lora.part("unet") if not hasattr(modules.get(n), "weight")]
    if missing:
        raise LoRAError(f"The LoRA {path} does not fit this UNet: {len(missing)} of its {len(lora.part('unet'))} "
                        f"modules do not exist here (e.g. {missing[0]}).{made_for}")
    for name, m in lora.part("unet").items():
        weight = modules[name].weight
        want = (weight.shape[0], m.rank, *weight.shape[2:]) if weight.dim() == 4 else (weight.shape[0], m.rank)
        if tuple(m.up.shape[:2]) != want[:2] or tuple(m.down.shape[1:]) != tuple(weight.shape[1:]):
            raise LoRAError(f"The LoRA {path} does not fit this UNet: at {name} its factors are down "
                            f"{tuple(m.down.shape)} and up {tuple(m.up.shape)}, but the layer's weight is "
                            f"{tuple(weight.shape)}.{made_for}")


def load_lora(unet, source: str | os.PathLike | LoraFile, adapter_name: str, allow_pickle: bool = False) -> LoraFile:
    """Load a LoRA (a kohya or diffusers file, or a `LoraFile` already read) into `unet` as `adapter_name`,
    weights in fp32.

    Rank and alpha come from the file (kohya's `.alpha` tensors or diffusers' `lora_adapter_metadata`
    header), so a LoRA trained with alpha != rank loads at its trained strength. Only the UNet part is
    loaded here; `text_encoder_loras` applies a text-encoder part. A file with no UNet LoRA,
    or one made for another architecture, raises `LoRAError` rather than loading nothing.
    """
    lora = source if isinstance(source, LoraFile) else read_lora_file(source, allow_pickle)
    path = lora.path or "the LoRA"
    if not lora.part("unet"):
        parts = ", ".join(sorted({k.partition(".")[0] for k in lora.modules}))
        raise LoRAError(f"{path} holds no LoRA weights for the UNet (only for {parts}); morphkit needs a UNet part.")
    check_fits(unet, lora, path)
    unet_only = LoraFile({k: m for k, m in lora.modules.items() if k.startswith(UNET_PREFIX)})
    metadata = peft_metadata(unet_only, "unet")
    try:
        with _second_adapter_is_fine():
            unet.load_lora_adapter(diffusers_state_dict(unet_only), prefix="unet", adapter_name=adapter_name,
                                   metadata=metadata)
    except Exception as e:
        raise LoRAError(f"The LoRA {path} does not fit this UNet: {str(e).splitlines()[0][:300]}") from None
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    if adapter_name not in getattr(unet, "peft_config", {}) or not params:
        raise LoRAError(f"No weight of the LoRA {path} matched a module of this UNet; it was made for another model.")
    for p in params:
        p.data = p.data.float()
    return lora


def check_targets(unet, targets) -> None:
    """Raise `LoRAError` unless every target names at least one module of `unet`."""
    names = [n for n, _ in unet.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise LoRAError(f"The LoRA targets {', '.join(missing)} match no module of this UNet. SD 1.5's attention "
                        "projections are to_q, to_k, to_v and to_out.0; feed-forward layers ff.net.0.proj and ff.net.2.")


@contextlib.contextmanager
def adapter_weights(unet, weights: dict[str, float | torch.Tensor]):
    """Activate the named adapters, each at a weight: a float, or one weight per sample of the batch.

    An empty dict runs the base model alone. Floats go through diffusers' `set_adapters` (the UNet's output is then the base plus the sum of
    weight x LoRA update). A 1-D tensor gives every sample of the batch its own weight, so that frames
    with different adapter blends render in one UNet call: each LoRA layer's scale is reshaped to
    broadcast over the batch dimension of its input. With classifier-free guidance the batch is
    doubled; pass the weights doubled too.
    """
    from peft.tuners.lora import LoraLayer

    if not weights:  # the base model alone, whatever adapters the UNet holds
        if getattr(unet, "peft_config", None):
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()
        else:
            yield
        return
    names = list(weights)
    unet.set_adapters(names, [1.0 if torch.is_tensor(w) else float(w) for w in weights.values()])
    per_sample = {n: w for n, w in weights.items() if torch.is_tensor(w)}
    hooks, saved = [], []
    for module in unet.modules():
        if not isinstance(module, LoraLayer) or not per_sample:
            continue
        scales = {n: module.scaling[n] for n in per_sample if n in module.scaling}
        saved.append((module, dict(module.scaling)))

        def hook(mod, args, scales=scales):
            x = args[0]
            for name, base in scales.items():
                w = per_sample[name].to(x.device, torch.float32)
                if w.shape[0] != x.shape[0]:
                    raise ValueError(f"adapter weights for {w.shape[0]} samples, but the batch has {x.shape[0]}")
                mod.scaling[name] = base * w.view(-1, *([1] * (x.dim() - 1)))

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for module, scaling in saved:
            module.scaling.update(scaling)


def one_hot_weights(adapters: list[str], device=None) -> dict[str, torch.Tensor]:
    """Per-sample weights for `adapter_weights` that run sample i through adapter `adapters[i]` alone."""
    return {name: torch.tensor([float(name == other) for other in adapters], device=device)
            for name in dict.fromkeys(adapters)}


def parse_lora_spec(spec: str | os.PathLike, default_weight: float = 1.0) -> tuple[Path, float]:
    """`"style.safetensors:0.8"` -> (Path("style.safetensors"), 0.8); without `:weight` the weight is `default_weight`."""
    text = str(spec)
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass  # a ':' that is part of the path
    return Path(text), default_weight


def load_loras(pipe, loras, prefix: str = "lora", allow_pickle: bool = False) -> dict[str, float]:
    """Load several LoRA files into `pipe` as adapters `lora0`, `lora1`, ...; returns {adapter name: weight}.

    `loras` holds paths, `"path:weight"` strings or (path or `LoraFile`, weight) pairs. Use the result with
    `adapter_weights(pipe.unet, ...)`. Any file that does not fit the model raises `LoRAError` naming it.
    """
    weights = {}
    for i, item in enumerate(loras):
        path, weight = item if isinstance(item, tuple) else parse_lora_spec(item)
        name = f"{prefix}{i}"
        if name in getattr(pipe.unet, "peft_config", {}):
            pipe.unet.delete_adapters(name)
        load_lora(pipe.unet, path, name, allow_pickle=allow_pickle)
        weights[name] = float(weight)
    return weights


@contextlib.contextmanager
def text_encoder_loras(text_encoder, loras: list[tuple[LoraFile, float]]):
    """Apply the text-encoder parts of `loras` (each at its weight) for the duration of the block.

    The text encoder runs once per prompt, so its LoRA is added to the weights (`W + w * alpha/r * B @ A`,
    the same numbers a LoRA layer computes) rather than wrapped in adapter layers; the original
    weights are put back, bit for bit, on the way out. LoRAs without a text-encoder part change nothing.
    """
    parts = [(lora.part("text_encoder"), w) for lora, w in loras if lora.part("text_encoder") and w != 0]
    layers = dict(text_encoder.named_modules())
    saved = {}
    for modules, _ in parts:
        for name in modules:
            layer = layers.get(name) or layers.get(name.removeprefix("text_model."))
            if layer is not None and name not in saved:
                saved[name] = (layer, layer.weight.detach().clone())
    try:
        for modules, w in parts:
            fuse_into(text_encoder, modules, w)
        yield len(saved)
    finally:
        with torch.no_grad():
            for layer, weight in saved.values():
                layer.weight.copy_(weight)


def fuse_into(model, modules: dict[str, LoraModule], weight: float) -> int:
    """Add `weight` x each module's update to `model`'s weights in place (`W += weight * alpha/r * B @ A`).

    `modules` are keyed by path inside `model`. Returns how many layers changed. The sum is done in fp32.
    """
    layers = dict(model.named_modules())
    for name, m in modules.items():
        layer = layers.get(name) or layers.get(name.removeprefix("text_model."))  # transformers 5 drops the prefix
        if layer is None or not hasattr(layer, "weight"):
            raise LoRAError(f"The LoRA adapts {name}, which this model does not have.")
        delta = m.delta().to(layer.weight.device)
        if delta.shape != layer.weight.shape:
            raise LoRAError(f"The LoRA's update at {name} has shape {tuple(delta.shape)}, the layer's weight "
                            f"{tuple(layer.weight.shape)}.")
        with torch.no_grad():
            layer.weight.copy_((layer.weight.float() + weight * delta).to(layer.weight.dtype))
    return len(modules)


@dataclass
class FuseResult:
    path: Path
    layers: dict[str, int]  # model part -> layers changed


def fuse_lora(
    model: str,
    loras,
    out: str | os.PathLike,
    dtype: str = "fp16",
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> FuseResult:
    """`morphkit lora fuse`: bake LoRAs (`"path:weight"` or (path, weight)) into `model` and write a single-file
    checkpoint in the original SD layout (A1111, ComfyUI, civitai; and `--model` here).

    The sum is done in fp32 on the CPU; `dtype` (fp16, bf16 or fp32) is the precision of the file.
    """
    from .checkpoint import save_single_file
    from .models import load_pipeline

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise LoRAError(f"Unknown --dtype {dtype!r} for the checkpoint; choose fp16, bf16 or fp32.")
    out = check_can_write(out, overwrite, "checkpoint")
    if out.suffix.lower() != ".safetensors":
        raise LoRAError(f"The fused checkpoint is written as safetensors; name it *.safetensors, not {out.name}.")
    pairs = [item if isinstance(item, tuple) else parse_lora_spec(item) for item in loras]
    if not pairs:
        raise LoRAError("Nothing to fuse: give at least one --lora FILE[:WEIGHT].")
    files = [(path, read_lora_file(path, allow_pickle), float(w)) for path, w in pairs]
    pipe = load_pipeline(model, device="cpu", dtype="fp32", allow_pickle=allow_pickle)
    layers = {"unet": 0, "text_encoder": 0}
    for path, lora, w in files:
        check_fits(pipe.unet, lora, path)
        layers["unet"] += fuse_into(pipe.unet, lora.part("unet"), w)
        layers["text_encoder"] += fuse_into(pipe.text_encoder, lora.part("text_encoder"), w)
    meta = {"morphkit.fused_from": str(model), "morphkit.fused_loras": json.dumps([[str(p), w] for p, _, w in files])}
    save_single_file(pipe, out, dtypes[dtype], overwrite=overwrite, metadata=meta)
    return FuseResult(out, layers)
