"""LoRA adapters on the UNet: add, read out, save, load, and weight them per call or per sample.

Files (reading, formats, conversion) are `lora_files`' business; this module puts them on a model. Plain
LoRAs become PEFT adapters as they are. Other kinds (LoCon with a Tucker core, LoHa, LoKr, full differences,
DoRA) become adapters through their exact LoRA form (`lora_files.as_lora`: their own low-rank factors, or the
identity factorisation of the dense update; a DoRA update is taken against this model's weights), or are
added to the weights for a run (`merged_updates`) and put back bit for bit afterwards.
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
from .families import family_of
from .io import atomic_write, check_can_write
from .lora_files import (
    DIFFUSERS_METADATA_KEY,
    LoraCompatibilityWarning,
    LoraFile,
    LoraModule,
    Update,
    as_lora,
    check_family,
    check_weight,
    clean_header,
    diffusers_state_dict,
    find_layer,
    for_unet,
    guess_base,
    info_header,
    lora_from_peft,
    part_of,
    peft_metadata,
    read_lora_file,
    save_lora_file,
    shown,
)
from .lora_files.spec import parse_lora_spec  # noqa: F401  (its home; importable from here too)

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
    use_dora: bool = False  # DoRA: a learned magnitude per output channel beside the low-rank direction

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
            use_dora=self.use_dora,
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
    family=None,
    unet_config=None,
) -> Path:
    """Write a LoRA trained by morphkit atomically, in `format` (`diffusers` or `kohya`).

    `state_dict` and `peft_metadata` are `lora_state_dict(unet)` and `adapter_metadata(unet)` (or the same with
    `text_encoder.` / `text_encoder_2.` parts); `info` is morphkit's training record, stored as strings under
    `morphkit.<key>` (and as kohya's `ss_*` keys). `family` and `unet_config` name kohya modules as the model's
    family does (SDXL: LDM-layout UNet names, `lora_te1_` / `lora_te2_`).
    """
    if format == "kohya":
        lora = lora_from_peft(state_dict, peft_metadata)
        return save_lora_file(path, lora, "kohya", info, overwrite, family=family, unet_config=unet_config)
    if format != "diffusers":
        raise LoRAError(f"Unknown LoRA format {format!r}; choose kohya or diffusers.")
    path = check_can_write(path, overwrite, "LoRA file")
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(peft_metadata, sort_keys=True, default=str),
              **info_header(info)}
    if not all(torch.isfinite(t).all() for t in state_dict.values()):
        raise LoRAError(f"The LoRA for {shown(path)} holds NaN or infinite values (the fit diverged); it was not written.")
    with atomic_write(path) as tmp:  # no format warning: morph caches its fits this way (train warns its users)
        save_file(state_dict, str(tmp), metadata=clean_header(header))
    return path


def _misfit(name: str, m: Update, layer) -> str | None:
    """Why update `m` cannot apply to `layer`, or None when it fits."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return f"{shown(name)} has no weight"
    if m.bias is not None and (getattr(layer, "bias", None) is None or layer.bias.shape != m.bias.shape):
        return f"at {shown(name)} the bias update has shape {tuple(m.bias.shape)}, the layer's bias " \
               f"{tuple(layer.bias.shape) if getattr(layer, 'bias', None) is not None else 'does not exist'}"
    if isinstance(m, LoraModule) and m.is_plain_lora:
        same = tuple(m.down.shape[1:]) == tuple(weight.shape[1:]) or m.down[0].numel() == weight[0].numel()
        if m.up.shape[0] != weight.shape[0] or not same:
            return f"at {shown(name)} its factors are down {tuple(m.down.shape)} and up {tuple(m.up.shape)}, but " \
                   f"the layer's weight is {tuple(weight.shape)}"
        return None
    if m.has_weight_update:
        d = m.delta()
        if d.shape[0] != weight.shape[0] or d.numel() != weight.numel():
            return f"at {shown(name)} its update has shape {tuple(d.shape)}, but the layer's weight is {tuple(weight.shape)}"
    if m.dora_scale is not None and m.dora_scale.numel() not in (weight.shape[0], weight.shape[1] if weight.dim() > 1 else -1):
        return f"at {shown(name)} the DoRA magnitude has {m.dora_scale.numel()} entries, but the layer's weight is " \
               f"{tuple(weight.shape)}"
    return None


def check_fits(model, lora: LoraFile, path, part: str = "unet") -> None:
    """Raise `LoRAError`, naming the problem, unless every `part` module of `lora` exists in `model` (the UNet or
    a text encoder) with matching sizes. UNet names in the LDM layout must be mapped first (`for_unet`)."""
    layers = dict(model.named_modules())
    found = guess_base(lora)
    made_for = f" It looks made for {found}." if found and not found.startswith("unknown") else ""
    modules = lora.part(part)
    missing = [n for n in modules if find_layer(model, n, layers) is None]
    if missing:
        raise LoRAError(f"The LoRA {shown(path)} does not fit this {part.replace('_', ' ')}: {len(missing)} of its "
                        f"{len(modules)} modules do not exist here (e.g. {shown(missing[0])}).{made_for}")
    for name, m in modules.items():
        problem = _misfit(name, m, find_layer(model, name, layers))
        if problem:
            raise LoRAError(f"The LoRA {shown(path)} does not fit this {part.replace('_', ' ')}: {problem}.{made_for}")


def adapter_form(unet, lora: LoraFile, plain_only: bool = False) -> tuple[LoraFile, list[str]]:
    """The UNet part of `lora` as plain LoRA factors PEFT can hold, and the modules left out.

    Each module becomes its exact LoRA form (`as_lora`; a DoRA update against this UNet's weights). With
    `plain_only`, only plain LoRAs are taken (the caller merges the rest). Bias updates and updates of 1-D
    weights (norm layers) have no LoRA form and are left out.
    """
    layers = dict(unet.named_modules())
    modules, left = {}, []
    for name, m in lora.part("unet").items():
        weight = find_layer(unet, name, layers).weight
        if (plain_only and not m.is_plain_lora) or not m.has_weight_update or weight.dim() not in (2, 4):
            left.append(name)
            continue
        modules[UNET_PREFIX + name] = as_lora(m, tuple(weight.shape), weight.detach())
        if m.bias is not None:
            left.append(name + " (bias)")
    return LoraFile(modules, lora.metadata, lora.format, lora.path), left


def load_lora(unet, source: str | os.PathLike | LoraFile, adapter_name: str, allow_pickle: bool = False,
              plain_only: bool = False) -> LoraFile:
    """Load a LoRA (any file `read_lora_file` reads, or a `LoraFile` already read) into `unet` as `adapter_name`,
    weights in fp32.

    Rank and alpha come from the file (kohya's `.alpha` tensors or diffusers' `lora_adapter_metadata`
    header), so a LoRA trained with alpha != rank loads at its trained strength. Other kinds load through
    their exact LoRA form (`adapter_form`); bias and norm-layer updates, which no LoRA layer can hold, are
    left out with a `LoraCompatibilityWarning` (stylize and `lora fuse` apply them). Only the UNet part is
    loaded here; `text_encoder_loras` applies a text-encoder part. A file with no UNet part, or one made
    for another architecture, raises `LoRAError` rather than loading nothing. Returns the file as read.
    """
    lora = source if isinstance(source, LoraFile) else read_lora_file(source, allow_pickle)
    path = lora.where()
    check_family(unet, lora, path)
    if not lora.part("unet"):
        parts = ", ".join(sorted({k.partition(".")[0] for k in lora.modules}))
        raise LoRAError(f"{path} holds no LoRA weights for the UNet (only for {parts}); morphkit needs a UNet part.")
    mapped = for_unet(lora, unet)
    check_fits(unet, mapped, path)
    adapters, left = adapter_form(unet, mapped, plain_only)
    if left and not plain_only:
        warnings.warn(f"{path}: {len(left)} of its updates (bias or norm-layer differences, e.g. {shown(left[0])}) have "
                      "no LoRA form, so they are left out here; stylize and lora fuse apply them.",
                      LoraCompatibilityWarning, stacklevel=2)
    if not adapters.modules:
        return lora
    try:
        with _second_adapter_is_fine():
            unet.load_lora_adapter(diffusers_state_dict(adapters), prefix="unet", adapter_name=adapter_name,
                                   metadata=peft_metadata(adapters, "unet"))
    except Exception as e:
        raise LoRAError(f"The LoRA {path} does not fit this UNet: {shown(str(e).splitlines()[0], 300)}") from None
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


def remove_adapters(unet, names) -> None:
    """Delete each named adapter the UNet holds (others and missing names are left alone), quietly: PEFT warns
    when an active adapter goes ("... was active which is now deleted"), which is what removing it means here."""
    held = [n for n in names if n in getattr(unet, "peft_config", {})]
    if held:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted", category=UserWarning)
            unet.delete_adapters(held)


@contextlib.contextmanager
def adapter_weights(unet, weights: dict[str, float | torch.Tensor]):
    """Activate the named adapters, each at a weight: a float, or one weight per sample of the batch.

    An empty dict runs the base model alone. Floats go through diffusers' `set_adapters` (the UNet's output is
    then the base plus the sum of weight x LoRA update). A 1-D tensor gives every sample of the batch its own
    weight, so that frames with different adapter blends render in one UNet call (and LoRAs of different images
    train in one batch). With classifier-free guidance the batch is doubled; pass the weights doubled too.

    Per-sample weights take one of two routes, the same sum either way. Where every LoRA layer of the named
    adapters is a plain LoRA on a linear layer (what morphkit fits), PEFT's own LoRA path is switched off and
    each layer adds all the adapters' updates in two matrix products (`fused_update`: the down factors stacked,
    each sample's rows weighted, the up factors stacked), a third of PEFT's calls per layer. Otherwise each LoRA
    layer's scale is reshaped to broadcast over the batch dimension of its input. The weights are read when a
    layer first runs in the context: to change them, enter the context again. On leaving, the per-sample routes
    are undone, but the named adapters stay the active ones, at the float weights given (1.0 for a tensor), as
    `set_adapters` left them: the next `adapter_weights` (or `set_adapters`) chooses again.
    """
    if not weights:  # the base model alone, whatever adapters the UNet holds
        with _adapters_off(unet):
            yield
        return
    names = list(weights)
    unet.set_adapters(names, [1.0 if torch.is_tensor(w) else float(w) for w in weights.values()])
    per_sample = {n: w for n, w in weights.items() if torch.is_tensor(w)}
    if not per_sample:
        yield
        return
    layers = _lora_layers(unet, names)
    if all(_is_plain_linear(module, names) for module in layers):
        with _fused_updates(unet, layers, weights):
            yield
        return
    with _per_sample_scales(layers, per_sample):
        yield


@contextlib.contextmanager
def _adapters_off(unet):
    if getattr(unet, "peft_config", None):
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
    else:
        yield


def _lora_layers(unet, names) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer) and any(n in m.lora_A for n in names)]


