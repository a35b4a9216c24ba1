"""Reading LoRA files safely, in every layout morphkit knows, into `LoraFile`.

Reading never runs code: only safetensors unless the caller allows pickles, and then
``torch.load(weights_only=True)``. Anything that is not a regular file is named for what it is (a folder,
a FIFO, a device) and never opened. Every file is checked before use: finite numbers, factors whose shapes
agree, a positive alpha, updates of a sane size, a header whose entries have the types PEFT gives them,
and content that is what the file name says. Strings from the file appear in messages escaped.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LoRAError
from ..io import file_kind
from ..models import PICKLE_SUFFIXES
from .names import KOHYA_PREFIXES, canonical_name, check_patterns, pattern_value, shown
from .updates import MAX_UPDATE, DiffModule, LohaModule, LokrModule, LoraFile, LoraModule, Update

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

# key suffix -> slot; kohya/LyCORIS leaves, diffusers/PEFT leaves, ComfyUI's full differences
_LEAVES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".dora_scale": "dora", ".lora_magnitude_vector": "dora",
    ".lora_magnitude_vector.weight": "dora", ".diff": "diff", ".diff_b": "diff_b",
    **{f".hada_{k}": f"hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{k}": f"lokr_{k}" for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_BY_LENGTH = sorted(_LEAVES, key=len, reverse=True)


# ---------------------------------------------------------------------------------------------- the file itself

def check_regular_file(path: str | os.PathLike, what: str = "LoRA file") -> Path:
    """`path`, if it is a regular file; otherwise `LoRAError` saying what it is (missing, a folder, a FIFO...)."""
    path = Path(path).expanduser()
    if not os.path.lexists(path):
        raise LoRAError(f"The {what} {shown(path)} does not exist.")
    kind = file_kind(path)
    if kind is not None:
        raise LoRAError(f"The {what} {shown(path)} is {kind}, not a file. Give the path of a .safetensors {what}.")
    return path


def _sniff(path: Path) -> str:
    """What a file's first bytes say it is. Opened without blocking, and checked again to be a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        head = os.read(fd, 16)
    finally:
        os.close(fd)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip archive (pickle)"
    if head[:1] == b"\x80":
        return "a pickle"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8"):
        return "an image"
    return "empty" if not head else "unknown"


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False, what: str = "LoRA file"):
    """Read a tensor file without running code: (tensors, header metadata). Raises `LoRAError` on anything odd."""
    path = check_regular_file(path, what)
    kind = _sniff(path)
    where = shown(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoRAError(
                f"{where} is a pickled {what} ({shown(path.suffix)}). Unpickling can run arbitrary code, so morphkit "
                "refuses it by default. Convert it to .safetensors where you trust it, or pass --allow-pickle if you "
                "trust its source: it is then read with torch.load(weights_only=True), which accepts tensors only.")
        return _read_pickle(path, what), {}
    if kind != "safetensors":
        if kind == "empty":
            raise LoRAError(f"{where} is empty, so it is not a {what}. Re-download or re-create it.")
        advice = " A pickle renamed to .safetensors can run code when loaded elsewhere: do not trust it." \
            if "pickle" in kind else ""
        said = f"its content is {kind}" if kind != "unknown" else "its content is not safetensors"
        raise LoRAError(f"{where} is not a safetensors {what}: {said}.{advice}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoRAError(f"{where} is a damaged safetensors {what} (truncated or corrupt: "
                        f"{shown(str(e).splitlines()[0], 200)}). Re-download or re-create it.") from None
    return tensors, metadata


def _read_pickle(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's notice about the pickle protocol is not for the user
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise LoRAError(f"{shown(path)} could not be read as a {what} with torch.load(weights_only=True): it holds "
                        "more than tensors, and a file that needs more than tensors to load is refused.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LoRAError(f"{shown(path)} does not hold a plain dict of tensors, so it is not a {what}.")
    return obj


def _check_finite(path, tensors: dict[str, torch.Tensor]):
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoRAError(f"{shown(path)} holds NaN or infinite values in {shown(key)}; the LoRA is broken (often a "
                            "training run that diverged in fp16). It was not loaded.")


# ---------------------------------------------------------------------------------------------- keys

def detect_format(tensors: dict[str, torch.Tensor]) -> str:
    """kohya, lycoris, diffusers, comfyui, diffusers-old or unknown, from the keys alone."""
    keys = list(tensors)
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys):
        return "comfyui"
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        plain = {"lora_down.weight", "lora_up.weight", "alpha"}
        return "kohya" if all(k.partition(".")[2] in plain for k in keys) else "lycoris"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    if any(".lora.down." in k or ".lora.up." in k or "_lora.down." in k for k in keys):
        return "diffusers-old"
    return "unknown"


def _split_key(key: str):
    """(raw module name, slot) of a tensor key, or (None, None) when its leaf is not one morphkit knows."""
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], _LEAVES[suffix]
    return None, None


def _group(path, tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        raw, slot = _split_key(key)
        name = canonical_name(raw) if raw else None
        if raw and name is None and fmt == "diffusers" and slot in ("down", "up", "dora", "alpha"):
            name = "unet." + raw  # PEFT keys saved without the part prefix
        if name is None:
            raise LoRAError(f"{shown(path)} has a key morphkit does not know: {shown(key)!r}. It reads LoRA, LoCon, "
                            "LoHa, LoKr, DoRA and full-difference (diff) files in kohya, diffusers and ComfyUI layouts; "
                            "other LyCORIS kinds (OFT, BOFT, GLoRA, IA3, norm modules) are not read.")
        groups.setdefault(name, {})[slot] = t
    return groups


# ---------------------------------------------------------------------------------------------- diffusers header

def diffusers_config(path, metadata: dict, part: str) -> dict:
    """The PEFT config of one part from the diffusers header, checked: {} when there is none."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoRAError(f"{shown(path)}: the {DIFFUSERS_METADATA_KEY} header entry is not valid JSON.") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{shown(path)}: the {DIFFUSERS_METADATA_KEY} header entry must be a JSON object, not "
                        f"{type(config).__name__}; the file is malformed.")
    p = part + "."
    if any(isinstance(k, str) and k.startswith(p) for k in config):
        config = {k[len(p):]: v for k, v in config.items() if k.startswith(p)}
    elif any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in config):
        return {}  # another part's config only
    for field, kind in (("lora_alpha", "number"), ("r", "whole number")):
        value = config.get(field)
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and
                               (kind == "number" or float(value).is_integer()))
        if not ok:
            raise LoRAError(f"{shown(path)}: the header's {part} {field} must be a {kind}, not {shown(repr(value), 60)}; "
                            "the file is malformed.")
    config["alpha_pattern"] = _checked_values(path, check_patterns(config.get("alpha_pattern"), "alpha_pattern", path),
                                              "alpha_pattern")
    config["rank_pattern"] = _checked_values(path, check_patterns(config.get("rank_pattern"), "rank_pattern", path),
                                             "rank_pattern")
    return config


def _checked_values(path, patterns: dict, field: str) -> dict:
    for key, value in patterns.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise LoRAError(f"{shown(path)}: the header's {field} gives {shown(key)} the value {shown(repr(value), 60)}; "
                            "a number was expected. The file is malformed.")
    return patterns


def _header_alpha(configs: dict, name: str):
    """(alpha, declared rank) of a diffusers-format module from the header's per-part configs."""
    part, _, inner = name.partition(".")
    config = configs.get(part) or {}
    alpha = pattern_value(config.get("alpha_pattern"), inner)
    alpha = config.get("lora_alpha") if alpha is None else alpha
    declared = pattern_value(config.get("rank_pattern"), inner)
    return alpha, config.get("r") if declared is None else declared


# ---------------------------------------------------------------------------------------------- modules

def read_lora_file(path: str | os.PathLike, allow_pickle: bool = False) -> LoraFile:
    """Read and check a LoRA file: kohya, diffusers, LyCORIS (LoCon, LoHa, LoKr, DoRA) or ComfyUI LoraSave."""
    tensors, metadata = read_tensors(path, allow_pickle)
    _check_finite(path, tensors)
    fmt = detect_format(tensors)
    if fmt == "diffusers-old":
        raise LoRAError(f"{shown(path)} uses the old diffusers attention-processor LoRA layout (`.lora.down.` keys). "
                        "Load it once with diffusers' load_lora_weights and save it again to use it here.")
    if fmt == "unknown":
        raise LoRAError(f"{shown(path)} holds no LoRA weights morphkit knows (keys like 'unet.<module>.lora_A.weight', "
                        "'lora_unet_<module>.lora_down.weight' or 'diffusion_model.<module>.lora_up.weight'); it is "
                        "not a LoRA file.")
    groups = _group(path, tensors, fmt)
    configs = None
    if fmt == "diffusers":  # parsed once; a malformed header is refused even where no module reads it
        configs = {part: diffusers_config(path, metadata, part) for part in {"unet", *(n.partition(".")[0] for n in groups)}}
    modules = {name: build_update(path, name, slots, configs) for name, slots in groups.items()}
    if not modules:
        raise LoRAError(f"{shown(path)} holds no LoRA factors.")
    return LoraFile(modules, metadata, fmt, Path(path))


def build_update(path, name: str, slots: dict[str, torch.Tensor], configs: dict | None = None) -> Update:
    """One module's update from its tensors, every shape and number checked; `configs`: a diffusers file's PEFT
    config per part (`diffusers_config`), where alpha and rank come from."""
    where = f"{shown(path)} at {shown(name)}"
    alpha = _alpha(where, slots)
    kinds = [k for k, keys in (("lora", ("down", "up", "mid")), ("loha", tuple(s for s in slots if s.startswith("hada"))),
                               ("lokr", tuple(s for s in slots if s.startswith("lokr"))), ("diff", ("diff",)))
             if any(s in slots for s in keys)]
    if len(kinds) > 1:
        raise LoRAError(f"{where}: the file mixes {' and '.join(kinds)} factors for one layer; it contradicts itself.")
    extras = {"bias": slots.get("diff_b"), "dora_scale": slots.get("dora")}
    if not kinds:
        if extras["bias"] is not None:
            return _checked(where, DiffModule(None, **extras))
        have = "a DoRA magnitude (dora_scale)" if extras["dora_scale"] is not None else "only an alpha"
        raise LoRAError(f"{where}: the file has {have} but no update for this layer (no LoRA, LoHa, LoKr or diff "
                        "factors). A DoRA magnitude rescales the update it belongs to; without it there is nothing to "
                        "apply. The file is incomplete.")
    if kinds == ["lora"]:
        update = _lora(where, slots, alpha, configs, name)
    elif kinds == ["loha"]:
        update = _loha(where, slots, alpha)
    elif kinds == ["lokr"]:
        update = _lokr(where, slots, alpha)
    else:
        update = DiffModule(slots["diff"])
    update.bias, update.dora_scale = extras["bias"], extras["dora_scale"]
    return _checked(where, update)


def _alpha(where, slots):
    t = slots.get("alpha")
    if t is None:
        return None
    if t.numel() != 1:
        raise LoRAError(f"{where}: alpha must hold one number, not a tensor of shape {tuple(t.shape)}.")
    return float(t.float().item())


def _contradiction(where, shapes: dict, rule: str):
    listed = ", ".join(f"{k} {tuple(v.shape)}" for k, v in shapes.items() if v is not None)
    return LoRAError(f"{where}: the factor shapes contradict each other ({listed}): {rule}. The file is damaged or "
                     "was written wrongly.")


def _lora(where, slots, alpha, configs, name) -> LoraModule:
    down, up, mid = slots.get("down"), slots.get("up"), slots.get("mid")
    if down is None or up is None:
        raise LoRAError(f"{where}: the file is incomplete: this module has a {'down' if up is None else 'up'} factor "
                        f"but no {'up' if up is None else 'down'} factor.")
    shapes = {"down": down, "up": up, "mid": mid}
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != (mid.shape[0] if mid is not None else down.shape[0]):
        raise _contradiction(where, shapes, "the up factor's second dimension must equal the rank, the down factor's first")
    if mid is not None and (mid.dim() != 4 or down.dim() != 4 or mid.shape[1] != down.shape[0]):
        raise _contradiction(where, shapes, "a Tucker core (lora_mid) is [rank, rank, kh, kw] between 4-D factors")
    if configs is not None:
        alpha, declared = _header_alpha(configs, name)
        if declared is not None and declared != down.shape[0]:
            raise LoRAError(f"{where}: the header says rank {declared}, but the factors have rank {down.shape[0]}; the "
                            "file contradicts itself.")
    return LoraModule(down, up, float(down.shape[0]) if alpha is None else float(alpha), mid=mid)


def _loha(where, s, alpha) -> LohaModule:
    need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    if missing := [k for k in need if k not in s] + (["hada_t1" if "hada_t2" in s else "hada_t2"]
                                                     if ("hada_t1" in s) != ("hada_t2" in s) else []):
        raise LoRAError(f"{where}: the LoHa module is incomplete: {', '.join(missing)} missing.")
    w1a, w1b, w2a, w2b, t1, t2 = (s.get(k) for k in need + ["hada_t1", "hada_t2"])
    shapes = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "hada_t1": t1, "hada_t2": t2}
    if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)):
        raise _contradiction(where, shapes, "LoHa factors are matrices")
    if t1 is None:
        ok = w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0] and w1a.shape[0] == w2a.shape[0] \
            and w1b.shape[1] == w2b.shape[1]
        rule = "w1_a @ w1_b and w2_a @ w2_b must be products of the same shape"
    else:
        ok = t1.dim() == 4 and t2.dim() == 4 and t1.shape[2:] == t2.shape[2:] and all(
            t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0] for t, a, b in ((t1, w1a, w1b), (t2, w2a, w2b))) \
            and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
        rule = "with Tucker cores, t is [r, r, kh, kw], w_a [r, out] and w_b [r, in], alike for both halves"
    if not ok:
        raise _contradiction(where, shapes, rule)
    return LohaModule(w1a, w1b, w2a, w2b, alpha, t1=t1, t2=t2)


