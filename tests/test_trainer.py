"""The full trainer on the tiny model: pivotal tuning, text-encoder LoRA, Prodigy, repeats and captions, prior
preservation, validation images, logs, resume with all of it, and the bad inputs it must refuse."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import morphkit
from morphkit.data import load_examples
from morphkit.train import TrainSettings, encode_examples, fit_lora
from morphkit.train.text import text_parts
from tests.conftest import REPO, interrupted_training, make_photo
from tests.test_train import fixed_loss

STYLE = REPO / "dataset" / "style"
FAST = dict(model="tiny", rank=4, progress=False, checkpointing_steps=0)


def text_output(pipe, prompt):
    """The text encoder's conditioning of `prompt`, as the pipeline computes it."""
    with torch.no_grad():
        return morphkit.models.encode_prompt(pipe, prompt)


def fresh_pipe(tiny_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None, requires_safety_checker=False)


def test_pivotal_tuning_writes_an_embedding_that_stock_diffusers_loads(photo, tmp_path, tiny_path):
    pipe = morphkit.load_pipeline("tiny", device="cpu")
    result = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path, train_text_encoder_ti=True, steps=6,
                                 text_encoder_lr=5e-2, pipe=pipe, **FAST)
    path = result.embedding_path
    assert path == tmp_path / "photo_emb.safetensors"
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["clip_l"] and f.get_tensor("clip_l").shape == (2, 32)
        assert json.loads(f.metadata()["morphkit.tokens"]) == ["<s0>", "<s1>"]
    trained = text_output(pipe, "a photo of <s0><s1>")  # the run's pipeline knows the tokens as its own

    stock = fresh_pipe(tiny_path)  # as the diffusers post loads pivotal-tuning embeddings
    stock.load_textual_inversion(load_file(str(path))["clip_l"], token=["<s0>", "<s1>"], text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    reloaded = text_output(stock, "a photo of <s0><s1>")
    assert (reloaded - trained).abs().max() < 1e-5
    by_file = fresh_pipe(tiny_path)  # and by path, as one multi-vector token (A1111 names it by the file, too)
    by_file.load_textual_inversion(str(path), token="<photo_emb>")
    assert (text_output(by_file, "a photo of <photo_emb>") - trained).abs().max() < 1e-5
    mean = fresh_pipe(tiny_path).text_encoder.get_input_embeddings().weight.mean(0)  # where the tokens started
    assert (load_file(str(path))["clip_l"] - mean).abs().max() > 1e-2  # and training moved them
    assert (reloaded - text_output(stock, "a photo of the")).abs().max() > 1e-3

    ours = morphkit.load_pipeline("tiny", device="cpu")  # morphkit's own loader: the abstraction works in prompts
    from morphkit.embeddings import load_embedding

    embedding = load_embedding(ours, path)
    assert embedding.in_prompt("a photo of TOK") == "a photo of <s0><s1>"
    assert (text_output(ours, embedding.in_prompt("a photo of TOK")) - trained).abs().max() < 1e-5


def test_new_tokens_stop_changing_after_their_fraction_of_the_run(photo, tmp_path):
    morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path, train_text_encoder_ti=True, steps=6,
                        train_text_encoder_ti_frac=0.5, text_encoder_lr=5e-2, model="tiny", rank=4, progress=False,
                        checkpointing_steps=1, checkpoints_total_limit=6)
    states = [load_file(str(tmp_path / "checkpoints" / f"step-{s:06d}" / "lora.safetensors")) for s in range(1, 7)]
    tokens = [s["tokens.text_encoder"] for s in states]
    unet = [s[next(k for k in s if k.startswith("unet."))] for s in states]
    moved = [(b - a).abs().max().item() for a, b in zip(tokens, tokens[1:])]
    assert all(m > 0 for m in moved[:2]), moved  # steps 2 and 3 move them
    assert all(m == 0 for m in moved[2:]), moved  # from step 4 on (3 of 6 steps done) they are frozen
    assert all((b - a).abs().max() > 0 for a, b in zip(unet, unet[1:]))  # while the UNet's LoRA trains on


