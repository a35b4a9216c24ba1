"""LoRA files in the formats people have: reading them safely, converting, inspecting, mixing.

Two formats are spoken, and both are read into one plain form, `LoraFile`: for each adapted module
(named `unet.<diffusers module path>` or `text_encoder.<path>`) a down factor A, an up factor B and an
alpha; the module's update is ``(alpha / rank) * B @ A``.

- **diffusers** (what diffusers' training scripts and PEFT write): ``unet.<path>.lora_A.weight`` and
  ``.lora_B.weight``; rank and alpha in the header entry ``lora_adapter_metadata`` (PEFT's LoraConfig),
  alpha = rank when it is missing.
- **kohya** (kohya sd-scripts, A1111, ComfyUI, civitai): ``lora_unet_<path with '_' for '.'>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; ``lora_te_`` for the text encoder; training notes in ``ss_*`` header keys.

Reading never runs code: only safetensors unless the caller allows pickles, and then
``torch.load(weights_only=True)``. Every file is checked before use: finite numbers, factors whose
shapes agree, a positive alpha, and content that is what the file name says.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LoRAError
from .io import atomic_write, check_can_write
from .models import PICKLE_SUFFIXES

FORMATS = ("kohya", "diffusers")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PART_TO_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

# Names in diffusers' UNet and transformers' CLIP text encoder that contain '_'. A kohya key replaces
# every '.' of the module path by '_'; these are the words that must be put back together.
_COMPOUND_NAMES = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k",
    "to_v", "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out",
    "class_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection", "norm_out",
    "conv_act", "time_proj", "encoder_hid_proj",
    "input_blocks", "output_blocks", "middle_block",  # the original (LDM) layout, used by SDXL kohya files
}
_MAX_COMPOUND = max(len(n.split("_")) for n in _COMPOUND_NAMES)


def kohya_module_name(module: str) -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    part, _, path = module.partition(".")
    if part not in PART_TO_KOHYA:
        raise LoRAError(f"No kohya name for a LoRA on {part!r}; kohya files name the unet and text encoders only.")
    return PART_TO_KOHYA[part] + path.replace(".", "_")


def module_from_kohya(name: str) -> str:
    """`lora_unet_down_blocks_0_attentions_0_proj_in` -> `unet.down_blocks.0.attentions.0.proj_in`.

    A kohya name lost the difference between '.' and '_'; it is rebuilt by reading the longest known
    compound word (`down_blocks`, `to_out`, `proj_in`, ...) at each position, a '.' everywhere else.
    """
    for prefix, part in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            break
    else:
        raise LoRAError(f"{name!r} is not a kohya LoRA module name (no lora_unet_ or lora_te_ prefix).")
    tokens = name[len(prefix):].split("_")
    words, i = [], 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + _MAX_COMPOUND), i + 1, -1):
            if "_".join(tokens[i:j]) in _COMPOUND_NAMES:
                words.append("_".join(tokens[i:j]))
                i = j
                break
        else:
            words.append(tokens[i])
            i += 1
    return part + "." + ".".join(words)


@dataclass
class LoraModule:
    """One adapted layer: update = (alpha / rank) * up @ down (conv factors flattened)."""

    down: torch.Tensor  # A: [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # B: [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update in the layer's own weight shape, fp32."""
        down, up = self.down.float(), self.up.float()
        flat = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if down.dim() == 4:
            return (self.scale * flat).reshape(up.shape[0], *down.shape[1:])
        return self.scale * flat


@dataclass
class LoraFile:
    modules: dict[str, LoraModule]  # `unet.<path>` / `text_encoder.<path>` -> factors
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"
    path: Path | None = None  # where it was read from, for messages

    def part(self, name: str) -> dict[str, LoraModule]:
        """The modules of one model part (`unet`, `text_encoder`), keyed by their path inside it."""
        return {k.partition(".")[2]: m for k, m in self.modules.items() if k.partition(".")[0] == name}


# ---------------------------------------------------------------------------------------------- reading


