"""Module names: kohya's underscored names, ComfyUI's and the original (LDM) layout, diffusers' paths, and
the text encoder's two spellings. Also the two rules for strings that come from a file: they are printed
escaped (`printable`), and header patterns are matched as module names, never run as regular expressions.

Every LoRA morphkit reads is keyed by one canonical name, `<part>.<path>`: the part is `unet`,
`text_encoder` or `text_encoder_2`; the text encoder's path keeps transformers 4's `text_model.` wrapper
(`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`), whatever the file spelled.
"""

from __future__ import annotations

import re
import unicodedata

from ..errors import LoRAError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PART_TO_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
PARTS = ("unet", "text_encoder", "text_encoder_2")
# ComfyUI's LoraSave prefixes: `diffusion_model.<LDM path>`, `text_encoders.<clip>.transformer.<path>`
COMFY_UNET = "diffusion_model."
COMFY_TEXT = {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_h.transformer.": "text_encoder",
              "text_encoders.clip_g.transformer.": "text_encoder_2"}

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
    "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
}
_MAX_COMPOUND = max(len(n.split("_")) for n in _COMPOUND_NAMES)
_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.")
_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


# ---------------------------------------------------------------------------------------------- printing

def printable(text) -> str:
    """`text` with every control, format and line-separator character escaped (`\\x1b`, `\\n`, `\\u202e`),
    so that a string from a file can neither move the cursor, recolour the terminal nor fake a line."""
    out = []
    for ch in str(text):
        if ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def shown(text, limit: int = 120) -> str:
    """`printable(text)`, cut to `limit` characters: for naming a key or value of a file in a message."""
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- kohya

def kohya_module_name(module: str) -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    part, _, path = module.partition(".")
    if part not in PART_TO_KOHYA:
        raise LoRAError(f"No kohya name for a LoRA on {shown(part)!r}; kohya files name the unet and text encoders only.")
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
        raise LoRAError(f"{shown(name)!r} is not a kohya LoRA module name (no lora_unet_ or lora_te_ prefix).")
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


# ---------------------------------------------------------------------------------------------- canonical names

def text_encoder_path(path: str) -> str:
    """A CLIP text encoder's module path with transformers 4's `text_model.` wrapper, which transformers 5
    dropped: `encoder.layers.0.mlp.fc1` -> `text_model.encoder.layers.0.mlp.fc1`."""
    if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + path
    return path


def canonical_name(raw: str) -> str | None:
    """The canonical `<part>.<path>` of a module named `raw` in any layout morphkit reads, or None.

    kohya (`lora_unet_...`, `lora_te_...`), diffusers (`unet.<path>`, `text_encoder.<path>`, either
    text-encoder spelling), ComfyUI's LoraSave (`diffusion_model.<LDM path>`, `text_encoders.clip_l.transformer.`).
    UNet paths in the LDM layout stay so here; `unet_path_for` maps them onto a given UNet.
    """
    if raw.startswith(tuple(KOHYA_PREFIXES)):
        name = module_from_kohya(raw)
    elif raw.startswith(COMFY_UNET):
        name = "unet." + raw[len(COMFY_UNET):]
    elif raw.startswith(tuple(COMFY_TEXT)):
        prefix = next(p for p in COMFY_TEXT if raw.startswith(p))
        name = COMFY_TEXT[prefix] + "." + raw[len(prefix):]
    elif raw.partition(".")[0] in PARTS:
        name = raw
    else:
        return None
    part, _, path = name.partition(".")
    if not path:
        return None
    return f"{part}.{text_encoder_path(path)}" if part != "unet" else name


def is_ldm_path(path: str) -> bool:
    """Whether a UNet module path is in the original (LDM) layout rather than diffusers'."""
    return path.startswith(_LDM_ROOTS)


def ldm_unet_names(config, existing=None) -> dict[str, str]:
    """LDM module prefix -> diffusers module prefix, for a UNet2DConditionModel config; with `existing` (the
    UNet's module names), only prefixes the UNet has (the layout's numbering gives absent blocks names too)."""
    from ..checkpoint import unet_ldm_prefixes

    return {ldm: diffusers for diffusers, ldm in unet_ldm_prefixes(config).items()
            if existing is None or diffusers in existing}


def unet_path_for(path: str, ldm_names: dict[str, str]) -> str:
    """A UNet module path in diffusers' layout: LDM paths (`input_blocks.1.1.proj_in`) are renamed with
    `ldm_names` (from `ldm_unet_names`); diffusers paths come back unchanged."""
    if not is_ldm_path(path):
        return path
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in ldm_names:
            rest = ".".join(parts[cut:])
            rest = _LDM_RESNET.get(rest, rest) if ".resnets." in ldm_names[head] + "." else rest
            return ldm_names[head] + ("." + rest if rest else "")
    return path


# ---------------------------------------------------------------------------------------------- header patterns

_PLAIN_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")  # no nested quantifier: linear time
MAX_PATTERNS = 100_000


def check_patterns(patterns, field: str, path) -> dict[str, object]:
    """`rank_pattern` / `alpha_pattern` from a header, checked to be a table of plain module paths.

    PEFT reads these keys as regular expressions; morphkit never does. A key must be a module path
    (letters, digits, '_' and '.'), matched as the module's full name or a '.'-suffix of it, the way
    diffusers' own files use them. Anything else is refused, with the key shown escaped.
    """
    if patterns in (None, ""):
        return {}
    if not isinstance(patterns, dict):
        raise LoRAError(f"{shown(path)}: the header's {field} must be a table of module names, not "
                        f"{type(patterns).__name__}; the file is malformed.")
    if len(patterns) > MAX_PATTERNS:
        raise LoRAError(f"{shown(path)}: the header's {field} holds {len(patterns)} entries; that is not a LoRA header.")
    for key in patterns:
        if len(key) > 1000 or not _PLAIN_PATH.fullmatch(key):
            raise LoRAError(f"{shown(path)}: the header's {field} has the key {shown(key)!r}, which is not a plain module "
                            "path (like down_blocks.1.attentions.0.proj_in). morphkit matches these keys as module names "
                            "and never runs them as regular expressions, so it refuses the file.")
    return patterns


def pattern_value(patterns: dict, path: str):
    """The value of the most specific key of `patterns` that is `path` or a '.'-suffix of it, or None."""
    if not patterns:
        return None
    parts = path.split(".")
    for cut in range(len(parts)):
        key = ".".join(parts[cut:])
        if key in patterns:
            return patterns[key]
    return None
