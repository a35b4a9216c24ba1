import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import morphkit
from morphkit.data import load_examples
from morphkit.lora import load_lora, lora_state_dict
from morphkit.lora_files import read_lora_file
from morphkit.train import TrainSettings, diffusion_loss, draw_noise, encode_examples, fit_lora, fit_loras, lr_at, rng
from tests.conftest import REPO, interrupted_training, make_photo, unet_probe

STYLE = REPO / "dataset" / "style"


def fixed_loss(pipe, encoded, settings):
    """The training loss on a fixed batch of 16 noise draws: comparable before and after training."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    z = encoded[0].latents[0][None].repeat(16, 1, 1, 1)
    e = encoded[0].embeddings[0].expand(16)
    noise, timesteps = draw_noise(z, rng(1234, "eval", 0), settings, scheduler.config.num_train_timesteps)
    with torch.no_grad():
        return diffusion_loss(pipe.unet, scheduler, z, e, noise, timesteps, settings,
                              torch.autocast("cpu", enabled=False)).item()


def test_loss_falls_and_lora_changes_the_unet(tiny_pipe, photo):
    settings = TrainSettings(data=str(photo), prompt="a photo", steps=50, learning_rate=5e-3, resolution=64, crop="none")
    encoded = encode_examples(tiny_pipe, load_examples(photo, "a photo"), 64, "none", False)
    before_out = unet_probe(tiny_pipe.unet)
    before = fixed_loss(tiny_pipe, encoded, settings)
    result = fit_lora(tiny_pipe, encoded, settings, progress=False)
    after = fixed_loss(tiny_pipe, encoded, settings)
    assert len(result.losses) == 50
    assert after < 0.95 * before, (before, after)
    assert (unet_probe(tiny_pipe.unet) - before_out).abs().max() > 1e-3


@pytest.mark.parametrize("alpha,fmt", [(None, "kohya"), (4.0, "kohya"), (4.0, "diffusers")])
def test_saved_lora_loads_in_stock_diffusers_and_reproduces_the_model(tiny_pipe, tiny_path, photo, tmp_path, alpha, fmt):
    from diffusers import StableDiffusionPipeline

    result = morphkit.train_lora(photo, "a photo", model="tiny", steps=30, learning_rate=5e-3, rank=8, alpha=alpha,
                                 output_dir=tmp_path / "out", pipe=tiny_pipe, progress=False, lora_format=fmt)
    assert read_lora_file(result.lora_path).format == fmt
    trained = unet_probe(tiny_pipe.unet)

    fresh = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None, requires_safety_checker=False)
    base = unet_probe(fresh.unet)
    fresh.load_lora_weights(str(result.lora_path))
    reloaded = unet_probe(fresh.unet)
    assert (reloaded - trained).abs().max() < 1e-5
    assert (reloaded - base).abs().max() > 1e-3  # the LoRA does something, so the match means something

    ours = morphkit.load_pipeline("tiny", device="cpu")  # and morphkit's own loader agrees (alpha from the header)
    load_lora(ours.unet, result.lora_path, "mine")
    assert (unet_probe(ours.unet) - trained).abs().max() < 1e-5

    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["morphkit.rank"] == "8" and float(meta["morphkit.alpha"]) == (alpha or 8)
    for key in ["base_model", "targets", "steps", "resolution", "seed", "data_hash", "version"]:
        assert f"morphkit.{key}" in meta
    assert meta["morphkit.base_model"] == "tiny" and meta["morphkit.steps"] == "30"
    if fmt == "kohya":  # the training notes A1111 and civitai show
        assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == str(int(alpha or 8))
        assert meta["ss_max_train_steps"] == "30" and meta["ss_sd_model_name"] == "tiny"


def test_format_both_writes_two_files_with_the_same_factors(tiny_pipe, photo, tmp_path):
    result = morphkit.train_lora(photo, "a photo", model="tiny", steps=2, output_dir=tmp_path, pipe=tiny_pipe,
                                 progress=False, lora_format="both")
    kohya, diffusers = result.lora_paths
    assert kohya.name == "photo.safetensors" and diffusers.name == "photo.diffusers.safetensors"
    a, b = read_lora_file(kohya), read_lora_file(diffusers)
    assert (a.format, b.format) == ("kohya", "diffusers")
    assert all(torch.equal(a.modules[k].up, b.modules[k].up) and a.modules[k].alpha == b.modules[k].alpha
               for k in a.modules)
    with pytest.raises(morphkit.ConfigError, match="kohya, diffusers or both"):
        morphkit.train_lora(photo, "a photo", model="tiny", steps=2, output_dir=tmp_path / "x", lora_format="ckpt")


def test_interrupted_run_resumes_to_the_same_lora(photo, tmp_path, monkeypatch):
    common = dict(model="tiny", steps=20, learning_rate=1e-3, checkpointing_steps=8, progress=False)
    whole = morphkit.train_lora(photo, "a photo", output_dir=tmp_path / "whole", **common)

    undo = interrupted_training(monkeypatch, 13)  # during step 13, after the checkpoint at step 8
    with pytest.raises(KeyboardInterrupt):
        morphkit.train_lora(photo, "a photo", output_dir=tmp_path / "cut", **common)
    undo()
    assert not (tmp_path / "cut" / "photo.safetensors").exists()  # no half-finished LoRA
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000008"]

    with pytest.raises(morphkit.OutputExistsError, match="--resume"):
        morphkit.train_lora(photo, "a photo", output_dir=tmp_path / "cut", **common)
    resumed = morphkit.train_lora(photo, "a photo", output_dir=tmp_path / "cut", resume=True, **common)
    assert resumed.resumed_from == 8 and resumed.steps == 20
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
    assert len(list((tmp_path / "cut" / "checkpoints").iterdir())) == 2  # checkpoints_total_limit


def test_resume_refuses_changed_settings(photo, tmp_path):
    common = dict(model="tiny", steps=4, checkpointing_steps=2, progress=False, output_dir=tmp_path)
    morphkit.train_lora(photo, "a photo", **common)
    with pytest.raises(morphkit.ConfigError, match="other settings"):
        morphkit.train_lora(photo, "a photo", resume=True, overwrite=True, learning_rate=1e-3, **common)


def test_folder_and_config_files_train_the_same_lora(tmp_path):
    settings = dict(model="tiny", epochs=2, batch_size=2, rank=4, seed=3, random_flip=True, crop="random")
    from_folder = morphkit.train_lora(STYLE, output_dir=tmp_path / "a", progress=False, **settings)
    assert from_folder.steps == 6  # 6 images, batch 2, 2 epochs

    toml = tmp_path / "style.toml"
    toml.write_text(f'data = "{STYLE}"\nmodel = "tiny"\nepochs = 2\nbatch-size = 2\nrank = 4\nseed = 3\n'
                    'random_flip = true\ncrop = "random"\n')
    from_toml = morphkit.train_lora(config=toml, output_dir=tmp_path / "b", progress=False)
    cfg = tmp_path / "style.json"
    cfg.write_text(json.dumps({"data": str(STYLE), **settings}))
    from_json = morphkit.train_lora(config=cfg, output_dir=tmp_path / "c", progress=False)
    a, b, c = (load_file(str(r.lora_path)) for r in (from_folder, from_toml, from_json))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rank": 4, "learning_rate": 1e-3}))
    s = TrainSettings.resolve(cfg, data="x", rank=2)
    assert s.rank == 2 and s.learning_rate == 1e-3
    cfg.write_text(json.dumps({"rnak": 4}))
    with pytest.raises(morphkit.ConfigError, match="unknown settings: rnak"):
        TrainSettings.resolve(cfg, data="x")


def test_learning_rate_schedules():
    assert lr_at(0, 1.0, "constant", 0, 100) == 1.0
    assert lr_at(0, 1.0, "constant", 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, "cosine", 10, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, "cosine", 10, 100) == pytest.approx(0.0)
    assert lr_at(50, 1.0, "linear", 0, 100) == pytest.approx(0.5)


def test_gradient_accumulation_noise_offset_and_min_snr_run(photo, tmp_path):
    result = morphkit.train_lora(photo, "a photo", model="tiny", steps=3, gradient_accumulation_steps=2, noise_offset=0.1,
                                 snr_gamma=5.0, lr_scheduler="cosine", lr_warmup_steps=1, gradient_checkpointing=True,
                                 output_dir=tmp_path, progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_resume_with_more_steps_continues_a_finished_run(photo, tmp_path):
    common = dict(model="tiny", checkpointing_steps=5, progress=False, output_dir=tmp_path)
    morphkit.train_lora(photo, "a photo", steps=5, **common)
    longer = morphkit.train_lora(photo, "a photo", steps=8, resume=True, **common)
    assert longer.resumed_from == 5 and longer.steps == 8
    straight = morphkit.train_lora(photo, "a photo", steps=8, **{**common, "output_dir": tmp_path / "straight"})
    a, b = load_file(str(longer.lora_path)), load_file(str(straight.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_run_writes_nothing(photo, tmp_path):
    with pytest.raises(morphkit.LoRAError, match="match no module"):
        morphkit.train_lora(photo, "a photo", model="tiny", steps=2, targets="nonexistent_module", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_training_twice_on_one_pipeline(photo, tiny_pipe, tmp_path):
    for name in ("first", "second"):
        morphkit.train_lora(photo, "a photo", steps=2, pipe=tiny_pipe, output_dir=tmp_path / name, progress=False)


@pytest.mark.parametrize("extra", [
    {},
    {"snr_gamma": 5.0, "noise_offset": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 2},
    {"prediction_type": "v_prediction", "snr_gamma": 5.0},
], ids=["plain", "snr-offset-cosine", "v-prediction"])
def test_fitting_two_loras_together_equals_fitting_them_one_by_one(tiny_pipe, photo, tmp_path, extra):
    from peft.tuners.lora import LoraLayer

    extra = dict(extra)
    if "prediction_type" in extra:
        tiny_pipe.scheduler.register_to_config(prediction_type=extra.pop("prediction_type"))
    other = make_photo(tmp_path / "other.png", seed=3)
    settings = TrainSettings(data="-", steps=6, learning_rate=2e-3, resolution=64, crop="none", rank=4,
                             max_grad_norm=0.05, **extra)  # a clip that bites, so per-adapter clipping is tested
    examples = {name: encode_examples(tiny_pipe, load_examples(path, prompt), 64, "none", False)
                for name, path, prompt in (("a", photo, "a photo"), ("b", other, "another photo"))}

    alone = {}
    for name, encoded in examples.items():
        result = fit_lora(tiny_pipe, encoded, settings, adapter_name=name, progress=False)
        alone[name] = (lora_state_dict(tiny_pipe.unet, name), result.losses)
    tiny_pipe.unet.delete_adapters(["a", "b"])

    together = fit_loras(tiny_pipe, examples, settings, progress=False)
    for name in ("a", "b"):
        weights, losses = alone[name]
        joint = lora_state_dict(tiny_pipe.unet, name)
        assert joint.keys() == weights.keys()
        # fp32 rounding differs between a batch of 2 and of 1, and Adam divides by the root of the second
        # moment, which carries that rounding of near-zero gradients into the weights: hence rtol 1e-3 and
        # atol 5e-5, 2.5 % of one Adam step at this learning rate (6 steps move a weight up to 1.2e-2)
        for key in weights:
            torch.testing.assert_close(joint[key], weights[key], rtol=1e-3, atol=5e-5)
        assert together[name].losses == pytest.approx(losses, rel=1e-4)
    # the two LoRAs learned different things (each from its own image), and learned something
    assert max((alone["a"][0][k] - alone["b"][0][k]).abs().max().item() for k in alone["a"][0]) > 1e-3
    # nothing left behind: the LoRAs are frozen and every layer's scale is a plain number again
    assert not any(p.requires_grad for p in tiny_pipe.unet.parameters())
    scales = [s for m in tiny_pipe.unet.modules() if isinstance(m, LoraLayer) for s in m.scaling.values()]
    assert scales and all(isinstance(s, float) for s in scales)


def test_fitting_loras_together_refuses_what_it_cannot_batch(tiny_pipe, photo):
    encoded = encode_examples(tiny_pipe, load_examples(photo, "a photo"), 64, "none", False)
    with pytest.raises(morphkit.ConfigError, match="batch_size 1"):
        fit_loras(tiny_pipe, {"a": encoded, "b": encoded}, TrainSettings(data="-", steps=2, batch_size=2), progress=False)


def test_two_processes_train_data_parallel_as_one_process_with_their_global_batch(tmp_path):
    """`--processes 2` (accelerate launch, gloo on the CPU): each process takes half of every global batch and
    the gradients are averaged, so the loss curve and the LoRA equal one process's with batch 2; a resumed
    data-parallel run continues that curve."""
    common = dict(model="tiny", rank=4, learning_rate=1e-3, seed=5, checkpointing_steps=2, progress=False)
    one = morphkit.train_lora(STYLE, output_dir=tmp_path / "one", steps=6, batch_size=2, **common)

    def launch(steps, *extra):
        command = [sys.executable, "-m", "morphkit", "train", str(STYLE), "--processes", "2", "--model", "tiny",
                   "--rank", "4", "--lr", "1e-3", "--seed", "5", "--checkpointing-steps", "2", "--batch-size", "1",
                   "--steps", str(steps), "-o", str(tmp_path / "two"), "-q", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("on 2 processes") == 1, done.stdout  # one report, from the main process
        return done

    launch(4)
    launch(6, "--resume")
    assert json.loads((tmp_path / "two" / "train_settings.json").read_text())["processes"] == 2
    rows = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # only the main process logs
    assert torch.allclose(torch.tensor([r["loss"] for r in rows]), torch.tensor(one.losses), rtol=1e-5, atol=1e-7)
    a, b = load_file(str(one.lora_path)), load_file(str(tmp_path / "two" / "style.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
