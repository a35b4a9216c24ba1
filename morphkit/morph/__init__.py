"""Morphing two images, or a chain of them: per-image LoRA, DDIM inversion, slerp, blended adapters (DiffMorpher's
recipe).

    image A ─► latent ─► LoRA "img0" fitted ─► DDIM inversion under img0 ─► noise A, corrections A ─┐
    image B ─► latent ─► LoRA "img1" fitted ─► DDIM inversion under img1 ─► noise B, corrections B ─┤
                                                                                                   ▼
    for each α:   noise = AdaIN(slerp(A, B, α))   prompt = lerp(eA, eB, α)   LoRAs blended at α
                  ─► DDIM sampling, several frames per UNet call, each step adding lerp(cA, cB, α)
                  ─► VAE decode ─► frame           (the corrections bring the ends back exactly)
    then (even pacing) measure the distance between neighbours, move α so that the steps are equal,
    and render again only the frames whose α moved.

The package, one concept a module:

- `settings`: `MorphSettings`, every setting, validated once, in three groups (prepare, render, export);
- `interpolation`: the numbers (`slerp`, `lerp`, `channel_stats`, `adain`, `start_latents`, `alpha_schedule`,
  `even_alphas`), functions of tensors;
- `attention`: DiffMorpher's self-attention interpolation, as attention processors;
- `sampling`: `render_frames` (many frames per UNet call, each with its own α) and `invert_under_loras`;
- `pair`: `prepare_pair` / `prepare_keyframes`, the slow stage (LoRAs and inversions), returning a `PreparedPair`
  (or `PreparedKeyframes`, whose `segment(i)` is the pair of keyframes i and i+1);
- `job`: the stages after preparing: `render_morph` / `pace` / `export_morph`;
- `chain`: keyframe chains (A → B → C ..., `loop` back to A): `render_chain` (frames shared out by each
  segment's perceptual length, even pacing over the whole chain);
- `run`: the whole jobs, `morph` (two images) and `morph_chain` (keyframes), each a short list of steps over
  the stages.
"""

from .attention import AttentionStore, attention_steps, check_attn_lambda, up_block_self_attention
from .interpolation import (adain, alpha_schedule, channel_stats, even_alphas, interp, lerp, moved_frames, slerp,
                            start_latents)
from .chain import allot_steps, render_chain, respace
from .job import MorphResult, Rendered, export_morph, pace, render_alphas, render_morph
from .run import morph, morph_chain
from .pair import PreparedKeyframes, PreparedPair, prepare_keyframes, prepare_pair
from .sampling import ADAPTERS, invert_under_loras, render_frames
from .settings import PACINGS, MorphSettings, check_pacing

__all__ = [
    "ADAPTERS", "PACINGS", "AttentionStore", "MorphResult", "MorphSettings", "PreparedKeyframes", "PreparedPair",
    "Rendered", "adain", "allot_steps", "alpha_schedule", "attention_steps", "channel_stats", "check_attn_lambda",
    "check_pacing", "even_alphas", "export_morph", "interp", "invert_under_loras", "lerp", "morph", "morph_chain",
    "moved_frames", "pace", "prepare_keyframes", "prepare_pair", "render_alphas", "render_chain", "render_frames",
    "render_morph", "respace", "slerp", "start_latents", "up_block_self_attention",
]
