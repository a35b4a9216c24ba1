"""What a LoRA file is: format, kinds, the architecture it was made for, and which tools load it as it is.

Which tools load what, as read from their own key-mapping code (ComfyUI `comfy/lora.py` and
`comfy/weight_adapter/`, A1111 `extensions-builtin/Lora`, kohya `networks/lora.py`, diffusers
`lora_conversion_utils.py`) and, for diffusers, checked in morphkit's tests on the tiny model.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from .names import printable
from .reading import read_lora_file
from .updates import LoraFile, LoraModule

_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _text_width(lora: LoraFile) -> set[int]:
    widths = set()
    for name, m in lora.modules.items():
        if isinstance(m, LoraModule) and (name.endswith("attn2.to_k") or name.endswith("self_attn.q_proj")) \
                and name.startswith(("unet.", "text_encoder.")):
            widths.add(m.down.shape[1])
    return widths


def guess_base(lora: LoraFile) -> str:
    """SD 1.x, SD 2.x, SDXL, or `unknown (...)`: from the text width the cross-attention reads, else from names."""
    if lora.part("text_encoder_2"):
        return "SDXL"
    unet = lora.part("unet")
    widths = _text_width(lora)
    known = sorted({_CONTEXT_WIDTHS[w] for w in widths if w in _CONTEXT_WIDTHS})
    if len(known) == 1:
        return "SDXL" if known[0] == "SD 1.x" and any("transformer_blocks.1." in n for n in unet) else known[0]
    if widths:
        return f"unknown (text width {', '.join(map(str, sorted(widths)))})"
    if any("transformer_blocks.1." in n for n in unet):
        return "SDXL"  # SD 1.x and 2.x have one transformer block per attention
    # In the LDM layout SDXL has no attention at its first level (input_blocks 1-2) nor its last (output_blocks 6-8)
    if any(re.match(r"input_blocks\.[12]\.1\.|output_blocks\.(?:[6-9]|1[01])\.1\.", n) for n in unet):
        return "SD 1.x or 2.x"
    if any(n.startswith(("input_blocks.", "output_blocks.", "middle_block.")) for n in unet):
        return "SDXL"
    return "unknown"


_HEADER_BASES = (("ss_base_model_version", (("sdxl", "SDXL"), ("sd_v1", "SD 1.x"), ("sd_v2", "SD 2.x"))),
                 ("modelspec.architecture", (("stable-diffusion-xl", "SDXL"), ("stable-diffusion-v1", "SD 1.x"),
                                             ("stable-diffusion-v2", "SD 2.x"))))


def made_for(lora: LoraFile) -> str | None:
    """The base a LoRA was made for, when something says so: "SDXL", "SD 1.x", "SD 2.x", "SD 1.x or 2.x"; or None.

    A second text encoder part means SDXL whatever the header says; then the header kohya's trainer, morphkit and
    most tools write (`ss_base_model_version`, `modelspec.architecture`); then `guess_base` from the layers."""
    if lora.part("text_encoder_2"):
        return "SDXL"
    for key, prefixes in _HEADER_BASES:
        value = str(lora.metadata.get(key, ""))
        for prefix, base in prefixes:
            if value.startswith(prefix):
                return base
    base = guess_base(lora)
    return None if base.startswith("unknown") else base


def family_of_lora(lora: LoraFile, default=None):
    """The model family (`morphkit.families`) a LoRA fits, from `made_for`; `default` when nothing says."""
    from ..families import FAMILIES

    base = made_for(lora)
    return next((f for f in FAMILIES if base in f.lora_bases), default)


def loaders(lora: LoraFile) -> dict[str, str]:
    """Which tools apply the file as it is: {tool: 'yes' | 'partly: why' | 'no: why'}."""
    kinds = {m.kind for m in lora.modules.values() if m.has_weight_update}
    dora = any(m.dora_scale is not None for m in lora.modules.values())
    fmt = lora.format
    out = {"morphkit": "yes"}
    if fmt == "kohya":
        dropped = [n for n in lora.part("unet") if n.split(".")[0] in ("conv_in", "conv_out", "time_embedding")]
        out.update({"diffusers": "yes", "ComfyUI": "yes", "A1111": "yes",
                    "kohya sd-scripts": f"partly: skips {len(dropped)} modules outside the UNet's blocks"
                    if dropped else "yes"})
    elif fmt == "lycoris":
        lycoris = kinds & {"loha", "lokr", "locon-tucker", "diff"} or dora
        out.update({"ComfyUI": "yes", "A1111": "yes",
                    "diffusers": "no: it reads plain LoRA factors only" if lycoris else "yes",
                    "kohya sd-scripts": "with the LyCORIS network module only"})
    elif fmt == "diffusers":
        out.update({"diffusers": "yes",
                    "ComfyUI": "partly: attention layers are not applied and the header alpha is ignored",
                    "A1111": "no: it does not read diffusers (PEFT) keys", "kohya sd-scripts": "no"})
    elif fmt == "comfyui":
        out.update({"ComfyUI": "yes", "diffusers": "no: it does not read diffusion_model.* keys for SD 1.x"})
    return out


def describe(lora: LoraFile) -> dict:
    """What a LoRA is: format, kinds, base architecture, ranks, alphas, targets, which tools load it, header."""
    leaves = Counter(_layer_kind(n) for n in lora.modules)
    first = next(iter(lora.modules.values()))
    return {
        "format": lora.format,
        "kinds": lora.kinds,
        "base": guess_base(lora),
        "modules": len(lora.modules),
        "unet_modules": len(lora.part("unet")),
        "text_encoder_modules": len(lora.part("text_encoder")) + len(lora.part("text_encoder_2")),
        "text_encoder_1_modules": len(lora.part("text_encoder")),  # SDXL's te1 (CLIP-L) and te2 (bigG), apart
        "text_encoder_2_modules": len(lora.part("text_encoder_2")),
        "ranks": dict(sorted(Counter(getattr(m, "rank", None) for m in lora.modules.values()).items(),
                             key=lambda kv: (kv[0] is None, kv[0] or 0))),
        "alphas": dict(sorted(Counter(getattr(m, "alpha", None) for m in lora.modules.values()).items(),
                              key=lambda kv: (kv[0] is None, kv[0] or 0))),
        "targets": dict(sorted(leaves.items())),
        "parameters": sum(m.parameters for m in lora.modules.values()),
        "dtype": str(first.dtype).replace("torch.", ""),
        "loaders": loaders(lora),
        "metadata": dict(sorted(lora.metadata.items())),
    }


def _layer_kind(name: str) -> str:
    """`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` -> `unet attn1.to_q`."""
    part, _, path = name.partition(".")
    m = re.match(r".*\.(?:transformer_blocks|attentions|resnets|layers|downsamplers|upsamplers)\.\d+\.(.+)$", path)
    return f"{part} {m.group(1) if m else path}"


def lora_info(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """`describe` a LoRA file (what `morphkit lora info` prints). Strings are as in the file: print them with
    `printable`, which `info_lines` does."""
    return {"path": str(path), **describe(read_lora_file(path, allow_pickle))}


def info_lines(report: dict, width: int = 100) -> list[str]:
    """`lora info`'s summary, every string from the file escaped (no terminal control reaches the screen)."""
    def counts(d):
        return ", ".join(f"{printable(k)} (x{v})" for k, v in d.items())

    te = f"{report['text_encoder_modules']} text encoder"
    if report.get("text_encoder_2_modules"):
        te += f": {report['text_encoder_1_modules']} te1, {report['text_encoder_2_modules']} te2"
    lines = [
        printable(report["path"]),
        f"  format:        {report['format']} ({counts(report['kinds'])})",
        f"  made for:      {report['base']}",
        f"  modules:       {report['modules']} ({report['unet_modules']} UNet, {te})",
        f"  ranks:         {counts(report['ranks'])}",
        f"  alphas:        {counts(report['alphas'])}",
        f"  parameters:    {report['parameters']:,} ({report['dtype']})",
        "  targets:       " + counts(report["targets"]),
        "  loads as is in: " + "; ".join(f"{tool} {how}" for tool, how in report["loaders"].items()),
    ]
    if report["metadata"]:
        lines.append("  header:")
        for key, value in report["metadata"].items():
            value = printable(value)
            value = value if len(value) <= width else value[: width - 3] + "..."
            lines.append(f"    {printable(key)}: {value}")
    return lines
