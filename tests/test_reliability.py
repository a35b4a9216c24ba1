"""Reliability: full disks, numbers that overflow, damaged caches, races on one output folder, leftovers of killed
runs, and failing before the heavy work. Each test runs in seconds on the tiny model (or none)."""

import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import morphkit
from cli.main import app
from morphkit.errors import ConfigError, DiskFullError, MorphkitError, NumericalError, OutputExistsError
from morphkit.export import (MANIFEST, check_mp4, frame_name, plan_outputs, save_frames, save_gif, write_outputs)
from tests.conftest import REPO, make_photo

runner = CliRunner()
TINY = dict(model="tiny", frames=2, steps=2, lora_steps=1, progress=False, device="cpu", pacing="linear")


def frames(n=3, size=(16, 16)):
    return [Image.new("RGB", size, (40 * i, 90, 200 - 40 * i)) for i in range(n)]


def leftovers(folder: Path) -> list[str]:
    ours = (MANIFEST, ".morphkit.lock")
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in ours)


def no_room(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- 1. a full disk: nothing reported written that is not complete ------------------------------------------

def test_a_full_disk_while_writing_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", no_room)
    with pytest.raises(DiskFullError, match=r"disk is full \(\d+ MB free at "):
        save_gif(frames(), tmp_path / "morph.gif", 100)
    with pytest.raises(DiskFullError, match="disk is full"):
        save_frames(frames(), tmp_path / "frames")
    assert sorted(os.listdir(tmp_path)) == []  # no morph.gif, no temp file, no half-made frame folder


def test_a_full_disk_in_train_checkpoints_and_json(tmp_path, monkeypatch, tiny_pipe):
    from morphkit.io import write_json
    from morphkit.train import TrainSettings, checkpoints
    from morphkit.train.trainables import Trainables

    monkeypatch.setattr(checkpoints, "save_file", no_room)
    trainables = Trainables.attach(tiny_pipe, TrainSettings(data="x", rank=2), steps=1)
    optimizer = torch.optim.AdamW(trainables.tensors())
    with pytest.raises(DiskFullError, match="disk is full"):
        checkpoints.save_checkpoint(tmp_path / "ck", 1, trainables, optimizer, None, "f", 2)
    assert os.listdir(tmp_path / "ck") == []
    monkeypatch.setattr(Path, "write_text", no_room)
    with pytest.raises(DiskFullError, match="disk is full"):
        write_json(tmp_path / "settings.json", {})
    assert not (tmp_path / "settings.json").exists()


def test_a_morph_export_that_fails_in_one_format_replaces_nothing(tmp_path, monkeypatch):
    from morphkit import export

    out = tmp_path / "out"
    monkeypatch.setattr(export, "write_mp4", no_room)
    with pytest.raises(DiskFullError, match="disk is full"):
        write_outputs(out, frames(), ("gif", "mp4", "png"), 100)
    assert not any(os.path.lexists(out / name) for name in ("morph.gif", "morph.mp4", "frames"))
    assert leftovers(out) == []
    monkeypatch.undo()
    write_outputs(out, frames(), ("gif", "mp4", "png"), 100)  # a rerun is not refused: nothing half-made is there
    assert (out / "morph.mp4").is_file() and len(os.listdir(out / "frames")) == 3


def test_the_cli_turns_any_full_disk_into_its_message(capsys):
    import typer

    from cli.common import call

    with pytest.raises(typer.Exit):
        call(no_room)
    error = capsys.readouterr().err
    assert "The disk is full" in error and "MB free at" in error and "Unexpected" not in error


MP4_UNDER_A_SIZE_LIMIT = """
import resource, sys
from PIL import Image
from morphkit.errors import MorphkitError
from morphkit.export import save_mp4
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))
frames = [Image.effect_noise((64, 64), 60 + i).convert("RGB") for i in range(30)]
try:
    save_mp4(frames, sys.argv[1], 10)
except MorphkitError as e:
    print("REFUSED", e)
    sys.exit(3)
print("WRITTEN")
"""


def test_an_mp4_cut_short_by_a_file_size_limit_is_never_reported_written(tmp_path):
    target = tmp_path / "morph.mp4"
    done = subprocess.run([sys.executable, "-c", MP4_UNDER_A_SIZE_LIMIT, str(target)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 3 and "REFUSED" in done.stdout, done.stdout + done.stderr
    assert "nothing was put in its place" in done.stdout and "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == []


def test_a_truncated_mp4_fails_the_completeness_check(tmp_path):
    from morphkit.export import save_mp4

    whole = save_mp4(frames(4), tmp_path / "whole.mp4", 10)
    check_mp4(whole)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(MorphkitError, match="cut short"):
        check_mp4(cut)


# ---- 2. numbers that overflow are refused up front; nothing non-finite is written --------------------------

def test_absurd_guidance_scales_and_learning_rates_are_refused_up_front():
    from morphkit.stylize import check_settings
    from morphkit.train import TrainSettings

    for guidance in (float("inf"), 1e30, float("nan")):
        with pytest.raises(ConfigError, match="--guidance"):
            check_settings(0.5, guidance, 0.5, 10, 1.0, 0, None, None, None)
    with pytest.raises(ConfigError, match="--controlnet-scale"):
        check_settings(0.5, 7.5, 1e30, 10, 1.0, 0, None, None, None)
    for lr in (1e30, float("inf")):
        with pytest.raises(ConfigError, match="--lr"):
            TrainSettings(data="x", learning_rate=lr).validate()


def test_no_non_finite_tensor_reaches_the_cache_or_a_checkpoint(tmp_path, tiny_pipe):
    from morphkit.cache import TensorCache
    from morphkit.checkpoint import save_single_file

    store = TensorCache(tmp_path / "cache")
    with pytest.raises(NumericalError, match="not cached"):
        store.put("inversion", "k", {"noise": torch.tensor([1.0, float("nan")])})
    assert not store.path("inversion", "k").exists()
    with torch.no_grad():
        next(tiny_pipe.unet.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NumericalError, match="nothing was written"):
        save_single_file(tiny_pipe, tmp_path / "model.safetensors", dtype=torch.float32)
    assert not (tmp_path / "model.safetensors").exists()
    from morphkit.inversion import _write_inversion

    paths = {k: tmp_path / f"inv.{k}" for k in ("noise", "reconstruction", "report")}
    paths["noise"] = tmp_path / "noise.safetensors"
    with pytest.raises(NumericalError, match="inversion produced NaN"):
        _write_inversion(paths, torch.full((1, 4, 2, 2), float("nan")), torch.zeros(1, 4, 2, 2), None, {}, {}, False)
    assert not paths["noise"].exists()


def test_a_render_that_overflows_stops_before_any_file(tmp_path, monkeypatch):
    from morphkit.morph import job

    pair = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=3)
    real = job.render_frames
    monkeypatch.setattr(job, "render_frames", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(NumericalError, match="rendering produced NaN or infinite"):
        morphkit.morph(*pair, output_dir=tmp_path / "out", cache=False, **TINY)
    assert not (tmp_path / "out" / "morph.gif").exists()


def test_a_stylized_image_that_overflows_is_refused_not_drawn_black(monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    import importlib

    stylize = importlib.import_module("morphkit.stylize")  # the module; `morphkit.stylize` is also the function
    monkeypatch.setattr(stylize, "encode_image", lambda pipe, image: None)
    overflowed = lambda **kwargs: SimpleNamespace(images=[np.full((8, 8, 3), np.nan, dtype=np.float32)])  # noqa: E731
    with pytest.raises(NumericalError, match="Stylizing produced NaN"):
        stylize.render(overflowed, Image.new("RGB", (8, 8)), np.zeros((8, 8), np.uint8))
    fine = lambda **kwargs: SimpleNamespace(images=[np.full((8, 8, 3), 0.5, dtype=np.float32)])  # noqa: E731
    assert stylize.render(fine, Image.new("RGB", (8, 8)), np.zeros((8, 8), np.uint8)).getpixel((0, 0)) == (128,) * 3


# ---- 3. damaged or non-finite cache entries are misses: logged, replaced, never served ----------------------

def test_damaged_and_non_finite_cache_entries_are_misses(tmp_path, caplog):
    from safetensors.torch import save_file

    from morphkit.cache import TensorCache

    store = TensorCache(tmp_path)
    store.path("inversion", "bad").parent.mkdir(parents=True)
    save_file({"noise": torch.tensor([float("nan")])}, str(store.path("inversion", "bad")))
    store.path("inversion", "cut").write_bytes(b"\x10\x00\x00")
    for key in ("bad", "cut"):
        assert store.get("inversion", key) is None and not store.path("inversion", key).exists()
    assert "not usable" in caplog.text
    store.put("inversion", "bad", {"noise": torch.ones(2)})
    assert torch.equal(store.get("inversion", "bad")["noise"], torch.ones(2))


def test_a_damaged_cached_lora_is_fitted_again_not_served(tmp_path):
    pair = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=3)
    cache = tmp_path / "cache"
    morphkit.morph(*pair, formats=(), cache_dir=cache, **TINY)
    for lora in (cache / "lora").iterdir():
        lora.write_bytes(lora.read_bytes()[:100])  # cut short, as a kill or a full disk would leave it
    again = morphkit.morph(*pair, formats=(), cache_dir=cache, **TINY)
    assert not again.cache_hits["lora_a"] and not again.cache_hits["lora_b"]
    third = morphkit.morph(*pair, formats=(), cache_dir=cache, **TINY)
    assert third.cache_hits["lora_a"] and third.cache_hits["lora_b"]  # and the refit was cached whole


# ---- 4. frame names sort in frame order --------------------------------------------------------------------

def test_frame_names_are_padded_to_the_count_and_eval_sorts_naturally(tmp_path):
    from morphkit.metrics import read_frames

    assert frame_name(7, 16) == "frame_007.png" and frame_name(7, 1001) == "frame_0007.png"
    assert frame_name(1000, 1001) == "frame_1000.png"
    shades = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(12)]
    for i, img in enumerate(shades):  # unpadded names, as other tools write them
        img.save(tmp_path / f"frame_{i}.png")
    read = read_frames(tmp_path)
    assert [f.getpixel((0, 0))[0] for f in read] == [i * 20 for i in range(12)]


# ---- 10, 11. one output folder: a manifest, a plan checked first, a lock ------------------------------------

def test_overwrite_replaces_only_what_morphkit_wrote(tmp_path):
    out = tmp_path / "out"
    write_outputs(out, frames(), ("gif", "png"), 100)
    assert json.loads((out / MANIFEST).read_text())["files"] == ["frames/frame_000.png", "frames/frame_001.png",
                                                                 "frames/frame_002.png", "morph.gif"]
    gif = (out / "morph.gif").read_bytes()
    (out / "frames" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="did not write.*notes.txt"):
        write_outputs(out, frames(5), ("gif", "png"), 50, overwrite=True)
    assert (out / "morph.gif").read_bytes() == gif and (out / "frames" / "notes.txt").read_text() == "mine"
    (out / "frames" / "notes.txt").unlink()
    write_outputs(out, frames(2), ("gif", "png"), 50, overwrite=True)  # fewer frames: the old ones go
    assert sorted(os.listdir(out / "frames")) == ["frame_000.png", "frame_001.png"]
    shots = tmp_path / "shots"  # save_frames alone, into a folder of any name
    save_frames(frames(), shots)
    (shots / "x.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="x.txt"):
        save_frames(frames(), shots, overwrite=True)


@pytest.mark.parametrize("trap", ["frames is a file", "frames is a symlink", "gif is a symlink", "gif not ours"])
def test_the_whole_plan_is_checked_before_any_file_is_touched(tmp_path, trap):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    write_outputs(out, frames(), ("gif", "mp4", "png"), 100)
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"user data")
    if trap == "frames is a file":
        os.rename(out / "frames", tmp_path / "old")
        (out / "frames").write_text("a file")
    elif trap == "frames is a symlink":
        os.rename(out / "frames", tmp_path / "old")
        (out / "frames").symlink_to(elsewhere)
    elif trap == "gif is a symlink":
        (out / "morph.gif").unlink()
        (out / "morph.gif").symlink_to(elsewhere / "keep.png")
    else:
        (out / MANIFEST).write_text(json.dumps({"files": ["morph.mp4"]}))
    before = {p: (out / p).read_bytes() for p in ("morph.mp4",)}
    with pytest.raises(OutputExistsError, match="morphkit replaces only what it wrote"):
        write_outputs(out, frames(4), ("gif", "mp4", "png"), 100, overwrite=True)
    assert (out / "morph.mp4").read_bytes() == before["morph.mp4"]  # nothing replaced before the refusal
    assert os.listdir(elsewhere) == ["keep.png"] and (elsewhere / "keep.png").read_bytes() == b"user data"


def test_the_output_plan_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    from morphkit.morph import pair as pair_module

    monkeypatch.setattr(pair_module, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    pair = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=3)
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="mine.jpg"):
        morphkit.morph(*pair, output_dir=out, overwrite=True, **TINY)


def test_two_runs_replacing_one_folder_at_once_take_turns(tmp_path):
    out, errors = tmp_path / "out", []
    write_outputs(out, frames(), ("gif", "png"), 100)

    def run(n):
        try:
            for _ in range(6):
                write_outputs(out, frames(n), ("gif", "png"), 100, overwrite=True)
        except Exception as e:  # noqa: BLE001 (any failure is the test's failure)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    count = len(os.listdir(out / "frames"))
    assert count in (3, 5) and Image.open(out / "morph.gif").n_frames == count and leftovers(out) == []


# ---- 12. what killed runs left behind is swept ----------------------------------------------------------------

def test_stale_temporaries_of_dead_runs_are_swept_at_start(tmp_path):
    from morphkit.cache import TensorCache
    from morphkit.io import sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = TensorCache(tmp_path / "cache")
    lora = tmp_path / "cache" / "lora"
    lora.mkdir(parents=True)
    (lora / f".abc.{dead.pid}.x1y2z3w4.tmp.safetensors").write_bytes(b"")
    (lora / f".abc.{os.getpid()}.a1b2c3d4.tmp.safetensors").write_bytes(b"")  # a live run's: kept
    (lora / ".old.q1w2e3r4.tmp.safetensors").write_bytes(b"")  # before ids were marked, and a day old
    os.utime(lora / ".old.q1w2e3r4.tmp.safetensors", (time.time() - 2 * 86400,) * 2)
    (lora / ".hidden-user-file").write_text("mine")
    cache.check_writable()
    assert sorted(os.listdir(lora)) == [".abc.%d.a1b2c3d4.tmp.safetensors" % os.getpid(), ".hidden-user-file"]

    out = tmp_path / "out"
    out.mkdir()
    (out / f".morph.{dead.pid}.k9k9k9k9.tmp.mp4").write_bytes(b"")
    (out / f".frames.{dead.pid}.m8m8m8m8").mkdir()
    write_outputs(out, frames(), ("gif",), 100)
    assert leftovers(out) == []
    assert sweep_stale(tmp_path / "missing") == []


# ---- 13. unwritable folders and a full disk are found before the model loads -------------------------------

def unwritable(tmp_path) -> Path:
    """A folder path that cannot be created or written, for root as for anyone."""
    if os.geteuid() == 0:
        return Path("/proc/morphkit-test/out")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "out"


def test_unwritable_folders_and_a_full_disk_fail_before_the_model_loads(tmp_path, monkeypatch):
    from morphkit import io as morphkit_io
    from morphkit.morph import pair as pair_module

    monkeypatch.setattr(pair_module, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    pair = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=3)
    with pytest.raises(OutputExistsError, match="--output-dir.*cannot be written"):
        morphkit.morph(*pair, output_dir=unwritable(tmp_path), **TINY)
    with pytest.raises(OutputExistsError, match="--cache-dir.*cannot be written"):
        morphkit.morph(*pair, formats=(), cache_dir=unwritable(tmp_path), **TINY)
    monkeypatch.setattr(morphkit_io, "free_bytes", lambda path: 2**20)
    with pytest.raises(DiskFullError, match="only 1 MB are free"):
        plan_outputs(tmp_path / "out", ("gif", "png"), need_bytes=200 * 2**20)
    result = runner.invoke(app, ["train", str(pair[0]), "-p", "x", "--model", "tiny", "-o",
                                 str(unwritable(tmp_path)), "--steps", "1"])
    assert result.exit_code != 0 and "cannot be written" in result.output and "Unexpected" not in result.output
    result = runner.invoke(app, ["invert", str(pair[0]), "--model", "tiny", "--output-dir", str(unwritable(tmp_path))])
    assert result.exit_code != 0 and "cannot be written" in result.output and "Unexpected" not in result.output


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path, tiny_pipe, monkeypatch):
    from morphkit import io as morphkit_io
    from morphkit.checkpoint import save_single_file

    monkeypatch.setattr(morphkit_io, "free_bytes", lambda path: 2**10)
    with pytest.raises(DiskFullError, match="the checkpoint need about"):
        save_single_file(tiny_pipe, tmp_path / "fused.safetensors")
    assert os.listdir(tmp_path) == []