def _is_plain_linear(module, names) -> bool:
    """A plain LoRA (no DoRA or other variant, no dropout) on an nn.Linear, for every named adapter it holds."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or getattr(module, "fan_in_fan_out", False):
        return False
    held = [n for n in names if n in module.lora_A]
    return all(n not in getattr(module, "lora_variant", {}) and not module.use_dora.get(n, False)
               and not getattr(module, "lora_bias", {}).get(n, False)
               and isinstance(module.lora_dropout[n], torch.nn.Identity) for n in held)


def fused_update(x: torch.Tensor, downs: list, ups: list, scales: torch.Tensor) -> torch.Tensor:
    """sum_k scales[:, k] * B_k A_k x, per sample, in two matrix products.

    `x` is (S, ..., in); `downs` the A factors (r_k, in), `ups` the B factors (out, r_k), `scales` (S, K) each
    sample's weight of each adapter (LoRA scale included). Returns (S, ..., out) in the factors' dtype.
    """
    dtype = downs[0].dtype
    down, up = torch.cat([a.to(dtype) for a in downs]), torch.cat([b.to(dtype) for b in ups], dim=1)
    return stacked_update(x.to(dtype), down, up, sample_columns(scales, [a.shape[0] for a in downs]).to(dtype))


def sample_columns(scales: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """(S, sum of ranks): each sample's weight of adapter k, repeated over that adapter's rows of the stacked
    down factor."""
    return torch.cat([scales[:, k:k + 1].expand(-1, r) for k, r in enumerate(ranks)], dim=1)


def stacked_update(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`fused_update` on factors already stacked: x (S, ..., in) through down (R, in), each sample's R columns
    weighted by `columns` (S, R), then through up (out, R)."""
    h = torch.nn.functional.linear(x, down)
    return torch.nn.functional.linear(h * columns.view(len(x), *[1] * (x.dim() - 2), -1), up)


