"""`morphkit lora mix`: one LoRA whose update is the weighted sum of several."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ..errors import LoRAError
from ..io import check_can_write
from .inspect import family_of_lora, guess_base, made_for
from .names import shown
from .reading import read_lora_file
from .spec import parse_lora_spec
from .updates import LoraFile, LoraModule, as_lora
from .writing import _weight_shape, save_lora_file

MAX_WEIGHT = 100.0  # LoRA weights are used between about -2 and 2; beyond this a weight is a typo


@dataclass
class MixResult:
    lora: LoraFile
    rank: int | None  # None: exact (ranks concatenated, they vary by module)
    lost_energy: float  # share of the update's squared Frobenius norm dropped by the SVD, over all modules
    worst_module: tuple[str, float] | None  # the module that lost the largest share


def check_weight(weight, what) -> float:
    """A LoRA weight: finite and within ±`MAX_WEIGHT`, else `LoRAError`."""
    weight = float(weight)
    if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
        raise LoRAError(f"The weight of {what} is {weight}; LoRA weights are finite numbers within ±{MAX_WEIGHT:g} "
                        "(usually between 0 and 1).")
    return weight


def _check_same_base(inputs: list[tuple[LoraFile, float]]):
    """Refuse LoRAs of different bases (an SD 1.x one with an SDXL one), as the headers or the layers tell."""
    bases = {made_for(lf) for lf, _ in inputs} - {None}
    named = {b for b in bases if b in ("SD 1.x", "SD 2.x", "SDXL")}
    if len(named) > 1 or ("SDXL" in bases and "SD 1.x or 2.x" in bases):
        made = "; ".join(f"{lf.where()}: {made_for(lf) or guess_base(lf)}" for lf, _ in inputs)
        raise LoRAError(f"The LoRAs were made for different models ({made}); mixing them would give a LoRA that fits "
                        "neither. Mix LoRAs of one base model.")


def _plain(name: str, m) -> LoraModule:
    if m.dora_scale is not None or m.bias is not None or not m.has_weight_update:
        what = "a DoRA magnitude" if m.dora_scale is not None else "a bias update (diff_b)"
        raise LoRAError(f"{shown(name)} carries {what}, which is not a sum of low-rank updates, so it cannot be mixed. "
                        "Apply such a file on its own (stylize, lora fuse).")
    if m.is_plain_lora:
        return m
    return as_lora(m, _weight_shape(name, m))


def mix_lora_files(inputs: list[tuple[LoraFile, float]], rank: int | None = None) -> MixResult:
    """One LoRA whose update is the weighted sum of the inputs' updates, sum_i w_i * ΔW_i.

    Without `rank` the factors are concatenated (rank r_1 + r_2 + ..., exact): A = [A_1; A_2], B =
    [w_1 s_1 B_1, w_2 s_2 B_2], alpha = rank; LoHa, LoKr and LoCon modules take part through their own
    exact low-rank factors. With `rank`, each module's sum is reduced to its best rank-`rank`
    approximation by an SVD computed on the small core of the factors (QR of both factor stacks), never
    on the full weight; the energy lost is reported.
    """
    if not inputs:
        raise LoRAError("Nothing to mix: give at least one LoRA.")
    if rank is not None and rank < 1:
        raise LoRAError(f"--rank must be at least 1, not {rank}.")
    _check_same_base(inputs)
    names = sorted(set().union(*(lf.modules for lf, _ in inputs)))
    modules, total, lost, worst = {}, 0.0, 0.0, None
    for name in names:
        parts = [(_plain(name, lf.modules[name]), w) for lf, w in inputs if name in lf.modules]
        first = parts[0][0]
        for m, _ in parts[1:]:
            if m.down.shape[1:] != first.down.shape[1:] or m.up.shape[0] != first.up.shape[0]:
                raise LoRAError(f"The LoRAs cannot be mixed: at {shown(name)} one adapts a layer of shape "
                                f"{tuple(first.up.shape[:1]) + tuple(first.down.shape[1:])} and another "
                                f"{tuple(m.up.shape[:1]) + tuple(m.down.shape[1:])}; they were made for different models.")
        down = torch.cat([m.down.float().reshape(m.rank, -1) for m, _ in parts], 0)
        up = torch.cat([m.up.float().reshape(m.up.shape[0], m.rank) * (w * m.scale) for m, w in parts], 1)
        if rank is not None and rank < down.shape[0]:
            q_up, r_up = torch.linalg.qr(up)
            q_down, r_down = torch.linalg.qr(down.T)
            u, s, vh = torch.linalg.svd(r_up @ r_down.T)
            energy, dropped = float((s**2).sum()), float((s[rank:] ** 2).sum())
            if not (math.isfinite(energy) and math.isfinite(dropped)):
                raise LoRAError(f"The mix overflows at {shown(name)}: the weighted update is too large for fp32. "
                                "Lower the weights.")
            total, lost = total + energy, lost + dropped
            if energy > 0 and (worst is None or dropped / energy > worst[1]):
                worst = (name, dropped / energy)
            up, down = (q_up @ u[:, :rank]) * s[:rank], vh[:rank] @ q_down.T
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
    check_can_write(out, overwrite, "LoRA file")
    pairs = [item if isinstance(item, tuple) else parse_lora_spec(item) for item in loras]
    pairs = [(p, check_weight(w, shown(p))) for p, w in pairs]
    inputs = [(read_lora_file(path, allow_pickle), w) for path, w in pairs]
    result = mix_lora_files(inputs, rank)
    info = {"mix": json.dumps([[os.path.basename(str(p)), w] for p, w in pairs]),
            "mix_rank": "exact" if rank is None else str(rank), "mix_lost_energy": f"{result.lost_energy:.6g}"}
    save_lora_file(out, result.lora, format, info, overwrite, family=family_of_lora(inputs[0][0]))
    return result