def _lokr(where, s, alpha) -> LokrModule:
    get = s.get
    shapes = {k: get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
    for i in ("1", "2"):
        full, a, b = get(f"lokr_w{i}"), get(f"lokr_w{i}_a"), get(f"lokr_w{i}_b")
        if (full is None) == (a is None or b is None) or (full is not None and (a is not None or b is not None)):
            raise _contradiction(where, shapes, f"W{i} is either lokr_w{i} or the pair lokr_w{i}_a, lokr_w{i}_b")
        if a is not None and (a.dim() != 2 or b.dim() not in (2, 4) or a.shape[1 if i == "1" or get("lokr_t2") is None
                                                                               else 0] != b.shape[0]):
            raise _contradiction(where, shapes, f"lokr_w{i}_a @ lokr_w{i}_b must be a product")
    w1 = get("lokr_w1")
    if w1 is not None and w1.dim() != 2 or get("lokr_w2") is not None and get("lokr_w2").dim() not in (2, 4):
        raise _contradiction(where, shapes, "W1 is a matrix, W2 a matrix or a 4-D kernel")
    t2 = get("lokr_t2")
    if t2 is not None and (get("lokr_w2_a") is None or t2.dim() != 4 or t2.shape[1] != get("lokr_w2_b").shape[0]
                           or t2.shape[0] != get("lokr_w2_a").shape[0]):
        raise _contradiction(where, shapes, "a Tucker core lokr_t2 is [r, r, kh, kw] with lokr_w2_a [r, out] and "
                                            "lokr_w2_b [r, in]")
    return LokrModule(w1, get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"), get("lokr_w2_b"),
                      alpha, t2=t2)


def out_features(update: Update) -> int | None:
    """How many output channels the adapted layer has, as the update's own shapes say."""
    if isinstance(update, LoraModule):
        return update.up.shape[0]
    if isinstance(update, LohaModule):
        return update.w1a.shape[1] if update.t1 is not None else update.w1a.shape[0]
    if isinstance(update, LokrModule):
        rows1 = update.w1.shape[0] if update.w1 is not None else update.w1a.shape[0]
        rows2 = update.w2.shape[0] if update.w2 is not None else \
            update.w2a.shape[1] if update.t2 is not None else update.w2a.shape[0]
        return rows1 * rows2
    if isinstance(update, DiffModule) and update.diff is not None:
        return update.diff.shape[0]
    return None


def _checked(where, update: Update) -> Update:
    """Refuse what no loader can apply: zero rank, a non-positive alpha, updates that overflow, a misfit bias or DoRA."""
    rank = getattr(update, "rank", None)
    if rank == 0 or any(t.numel() == 0 for t in update.tensors()):
        raise LoRAError(f"{where}: the factors have rank 0 (empty tensors); such a module changes nothing and cannot "
                        "be applied. The file is damaged.")
    alpha = getattr(update, "alpha", None)
    if alpha is not None and not (0 < alpha < float("inf")):
        raise LoRAError(f"{where}: alpha is {alpha}; alpha must be a positive number.")
    out = out_features(update)
    if update.bias is not None and (update.bias.dim() != 1 or (out is not None and update.bias.shape[0] != out)):
        raise LoRAError(f"{where}: the bias update (diff_b) has shape {tuple(update.bias.shape)}, but the layer has "
                        f"{out} output channels.")
    if update.dora_scale is not None and out is not None and update.dora_scale.shape[0] not in (out, 1):
        raise LoRAError(f"{where}: the DoRA magnitude has shape {tuple(update.dora_scale.shape)}; it needs one entry "
                        f"per output channel ({out}) or per input channel.")
    _check_size(where, update)
    return update


def _check_size(where, update: Update):
    biggest = max([_abs_max(t) for t in (update.bias, update.dora_scale) if t is not None], default=0.0)
    if update.has_weight_update and update.bound() > MAX_UPDATE:  # the bound is loose: look at the real update
        d = update.delta().double() if not isinstance(update, LoraModule) else \
            (update.up.double().reshape(update.up.shape[0], -1) * update.scale) @ \
            (update.factors()[1].double() if update.mid is not None else update.down.double().reshape(update.rank, -1))
        biggest = max(biggest, _abs_max(d))
    if not biggest <= MAX_UPDATE:
        raise LoRAError(f"{where}: the update reaches {biggest:.3g} in a single weight, where real LoRA updates stay "
                        f"well below 1 (the limit is {MAX_UPDATE:g}). Its alpha or factors are absurd (or overflow), so "
                        "applying it could only give black or NaN images; the file is refused.")


def _abs_max(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0
