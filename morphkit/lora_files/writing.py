"""Writing LoRA files: kohya (the default; every tool loads it) or diffusers, with headers that help and do not leak.

- **kohya**: ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, ``lora_te_`` for the text
  encoder, and the ``ss_*`` / ``modelspec.*`` header entries kohya's trainer writes and A1111 and civitai show.
  SDXL files name the UNet in the original (LDM) layout (``lora_unet_input_blocks_4_1_...``) and the text
  encoders ``lora_te1_`` / ``lora_te2_``, as kohya's SDXL trainer does: the model family decides
  (`morphkit.families`).
- **diffusers**: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` and PEFT's config under ``lora_adapter_metadata``.
  The text encoder's target modules and patterns are written without transformers 4's ``text_model.`` wrapper
  (``encoder.layers.0.self_attn.q_proj``), a '.'-suffix of the module's name under transformers 4 and its
  whole name under transformers 5, so stock diffusers loads the file under both.

No header holds an absolute path: file and folder names are reduced to their last part. Nothing non-finite
is ever written.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import LoRAError
from ..io import atomic_write, check_can_write
from .names import PARTS, is_ldm_path, kohya_module_name, shown
from .reading import DIFFUSERS_METADATA_KEY, read_lora_file
from .updates import LoraFile, LoraModule, nearest_lora

FORMATS = ("kohya", "diffusers")
# UNet modules outside the blocks kohya's sd-scripts wraps (Transformer2DModel, ResnetBlock2D, Down/Upsample2D):
# it loads a kohya file without them, saying so only at INFO level.
KOHYA_DROPPED = ("conv_in", "conv_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding")


class LoraCompatibilityWarning(UserWarning):
    """A LoRA file that some tools will not apply fully (or a training run that will produce one)."""


DIFFUSERS_FORMAT_WARNING = (
    "A diffusers-format LoRA loads in diffusers and morphkit only: ComfyUI applies its non-attention layers alone and "
    "ignores its alpha, and A1111 does not apply it at all. Write kohya format for those tools (the default: --format kohya in train, --to kohya in lora convert and lora mix).")


# ---------------------------------------------------------------------------------------------- checks

def kohya_dropped_targets(targets) -> list[str]:
    """The training targets whose modules kohya's sd-scripts leaves out when it loads a kohya-format file."""
    return [t for t in targets if t.split(".")[0] in KOHYA_DROPPED and not t.startswith(("down_blocks", "up_blocks"))]


def warn_kohya_dropped(targets) -> list[str]:
    """Warn (`LoraCompatibilityWarning`) when `targets` include modules that kohya-format tools drop."""
    dropped = kohya_dropped_targets(targets)
    if dropped:
        warnings.warn(f"The targets {', '.join(dropped)} adapt modules outside the UNet's blocks (conv_in, conv_out, "
                      "time_embedding). kohya's sd-scripts skips them when it loads a kohya-format LoRA, and says so only "
                      "in an INFO line; A1111, ComfyUI, diffusers and morphkit apply them.",
                      LoraCompatibilityWarning, stacklevel=3)
    return dropped


def check_finite(tensors: dict[str, torch.Tensor], out) -> None:
    """Refuse to write a file that would hold NaN or infinite values."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoRAError(f"The result would hold NaN or infinite values (at {shown(key)}), so {shown(out)} was not "
                            "written. One of the inputs overflows at these weights.")


# ---------------------------------------------------------------------------------------------- tensors

def kohya_name(name: str, family=None, unet_config=None) -> str:
    """A canonical module name (`unet.<path>`, `text_encoder_2.<path>`) as `family`'s kohya files spell it: SD 1.x
    (the default) keeps diffusers' block names and `lora_te_`; SDXL names the UNet in the LDM layout (from
    `unet_config`, SDXL base's by default) and the text encoders `lora_te1_` / `lora_te2_`."""
    if family is None:
        return kohya_module_name(name)
    part, _, path = name.partition(".")
    if part == "unet":
        if not is_ldm_path(path):
            path = family.kohya_unet_name(path, unet_config or family.unet_config())
        return "lora_unet_" + path.replace(".", "_")
    if part not in family.part_names():
        raise LoRAError(f"A {family.label} LoRA has no part {shown(part)!r}; its parts are "
                        f"{', '.join(family.part_names())}.")
    return family.kohya_prefix(part) + path.replace(".", "_")