class _FusedLayer:
    """A forward hook adding one layer's fused update under fixed per-sample weights (`_fused_updates`).

    Eager, the weight columns are made at the first call and kept (for that batch size), and so are the stacked
    factors while no factor changes (inversion, rendering; checked by each factor's storage and version counter, so
    in-place updates are seen, though writes through `.data` are not); they are stacked at every call where
    autograd needs them (fitting, where the optimizer updates them in place between steps). Traced by
    torch.compile, every call makes both in the graph, where they cost nothing and keep nothing.
    """

    def __init__(self, module, held: tuple, weights: dict):
        self.module, self.held, self.weights = module, held, weights
        self.downs = [module.lora_A[n].weight for n in held]  # the parameters (updated in place, never replaced)
        self.ups = [module.lora_B[n].weight for n in held]
        self.columns: torch.Tensor | None = None
        self.stacked: tuple | None = None
        self.versions: tuple | None = None

    def __call__(self, module, args, output):
        x = args[0]
        if torch.compiler.is_compiling():
            down, up = self.stack()
            columns = self.make_columns(x, down.dtype)
        else:
            down, up = self.kept_factors()
            c = self.columns
            if c is None or c.device != x.device or c.dtype != down.dtype or c.shape[0] != x.shape[0]:
                self.columns = self.make_columns(x, down.dtype)
            columns = self.columns
        return (output + stacked_update(x.to(down.dtype), down, up, columns)).to(output.dtype)

    def make_columns(self, x: torch.Tensor, dtype) -> torch.Tensor:
        scales = []
        for n in self.held:  # `scaling` holds alpha / rank, times the weight of an adapter weighted by a float
            w = self.weights[n]
            if torch.is_tensor(w) and w.shape[0] != x.shape[0]:
                raise ValueError(f"adapter weights for {w.shape[0]} samples, but the batch has {x.shape[0]}")
            w = w.to(x.device, torch.float32) if torch.is_tensor(w) else torch.ones(x.shape[0], device=x.device)
            scales.append(w * self.module.scaling[n])
        return sample_columns(torch.stack(scales, dim=1), [a.shape[0] for a in self.downs]).to(dtype)

    def stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.downs[0].dtype
        return torch.cat([a.to(dtype) for a in self.downs]), torch.cat([b.to(dtype) for b in self.ups], dim=1)

    def kept_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.downs + self.ups):
            return self.stack()
        versions = tuple((p.data_ptr(), p._version) for p in self.downs + self.ups)
        if versions != self.versions:
            self.stacked, self.versions = self.stack(), versions
        return self.stacked