def _sniff(path: Path) -> str:
    """What a file's first bytes say it is."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip archive (pickle)"
    if head[:1] == b"\x80":
        return "a pickle"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8"):
        return "an image"
    if not head:
        return "empty"
    return "unknown"


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False, what: str = "LoRA file"):
    """Read a tensor file without running code: (tensors, header metadata). Raises `LoRAError` on anything odd."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoRAError(f"The {what} {path} does not exist.")
    kind = _sniff(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoRAError(
                f"{path} is a pickled {what} ({path.suffix}). Unpickling can run arbitrary code, so morphkit refuses "
                "it by default. Convert it to .safetensors where you trust it, or pass --allow-pickle if you trust "
                "its source: it is then read with torch.load(weights_only=True), which accepts tensors only.")
        return _read_pickle(path, what), {}
    if kind != "safetensors":
        if kind == "empty":
            raise LoRAError(f"{path} is empty, so it is not a {what}. Re-download or re-create it.")
        advice = {"a pickle": " A pickle renamed to .safetensors can run code when loaded elsewhere: do not trust it.",
                  "a PyTorch zip archive (pickle)": " A pickle renamed to .safetensors can run code when loaded "
                  "elsewhere: do not trust it."}.get(kind, "")
        said = f"its content is {kind}" if kind != "unknown" else "its content is not safetensors"
        raise LoRAError(f"{path} is not a safetensors {what}: {said}.{advice}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoRAError(f"{path} is a damaged safetensors {what} (truncated or corrupt: "
                        f"{str(e).splitlines()[0][:200]}). Re-download or re-create it.") from None
    return tensors, metadata


def _read_pickle(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's notice about the pickle protocol is not for the user
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoRAError(f"{path} could not be read as a {what} with torch.load(weights_only=True): "
                        f"{str(e).splitlines()[0][:200]}. A file that needs more than tensors to load is refused.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoRAError(f"{path} does not hold a plain dict of tensors, so it is not a {what}.")
    return obj


def _check_finite(path, tensors: dict[str, torch.Tensor]):
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoRAError(f"{path} holds NaN or infinite values in {key}; the LoRA is broken (often a training run "
                            "that diverged in fp16). It was not loaded.")


def detect_format(tensors: dict[str, torch.Tensor]) -> str:
    keys = list(tensors)
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        if any(k.endswith((".hada_w1_a", ".lokr_w1", ".hada_w1_b", ".lokr_w1_a")) for k in keys):
            return "lycoris"
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(".lora.down." in k or ".lora.up." in k or "_lora.down." in k for k in keys):
        return "diffusers-old"
    return "unknown"


def read_lora_file(path: str | os.PathLike, allow_pickle: bool = False) -> LoraFile:
    """Read and check a LoRA file in kohya or diffusers format."""
    tensors, metadata = read_tensors(path, allow_pickle)
    _check_finite(path, tensors)
    fmt = detect_format(tensors)
    if fmt == "kohya":
        modules = _modules_from_kohya(path, tensors)
    elif fmt == "diffusers":
        modules = _modules_from_diffusers(path, tensors, metadata)
    elif fmt == "lycoris":
        raise LoRAError(f"{path} is a LyCORIS file (LoHa/LoKr factors), not a LoRA; morphkit reads plain LoRAs only.")
    elif fmt == "diffusers-old":
        raise LoRAError(f"{path} uses the old diffusers attention-processor LoRA layout (`.lora.down.` keys). Load "
                        "it once with diffusers' load_lora_weights and save it again, or convert it, to use it here.")
    else:
        raise LoRAError(f"{path} holds no LoRA weights morphkit knows (keys like 'unet.<module>.lora_A.weight' or "
                        "'lora_unet_<module>.lora_down.weight'); it is not a LoRA file.")
    if not modules:
        raise LoRAError(f"{path} holds no LoRA factors.")
    return LoraFile(modules, metadata, fmt, Path(path))


def _pair(path, name: str, down, up, alpha) -> LoraModule:
    if down is None or up is None:
        raise LoRAError(f"{path} is incomplete: module {name} has a {'down' if up is None else 'up'} factor but no "
                        f"{'up' if up is None else 'down'} factor.")
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
        raise LoRAError(f"{path} has factors whose shapes contradict each other at {name}: down {tuple(down.shape)}, "
                        f"up {tuple(up.shape)} (the up factor's second dimension must equal the rank, the down "
                        "factor's first).")
    if alpha is None:
        alpha = float(down.shape[0])
    if not (alpha > 0 and alpha == alpha and alpha != float("inf")):
        raise LoRAError(f"{path} has alpha {alpha} at {name}; alpha must be a positive number.")
    return LoraModule(down, up, float(alpha))


def _modules_from_kohya(path, tensors) -> dict[str, LoraModule]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, leaf = key.partition(".")
        if not name.startswith(tuple(KOHYA_PREFIXES)):
            raise LoRAError(f"{path} mixes kohya keys with other keys ({key}); it is not a LoRA file morphkit reads.")
        slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(leaf)
        if slot is None:
            raise LoRAError(f"{path} has a kohya key of a kind morphkit does not know: {key} (DoRA and LyCORIS "
                            "extras are not supported).")
        if slot == "alpha" and t.numel() != 1:
            raise LoRAError(f"{path}: {key} must hold one number, not a tensor of shape {tuple(t.shape)}.")
        groups.setdefault(name, {})[slot] = t.float().item() if slot == "alpha" else t
    return {module_from_kohya(n): _pair(path, n, g.get("down"), g.get("up"), g.get("alpha"))
            for n, g in groups.items()}


def _peft_alpha_rank(metadata: dict, part: str):
    """(alpha, r, alpha_pattern, rank_pattern) of one part from the diffusers header, or Nones."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None, None, {}, {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoRAError(f"The {DIFFUSERS_METADATA_KEY} header entry is not valid JSON.") from None
    p = part + "."
    if any(k.startswith(p) for k in config):
        config = {k[len(p):]: v for k, v in config.items() if k.startswith(p)}
    return (config.get("lora_alpha"), config.get("r"), config.get("alpha_pattern") or {},
            config.get("rank_pattern") or {})


def _pattern_value(patterns: dict, path: str):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _modules_from_diffusers(path, tensors, metadata) -> dict[str, LoraModule]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        for slot, marker in (("down", ".lora_A."), ("up", ".lora_B.")):
            if marker in key:
                name = key.split(marker)[0]
                break
        else:
            continue  # e.g. a text encoder's `.alpha` or unrelated extras
        if "." not in name or name.partition(".")[0] not in PART_TO_KOHYA:
            name = "unet." + name  # PEFT keys saved without the part prefix
        groups.setdefault(name, {})[slot] = t
    modules = {}
    for name, g in groups.items():
        part, _, inner = name.partition(".")
        alpha, r, alpha_pattern, rank_pattern = _peft_alpha_rank(metadata, part)
        a = _pattern_value(alpha_pattern, inner)
        a = alpha if a is None else a  # None: alpha = rank, as diffusers assumes without a header
        declared = _pattern_value(rank_pattern, inner) or r
        if declared is not None and g.get("down") is not None and declared != g["down"].shape[0]:
            raise LoRAError(f"{path}: the header says rank {declared} for {name}, but its factors have rank "
                            f"{g['down'].shape[0]}; the file contradicts itself.")
        modules[name] = _pair(path, name, g.get("down"), g.get("up"), a)
    return modules


def lora_from_peft(state_dict: dict[str, torch.Tensor], peft_config: dict) -> LoraFile:
    """A `LoraFile` from a PEFT state dict with `unet.` keys and its config (`lora.adapter_metadata`)."""
    return LoraFile(_modules_from_diffusers("the adapter", state_dict, {DIFFUSERS_METADATA_KEY: json.dumps(peft_config)}))


# ---------------------------------------------------------------------------------------------- inspecting

_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def describe(lora: LoraFile) -> dict:
    """What a LoRA is: format, the base architecture it was made for, ranks, alphas, targets, header."""
    unet, te = lora.part("unet"), {**lora.part("text_encoder"), **lora.part("text_encoder_2")}
    base = "unknown"
    if any(n.startswith(("input_blocks", "output_blocks", "middle_block")) for n in unet) or lora.part("text_encoder_2"):
        base = "SDXL"
    else:
        widths = {m.down.shape[1] for n, m in unet.items() if n.endswith("attn2.to_k")}
        widths |= {m.down.shape[1] for n, m in te.items() if n.endswith("self_attn.q_proj")}
        known = [_CONTEXT_WIDTHS[w] for w in widths if w in _CONTEXT_WIDTHS]
        if len(known) == 1:
            base = known[0]
        elif widths:
            base = f"unknown (text width {', '.join(map(str, sorted(widths)))})"
        if base == "SD 1.x" and any("transformer_blocks.1." in n for n in unet):
            base = "SDXL"
    leaves = Counter(_layer_kind(n) for n in lora.modules)
    return {
        "format": lora.format,
        "base": base,
        "modules": len(lora.modules),
        "unet_modules": len(unet),
        "text_encoder_modules": len(te),
        "ranks": dict(sorted(Counter(m.rank for m in lora.modules.values()).items())),
        "alphas": dict(sorted(Counter(m.alpha for m in lora.modules.values()).items())),
        "targets": dict(sorted(leaves.items())),
        "parameters": sum(m.down.numel() + m.up.numel() for m in lora.modules.values()),
        "dtype": str(next(iter(lora.modules.values())).down.dtype).replace("torch.", ""),
        "metadata": dict(sorted(lora.metadata.items())),
    }


def _layer_kind(name: str) -> str:
    """`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` -> `unet attn1.to_q`."""
    part, _, path = name.partition(".")
    m = re.match(r".*\.(?:transformer_blocks|attentions|resnets|layers|downsamplers|upsamplers)\.\d+\.(.+)$", path)
    return f"{part} {m.group(1) if m else path}"


def lora_info(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """`describe` a LoRA file (what `morphkit lora info` prints)."""
    return {"path": str(path), **describe(read_lora_file(path, allow_pickle))}


# ---------------------------------------------------------------------------------------------- writing


def kohya_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora.modules.items():
        k = kohya_module_name(name)
        out[f"{k}.lora_down.weight"] = m.down.contiguous()
        out[f"{k}.lora_up.weight"] = m.up.contiguous()
        out[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return out


def diffusers_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora.modules.items():
        out[f"{name}.lora_A.weight"] = m.down.contiguous()
        out[f"{name}.lora_B.weight"] = m.up.contiguous()
    return out


def peft_metadata(lora: LoraFile, part: str = "unet") -> dict:
    """The PEFT LoraConfig of one part, as diffusers stores it: the common rank and alpha, patterns for the rest."""
    modules = lora.part(part)
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
        "use_dora": False,
        "use_rslora": False,
    }
    return {f"{part}.{k}": v for k, v in config.items()}


def kohya_header(lora: LoraFile, info: dict | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` header entries kohya's trainer writes and A1111/civitai show."""
    info = info or {}
    ranks = Counter(m.rank for m in lora.modules.values())
    alphas = Counter(m.alpha for m in lora.modules.values())
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
    }
    rename = {"base_model": "ss_sd_model_name", "steps": "ss_max_train_steps", "resolution": "ss_resolution",
              "seed": "ss_seed", "learning_rate": "ss_learning_rate", "lr_scheduler": "ss_lr_scheduler",
              "name": "modelspec.title", "num_images": "ss_num_train_images", "noise_offset": "ss_noise_offset",
              "created": "modelspec.date"}
    for key, target in rename.items():
        if info.get(key) is not None:
            value = info[key]
            header[target] = value if isinstance(value, str) else json.dumps(value)
    if not lora.part("text_encoder"):
        header["ss_network_args"] = json.dumps({"unet_only": True})
    return header


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def save_lora_file(path: str | os.PathLike, lora: LoraFile, format: str = "kohya", info: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write `lora` atomically in `format` (`kohya` or `diffusers`), with the header that format's users expect.

    `info` is morphkit's training record: stored under `morphkit.<key>` in both formats, and also as
    kohya's `ss_*` keys in a kohya file. The metadata the file was read with is kept (minus entries
    the other format would misread).
    """
    if format not in FORMATS:
        raise LoRAError(f"Unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}.")
    path = check_can_write(path, overwrite, "LoRA file")
    header = {k: v for k, v in lora.metadata.items() if k != DIFFUSERS_METADATA_KEY and not k.startswith("ss_")}
    for key, value in (info or {}).items():
        header[f"morphkit.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    if format == "kohya":
        header.update({k: v for k, v in lora.metadata.items() if k.startswith("ss_")})
        header.update(kohya_header(lora, info))
        tensors = kohya_state_dict(lora)
    else:
        config = {**peft_metadata(lora, "unet"), **peft_metadata(lora, "text_encoder")}
        header[DIFFUSERS_METADATA_KEY] = json.dumps(config, sort_keys=True)
        tensors = diffusers_state_dict(lora)
    header["format"] = "pt"
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def convert_lora(src: str | os.PathLike, dst: str | os.PathLike, to: str = "kohya", overwrite: bool = False,
                 allow_pickle: bool = False) -> Path:
    """Rewrite a LoRA file in the other format. The factors are copied bit for bit; alpha moves between
    kohya's `.alpha` tensors and diffusers' header."""
    lora = read_lora_file(src, allow_pickle)
    return save_lora_file(dst, lora, to, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- mixing


@dataclass
class MixResult:
    lora: LoraFile
    rank: int | None  # None: exact (ranks concatenated, they vary by module)
    lost_energy: float  # share of the update's squared Frobenius norm dropped by the SVD, over all modules
    worst_module: tuple[str, float] | None  # the module that lost the largest share


def mix_lora_files(inputs: list[tuple[LoraFile, float]], rank: int | None = None) -> MixResult:
    """One LoRA whose update is the weighted sum of the inputs' updates, sum_i w_i * (alpha_i/r_i) B_i A_i.

    Without `rank` the factors are concatenated (rank r_1 + r_2 + ..., exact): A = [A_1; A_2], B =
    [w_1 s_1 B_1, w_2 s_2 B_2], alpha = rank. With `rank`, each module's sum is reduced to its best
    rank-`rank` approximation by an SVD computed on the small core of the factors (QR of both
    factor stacks), never on the full weight; the energy lost is reported.
    """
    if not inputs:
        raise LoRAError("Nothing to mix: give at least one LoRA.")
    if rank is not None and rank < 1:
        raise LoRAError(f"--rank must be at least 1, not {rank}.")
    names = sorted(set().union(*(lf.modules for lf, _ in inputs)))
    modules, total, lost, worst = {}, 0.0, 0.0, None
    for name in names:
        parts = [(lf.modules[name], w) for lf, w in inputs if name in lf.modules]
        first = parts[0][0]
        for m, _ in parts[1:]:
            if m.down.shape[1:] != first.down.shape[1:] or m.up.shape[0] != first.up.shape[0]:
                raise LoRAError(f"The LoRAs cannot be mixed: at {name} one adapts a layer of shape "
                                f"{tuple(first.up.shape[:1]) + tuple(first.down.shape[1:])} and another "
                                f"{tuple(m.up.shape[:1]) + tuple(m.down.shape[1:])}; they were made for different models.")
        down = torch.cat([m.down.float().reshape(m.rank, -1) for m, _ in parts], 0)
        up = torch.cat([m.up.float().reshape(m.up.shape[0], m.rank) * (w * m.scale) for m, w in parts], 1)
        if rank is not None and rank < down.shape[0]:
            q_up, r_up = torch.linalg.qr(up)
            q_down, r_down = torch.linalg.qr(down.T)
            u, s, vh = torch.linalg.svd(r_up @ r_down.T)
            energy = float((s**2).sum())
            dropped = float((s[rank:] ** 2).sum())
            total, lost = total + energy, lost + dropped
            if energy > 0 and (worst is None or dropped / energy > worst[1]):
                worst = (name, dropped / energy)
            up = (q_up @ u[:, :rank]) * s[:rank]
            down = vh[:rank] @ q_down.T
        r = down.shape[0]
        conv = first.down.dim() == 4
        modules[name] = LoraModule(
            down=down.reshape(r, *first.down.shape[1:]).contiguous() if conv else down.contiguous(),
            up=up.reshape(up.shape[0], r, 1, 1).contiguous() if conv else up.contiguous(),
            alpha=float(r),
        )
    return MixResult(LoraFile(modules), rank, lost / total if total else 0.0, worst)


def mix_loras(loras, out: str | os.PathLike, rank: int | None = None, format: str = "kohya", overwrite: bool = False,
              allow_pickle: bool = False) -> MixResult:
    """`morphkit lora mix`: read `loras` (`"path:weight"` strings or (path, weight) pairs), mix, write `out`."""
    from .lora import parse_lora_spec

    check_can_write(out, overwrite, "LoRA file")
    pairs = [item if isinstance(item, tuple) else parse_lora_spec(item) for item in loras]
    inputs = [(read_lora_file(path, allow_pickle), float(w)) for path, w in pairs]
    result = mix_lora_files(inputs, rank)
    info = {"mix": json.dumps([[str(p), w] for p, w in pairs]), "mix_rank": "exact" if rank is None else str(rank),
            "mix_lost_energy": f"{result.lost_energy:.6g}"}
    save_lora_file(out, result.lora, format, info, overwrite)
    return result
