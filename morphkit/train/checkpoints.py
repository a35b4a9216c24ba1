"""Training checkpoints: `checkpoints/step-NNNNNN/` with the LoRA, the optimizer's state and the run's state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, NumericalError
from ..io import make_staging_dir, no_room_error
from ..lora import lora_state_dict


def save_checkpoint(folder: Path, step: int, unet, adapter_name: str, optimizer, scaler, fingerprint: str, keep: int):
    """Write `folder/step-NNNNNN/` atomically (a temp folder renamed), then drop all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    lora = lora_state_dict(unet, adapter_name)
    if not all(bool(torch.isfinite(t).all()) for t in lora.values()):
        raise NumericalError(f"The fit diverged: at step {step} the LoRA holds NaN or infinite values, so no checkpoint "
                             "was written. Lower --lr (or --max-grad-norm), or train in fp32 (--mixed-precision no).")
    staging = make_staging_dir(target)
    try:
        save_file(lora, str(staging / "lora.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
        save_file(tensors, str(staging / "optimizer.safetensors"))
        state = {"step": step, "fingerprint": fingerprint, "param_groups": opt["param_groups"],
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
        (staging / "state.json").write_text(json.dumps(state, default=str))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as e:
        raise no_room_error(e, target) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, unet, adapter_name: str, optimizer, scaler, fingerprint: str) -> int:
    """Restore LoRA weights, optimizer and scaler from a checkpoint; return its step."""
    from peft.utils import set_peft_model_state_dict

    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise ConfigError(
            f"The checkpoint {path} was made with other settings or other data than this run. Resume with the "
            "same settings (only steps/epochs may change), or pass --overwrite to start afresh."
        )
    lora = {k[len("unet."):]: v for k, v in load_file(str(path / "lora.safetensors")).items()}
    set_peft_model_state_dict(unet, lora, adapter_name=adapter_name)
    device = next(unet.parameters()).device
    flat = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    groups = state["param_groups"]
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])
