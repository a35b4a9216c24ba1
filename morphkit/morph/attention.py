"""DiffMorpher's self-attention interpolation, as attention processors around diffusers' own.

The end frames (α = 0 and 1) render first, and the inputs of their self-attention in the UNet's up blocks are
kept for the first λ of the steps; during those steps an in-between frame's self-attention takes its keys and
values from the interpolation of the two ends' inputs (by its own α), computed through the layer's own to_k /
to_v so that the frame's LoRA blend applies. The ends render in the first batch, and a batch that holds them
uses their inputs directly, in tensor operations alone (`_AttentionRun.mixed_inputs`: a compiled UNet keeps it in
its graphs); inputs are kept (fp16) only for later batches, or a later pass that does not render the ends along.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


def attention_steps(attn_lambda: float, steps: int) -> int:
    """How many of the first sampling steps use interpolated self-attention: ⌈λ·steps⌉ (DiffMorpher's i < λ·N)."""
    return max(0, math.ceil(attn_lambda * steps - 1e-9))


def check_attn_lambda(attn_lambda) -> float:
    if isinstance(attn_lambda, bool) or not isinstance(attn_lambda, (int, float)) or not 0 <= attn_lambda <= 1:
        raise ConfigError(f"attn_lambda (--attn-lambda) must be from 0 (no attention interpolation) to 1 (all steps); "
                          f"got {attn_lambda!r}. DiffMorpher uses 0.6.")
    return float(attn_lambda)


@dataclass
class AttentionStore:
    """The end frames' self-attention inputs that the in-between frames interpolate, per layer and step.

    `steps`: how many of the first sampling steps interpolate (`attention_steps(λ, N)`); with 0 the
    processors are in place but change nothing. Inputs are kept only for those steps, only for the
    up blocks' self-attention layers, in `dtype` (fp16). `keep`: hold them after `render_frames` returns,
    for a later call that renders more in-between frames (even pacing); otherwise `render_frames` keeps
    them only while its own later batches need them and drops them at its end. `peak_bytes` is the most
    they took at any time. `device`: where they are kept; None keeps them where they were computed, "cpu"
    keeps them off the GPU and copies each back when a layer reads it (on SDXL at 1024 px the store is
    about 0.1 GiB per end frame and interpolated step, 6 GiB at DiffMorpher's settings: see
    benchmarks/memory_sdxl.py).
    """

    steps: int
    dtype: torch.dtype = torch.float16
    keep: bool = False
    device: str | torch.device | None = None
    states: dict = field(default_factory=dict)  # (layer name, step, end 0 or 1) -> (groups, tokens, channels)
    nbytes: int = 0
    peak_bytes: int = 0

    def put(self, layer: str, step: int, end: int, inputs: torch.Tensor):
        if self.device is not None:
            inputs = inputs.to(self.device)
        old = self.states.get((layer, step, end))
        self.nbytes += inputs.numel() * inputs.element_size() - (0 if old is None else old.numel() * old.element_size())
        self.states[(layer, step, end)] = inputs
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def get(self, layer: str, step: int, end: int) -> torch.Tensor:
        try:
            return self.states[(layer, step, end)]
        except KeyError:
            raise ValueError(f"No self-attention inputs of end frame {end} at step {step} in {layer}: render the "
                             "end frames (α = 0 and 1) first, in the same call or in an earlier one with "
                             "keep=True.") from None

    def clear(self):
        self.states.clear()
        self.nbytes = 0


@dataclass
class _AttentionRun:
    """What the processors of one `render_frames` call share: the store, the step, and the batch's roles."""

    store: AttentionStore
    record: bool
    step: int = 0
    end_rows: tuple = ()  # for end 0 and end 1: the rows of the batch that hold it, in group order
    inner: torch.Tensor | None = None  # rows of the in-between frames
    group: torch.Tensor | None = None  # of each in-between row: 0, or 0/1 for the [negative, positive] halves
    alpha: torch.Tensor | None = None  # of each in-between row, (rows, 1, 1)
    in_batch: bool = False  # both ends and an in-between frame in this batch, nothing to record: tensors alone
    gate: torch.Tensor | None = None  # 1 during the interpolated steps, 0 after (a tensor: no guard on the step)
    gates: tuple = ()  # the two values of `gate`, on the batch's device

    def set_batch(self, alphas: torch.Tensor, groups: int, device):
        """The roles in a UNet batch of `groups` halves of the frames at `alphas` (the guided batch is doubled)."""
        alphas = alphas.repeat(groups)
        group = torch.arange(groups).repeat_interleave(len(alphas) // groups)
        self.end_rows = tuple((alphas == a).nonzero().flatten().to(device) for a in (0, 1))
        inner = ((alphas > 0) & (alphas < 1)).nonzero().flatten()
        self.inner, self.group = inner.to(device), group[inner].to(device)
        self.alpha = alphas[inner].float().view(-1, 1, 1).to(device)
        self.in_batch = bool(len(inner)) and all(len(rows) for rows in self.end_rows) and not self.record
        self.gates = (torch.ones((), device=device), torch.zeros((), device=device))
        self.set_step(self.step)

    def set_step(self, step: int):
        """The sampling step about to run (set outside the UNet call, so that compiled graphs never see it)."""
        self.step = step
        if self.gates:
            self.gate = self.gates[0 if step < self.store.steps else 1]

    def __post_init__(self):
        # The step and the store are Python state: under torch.compile they must stay out of the graphs (no
        # guards on them). torch.compile runs through `models.compiled`, which loads dynamo before a run is made;
        # without it nothing is disabled, and importing dynamo (about 2 s) is not paid by every morph.
        if "torch._dynamo" in sys.modules:
            self.interpolated_inputs = torch.compiler.disable(self.interpolated_inputs)

    def mixed_inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """`key_value_inputs` for a batch that holds both ends (`in_batch`), in tensor operations alone, so that a
        compiled UNet runs it inside its graphs: the interpolated inputs during the interpolated steps (`gate` 1),
        the layer's own inputs after them (plain self-attention)."""
        s0, s1 = (hidden[rows].to(self.store.dtype) for rows in self.end_rows)
        mixed = (1 - self.alpha) * s0[self.group].float() + self.alpha * s1[self.group].float()
        out = hidden.index_put((self.inner,), mixed.to(hidden.dtype))
        return torch.where(self.gate.bool(), out, hidden)

    def interpolated_inputs(self, layer: str, hidden: torch.Tensor) -> torch.Tensor | None:
        """`key_value_inputs` during the interpolated steps; None (plain self-attention) after them."""
        return self.key_value_inputs(layer, hidden) if self.step < self.store.steps else None

    def key_value_inputs(self, layer: str, hidden: torch.Tensor) -> torch.Tensor | None:
        """The tensor the keys and values are computed from: for the in-between samples, the interpolation of
        the two ends' inputs at their α; for the ends, their own inputs. None where the batch has no
        in-between frame (plain self-attention)."""
        ends = {}
        for e, rows in enumerate(self.end_rows):
            if len(rows):
                ends[e] = hidden[rows].to(self.store.dtype)  # (groups, tokens, channels)
                if self.record:
                    self.store.put(layer, self.step, e, ends[e])
        if not len(self.inner):
            return None
        s0, s1 = (ends[e] if e in ends else self.store.get(layer, self.step, e).to(hidden.device) for e in (0, 1))
        mixed = (1 - self.alpha) * s0[self.group].float() + self.alpha * s1[self.group].float()
        out = hidden.clone()
        out[self.inner] = mixed.to(hidden.dtype)
        return out


class InterpolatedSelfAttnProcessor:
    """An attention processor for a self-attention (`attn1`) layer that lets in-between frames attend to the ends.

    During the interpolated steps it hands the wrapped processor (diffusers' own, usually
    `AttnProcessor2_0`) the interpolated inputs as `encoder_hidden_states`, so the keys and values come
    from the layer's own `to_k` / `to_v`, LoRA included; queries stay the frame's own. Otherwise it calls
    the wrapped processor unchanged.
    """

    def __init__(self, name: str, original, run: _AttentionRun):
        self.name, self.original, self.run = name, original, run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None and hidden_states.dim() == 3:
            if self.run.in_batch:
                encoder_hidden_states = self.run.mixed_inputs(hidden_states)
            else:
                encoder_hidden_states = self.run.interpolated_inputs(self.name, hidden_states)
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


def up_block_self_attention(unet) -> list[tuple[str, object]]:
    """(name, module) of the self-attention layers of the UNet's up blocks (the ones DiffMorpher interpolates)."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules()
            if name.startswith("up_blocks.") and name.endswith("attn1") and isinstance(m, Attention)
            and not m.is_cross_attention and m.group_norm is None and m.spatial_norm is None]


@contextlib.contextmanager
def interpolated_self_attention(unet, run: _AttentionRun):
    """Install `InterpolatedSelfAttnProcessor` on the up blocks' self-attention; the old processors come back after."""
    installed = []
    try:
        for name, module in up_block_self_attention(unet):
            installed.append((module, module.processor))
            module.set_processor(InterpolatedSelfAttnProcessor(name, module.processor, run))
        yield [module for module, _ in installed]
    finally:
        for module, processor in installed:
            module.set_processor(processor)

