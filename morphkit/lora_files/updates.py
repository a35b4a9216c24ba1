"""What one adapted layer of a LoRA file does to its weight, for every kind of file people have.

Each kind computes its own update, as its authors define it (LyCORIS, kohya, ComfyUI, PEFT):

| kind | keys | weight update ΔW |
|---|---|---|
| `lora` | `lora_down`, `lora_up` (`lora_A`, `lora_B`) | (α/r) · up @ down |
| `locon-tucker` | + `lora_mid` | (α/r) · Σ up[o,a] mid[a,b,k,l] down[b,i] |
| `loha` | `hada_w1_a/b`, `hada_w2_a/b` (+ `hada_t1/t2`) | (α/r) · (w1a @ w1b) ⊙ (w2a @ w2b) |
| `lokr` | `lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b` (+ `lokr_t2`) | (α/r) · W1 ⊗ W2 (α/r = 1 when both are full) |
| `diff` | `diff` (ComfyUI, LyCORIS full) | diff |

Any kind may carry `diff_b`, an update of the layer's bias, and DoRA's magnitude (`dora_scale`, or
PEFT's `lora_magnitude_vector`): the merged weight is then W' = m · (W + ΔW) / ‖W + ΔW‖, the norm taken
per output channel when m has one entry per output channel (PEFT; LyCORIS `wd_on_out`) and per input
channel when it has one per input channel (kohya/LyCORIS's other orientation). That rescale depends on
the base weight W, so a DoRA update only exists against a model. At a strength w, every kind gives
W + w · (W' − W), as ComfyUI and A1111 apply DoRA; for additive kinds that is W + w · ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LoRAError
from .names import shown

MAX_UPDATE = 1e4  # the largest entry an update may have; real ones stay far below 1 (weights are O(0.1))
EPS = torch.finfo(torch.float32).eps


def _amax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild: W[p, r, k, l] = Σ t[i, j, k, l] · wa[i, p] · wb[j, r]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


@dataclass(kw_only=True)
class Update:
    """One adapted layer. `bias` is a full update of the layer's bias; `dora_scale` DoRA's magnitude."""

    bias: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    kind = "update"

    # -- what every kind defines
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.bias, self.dora_scale) if t is not None]

    @property
    def has_weight_update(self) -> bool:
        return True

    def delta(self, shape=None) -> torch.Tensor:
        """ΔW, fp32, in `shape` (the layer's weight shape) when given, else in the shape the file implies."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact low-rank factors (up [out, R], down [R, in·k·k]) of ΔW with the scale in `up`, or None."""
        return None

    def bound(self) -> float:
        """An upper bound of max |ΔW| that costs no dense product."""
        return math.inf

    # -- derived
    @property
    def label(self) -> str:
        """`lora`, `loha+dora`, `diff+bias`, `bias-only`, ...: what `lora info` counts."""
        extras = ["dora"] * (self.dora_scale is not None) + ["bias"] * (self.bias is not None and self.has_weight_update)
        return "+".join([self.kind if self.has_weight_update else "bias-only", *extras])

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors()[0].dtype

    @property
    def is_plain_lora(self) -> bool:
        """A LoRA that PEFT adapters hold as they are: no Tucker core, no DoRA, no bias update."""
        return False

    @property
    def additive(self) -> bool:
        """Whether the update is the same whatever the base weight (everything but DoRA)."""
        return self.dora_scale is None

    def merged(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The layer's weight with this update applied at `strength`, fp32 (W + w·ΔW, or W + w·(W' − W) for DoRA)."""
        w0 = weight.detach().float()
        d = self.delta(w0.shape).to(w0.device) if self.has_weight_update else torch.zeros_like(w0)
        if self.dora_scale is None:
            return w0 + strength * d
        return w0 + strength * (dora_rescale(w0 + d, self.dora_scale.to(w0.device)) - w0)

    def merged_bias(self, bias: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return bias.detach().float() + strength * self.bias.to(bias.device).float()


def dora_rescale(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m · W / ‖W‖: per output channel when m has one entry per output channel, else per input channel."""
    out, inp = weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1
    m = magnitude.float()
    if m.numel() == out and (m.dim() == 1 or m.shape[0] == out):
        norm = _flat(weight).norm(dim=1).reshape(out, *[1] * (weight.dim() - 1))
        m = m.reshape(norm.shape)
    elif m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] == inp and m.numel() == inp:
        norm = weight.transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(1, inp, *[1] * (weight.dim() - 2))
        m = m.reshape(norm.shape)
    else:
        raise LoRAError(f"A DoRA magnitude of shape {tuple(magnitude.shape)} fits neither the output channels nor the "
                        f"input channels of a weight of shape {tuple(weight.shape)}.")
    return weight * (m / (norm + EPS))