# ---- 9, 14. names and seeds, refused before any file is written ---------------------------------------------

@pytest.mark.parametrize("option, value, words", [("--name", "../x", "plain file name"),
                                                  ("--name", "/abs/x", "plain file name"),
                                                  ("--seed", str(2**64), "--seed"), ("--seed", "-1", "--seed"),
                                                  ("--lr", "1e30", "--lr")])
def test_train_refuses_bad_names_and_seeds_before_writing(tmp_path, photo, option, value, words):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(photo), "-p", "x", "--model", "tiny", "-o", str(out), "--steps", "1",
                                 option, value])
    assert result.exit_code == 2 and words in result.output and "Unexpected" not in result.output, result.output
    assert not out.exists() and not (tmp_path / "x.safetensors").exists()


def test_seeds_are_checked_alike_everywhere(tmp_path):
    from morphkit.morph import MorphSettings
    from morphkit.stylize import check_settings

    for seed in (-1, 2**63, 2**64):
        with pytest.raises(ConfigError, match="seed"):
            MorphSettings(seed=seed).validate()
        with pytest.raises(ConfigError, match="--seed"):
            check_settings(0.5, 7.5, 0.5, 10, 1.0, seed, None, None, None)
    MorphSettings(seed=2**63 - 1).validate()


# ---- 15. messages in the user's words ------------------------------------------------------------------------

