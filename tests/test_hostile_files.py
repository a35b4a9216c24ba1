"""Crafted files: each is built here and must get one clear refusal, quickly, with nothing run, printed raw or written.

Every case runs under a hard time limit (SIGALRM), so a hang fails the test instead of stalling the suite.
LoRA files first; other inputs (images, frames, datasets) belong here too.
"""

import json
import os
import signal
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from morphkit.errors import LoRAError, MorphkitError
from morphkit.lora_files import kohya_module_name, lora_info, mix_loras, read_lora_file
from tests.conftest import make_photo

runner = CliRunner()
LIMIT_S = 5.0
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # tiny: Linear 64 -> 64
KQ = kohya_module_name("unet." + Q)


@contextmanager
def within(seconds=LIMIT_S):
    """Fail (instead of hanging) when the block takes longer than `seconds`."""
    def expired(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds * 4)  # the hard stop; the soft bound is asserted below
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < seconds


def refused(fn, *args, match=None, error=LoRAError, **kwargs):
    with within(), pytest.raises(error) as caught:
        fn(*args, **kwargs)
    if match:
        assert match.lower() in str(caught.value).lower(), str(caught.value)
    return str(caught.value)


def cli_refuses(args, *words, code=2, seconds=LIMIT_S):
    with within(seconds):
        result = runner.invoke(app, args)
    assert result.exit_code == code and "Traceback" not in result.output and "Unexpected" not in result.output, \
        result.output
    for word in words:
        assert word.lower() in result.output.lower(), result.output
    return result.output


def kohya(path, down=None, up=None, alpha=None, extra=None, metadata=None):
    t = {f"{KQ}.lora_down.weight": torch.randn(4, 64) * 0.1 if down is None else down,
         f"{KQ}.lora_up.weight": torch.randn(64, 4) * 0.1 if up is None else up}
    if alpha is not None:
        t[f"{KQ}.alpha"] = torch.tensor(alpha)
    t.update(extra or {})
    save_file(t, str(path), metadata=metadata)
    return path


def diffusers(path, header):
    t = {f"unet.{Q}.lora_A.weight": torch.randn(4, 64) * 0.1, f"unet.{Q}.lora_B.weight": torch.randn(64, 4) * 0.1}
    save_file(t, str(path), metadata={"format": "pt", "lora_adapter_metadata": header})
    return path


# ---- regular expressions from a header are never run ---------------------------------------------------------

@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
@pytest.mark.parametrize("pattern", ["((.*)*)*x", "(a+)+$", ".*", "[unclosed"])
def test_pattern_that_is_not_a_module_path_is_refused_promptly(tmp_path, field, pattern):
    path = diffusers(tmp_path / "p.safetensors", json.dumps({"unet.r": 4, "unet.lora_alpha": 4,
                                                              f"unet.{field}": {pattern: 2}}))
    message = refused(read_lora_file, path, match="not a plain module path")
    assert "regular expression" in message
    cli_refuses(["lora", "info", str(path)], "plain module path")


def test_plain_pattern_keys_match_as_module_names(tmp_path):
    path = diffusers(tmp_path / "ok.safetensors", json.dumps({"unet.r": 4, "unet.lora_alpha": 4,
                                                               "unet.alpha_pattern": {"attn1.to_q": 2.0, "to_k": 8.0}}))
    assert read_lora_file(path).modules["unet." + Q].alpha == 2.0  # '.'-suffix of the module's name


# ---- malformed headers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("header, words", [
    (json.dumps({"unet.r": 4, "unet.lora_alpha": [4]}), ["lora_alpha", "number"]),
    (json.dumps({"unet.r": 4, "unet.lora_alpha": "4"}), ["lora_alpha", "number"]),
    (json.dumps({"unet.r": "four", "unet.lora_alpha": 4}), [" r ", "whole number"]),
    (json.dumps({"unet.r": 4, "unet.alpha_pattern": ["to_q", 2]}), ["alpha_pattern", "table"]),
    (json.dumps({"unet.r": 4, "unet.alpha_pattern": {"to_q": "2"}}), ["alpha_pattern", "number"]),
    (json.dumps([{"unet.r": 4}]), ["JSON object"]),
    ("{not json", ["not valid JSON"]),
])
def test_odd_header_types_get_a_clear_message(tmp_path, header, words):
    path = diffusers(tmp_path / "h.safetensors", header)
    message = refused(read_lora_file, path)
    for word in words:
        assert word.lower() in message.lower(), message
    cli_refuses(["lora", "info", str(path)], words[0])