def test_text_encoder_lora_loads_in_stock_diffusers_and_changes_the_text_encoder(photo, tmp_path, tiny_path):
    pipe = morphkit.load_pipeline("tiny", device="cpu")
    before = text_output(pipe, "a photo")
    result = morphkit.train_lora(photo, "a photo", output_dir=tmp_path, train_text_encoder=True, steps=8,
                                 text_encoder_lr=1e-2, pipe=pipe, lora_format="both", **FAST)
    trained = text_output(pipe, "a photo")
    assert (trained - before).abs().max() > 1e-4
    kohya = load_file(str(result.lora_paths[0]))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    diffusers_keys = load_file(str(result.lora_paths[1]))
    assert any(k.startswith("text_encoder.") for k in diffusers_keys)
    for path in result.lora_paths:
        stock = fresh_pipe(tiny_path)
        stock.load_lora_weights(str(path))
        assert (text_output(stock, "a photo") - trained).abs().max() < 1e-4, path


def test_prodigy_lowers_the_loss(tiny_pipe, photo):
    settings = TrainSettings.resolve(data=str(photo), prompt="a photo", optimizer="prodigy", steps=40, resolution=64,
                                     crop="none", prodigy_d0=1e-2)  # a first estimate fit for 40 steps of a tiny model
    assert settings.learning_rate == 1.0
    encoded = encode_examples(tiny_pipe, load_examples(photo, "a photo"), 64, "none", False)
    before = fixed_loss(tiny_pipe, encoded, settings)
    fit_lora(tiny_pipe, encoded, settings, progress=False)
    after = fixed_loss(tiny_pipe, encoded, settings)
    assert after < 0.95 * before, (before, after)


def test_repeats_multiply_the_steps_of_an_epoch(tmp_path):
    once = morphkit.train_lora(STYLE, output_dir=tmp_path / "a", epochs=1, batch_size=2, **FAST)
    twice = morphkit.train_lora(STYLE, output_dir=tmp_path / "b", epochs=1, batch_size=2, repeats=2, **FAST)
    assert (once.steps, twice.steps) == (3, 6)


def test_captions_from_a_column_an_instance_prompt_and_dropped(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        make_photo(folder / f"{i}.png", seed=i)
    examples = load_examples(folder, instance_prompt="a photo of TOK")
    assert [e.captions for e in examples] == [["a photo of TOK"]] * 2
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "zero"}\n{"file_name": "1.png"}\n')
    examples = load_examples(folder, caption_column="caption", instance_prompt="fallback")
    assert [e.captions for e in examples] == [["zero"], ["fallback"]]
    with pytest.raises(morphkit.InputError, match="--caption-column"):
        load_examples(folder, caption_column="caption")
    morphkit.train_lora(folder, output_dir=tmp_path / "out", caption_column="caption", instance_prompt="fallback",
                        caption_dropout_rate=0.5, steps=3, **FAST)


def test_missing_class_images_are_generated_once_and_reused(photo, tmp_path):
    classes = tmp_path / "classes"
    common = dict(with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo", num_class_images=3,
                  sample_batch_size=2, sample_steps=2, steps=3, **FAST)
    first = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "a", **common)
    made = sorted(classes.iterdir())
    assert len(made) == 3 and all(p.suffix == ".png" for p in made)
    stamps = {p: p.stat().st_mtime_ns for p in made}
    again = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "b", **common)
    assert {p: p.stat().st_mtime_ns for p in sorted(classes.iterdir())} == stamps  # none made again
    assert again.losses == first.losses  # the same class images, the same run
    plain = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "c", steps=3, **FAST)
    assert plain.losses != first.losses  # and the prior term is in the loss


def test_validation_images_appear_at_the_right_steps(photo, tmp_path):
    morphkit.train_lora(photo, "a photo", output_dir=tmp_path, steps=4, validation_prompt="a photo", validation_steps=2,
                        num_validation_images=2, sample_steps=2, report_to="tensorboard", **FAST)
    folders = sorted(p.name for p in (tmp_path / "validation").iterdir() if p.is_dir())
    assert folders == ["step_000002", "step_000004"]
    assert all(len(list((tmp_path / "validation" / f).glob("*.png"))) == 2 for f in folders)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "validation" in r] == [2, 4]
    from PIL import Image

    assert Image.open(tmp_path / "validation" / "grid.png").size == (2 * 64, 2 * 64)  # a row per step
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))  # TensorBoard's event file


def test_resume_with_pivotal_tuning_and_prodigy_equals_an_unbroken_run(photo, tmp_path, monkeypatch):
    common = dict(model="tiny", rank=4, steps=6, checkpointing_steps=2, progress=False, train_text_encoder_ti=True,
                  optimizer="prodigy", train_text_encoder_ti_frac=0.5)
    whole = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "whole", **common)
    assert whole.embedding_path.is_file()

    undo = interrupted_training(monkeypatch, 4)  # during step 4, after the checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "cut", **common)
    undo()
    resumed = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "cut", resume=True, **common)
    assert resumed.resumed_from == 2
    for name in ("photo.safetensors", "photo_emb.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name
    rows = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed)  # the clock continues across the resume

    with pytest.raises(morphkit.ConfigError, match=r"changed: .*prodigy_beta3"):
        morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "cut", resume=True, overwrite=True,
                            **{**common, "steps": 8, "prodigy_beta3": 0.5})