def kohya_state_dict(lora: LoraFile, family=None, unet_config=None) -> dict[str, torch.Tensor]:
    """kohya keys and tensors of a plain LoRA, named for `family` (see `kohya_name`; default SD 1.x's names)."""
    out = {}
    for name, m in _plain(lora).items():
        k = kohya_name(name, family, unet_config)
        out[f"{k}.lora_down.weight"] = m.down.contiguous()
        out[f"{k}.lora_up.weight"] = m.up.contiguous()
        out[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        if m.dora_scale is not None:  # one magnitude per output channel: (out, 1), LyCORIS' wd_on_out layout
            out[f"{k}.dora_scale"] = m.dora_scale.reshape(-1, 1).contiguous()
    return out


def diffusers_names(lora: LoraFile, family=None, unet_config=None) -> LoraFile:
    """`lora` with UNet modules named in the LDM layout (an SDXL kohya file's, ComfyUI's) renamed to diffusers' block
    names for `family` (by default the one the file says it was made for; from `unet_config`, or the family's base
    UNet), which is all diffusers loads. Without a family, or with diffusers names already, `lora` as it is."""
    from .inspect import family_of_lora
    from .names import ldm_unet_names, unet_path_for

    family = family or family_of_lora(lora)
    if family is None or not any(is_ldm_path(p) for p in lora.part("unet")):
        return lora
    names = ldm_unet_names(unet_config or family.unet_config())
    modules = {(f"unet.{unet_path_for(n.partition('.')[2], names)}" if n.startswith("unet.") else n): m
               for n, m in lora.modules.items()}
    return LoraFile(modules, lora.metadata, lora.format, lora.path)


def diffusers_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in _plain(lora).items():
        out[f"{name}.lora_A.weight"] = m.down.contiguous()
        out[f"{name}.lora_B.weight"] = m.up.contiguous()
        if m.dora_scale is not None:  # PEFT's DoRA magnitude: one entry per output channel
            out[f"{name}.lora_magnitude_vector"] = m.dora_scale.reshape(-1).contiguous()
    return out


def _writable(m) -> bool:
    """Plain LoRA factors, with a DoRA magnitude per output channel or none (what PEFT's DoRA trains)."""
    if m.is_plain_lora:
        return True
    out = m.up.shape[0] if isinstance(m, LoraModule) else None
    return (isinstance(m, LoraModule) and m.mid is None and m.bias is None and m.dora_scale is not None
            and m.dora_scale.numel() == out)


def _plain(lora: LoraFile) -> dict[str, LoraModule]:
    if not all(_writable(m) for m in lora.modules.values()):
        kinds = sorted({m.label for m in lora.modules.values() if not _writable(m)})
        raise LoRAError(f"Only plain LoRA factors can be written in kohya or diffusers format; this LoRA holds "
                        f"{', '.join(kinds)} modules. `morphkit lora convert` turns them into the nearest LoRA.")
    return lora.modules


def _pattern_key(part: str, path: str) -> str:
    return path.removeprefix("text_model.") if part.startswith("text_encoder") else path


def peft_metadata(lora: LoraFile, part: str = "unet") -> dict:
    """The PEFT LoraConfig of one part, as diffusers stores it: the common rank and alpha, patterns for the rest.
    Text-encoder module names are written so that they match under transformers 4 and 5 alike."""
    modules = {_pattern_key(part, p): m for p, m in lora.part(part).items()}
    if not modules:
        return {}
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {p: m.rank for p, m in sorted(modules.items()) if m.rank != rank},
        "alpha_pattern": {p: m.alpha for p, m in sorted(modules.items()) if m.alpha != alpha},
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": any(m.dora_scale is not None for m in modules.values()),
        "use_rslora": False,
    }
    return {f"{part}.{k}": v for k, v in config.items()}


def lora_from_peft(state_dict: dict[str, torch.Tensor], peft_config: dict) -> LoraFile:
    """A `LoraFile` from a PEFT state dict with part prefixes (`unet.`, `text_encoder.`, `text_encoder_2.`) and
    its config with the same prefixes (`lora.adapter_metadata`)."""
    from .reading import _group, build_update, diffusers_config

    metadata = {DIFFUSERS_METADATA_KEY: json.dumps(peft_config, default=str)}
    configs = {part: diffusers_config("the adapter", metadata, part) for part in PARTS
               if any(k.startswith(part + ".") for k in state_dict)}
    groups = _group("the adapter", state_dict, "diffusers")
    return LoraFile({n: build_update("the adapter", n, g, configs) for n, g in groups.items()})