# ---- nothing from a file reaches the terminal raw ----------------------------------------------------------

def test_info_escapes_control_characters_in_values_and_names(tmp_path):
    evil_key = "lora_unet_x\x1b[31m\x1b]0;owned\x07"
    path = kohya(tmp_path / "e.safetensors", alpha=4.0, extra={
        f"{evil_key}.lora_down.weight": torch.zeros(2, 8), f"{evil_key}.lora_up.weight": torch.zeros(8, 2)},
        metadata={"ss_output_name": "x\x1b[2K\x1b]0;title\x07",
                  "note\x1b[1A": "ok\n  made for:      SD 1.x (verified safe)\r\u202eevil"})
    with within():
        result = runner.invoke(app, ["lora", "info", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert not any(c in out for c in "\x1b\x07\r\u202e"), repr(out)
    assert sum(line.startswith("  made for:") for line in out.splitlines()) == 1
    assert "\\x1b[2K" in out and "\\n  made for:" in out and "\\u202e" in out
    report = json.loads(runner.invoke(app, ["lora", "info", str(path), "--json"]).output)  # JSON escapes by itself
    assert report["metadata"]["ss_output_name"] == "x\x1b[2K\x1b]0;title\x07"


def test_error_messages_escape_names_from_the_file(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file({"lora_unet_a\x1b[2J.hada_w1_a": torch.zeros(2, 2), "lora_unet_a\x1b[2J.weird\x1b[2J": torch.zeros(1)},
              str(path))
    output = cli_refuses(["lora", "info", str(path)], "does not know")
    assert "\x1b" not in output and "\\x1b[2J" in output


# ---- special files ----------------------------------------------------------------------------------------

def test_fifo_device_and_folder_as_lora_say_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    cases = [(fifo, "FIFO"), ("/dev/zero", "character device"), (tmp_path, "folder"),
             (tmp_path / "missing.safetensors", "does not exist")]
    for path, words in cases:
        message = refused(read_lora_file, path, match=words)
        if words != "does not exist":
            assert "does not exist" not in message
        cli_refuses(["lora", "info", str(path)], words)
    cli_refuses(["lora", "mix", str(fifo), "--out", str(tmp_path / "m.safetensors")], "FIFO")
    broken = tmp_path / "broken.safetensors"
    broken.symlink_to(tmp_path / "nowhere")
    refused(read_lora_file, broken, match="broken symbolic link")


# ---- numbers that overflow or mean nothing -----------------------------------------------------------------

def test_absurd_alpha_and_overflowing_factors_are_refused(tmp_path):
    refused(read_lora_file, kohya(tmp_path / "a.safetensors", alpha=1e30), match="absurd")
    big = torch.full((4, 64), 3e38)
    refused(read_lora_file, kohya(tmp_path / "f.safetensors", down=big, up=torch.full((64, 4), 3e38)), match="absurd")
    refused(read_lora_file, kohya(tmp_path / "z.safetensors", alpha=-1.0), match="positive")
    cli_refuses(["lora", "mix", str(tmp_path / "f.safetensors"), "--out", str(tmp_path / "m.safetensors"), "--rank", "1"],
                "absurd")
    assert not (tmp_path / "m.safetensors").exists()


def test_zero_rank_factors_are_refused_in_mix_and_fuse(tmp_path):
    from morphkit.lora import fuse_lora

    path = kohya(tmp_path / "r0.safetensors", down=torch.zeros(0, 64), up=torch.zeros(64, 0))
    refused(mix_loras, [str(path)], tmp_path / "m.safetensors", match="rank 0")
    refused(fuse_lora, "tiny", [str(path)], tmp_path / "f.safetensors", match="rank 0")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "f.safetensors").exists()


def test_absurd_weights_are_refused_up_front(tmp_path):
    from morphkit.stylize import check_lora_files

    path = kohya(tmp_path / "k.safetensors", alpha=4.0)
    refused(mix_loras, [f"{path}:1e30"], tmp_path / "m.safetensors", match="weight")
    refused(mix_loras, [f"{path}:nan"], tmp_path / "m.safetensors", match="weight")
    refused(check_lora_files, [f"{path}:1e30"], match="weight")
    cli_refuses(["lora", "fuse", "--model", "tiny", "--lora", f"{path}:inf", "--out", str(tmp_path / "f.safetensors")],
                "weight")


def test_fuse_never_writes_a_non_finite_tensor(tmp_path, tiny_path):
    # a legal update (entries about 2000) that overflows fp16 at weight 50
    path = kohya(tmp_path / "big.safetensors", down=torch.full((4, 64), 20.0), up=torch.full((64, 4), 25.0), alpha=4.0)
    out = tmp_path / "fused.safetensors"
    output = cli_refuses(["lora", "fuse", "--model", "tiny", "--lora", f"{path}:50", "--out", str(out)], "overflows",
                         seconds=30)  # this one loads the model
    assert not out.exists() and "nothing was written" in output.lower()


def test_mixing_loras_for_different_models_is_refused(tmp_path):
    sd15 = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}
    xl = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
          "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    save_file(xl, str(tmp_path / "xl.safetensors"))
    message = refused(mix_loras, [str(tmp_path / "sd15.safetensors"), str(tmp_path / "xl.safetensors")],
                      tmp_path / "m.safetensors", match="different models")
    assert "SDXL" in message and "SD 1.x" in message
    assert lora_info(tmp_path / "xl.safetensors")["text_encoder_modules"] == 1


# ---- LyCORIS, ComfyUI and DoRA files that contradict themselves --------------------------------------------

def test_lycoris_factor_shapes_that_contradict_each_other(tmp_path):
    loha = {f"{KQ}.hada_w1_a": torch.zeros(64, 3), f"{KQ}.hada_w1_b": torch.zeros(3, 64),
            f"{KQ}.hada_w2_a": torch.zeros(64, 3), f"{KQ}.hada_w2_b": torch.zeros(3, 32)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    refused(read_lora_file, tmp_path / "loha.safetensors", match="contradict")
    lokr = {f"{KQ}.lokr_w1": torch.zeros(4, 8), f"{KQ}.lokr_w2_a": torch.zeros(16, 2), f"{KQ}.lokr_w2_b": torch.zeros(3, 8)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    refused(read_lora_file, tmp_path / "lokr.safetensors", match="contradict")
    tucker = {f"{KQ}.lora_down.weight": torch.zeros(4, 64, 1, 1), f"{KQ}.lora_mid.weight": torch.zeros(4, 5, 3, 3),
              f"{KQ}.lora_up.weight": torch.zeros(64, 4, 1, 1)}
    save_file(tucker, str(tmp_path / "tucker.safetensors"))
    refused(read_lora_file, tmp_path / "tucker.safetensors", match="contradict")
    mixed = {f"{KQ}.hada_w1_a": torch.zeros(64, 3), f"{KQ}.lora_down.weight": torch.zeros(4, 64)}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    refused(read_lora_file, tmp_path / "mixed.safetensors", match="mixes")


def test_diff_for_a_module_that_does_not_exist(tiny_pipe, tmp_path):
    from morphkit.lora import load_lora

    save_file({"diffusion_model.input_blocks.99.1.proj_in.diff": torch.zeros(64, 64, 1, 1)},
              str(tmp_path / "comfy.safetensors"))
    refused(load_lora, tiny_pipe.unet, tmp_path / "comfy.safetensors", "x", match="do not exist")


def test_dora_without_its_base(tmp_path):
    save_file({f"{KQ}.dora_scale": torch.ones(64, 1)}, str(tmp_path / "dora.safetensors"))
    refused(read_lora_file, tmp_path / "dora.safetensors", match="DoRA magnitude")
    save_file({f"{KQ}.lora_down.weight": torch.zeros(4, 64), f"{KQ}.lora_up.weight": torch.zeros(64, 4),
               f"{KQ}.dora_scale": torch.ones(7, 1)}, str(tmp_path / "wrong.safetensors"))
    refused(read_lora_file, tmp_path / "wrong.safetensors", match="DoRA magnitude")
    save_file({f"{KQ}.lora_down.weight": torch.zeros(4, 64), f"{KQ}.lora_up.weight": torch.zeros(64, 4),
               f"{KQ}.dora_scale": torch.ones(64, 1)}, str(tmp_path / "ok.safetensors"))
    cli_refuses(["lora", "convert", str(tmp_path / "ok.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"],
                "--model")


def test_pickled_lora_is_never_unpickled_by_default(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({f"{KQ}.lora_down.weight": torch.zeros(4, 64)}, path)
    refused(read_lora_file, path, match="pickle", error=MorphkitError)


# ---- images, frames and datasets ---------------------------------------------------------------------------

def crafted_gif(path, width, height, frames):
    """A GIF whose header declares a `width` x `height` canvas, holding `frames` 1x1 frames: a few hundred bytes."""
    out = bytearray(b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\x80\x00\x00")
    out += b"\x00\x00\x00\xff\xff\xff"  # a two-colour global palette
    for _ in range(frames):
        out += b"\x21\xf9\x04\x04\x0a\x00\x00\x00"  # graphic control: 100 ms, keep the canvas
        out += b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00" + b"\x02\x02\x44\x01\x00"  # one 1x1 image
    path.write_bytes(bytes(out + b"\x3b"))
    return path


@pytest.mark.parametrize("width, height, frames", [(8000, 8000, 40), (30000, 30000, 1), (4000, 4000, 400)])
def test_gif_memory_bombs_are_refused_before_decoding(tmp_path, photo, width, height, frames):
    from morphkit.metrics import read_frames

    bomb = crafted_gif(tmp_path / "bomb.gif", width, height, frames)
    assert bomb.stat().st_size < 10_000
    refused(read_frames, bomb, match="megapixels", error=MorphkitError)
    cli_refuses(["eval", str(bomb), "--a", str(photo), "--b", str(photo)], "megapixels")


def test_a_frame_folder_too_large_together_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from morphkit import images
    from morphkit.metrics import read_frames

    for i in range(3):
        Image.new("RGB", (64, 64)).save(tmp_path / f"frame_{i}.png")
    monkeypatch.setattr(images, "MAX_SEQUENCE_PIXELS", 2 * 64 * 64)
    monkeypatch.setattr(images, "open_image", lambda *_: pytest.fail("decoded before the limit was checked"))
    refused(read_frames, tmp_path, match="megapixels", error=MorphkitError)


def test_fifo_and_devices_as_frames_or_images_say_what_they_are(tmp_path, photo):
    from morphkit.images import open_image
    from morphkit.metrics import read_frames

    fifo = tmp_path / "frames.gif"
    os.mkfifo(fifo)
    refused(read_frames, fifo, match="FIFO", error=MorphkitError)
    refused(open_image, fifo, match="FIFO", error=MorphkitError)
    refused(open_image, "/dev/zero", match="character device", error=MorphkitError)
    cli_refuses(["eval", str(fifo), "--a", str(photo), "--b", str(photo)], "FIFO")
    cli_refuses(["invert", str(fifo), "--model", "tiny"], "FIFO")
    other = make_photo(tmp_path / "other.png", seed=4)
    cli_refuses(["morph", str(photo), str(other), "--model", "tiny", "--lora-a", str(fifo), "-o", str(tmp_path / "m")],
                "FIFO")


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "link.png"])
def test_dataset_entries_outside_their_folder_are_refused(tmp_path, name):
    from PIL import Image

    from morphkit.data import load_examples

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    refused(load_examples, data, match="outside the dataset folder", error=MorphkitError)
    cli_refuses(["train", str(data), "--model", "tiny", "-o", str(tmp_path / "out")], "outside the dataset folder")
    assert not (tmp_path / "out").exists()