@contextlib.contextmanager
def _fused_updates(unet, layers: list, weights: dict):
    """PEFT's LoRA path off; each layer adds the weighted updates of `weights`' adapters by `fused_update`'s
    two products (`_FusedLayer`)."""
    hooks = []
    for module in layers:
        held = tuple(n for n in weights if n in module.lora_A)
        hooks.append(module.register_forward_hook(_FusedLayer(module, held, weights)))
    try:
        with _adapters_off(unet):
            yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _per_sample_scales(layers: list, per_sample: dict):
    """Each LoRA layer's scale of the per-sample adapters reshaped to broadcast over the batch (PEFT's path)."""
    hooks, saved = [], []
    for module in layers:
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


def load_loras(pipe, loras, prefix: str = "lora", allow_pickle: bool = False, plain_only: bool = False) -> dict[str, float]:
    """Load several LoRA files into `pipe` as adapters `lora0`, `lora1`, ...; returns {adapter name: weight}.

    `loras` holds paths, `"path:weight"` strings or (path or `LoraFile`, weight) pairs. Use the result with
    `adapter_weights(pipe.unet, ...)`. Any file that does not fit the model raises `LoRAError` naming it.
    With `plain_only`, only plain LoRA modules become adapters (see `merged_updates` for the rest), and a
    file without any gets no adapter.
    """
    weights = {}
    for i, item in enumerate(loras):
        path, weight = item if isinstance(item, tuple) else parse_lora_spec(item)
        name = f"{prefix}{i}"
        remove_adapters(pipe.unet, [name])
        load_lora(pipe.unet, path, name, allow_pickle=allow_pickle, plain_only=plain_only)
        if name in getattr(pipe.unet, "peft_config", {}):
            weights[name] = check_weight(weight, shown(getattr(path, "path", path)))
    return weights


def _model_parts(pipe, lora: LoraFile, parts, only_merged: bool):
    """(model, {path: update}) per part of `lora` that `pipe` applies by merging."""
    for part in parts:
        modules = lora.part(part)
        if part == "unet":
            modules = for_unet(lora, pipe.unet).part("unet")
        if only_merged and part == "unet":
            modules = {n: m for n, m in modules.items() if not m.is_plain_lora}
        if modules:
            yield part_of(pipe, part), modules


