"""Single-file checkpoints in the original Stable Diffusion (LDM) layout, as A1111, ComfyUI and civitai use.

diffusers reads this layout (`from_single_file`); this module writes it, so that a model changed by
morphkit (a LoRA fused in) goes back to the tools people use. Key names are derived from the model
configs rather than listed, so the same code writes SD 1.5, SDXL and the tiny test models:

    unet.*            -> model.diffusion_model.*   (input_blocks / middle_block / output_blocks numbering;
                                                    SDXL's add_embedding -> label_emb.0)
    vae.*             -> first_stage_model.*       (encoder.down.i.block.j, decoder.up.(N-1-i).block.j, mid.attn_1.q/k/v)
    text_encoder.*    -> cond_stage_model.transformer.text_model.*            (SD 1.x)
                         conditioner.embedders.0.transformer.text_model.*     (SDXL's CLIP ViT-L)
    text_encoder_2.*  -> conditioner.embedders.1.model.*                      (SDXL's bigG, in OpenCLIP's layout)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import NumericalError
from .io import atomic_write, check_can_write, check_room

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_ldm_prefixes(config) -> dict[str, str]:
    """diffusers UNet module prefixes -> LDM prefixes, for a UNet2DConditionModel config."""
    per_block = config["layers_per_block"]
    n = len(config["block_out_channels"])
    out = dict(_UNET_TOP)
    for i in range(n):
        for j in range(per_block):
            k = 1 + i * (per_block + 1) + j
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op"
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per_block + 1):
            k = i * (per_block + 1) + j
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        out[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (per_block + 1) + per_block}.{2 if has_attention else 1}"
    out.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                "mid_block.resnets.1": "middle_block.2"})
    return out


def _rename(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    """(new prefix + rest, matched diffusers prefix) for the longest prefix of `key` in `prefixes`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            return prefixes[head] + "." + ".".join(parts[cut:]), head
    return None


def _unet_ldm_name(key: str, prefixes: dict[str, str]) -> str:
    found = _rename(key + ".", prefixes) if key in prefixes else _rename(key, prefixes)
    if found is None:
        raise ValueError(f"no LDM name for UNet weight {key}")
    new, head = found
    if ".resnets." in head and key != head:
        inner = key[len(head) + 1:].split(".")
        new = prefixes[head] + "." + ".".join([_RESNET.get(inner[0], inner[0]), *inner[1:]])
    return new.rstrip(".")


def unet_ldm_path(path: str, config) -> str:
    """A diffusers UNet module path in the LDM layout: `down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in` (SDXL numbering), `down_blocks.0.resnets.0.conv1` -> `input_blocks.1.0.in_layers.2`."""
    return _unet_ldm_name(path, unet_ldm_prefixes(config))


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    prefixes = unet_ldm_prefixes(config)
    return {"model.diffusion_model." + _unet_ldm_name(key, prefixes): value for key, value in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    prefixes = {}
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        prefixes[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
        prefixes[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
        prefixes[f"{side}.conv_norm_out"] = f"{side}.norm_out"
    out = {}
    for key, value in state.items():
        found = _rename(key, prefixes)
        new = found[0] if found else key
        if found and found[1].endswith("attentions.0"):
            inner = key[len(found[1]) + 1:]
            layer, _, leaf = inner.rpartition(".")
            new = f"{prefixes[found[1]]}.{_VAE_ATTENTION.get(layer, layer)}.{leaf}"
            if leaf == "weight" and value.dim() == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif found and ".resnets." in found[1]:
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer.") \
        -> dict[str, torch.Tensor]:
    # transformers 5 names CLIPTextModel's weights without the `text_model.` prefix that LDM keys keep
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()
            if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = "conditioner.embedders.1.model.") \
        -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection` state dict in OpenCLIP's layout, as SDXL checkpoints hold text_encoder_2:
    q/k/v stacked into `attn.in_proj_weight`, `text_projection` as a (hidden, projection) matrix."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(src)]:
            inner, _, leaf = key[len(src):].rpartition(".")
            out[f"{dst}{_OPEN_CLIP_LAYER[inner]}.{leaf}"] = state.pop(key)
    if state:
        raise ValueError(f"no OpenCLIP name for text_encoder_2 weight {next(iter(state))}")
    return out


def text_encoders_to_ldm(pipe, cast) -> dict[str, torch.Tensor]:
    """The pipeline's text encoders in the layout of its family's single files."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return text_encoder_to_ldm(cast(pipe.text_encoder.state_dict()))
    out = text_encoder_to_ldm(cast(pipe.text_encoder.state_dict()), "conditioner.embedders.0.transformer.")
    out.update(open_clip_to_ldm(cast(pipe.text_encoder_2.state_dict())))
    return out


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype = torch.float16, overwrite: bool = False,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `pipe`'s UNet, VAE and text encoder(s) as one LDM-layout `.safetensors` checkpoint, atomically
    (SD 1.x or SDXL, as the pipeline is)."""
    path = check_can_write(path, overwrite, "checkpoint")

    def cast(sd):
        return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in sd.items()}

    tensors = {}
    tensors.update(unet_to_ldm(cast(pipe.unet.state_dict()), pipe.unet.config))
    tensors.update(vae_to_ldm(cast(pipe.vae.state_dict()), pipe.vae.config))
    tensors.update(text_encoders_to_ldm(pipe, cast))
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise NumericalError(f"The checkpoint for {path} would hold NaN or infinite values ({bad}; in {dtype} a weight "
                             "overflowed), so nothing was written. Lower the LoRA weights, or write fp32.")
    check_room(path.parent, sum(t.numel() * t.element_size() for t in tensors.values()), "the checkpoint", "--out")
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path