def test_ctrl_c_in_morph_speaks_of_the_cache_and_in_train_of_resume():
    from cli.common import interrupted_message

    with click.Context(click.Command("morph"), info_name="morph"):
        message = interrupted_message()
    assert "cache" in message and "--resume" not in message
    with click.Context(click.Command("train"), info_name="train"):
        assert "--resume" in interrupted_message()


def test_pickle_messages_do_not_mislead(tmp_path):
    from morphkit.models import _one_line

    pair = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", seed=3)
    torch.save({"x": torch.zeros(1)}, tmp_path / "a.pt")
    with pytest.raises(ConfigError) as caught:
        morphkit.morph(*pair, lora_a=str(tmp_path / "a.pt"), formats=(), **TINY)
    assert "lora convert" in str(caught.value) and "pass --allow-pickle" not in str(caught.value)
    torch_text = RuntimeError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False`")
    assert "Re-running" not in _one_line(torch_text) and "weights_only=False" not in _one_line(torch_text)


def test_option_names_in_train_messages():
    from morphkit.train import TrainSettings

    for field, value, option in (("steps", 0, "--steps"), ("batch_size", 0, "--batch-size"),
                                 ("learning_rate", "x", "--lr"), ("noise_offset", -1, "--noise-offset")):
        with pytest.raises(ConfigError, match=option):
            TrainSettings(data="x", **{field: value}).validate()


def test_nested_progress_bars_leave_no_escape_lines_when_redirected():
    from morphkit.progress import tqdm

    out = io.StringIO()
    outer = tqdm(total=2, file=out)
    for _ in range(2):
        for _ in tqdm(range(3), leave=False, file=out):
            pass
        outer.update()
    outer.close()
    assert "\x1b[A" not in out.getvalue() and "100%" in out.getvalue()


# ---- 16. the README's CPU install line --------------------------------------------------------------------

def test_readme_installs_torch_from_pytorchs_cpu_index_and_ci_the_same_release():
    line = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert f"pip install {line}" in (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()  # the same release, before morphkit (from the wheel on CI's disk)
    assert "pip install -q torch==2.13.0" in ci and ci.index("torch==2.13.0") < ci.index('-e ".[test')
