"""`morphkit train`: a thin layer over `morphkit.train_lora`.

The settings options are the fields of `TrainSettings` (with '-' for '_'), listed once in `SETTINGS` below with
their help; each defaults to None here, meaning "not given", so that a `--config` file's value stands unless the
flag is given. The real defaults live in `TrainSettings`. The command's signature is built from that table (one
option a row reads better than a signature of seventy parameters); the run options follow it as usual.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from cli.common import MODEL_HELP, call

# field, type, flags, help. A bool field becomes --flag/--no-flag.
SETTINGS = [
    ("model", str, ("--model", "-m"), MODEL_HELP + " [default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    ("name", str, ("--name",), "File name of the LoRA (without .safetensors). [default: the image or folder name]"),
    # the LoRA
    ("rank", int, ("--rank", "-r"), "LoRA rank. [default: 16]"),
    ("alpha", float, ("--alpha",), "LoRA alpha; the update is scaled by alpha/rank. [default: rank]"),
    ("targets", str, ("--targets",), "Comma-separated UNet module names to adapt. [default: to_q,to_k,to_v,to_out.0]"),
    ("use_dora", bool, ("--use-dora",), "DoRA (weight-decomposed LoRA, peft's): a learned magnitude per output "
                                        "channel beside the low-rank direction. [default: off]"),
    # how long
    ("steps", int, ("--steps",), "Optimizer steps. [default: 200, unless --epochs]"),
    ("epochs", int, ("--epochs",), "Passes over the data (by every process together), instead of --steps."),
    # the optimizer
    ("optimizer", str, ("--optimizer",), "adamw or prodigy (the prodigyopt package; it finds its own step size, "
                                         "and --lr scales it). [default: adamw]"),
    ("learning_rate", float, ("--learning-rate", "--lr"), "Learning rate. [default: 2e-4; 1.0 with Prodigy]"),
    ("lr_scheduler", str, ("--lr-scheduler",), "constant, cosine or linear. [default: constant]"),
    ("lr_warmup_steps", int, ("--lr-warmup-steps",), "Steps of linear warm-up. [default: 0]"),
    ("adam_beta1", float, ("--adam-beta1",), "Adam's (and Prodigy's) beta1. [default: 0.9]"),
    ("adam_beta2", float, ("--adam-beta2",), "Adam's (and Prodigy's) beta2; 0.99 is the post's for Prodigy. [default: 0.999]"),
    ("adam_weight_decay", float, ("--adam-weight-decay",), "Weight decay of the UNet's LoRA. [default: 0.01]"),
    ("adam_epsilon", float, ("--adam-epsilon",), "Adam's epsilon. [default: 1e-8]"),
    ("prodigy_beta3", float, ("--prodigy-beta3",), "Prodigy's beta3. [default: the square root of beta2]"),
    ("prodigy_decouple", bool, ("--prodigy-decouple",), "Prodigy: decoupled (AdamW-style) weight decay. [default: on]"),
    ("prodigy_use_bias_correction", bool, ("--prodigy-use-bias-correction",), "Prodigy: Adam's bias correction. [default: on]"),
    ("prodigy_safeguard_warmup", bool, ("--prodigy-safeguard-warmup",), "Prodigy: keep the step size from growing "
                                                                        "too fast during warm-up. [default: on]"),
    ("prodigy_d0", float, ("--prodigy-d0",), "Prodigy's first step-size estimate; raise it to start short runs "
                                             "sooner. [default: 1e-6]"),
    ("batch_size", int, ("--batch-size",), "Images per micro-batch (per process). [default: 1]"),
    ("gradient_accumulation_steps", int, ("--gradient-accumulation-steps",), "Micro-batches per optimizer step. [default: 1]"),
    ("max_grad_norm", float, ("--max-grad-norm",), "Gradient clipping norm. [default: 1.0]"),
    # the loss
    ("noise_offset", float, ("--noise-offset",), "Noise offset (0.1 helps very dark/bright styles). [default: 0]"),
    ("snr_gamma", float, ("--snr-gamma",), "Min-SNR loss weighting gamma (5.0 is usual). [default: off]"),
    # the text encoder
    ("train_text_encoder", bool, ("--train-text-encoder",), "Train a LoRA on the text encoder(s) too. [default: off]"),
    ("train_text_encoder_ti", bool, ("--train-text-encoder-ti",), "Pivotal tuning: teach new tokens <s0><s1>… that "
     "stand for --token-abstraction in every caption; writes NAME_emb.safetensors. [default: off]"),
    ("text_encoder_lr", float, ("--text-encoder-lr",), "Learning rate of the text encoder's LoRA or new tokens "
     "(with Prodigy, --lr is used). [default: --lr]"),
    ("adam_weight_decay_text_encoder", float, ("--adam-weight-decay-text-encoder",), "Weight decay of the text "
     "encoder's LoRA or new tokens. [default: 0.001]"),
    ("text_encoder_targets", str, ("--text-encoder-targets",), "Text-encoder modules the LoRA adapts. "
     "[default: q_proj,k_proj,v_proj,out_proj]"),
    ("token_abstraction", str, ("--token-abstraction",), "The word captions use for the subject; pivotal tuning "
     "replaces it with the new tokens. [default: TOK]"),
    ("num_new_tokens_per_abstraction", int, ("--num-new-tokens-per-abstraction",), "New tokens per abstraction. [default: 2]"),
    ("train_text_encoder_ti_frac", float, ("--train-text-encoder-ti-frac",), "The fraction of the steps the new "
     "tokens train for; then they are frozen. [default: 0.5]"),
    ("initializer_token", str, ("--initializer-token",), "The new tokens start from this word's embedding. "
     "[default: the mean embedding]"),
    # the data
    ("caption_column", str, ("--caption-column",), "The metadata.jsonl column holding the captions. [default: text]"),
    ("instance_prompt", str, ("--instance-prompt",), "The caption of images without one (a folder without "
     "metadata.jsonl, or rows without a caption)."),
    ("caption_dropout_rate", float, ("--caption-dropout-rate",), "The share of captions dropped (trained as "
     "unconditional). [default: 0]"),
    ("repeats", int, ("--repeats",), "Times each image is seen per epoch. [default: 1]"),
    ("seed", int, ("--seed",), "Seed for LoRA init, data order, noise, timesteps, validation and class images. [default: 0]"),
    ("resolution", int, ("--resolution",), "Shorter image side in pixels, a multiple of 8. [default: the model's, "
     "512 for SD 1.5, 64 for tiny]"),
    ("crop", str, ("--crop",), "center or random (square crops), or none (whole image, aspect kept). [default: "
     "none for one image, center for a folder or with prior preservation]"),
    ("random_flip", bool, ("--random-flip",), "Flip images left-right at random. [default: off]"),
    # prior preservation
    ("with_prior_preservation", bool, ("--with-prior-preservation",), "DreamBooth's prior preservation: train on "
     "class images too, so the class keeps its look. [default: off]"),
    ("class_data_dir", str, ("--class-data-dir",), "Folder of class images; missing ones are generated there and kept."),
    ("class_prompt", str, ("--class-prompt",), "The prompt of the class images, like 'a photo of a dog'."),
    ("num_class_images", int, ("--num-class-images",), "How many class images. [default: 100]"),
    ("prior_loss_weight", float, ("--prior-loss-weight",), "Weight of the class images' loss. [default: 1.0]"),
    ("sample_batch_size", int, ("--sample-batch-size",), "Batch size of generating class images. [default: 4]"),
    ("sample_steps", int, ("--sample-steps",), "Denoising steps of validation and class images. [default: 25]"),
    # validation and logs
    ("validation_prompt", str, ("--validation-prompt",), "Render this prompt during training into validation/."),
    ("num_validation_images", int, ("--num-validation-images",), "Images per validation. [default: 4]"),
    ("validation_epochs", int, ("--validation-epochs",), "Validate every N epochs. [default: at the end only]"),
    ("validation_steps", int, ("--validation-steps",), "Validate every N steps. [default: at the end only]"),
    ("report_to", str, ("--report-to",), "tensorboard: also write loss, learning rates and validation images to "
     "OUTPUT/logs (needs the tensorboard package). [default: train_log.jsonl only]"),
    # the machine and checkpoints
    ("mixed_precision", str, ("--mixed-precision",), "auto, no, fp16 or bf16. Base weights in that precision, "
     "LoRA weights fp32. [default: auto: bf16 on CUDA GPUs that support it, else fp16; no (fp32) on CPU and MPS]"),
    ("gradient_checkpointing", bool, ("--gradient-checkpointing",), "Trade compute for memory. [default: off]"),
    ("checkpointing_steps", int, ("--checkpointing-steps",), "Save a resumable checkpoint every N steps (0: none). [default: 100]"),
    ("checkpoints_total_limit", int, ("--checkpoints-total-limit",), "Keep at most K checkpoints. [default: 2]"),
]


def _option(name: str, kind, flags: tuple, help: str) -> inspect.Parameter:
    if kind is bool:
        dashed = flags[0][2:]
        flags = (f"--{dashed}/--no-{dashed}",)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                             default=typer.Option(None, *flags, help=help))


RUN_OPTIONS = [  # what is not a setting of the training itself
    ("data", Optional[Path], typer.Argument(None, help="An image (with --prompt), a folder with metadata.jsonl, or a "
                                                       "folder of images with --instance-prompt. May come from --config.")),
    ("prompt", Optional[str], typer.Option(None, "--prompt", "-p", help="Caption for a single training image, e.g. 'a photo of sks'.")),
    ("config", Optional[Path], typer.Option(None, "--config", "-c", help="JSON or TOML file with any of these settings "
                                            "(keys as the option names, '_' or '-'); flags override it.")),
    ("output_dir", Optional[Path], typer.Option(None, "--output-dir", "-o", help="Folder for the LoRA, its log and "
                                                "checkpoints. [default: outputs/lora/NAME]")),
    ("lora_format", str, typer.Option("kohya", "--format", help="File format of the LoRA: kohya (lora_unet_... keys; "
                                      "loads in A1111, ComfyUI, diffusers and morphkit), diffusers (PEFT keys, as "
                                      "diffusers' own scripts write), or both (NAME.safetensors in kohya format and "
                                      "NAME.diffusers.safetensors).")),
    ("metadata_prompt", bool, typer.Option(True, "--metadata-prompt/--no-metadata-prompt", help="Record the prompts and "
                                           "the captions' tags (ss_tag_frequency, which A1111 shows as trigger words) in "
                                           "the LoRA's header; --no-metadata-prompt keeps them out, for private data.")),
    ("resume", bool, typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder.")),
    ("overwrite", bool, typer.Option(False, "--overwrite", help="Replace an existing LoRA and start afresh (with "
                                     "--resume: continue, then replace).")),
    ("device", Optional[str], typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto; "
                                           "under accelerate, each process's own device]")),
    ("processes", Optional[int], typer.Option(None, "--processes", help="Train data-parallel on N processes through "
                                              "accelerate launch (one per GPU; on a machine without one, CPU processes). "
                                              "--batch-size is per process. Same as: accelerate launch --multi_gpu "
                                              "--num_processes N -m morphkit train ...")),
    ("allow_pickle", bool, typer.Option(False, "--allow-pickle", help="Allow a pickled .ckpt/.pt/.bin model (loaded "
                                        "with weights_only=True). Only for files you trust.")),
    ("quiet", bool, typer.Option(False, "--quiet", "-q", help="No progress bar.")),
]


def train(**options):
    """Fit a LoRA to one image (overfitting is the point), a subject or a style.

    Writes NAME.safetensors (kohya format unless --format; loads in A1111, ComfyUI, diffusers), train_log.jsonl,
    train_settings.json and checkpoints/ into the output folder; with --train-text-encoder-ti also NAME_emb.safetensors,
    with --validation-prompt validation/. Under accelerate launch (or with --processes) the processes train
    data-parallel, and the main process writes the files.
    """
    from morphkit.processes import launch, launched_processes

    if options["processes"] is not None and options["processes"] > 1 and launched_processes() == 1:
        from cli.common import without_processes

        raise typer.Exit(call(launch, options["processes"], without_processes(sys.argv[1:])))
    import morphkit

    settings = {name: options[name] for name, *_ in SETTINGS}
    run = {k: options[k] for k in ("config", "output_dir", "device", "resume", "overwrite", "allow_pickle",
                                   "lora_format", "metadata_prompt")}
    start = time.perf_counter()
    result = call(morphkit.train_lora, options["data"], options["prompt"], progress=not options["quiet"], **run,
                  **settings)
    if result.rank != 0:
        return  # the main process reports
    for line in summary(result, time.perf_counter() - start):
        typer.echo(line)


def summary(result, seconds: float) -> list[str]:
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    last = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
    on = f" on {result.processes} processes" if result.processes > 1 else ""
    lines = [f"Trained {result.steps} steps{resumed}{on}{last} in {seconds:.1f} s."]
    lines += [f"LoRA: {path}" for path in result.lora_paths]
    if result.embedding_path:
        lines.append(f"Embedding: {result.embedding_path} (tokens in prompts: use the token abstraction, or load it "
                     "with --embedding)")
    if result.validation_grid:
        lines.append(f"Validation: {result.validation_grid}")
    lines.append(f"Log:  {result.output_dir / 'train_log.jsonl'}")
    return lines


train.__signature__ = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t, default=d) for n, t, d in RUN_OPTIONS]
    + [_option(*row) for row in SETTINGS])
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}