def lora_from_peft_parts(parts: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> LoraFile:
    """A `LoraFile` from the PEFT adapters of several model parts, for writing in any format (the trainer's way
    to kohya SDXL files): `{"unet": (state dict, config), "text_encoder": (...), "text_encoder_2": (...)}`, each
    state dict as `peft.utils.get_peft_model_state_dict(model, adapter_name=...)` gives it (keys with or without
    the part prefix) and each config `model.peft_config[adapter_name].to_dict()` (rank, alpha and patterns).
    Then `save_lora_file(path, lora, "kohya", family=SDXL, unet_config=pipe.unet.config)` or
    `kohya_state_dict(lora, SDXL, unet.config)`."""
    return lora_from_peft(*prefixed_peft_state(parts))


def prefixed_peft_state(parts: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> tuple[dict, dict]:
    """The PEFT state dicts and configs of several model parts (as `lora_from_peft_parts` takes them) as one state
    dict and one config with diffusers' part prefixes (`unet.`, `text_encoder.`, ...): fp32 tensors on the CPU."""
    tensors, header = {}, {}
    for part, (state, config) in parts.items():
        tensors.update({k if k.startswith(part + ".") else f"{part}.{k}": v.detach().float().cpu().contiguous()
                        for k, v in state.items()})
        header.update({f"{part}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()})
    return tensors, header


# ---------------------------------------------------------------------------------------------- headers

def _is_local_path(value: str) -> bool:
    """An absolute path (POSIX, `~`, Windows or UNC) without spaces, or any path that exists here."""
    absolute = value.startswith(("/", "~", "\\\\")) or bool(re.match(r"[A-Za-z]:[\\/]", value))
    if ("/" not in value and "\\" not in value) or len(value) > 4096:
        return False
    return (absolute and not any(c.isspace() for c in value)) or os.path.exists(os.path.expanduser(value))


def _basename(value: str) -> str:
    return Path(value.replace("\\", "/").rstrip("/")).name or value


def without_paths(value):
    """`value` (a JSON-like structure) with every local path reduced to its last part: names, never locations."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return _basename(value)
    return value


def clean_header(header: dict[str, str]) -> dict[str, str]:
    """Every header value with local paths reduced to names (JSON values are cleaned inside too)."""
    out = {}
    for key, value in header.items():
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            out[key] = json.dumps(without_paths(parsed), sort_keys=True)
        else:
            out[key] = without_paths(value)
    return out


def tag_frequency(captions_by_image, dataset: str = "data") -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {dataset name: {tag: images whose caption has it}}, tags split at commas."""
    counts: Counter = Counter()
    for captions in captions_by_image:
        counts.update({t.strip() for c in captions for t in str(c).split(",") if t.strip()})
    return {_basename(str(dataset)) or "data": dict(sorted(counts.items()))}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_header(lora: LoraFile, info: dict | None = None, family=None, unet_config=None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` header entries kohya's trainer writes and A1111/civitai show."""
    from .inspect import describe

    info = info or {}
    modules = _plain(lora)
    linear = [m for m in modules.values() if m.down.dim() == 2 or m.down.shape[2:] == (1, 1)]
    conv = [m for m in modules.values() if m.down.dim() == 4 and m.down.shape[2:] != (1, 1)]
    common = lambda values: Counter(values).most_common(1)[0][0]  # noqa: E731
    base = describe(lora)["base"]
    if family is not None and base not in family.lora_bases:  # the layers do not tell (a tiny model's LoRA)
        base = family.label
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(common(m.rank for m in (linear or conv))),
        "ss_network_alpha": _num(common(m.alpha for m in (linear or conv))),
        "ss_base_model_version": "sdxl_base_v1-0" if base == "SDXL" else "sd_v2" if base == "SD 2.x" else "sd_v1",
        "ss_v2": str(base == "SD 2.x"),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if base == "SDXL" else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "diffusers",
    }
    if conv:
        args = {"conv_dim": str(common(m.rank for m in conv)), "conv_alpha": _num(common(m.alpha for m in conv))}
        header["ss_network_args"] = json.dumps(args)
    if not lora.part("text_encoder") and not lora.part("text_encoder_2"):
        header["ss_network_train_unet_only"] = "True"
    for field, values in (("rank_pattern", {n: m.rank for n, m in modules.items()}),
                          ("alpha_pattern", {n: m.alpha for n, m in modules.items()})):
        if len(set(values.values())) > 1:  # where they vary, per module (kohya names)
            header[f"morphkit.{field}"] = json.dumps({kohya_name(n, family, unet_config): v
                                                      for n, v in sorted(values.items())})
    rename = {"base_model": "ss_sd_model_name", "steps": "ss_max_train_steps", "resolution": "ss_resolution",
              "seed": "ss_seed", "learning_rate": "ss_learning_rate", "lr_scheduler": "ss_lr_scheduler",
              "name": "modelspec.title", "num_images": "ss_num_train_images", "noise_offset": "ss_noise_offset",
              "created": "modelspec.date", "tag_frequency": "ss_tag_frequency"}
    for key, target in rename.items():
        if info.get(key) is not None:
            value = info[key]
            header[target] = value if isinstance(value, str) else json.dumps(value)
    if info.get("name") is not None:
        header["ss_output_name"] = str(info["name"])
    if info.get("resolution") is not None:
        header["modelspec.resolution"] = f"{info['resolution']}x{info['resolution']}"
    return header


# ---------------------------------------------------------------------------------------------- files

def save_lora_file(path: str | os.PathLike, lora: LoraFile, format: str = "kohya", info: dict | None = None,
                   overwrite: bool = False, family=None, unet_config=None) -> Path:
    """Write `lora` (plain LoRA factors) atomically in `format`, with the header that format's users expect.

    `family` (`morphkit.families`; by default the one the LoRA says it was made for, else SD 1.x) decides the
    kohya names: SDXL's are LDM-layout UNet names (from `unet_config`, SDXL base's by default) and
    `lora_te1_` / `lora_te2_`.

    `info` is morphkit's training record: stored under `morphkit.<key>` in both formats, and also as
    kohya's `ss_*` keys in a kohya file. The metadata the file was read with is kept (minus entries the
    other format would misread). Writing `diffusers` warns (`LoraCompatibilityWarning`) that A1111 and
    ComfyUI will not apply it fully.
    """
    if format not in FORMATS:
        raise LoRAError(f"Unknown LoRA format {shown(format)!r}; choose one of {', '.join(FORMATS)}.")
    path = check_can_write(path, overwrite, "LoRA file")
    header = {k: v for k, v in lora.metadata.items() if k != DIFFUSERS_METADATA_KEY and not k.startswith("ss_")}
    header.update(info_header(info))
    from .inspect import family_of_lora

    family = family or family_of_lora(lora)
    if format == "kohya":
        header.update({k: v for k, v in lora.metadata.items() if k.startswith("ss_")})
        header.update(kohya_header(lora, info, family, unet_config))
        tensors = kohya_state_dict(lora, family, unet_config)
    else:
        lora = diffusers_names(lora, family, unet_config)
        config = {**peft_metadata(lora, "unet"), **peft_metadata(lora, "text_encoder"),
                  **peft_metadata(lora, "text_encoder_2")}
        header[DIFFUSERS_METADATA_KEY] = json.dumps(config, sort_keys=True)
        if family is not None:  # what the file is for, in the header key kohya and civitai use (read by made_for)
            header.setdefault("modelspec.architecture", kohya_header(lora, None, family)["modelspec.architecture"])
        tensors = diffusers_state_dict(lora)
        warnings.warn(DIFFUSERS_FORMAT_WARNING, LoraCompatibilityWarning, stacklevel=2)
    header["format"] = "pt"
    check_finite(tensors, path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=clean_header(header))
    return path


def info_header(info: dict | None) -> dict[str, str]:
    """morphkit's training record as `morphkit.<key>` header entries (strings; other values as JSON)."""
    return {f"morphkit.{k}": v if isinstance(v, str) else json.dumps(v, default=str)
            for k, v in (info or {}).items() if v is not None}


def kernel_of(name: str, update, flat_width: int):
    """The weight shape's tail (in, kh, kw) or (in,) for a layer, when the file stores it flattened.

    UNet 3x3 convolutions (`conv1`, `conv2`, `conv_in`, `conv_out`, the down/upsamplers' `conv`) are recognised by
    name; everything else is taken as a linear layer (a 1x1 convolution reads 2-D factors the same way)."""
    leaf = name.rpartition(".")[2]
    if name.startswith("unet.") and leaf in ("conv1", "conv2", "conv_in", "conv_out", "conv", "op") and flat_width % 9 == 0:
        return (flat_width // 9, 3, 3)
    return (flat_width,)


def _weight_shape(name: str, update) -> tuple[int, ...]:
    d = update.delta()
    return tuple(d.shape) if d.dim() != 2 else (d.shape[0], *kernel_of(name, update, d.shape[1]))


def to_plain_lora(lora: LoraFile, rank: int | None = None, model=None) -> tuple[LoraFile, float, tuple | None]:
    """`lora` with every non-LoRA module replaced by its nearest rank-`rank` LoRA (SVD); (file, energy lost, worst).

    Plain LoRAs are kept bit for bit. LoCon's Tucker form keeps all its energy (its rank is the module's). Other kinds go through the SVD of
    their update, to `rank` or (by default) the module's own rank (LoHa and LoKr: their dimension); the share of
    ‖ΔW‖² dropped is reported. DoRA updates need the base `model` (a pipeline) to exist at all.
    """
    from .merging import weight_of

    modules, total, lost, worst = {}, 0.0, 0.0, None
    for name, m in lora.modules.items():
        if m.is_plain_lora and (rank is None or m.rank <= rank):
            modules[name] = m
            continue
        if not m.has_weight_update:
            raise LoRAError(f"{lora.where()} updates only the bias of {shown(name)}; kohya and diffusers LoRA files "
                            "cannot hold that. Use the file as it is (stylize, lora fuse) instead.")
        if m.bias is not None:
            raise LoRAError(f"{lora.where()} updates the bias of {shown(name)} too (diff_b); kohya and diffusers LoRA "
                            "files cannot hold that. Use the file as it is (stylize, lora fuse) instead.")
        if m.dora_scale is not None:
            if model is None:
                raise LoRAError(f"{lora.where()} is a DoRA LoRA: its update rescales the base model's weights, so it "
                                "exists only against that model. Pass the base model (--model) to convert it.")
            weight = weight_of(model, name)
            m = LoraModule(*_dense_as_factors(m.merged(weight) - weight.float()), 1.0)
            shape = tuple(weight.shape)
        else:
            shape = tuple(weight_of(model, name).shape) if model is not None else _weight_shape(name, m)
        target = rank or getattr(m, "rank", None) or min(shape[0], math.prod(shape[1:]))
        modules[name], energy, dropped = nearest_lora(m, target, shape)
        total, lost = total + energy, lost + dropped
        if energy > 0 and (worst is None or dropped / energy > worst[1]):
            worst = (name, dropped / energy)
    return LoraFile(modules, dict(lora.metadata), lora.format, lora.path), (lost / total if total else 0.0), worst


def _dense_as_factors(delta: torch.Tensor):
    from .updates import identity_factors

    up, down = identity_factors(delta)
    return down.reshape(down.shape[0], *delta.shape[1:]), up.reshape(up.shape[0], up.shape[1], *[1] * (delta.dim() - 2))


def convert_lora(src: str | os.PathLike, dst: str | os.PathLike, to: str = "kohya", overwrite: bool = False,
                 allow_pickle: bool = False, rank: int | None = None, model=None) -> Path:
    """`convert_lora_report`, returning only the path written."""
    return convert_lora_report(src, dst, to, overwrite, allow_pickle, rank, model).path


def convert_lora_report(src: str | os.PathLike, dst: str | os.PathLike, to: str = "kohya", overwrite: bool = False,
                        allow_pickle: bool = False, rank: int | None = None, model=None):
    """Rewrite a LoRA file in kohya or diffusers format; returns `ConvertResult`.

    Plain LoRA factors are copied bit for bit, alpha moving between kohya's `.alpha` tensors and diffusers'
    header. LoHa, LoKr, Tucker LoCon, DoRA and full differences become their nearest LoRA (`to_plain_lora`),
    with the energy lost reported. `model`: the base pipeline, needed for DoRA.
    """
    from .merging import ConvertResult

    if rank is not None and rank < 1:
        raise LoRAError(f"--rank must be at least 1, not {rank}.")
    check_can_write(dst, overwrite, "LoRA file")
    lora = read_lora_file(src, allow_pickle)
    plain, lost, worst = to_plain_lora(lora, rank, model)
    path = save_lora_file(dst, plain, to, overwrite=overwrite)
    return ConvertResult(Path(path), lora.kinds, lost, worst, exact=lora.all_plain)