@pytest.mark.parametrize("settings,message", [
    (dict(train_text_encoder_ti=True, prompt="a photo of a dog"), "no caption holds it"),
    (dict(train_text_encoder=True, train_text_encoder_ti=True), "alternatives"),
    (dict(repeats=0), "--repeats must be 1 or more"),
    (dict(with_prior_preservation=True, class_prompt="a dog"), "--class-data-dir"),
])
def test_bad_trainer_settings_are_refused_before_the_model_loads(photo, tmp_path, settings, message, monkeypatch):
    monkeypatch.setattr(morphkit.train.run, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    kwargs = {"prompt": "a photo of TOK", **settings}
    with pytest.raises(morphkit.ConfigError, match=message):
        morphkit.train_lora(photo, output_dir=tmp_path, steps=2, **{**FAST, **kwargs})


def test_a_class_folder_with_other_files_and_a_missing_prodigy_are_refused(photo, tmp_path, monkeypatch):
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "notes.txt").write_text("not an image")
    monkeypatch.setattr(morphkit.train.run, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(morphkit.InputError, match="notes.txt.*not an image"):
        morphkit.train_lora(photo, "a photo", output_dir=tmp_path / "o", with_prior_preservation=True,
                            class_data_dir=str(classes), class_prompt="a photo", steps=2, **FAST)
    import builtins

    real_import = builtins.__import__

    def no_prodigy(name, *args, **kwargs):
        if name == "prodigyopt":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    with pytest.raises(morphkit.ConfigError, match="pip install prodigyopt"):
        morphkit.train.optim.make_optimizer([torch.zeros(1, requires_grad=True)],
                                            TrainSettings(data="x", optimizer="prodigy"), torch.device("cpu"))


def test_text_parts_of_the_tiny_model(tiny_pipe):
    assert [p.name for p in text_parts(tiny_pipe)] == ["text_encoder"]


def test_a_dora_file_round_trips_in_both_formats(photo, tmp_path, tiny_path):
    from tests.conftest import unet_probe

    pipe = morphkit.load_pipeline("tiny", device="cpu")
    base = unet_probe(pipe.unet)
    result = morphkit.train_lora(photo, "a photo", output_dir=tmp_path, use_dora=True, steps=8, learning_rate=1e-2,
                                 pipe=pipe, lora_format="both", **FAST)
    trained = unet_probe(pipe.unet)
    assert (trained - base).abs().max() > 1e-3
    kohya, diffusers_file = result.lora_paths
    assert any(k.endswith(".dora_scale") for k in load_file(str(kohya)))
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(str(diffusers_file)))
    for path in result.lora_paths:  # morphkit reads both back: the same UNet
        ours = morphkit.load_pipeline("tiny", device="cpu")
        morphkit.lora.load_lora(ours.unet, path, "dora")
        assert (unet_probe(ours.unet) - trained).abs().max() < 1e-4, path
    stock = fresh_pipe(tiny_path)  # and stock diffusers reads the diffusers-format one (PEFT's DoRA)
    stock.load_lora_weights(str(diffusers_file))
    assert (unet_probe(stock.unet) - trained).abs().max() < 1e-4
    info = morphkit.lora_files.lora_info(kohya)
    assert "dora" in json.dumps(info).lower()


# ---------------------------------------------------------------------------------------------- SDXL

@pytest.fixture(scope="module")
def tiny_sdxl(morphkit_cache):
    from morphkit.tiny_sdxl import tiny_sdxl_model_path

    return tiny_sdxl_model_path()


