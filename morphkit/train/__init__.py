"""Fitting a LoRA to one image or to a captioned folder.

The path of the data:

    images ──VAE (once)──► latents          captions ──text encoder (once)──► embeddings
                                  │
                  fit_lora: for each step, draw examples, noise and timesteps from a generator
                  seeded by (seed, step), so a resumed run repeats exactly what an unbroken one does
                                  │
                     LoRA weights ──save_lora──► <name>.safetensors (kohya or diffusers format)

Modules, one concept each:
- `settings`: `TrainSettings` (validated once, loadable from a config file) and `TrainResult`;
- `draws`: the learning rate and random draws of a step, functions of (seed, step) alone;
- `encoding`: latents and embeddings computed once; `loss`: the denoising loss;
- `optim`: the optimizer, mixed precision, one optimizer step; `checkpoints`: save, list, resume;
- `parallel`: data-parallel processes (rows of the global batch, averaged gradients);
- `loop`: `fit_lora`, the loop alone over a loaded pipeline; `joint`: `fit_loras`, several LoRAs in one pass;
- `run`: `train_lora`, what `morphkit train` runs: settings, files, checkpoints and resume.
"""

from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .draws import batch_indices, draw_batch, draw_noise, lr_at, rng, total_steps
from .encoding import EncodedExample, encode_examples
from .joint import fit_loras, joint_steps
from .loop import fit_lora
from .loss import diffusion_loss, min_snr_weights
from .optim import make_optimizer, mixed_precision, optimizer_step
from .parallel import Share
from .run import lora_files, train_lora
from .settings import CROPS, DEFAULT_STEPS, LR_SCHEDULES, MIXED_PRECISIONS, TrainResult, TrainSettings

FAMILIES = ("sd15", "sdxl")  # the model families the trainer fits LoRAs on (`morph` asks, before it fits)

__all__ = [
    "FAMILIES",
    "CROPS", "DEFAULT_STEPS", "LR_SCHEDULES", "MIXED_PRECISIONS", "EncodedExample", "Share", "TrainResult",
    "TrainSettings", "batch_indices", "diffusion_loss", "draw_batch", "draw_noise", "encode_examples", "fit_lora",
    "fit_loras", "joint_steps", "list_checkpoints", "load_checkpoint", "lora_files", "lr_at", "make_optimizer",
    "min_snr_weights", "mixed_precision", "optimizer_step", "rng", "save_checkpoint", "total_steps", "train_lora",
]