@contextlib.contextmanager
def merged_updates(pipe, loras: list[tuple[LoraFile, float]], parts=("text_encoder", "text_encoder_2"),
                   only_merged: bool = False):
    """Add the updates of `loras` (each at its weight) in `parts` of `pipe` to the weights for the block.

    Every kind is applied by its own math (`Update.merged`: DoRA's rescale exactly, bias updates included);
    several files apply in the order given. The original weights and biases are put back, bit for bit, on the
    way out. With `only_merged`, UNet modules that are plain LoRAs are skipped (they run as adapters).
    Yields how many layers changed.
    """
    saved = {}
    try:
        for lora, w in loras:
            if w == 0:
                continue
            for model, modules in _model_parts(pipe, lora, parts, only_merged):
                layers = dict(model.named_modules())
                for name, m in modules.items():
                    layer = find_layer(model, name, layers)
                    if layer is not None and id(layer) not in saved:
                        saved[id(layer)] = (layer, layer.weight.detach().clone(),
                                            None if getattr(layer, "bias", None) is None else layer.bias.detach().clone())
                fuse_into(model, modules, w, layers)
        yield len(saved)
    finally:
        with torch.no_grad():
            for layer, weight, bias in saved.values():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)


class _TextEncoders:
    """A stand-in pipeline that holds only a text encoder, for `merged_updates`."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder


def text_encoder_loras(text_encoder, loras: list[tuple[LoraFile, float]]):
    """Apply the text-encoder parts of `loras` (each at its weight) to `text_encoder` for the duration of the block.

    The text encoder runs once per prompt, so its LoRA is added to the weights (`W + w * ΔW`, the same numbers a
    LoRA layer computes; DoRA by its rescale) rather than wrapped in adapter layers; the original weights are
    put back, bit for bit, on the way out. LoRAs without a text-encoder part change nothing.
    """
    return merged_updates(_TextEncoders(text_encoder), loras, parts=("text_encoder",))


def fuse_into(model, modules: dict[str, Update], weight: float, layers: dict | None = None) -> int:
    """Apply `weight` x each module's update to `model`'s weights in place (`Update.merged`; biases too).

    `modules` are keyed by path inside `model`. Returns how many layers changed. The sum is done in fp32,
    and a result that is not finite in the layer's precision is refused before anything is written.
    """
    layers = dict(model.named_modules()) if layers is None else layers
    for name, m in modules.items():
        layer = find_layer(model, name, layers)
        problem = "it does not exist in this model" if layer is None else _misfit(name, m, layer)
        if problem:
            raise LoRAError(f"The LoRA cannot be applied at {shown(name)}: {problem}.")
        new_weight = m.merged(layer.weight, weight).to(layer.weight.dtype) if m.has_weight_update or m.dora_scale \
            is not None else None
        new_bias = m.merged_bias(layer.bias, weight).to(layer.bias.dtype) if m.bias is not None else None
        for t in (new_weight, new_bias):
            if t is not None and not torch.isfinite(t).all():
                raise LoRAError(f"The LoRA's update at {shown(name)} overflows {str(t.dtype).replace('torch.', '')} at "
                                f"weight {weight:g}; lower the weight.")
        with torch.no_grad():
            if new_weight is not None:
                layer.weight.copy_(new_weight)
            if new_bias is not None:
                layer.bias.copy_(new_bias)
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
    files = [(path, read_lora_file(path, allow_pickle), check_weight(w, shown(path))) for path, w in pairs]
    pipe = load_pipeline(model, device="cpu", dtype="fp32", allow_pickle=allow_pickle)
    parts = family_of(pipe).part_names()  # unet, text_encoder (and SDXL's text_encoder_2)
    layers = dict.fromkeys(parts, 0)
    for path, lora, w in files:
        check_family(pipe, lora, shown(path))
        lora = for_unet(lora, pipe.unet)
        for part in parts:
            check_fits(getattr(pipe, part), lora, shown(path), part)
        for part in parts:
            layers[part] += fuse_into(getattr(pipe, part), lora.part(part), w)
    for part in parts:  # never write a tensor that is not finite in the file's precision
        for key, t in getattr(pipe, part).state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t.to(dtypes[dtype])).all():
                raise LoRAError(f"The fused {part} overflows {dtype} at {shown(key)}; nothing was written. Lower the "
                                "LoRA weights, or write --dtype fp32.")
    meta = {"morphkit.fused_from": Path(str(model)).name if Path(str(model)).exists() else str(model),
            "morphkit.fused_loras": json.dumps([[Path(p).name, w] for p, _, w in files])}
    save_single_file(pipe, out, dtypes[dtype], overwrite=overwrite, metadata=meta)
    return FuseResult(out, layers)