@dataclass
class LoraModule(Update):
    """LoRA and LoCon: ΔW = (alpha / rank) · up @ down, with LoCon's Tucker core `mid` between them when present."""

    down: torch.Tensor  # A: [rank, in] or [rank, in, kh, kw] ([rank, in, 1, 1] with a mid)
    up: torch.Tensor  # B: [out, rank] or [out, rank, 1, 1]
    alpha: float
    mid: torch.Tensor | None = field(default=None, kw_only=True)  # [rank, rank, kh, kw]

    @property
    def kind(self) -> str:
        return "lora" if self.mid is None else "locon-tucker"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_plain_lora(self) -> bool:
        return self.mid is None and self.dora_scale is None and self.bias is None

    def tensors(self):
        return [self.down, self.up, *([self.mid] if self.mid is not None else []), *super().tensors()]

    def factors(self):
        up = _flat(self.up.float()) * self.scale
        if self.mid is None:
            return up, _flat(self.down.float())
        down = torch.einsum("abkl,bi->aikl", self.mid.float(), _flat(self.down.float()))
        return up, _flat(down)

    def delta(self, shape=None) -> torch.Tensor:
        up, down = self.factors()
        if shape is None:
            shape = (up.shape[0], self.down.shape[1], *self.mid.shape[2:]) if self.mid is not None else \
                (up.shape[0], *self.down.shape[1:])
        return (up @ down).reshape(shape)

    def bound(self):
        b = abs(self.scale) * self.rank * _amax(self.up) * _amax(self.down)
        return b if self.mid is None else b * self.mid.shape[1] * _amax(self.mid)


@dataclass
class LohaModule(Update):
    """LyCORIS LoHa: ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker cores t1, t2 each factor is rebuilt
    as Σ t[i, j, k, l] · wa[i, o] · wb[j, c] (then wa is [r, out] and wb [r, in])."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None
    t1: torch.Tensor | None = field(default=None, kw_only=True)
    t2: torch.Tensor | None = field(default=None, kw_only=True)
    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def tensors(self):
        return [self.w1a, self.w1b, self.w2a, self.w2b, *[t for t in (self.t1, self.t2) if t is not None],
                *super().tensors()]

    def _halves(self):
        """Each Hadamard factor as (U [out, r], V [r, in·k·k]) with factor = U @ V."""
        halves = []
        for wa, wb, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            wa, wb = wa.float(), wb.float()
            if t is None:
                halves.append((_flat(wa), _flat(wb)))
            else:
                halves.append((wa.T, torch.einsum("ijkl,jr->irkl", t.float(), wb).reshape(t.shape[0], -1)))
        return halves

    def factors(self):
        (u1, v1), (u2, v2) = self._halves()
        up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1) * self.scale  # face-splitting product
        down = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
        return up, down

    def delta(self, shape=None) -> torch.Tensor:
        (u1, v1), (u2, v2) = self._halves()
        d = (u1 @ v1) * (u2 @ v2) * self.scale
        if shape is None and self.t1 is not None:
            shape = (d.shape[0], self.w1b.shape[1], *self.t1.shape[2:])
        return d if shape is None else d.reshape(shape)

    def bound(self):
        parts = []
        for wa, wb, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            b = self.rank * _amax(wa) * _amax(wb)
            parts.append(b if t is None else b * self.rank * _amax(t))
        return abs(self.scale) * parts[0] * parts[1]


@dataclass
class LokrModule(Update):
    """LyCORIS LoKr: ΔW = scale · W1 ⊗ W2, each W full (`lokr_w1`) or a product (`lokr_w1_a @ lokr_w1_b`, W2 also
    with a Tucker core `lokr_t2`); scale = alpha / r of the decomposed factor, 1 when both are full."""

    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    alpha: float | None
    t2: torch.Tensor | None = field(default=None, kw_only=True)
    kind = "lokr"

    @property
    def rank(self) -> int | None:
        if self.w2 is None:
            return self.w2b.shape[0]
        return None if self.w1 is not None else self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.rank is None else self.alpha / self.rank

    def tensors(self):
        return [t for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2) if t is not None] + \
            super().tensors()

    def _w1(self):
        return self.w1.float() if self.w1 is not None else self.w1a.float() @ self.w1b.float()

    def _w2(self):
        if self.w2 is not None:
            return self.w2.float()
        if self.t2 is not None:
            return _tucker(self.t2.float(), self.w2a.float(), self.w2b.float())
        return self.w2a.float() @ self.w2b.float()

    def delta(self, shape=None) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2) * self.scale
        return d if shape is None else d.reshape(shape)

    @staticmethod
    def _pair(full, a, b):
        if full is None:
            return a.float(), _flat(b.float())
        full = _flat(full.float())
        if full.shape[0] <= full.shape[1]:
            return torch.eye(full.shape[0]), full
        return full, torch.eye(full.shape[1])

    def factors(self):
        u1, v1 = self._pair(self.w1, self.w1a, self.w1b)
        if self.t2 is not None:
            u2, v2 = self._pair(self._w2(), None, None)
        else:
            u2, v2 = self._pair(self.w2, self.w2a, self.w2b)
        return torch.kron(u1, u2) * self.scale, torch.kron(v1, v2)  # (U1 V1) ⊗ (U2 V2) = (U1 ⊗ U2)(V1 ⊗ V2)

    def bound(self):
        def b(full, a, b_, t=None):
            if full is not None:
                return _amax(full)
            inner = a.shape[1] * (t.shape[1] * _amax(t) if t is not None else 1)
            return inner * _amax(a) * _amax(b_)

        return abs(self.scale) * b(self.w1, self.w1a, self.w1b) * b(self.w2, self.w2a, self.w2b, self.t2)


@dataclass
class DiffModule(Update):
    """A full update of the weight (`diff`, as ComfyUI's LoraSave and LyCORIS' full fine-tuning write), or of
    the bias alone (`diff_b` without `diff`: `diff` is None)."""

    diff: torch.Tensor | None
    kind = "diff"

    @property
    def has_weight_update(self) -> bool:
        return self.diff is not None

    def tensors(self):
        return ([self.diff] if self.diff is not None else []) + super().tensors()

    def delta(self, shape=None) -> torch.Tensor:
        d = self.diff.float()
        return d if shape is None else d.reshape(shape)

    def bound(self):
        return _amax(self.diff) if self.diff is not None else 0.0


def identity_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a dense update: (I, ΔW) or (ΔW, I), whichever has the smaller rank."""
    flat = _flat(delta.float())
    out, inp = flat.shape
    if out <= inp:
        return torch.eye(out), flat
    return flat, torch.eye(inp)