def xl_unet_probe(pipe, seed=0):
    """The SDXL UNet's output on a fixed random input (latents, token embeddings, pooled embeddings, time ids)."""
    unet, g = pipe.unet, torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn((2, 4, size, size), generator=g)
    emb = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
    pooled = torch.randn((2, pipe.text_encoder_2.config.projection_dim), generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 20]), emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def test_sdxl_lora_with_both_text_encoders_trains_and_loads_in_stock_diffusers(photo, tmp_path, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = morphkit.load_pipeline("tiny-sdxl", device="cpu")
    base = xl_unet_probe(pipe)
    result = morphkit.train_lora(photo, "a photo", output_dir=tmp_path, train_text_encoder=True, steps=6,
                                 learning_rate=1e-2, text_encoder_lr=1e-2, pipe=pipe, **FAST)
    assert result.losses and all(torch.isfinite(torch.tensor(result.losses)))
    trained, cond = xl_unet_probe(pipe), morphkit.models.encode_conditioning(pipe, "a photo", (64, 64))
    assert (trained - base).abs().max() > 1e-3
    keys = load_file(str(result.lora_path))
    for prefix in ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(k.startswith(prefix) for k in keys), prefix  # SDXL's kohya names, as A1111 and ComfyUI map them

    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    stock.load_lora_weights(str(result.lora_path))
    assert (xl_unet_probe(stock) - trained).abs().max() < 1e-4
    again = morphkit.models.encode_conditioning(stock, "a photo", (64, 64))
    assert (again.embeds - cond.embeds).abs().max() < 1e-4 and (again.pooled - cond.pooled).abs().max() < 1e-4


def test_sdxl_pivotal_tuning_writes_clip_l_and_clip_g(photo, tmp_path, tiny_sdxl):
    from morphkit.embeddings import load_embedding

    pipe = morphkit.load_pipeline("tiny-sdxl", device="cpu")
    result = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path, train_text_encoder_ti=True, steps=4,
                                 text_encoder_lr=5e-2, pipe=pipe, **FAST)
    vectors = load_file(str(result.embedding_path))
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"clip_l": (2, 32), "clip_g": (2, 48)}
    trained = morphkit.models.encode_conditioning(pipe, "a photo of <s0><s1>", (64, 64))
    ours = morphkit.load_pipeline("tiny-sdxl", device="cpu")
    embedding = load_embedding(ours, result.embedding_path)
    again = morphkit.models.encode_conditioning(ours, embedding.in_prompt("a photo of TOK"), (64, 64))
    assert (again.embeds - trained.embeds).abs().max() < 1e-5 and (again.pooled - trained.pooled).abs().max() < 1e-5
    with pytest.raises(morphkit.InputError, match="clip_g"):  # an SDXL embedding on SD 1.5
        load_embedding(morphkit.load_pipeline("tiny", device="cpu"), result.embedding_path)


def test_a_morph_on_sdxl_fits_a_lora_per_image(tmp_path, tiny_sdxl):
    a, b = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=5)
    result = morphkit.morph(a, b, model="tiny-sdxl", steps=4, frames=3, lora_steps=3, pacing="linear",
                            output_dir=tmp_path / "m", formats=("gif",), cache=False, progress=False)
    assert len(result.frames) == 3


def test_morph_and_stylize_take_an_embedding_and_its_abstraction(photo, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    trained = morphkit.train_lora(photo, "a photo of TOK", output_dir=tmp_path / "t", train_text_encoder_ti=True,
                                  steps=4, text_encoder_lr=5e-2, **FAST)
    emb = trained.embedding_path
    a, b = make_photo(tmp_path / "a.png", seed=1), make_photo(tmp_path / "b.png", seed=2)
    common = dict(model="tiny", prompt="a photo of TOK", tuning_free=True, steps=4, frames=3, pacing="linear",
                  formats=("png",), cache_dir=str(tmp_path / "cache"), progress=False)
    plain = morphkit.morph(a, b, output_dir=tmp_path / "plain", **common)
    with_tokens = morphkit.morph(a, b, output_dir=tmp_path / "emb", embeddings=[str(emb)], **common)
    assert with_tokens.cache_hits and not any(with_tokens.cache_hits.values())  # the embedding is in the cache keys: nothing reused
    middle = [torch.tensor(list(r.frames[1].getdata()), dtype=torch.float32) for r in (plain, with_tokens)]
    assert (middle[0] - middle[1]).abs().max() > 0  # TOK now means the learned tokens
    again = morphkit.morph(a, b, output_dir=tmp_path / "emb2", embeddings=[str(emb)], **common)
    assert again.cache_hits and all(again.cache_hits.values())

    done = CliRunner().invoke(app, ["stylize", str(photo), "--model", "tiny", "--embedding", str(emb), "-p",
                                    "a painting of TOK", "--steps", "2", "-o", str(tmp_path / "s"), "-q"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "s" / "photo.png").is_file()
    bad = CliRunner().invoke(app, ["stylize", str(photo), "--model", "tiny", "--embedding", str(tmp_path / "no.safetensors"),
                                   "-o", str(tmp_path / "s2"), "-q"])
    assert bad.exit_code != 0 and "no.safetensors" in bad.output and "Traceback" not in bad.output
