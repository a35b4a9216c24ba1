"""Training checkpoints: `checkpoints/step-NNNNNN/`, each enough to continue the run exactly.

- `lora.safetensors`: everything trained (`Trainables.state`: the UNet's LoRA, the text encoders' LoRA or new
  tokens);
- `optimizer.safetensors`: the optimizer's tensors (AdamW's moments, Prodigy's as well);
- `state.json`: the step, the optimizer's other state and groups (Prodigy's step size estimate lives there),
  the gradient scaler, the settings that fix the run's trajectory, and the time spent so far.

A checkpoint is written into a temporary folder and renamed, so a killed run never leaves half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, NumericalError
from ..io import make_staging_dir, no_room_error


def save_checkpoint(folder: Path, step: int, trainables, optimizer, scaler, fingerprint: str, keep: int,
                    run: dict | None = None) -> Path:
    """Write `folder/step-NNNNNN/` atomically (a temp folder renamed), then drop all but the newest `keep`.

    `run` is what else the run records: the settings that fix its trajectory, and its elapsed time."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    trained = trainables.state()
    if not all(bool(torch.isfinite(t).all()) for t in trained.values()):
        raise NumericalError(f"The fit diverged: at step {step} the LoRA holds NaN or infinite values, so no checkpoint "
                             "was written. Lower --lr (or --max-grad-norm), or train in fp32 (--mixed-precision no).")
    staging = make_staging_dir(target)
    try:
        save_file(trained, str(staging / "lora.safetensors"))
        tensors, other = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(staging / "optimizer.safetensors"))
        state = {"step": step, "fingerprint": fingerprint, "optimizer": other,
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None, **(run or {})}
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


def split_optimizer_state(opt: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's `state_dict` as tensors (`<param index>.<name>`) and the JSON-able rest."""
    tensors, plain = {}, {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{name}"] = value
    return tensors, {"state": plain, "param_groups": opt["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], other: dict, device) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *other["state"].items()]:
        index, name = key.split(".", 1)
        is_step = name == "step"  # AdamW keeps its step count on the CPU
        state.setdefault(int(index), {})[name] = value.to(device) if isinstance(value, torch.Tensor) and not is_step else value
    groups = other["param_groups"]
    for group in groups:
        group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def refuse_other_run(path: Path, state: dict, fingerprint: str, trajectory: dict | None = None) -> None:
    """Refuse to resume from a checkpoint made with other settings or data, naming the settings that changed."""
    if state["fingerprint"] == fingerprint:
        return
    changed = changed_settings(state, trajectory) if trajectory is not None and state.get("trajectory") else []
    named = f" (changed: {', '.join(changed)})" if changed else ""
    raise ConfigError(f"The checkpoint {path} was made with other settings or other data than this run{named}. Resume "
                      "with the same settings (only steps/epochs may change), or drop --resume and pass --overwrite to "
                      "start afresh.")


def load_checkpoint(path: Path, trainables, optimizer, scaler, fingerprint: str, trajectory: dict | None = None) -> dict:
    """Restore what trains, the optimizer and the scaler from a checkpoint; return its state (step, elapsed …)."""
    state = read_state(path)
    refuse_other_run(path, state, fingerprint, trajectory)
    trainables.load_state(load_file(str(path / "lora.safetensors")))
    device = trainables.unet[0].device
    optimizer.load_state_dict(join_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"],
                                                   device))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def changed_settings(state: dict, trajectory: dict) -> list[str]:
    """The settings (and data) in which this run differs from the checkpoint's, by name."""
    before = state.get("trajectory") or {}
    return sorted(k for k in set(before) | set(trajectory) if before.get(k) != trajectory.get(k))