def as_lora(update: Update, shape, weight: torch.Tensor | None = None) -> LoraModule:
    """The update as a plain LoRA for a layer whose weight has `shape`, exactly (up to fp32 rounding).

    Plain LoRAs come back as they are. Other kinds use their own exact low-rank factors (LoCon's core folded
    into the down factor, LoHa's face-splitting product, LoKr's Kronecker factors) when their rank is below
    the layer's, otherwise the identity factorisation of the dense update. A DoRA update needs the layer's
    `weight`: it becomes the additive update W' − W of that weight.
    """
    if update.is_plain_lora:
        if tuple(update.down.shape[1:]) == tuple(shape[1:]) or update.down[0].numel() != math.prod(shape[1:]):
            return update  # as it is (a misfit is check_fits' to report)
        rank = update.rank  # 2-D factors for a 1x1 convolution, or the other way round
        up = update.up.reshape(shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        return LoraModule(update.down.reshape(rank, *shape[1:]), up, update.alpha)
    if not update.has_weight_update:
        raise LoRAError("A bias-only update has no LoRA form.")
    if update.dora_scale is not None:
        if weight is None:
            raise LoRAError("A DoRA update depends on the base model's weights; it has no LoRA form without them.")
        up, down = identity_factors(update.merged(weight) - weight.float())
    else:
        found = update.factors()
        limit = min(shape[0], math.prod(shape[1:]))
        up, down = found if found is not None and found[0].shape[1] < limit else identity_factors(update.delta(shape))
    rank = down.shape[0]
    if len(shape) == 4:
        return LoraModule(down.reshape(rank, *shape[1:]).contiguous(), up.reshape(shape[0], rank, 1, 1).contiguous(),
                          float(rank))
    return LoraModule(down.contiguous(), up.contiguous(), float(rank))


def nearest_lora(update: Update, rank: int, shape) -> tuple[LoraModule, float, float]:
    """The best rank-`rank` LoRA of an additive update (SVD), with (energy, energy lost) in ‖ΔW‖²_F terms."""
    found = update.factors()
    if found is not None:
        up, down = found
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        u, vh = q_up @ u, vh @ q_down.T
    else:
        u, s, vh = torch.linalg.svd(_flat(update.delta(shape)), full_matrices=False)
    r = min(rank, s.shape[0])
    energy, lost = float((s**2).sum()), float((s[r:] ** 2).sum())
    up, down = u[:, :r] * s[:r], vh[:r]
    if len(shape) == 4:
        return LoraModule(down.reshape(r, *shape[1:]).contiguous(), up.reshape(shape[0], r, 1, 1).contiguous(),
                          float(r)), energy, lost
    return LoraModule(down.contiguous(), up.contiguous(), float(r)), energy, lost


@dataclass
class LoraFile:
    modules: dict[str, Update]  # `unet.<path>` / `text_encoder.<path>` -> its update
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"
    path: Path | None = None  # where it was read from, for messages

    def part(self, name: str) -> dict[str, Update]:
        """The modules of one model part (`unet`, `text_encoder`), keyed by their path inside it."""
        return {k.partition(".")[2]: m for k, m in self.modules.items() if k.partition(".")[0] == name}

    @property
    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            counts[m.label] = counts.get(m.label, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def all_plain(self) -> bool:
        return all(m.is_plain_lora for m in self.modules.values())

    def where(self) -> str:
        return shown(self.path) if self.path is not None else "the LoRA"
