"""The command line: help for every option, clear errors and exit codes, no tracebacks, no partial files."""

import subprocess
import sys

import click
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import REPO

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_every_option_has_help():
    command = typer.main.get_command(app)
    assert run("--help").exit_code == 0
    for name, sub in command.commands.items():
        result = run(name, "--help")
        assert result.exit_code == 0, result.output
        for param in sub.params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, f"{name} {param.name} has no help"
                assert param.opts[0] in result.output


def bad_inputs(tmp_path):
    """(name, argv, words expected in the message) for each bad input the train command must survive."""
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    (tmp_path / "nometa").mkdir()
    for name, text in {"malformed": '{"file_name": "ok.png", "text": ', "emptymeta": "\n\n",
                       "missingimg": '{"file_name": "gone.png", "text": "x"}'}.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / name / "ok.png")
        (tmp_path / name / "metadata.jsonl").write_text(text)
    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")
    ok = tmp_path / "ok.png"
    return [
        ("missing", [tmp_path / "nope.png", "-p", "x"], "does not exist"),
        ("empty", [tmp_path / "empty.png", "-p", "x"], "empty"),
        ("corrupt", [tmp_path / "corrupt.png", "-p", "x"], "corrupt"),
        ("huge", [tmp_path / "huge.png", "-p", "x"], "megapixels"),
        ("folder without metadata", [tmp_path / "nometa"], "metadata.jsonl"),
        ("malformed metadata", [tmp_path / "malformed"], "not valid JSON"),
        ("empty metadata", [tmp_path / "emptymeta"], "no rows"),
        ("row naming a missing image", [tmp_path / "missingimg"], "gone.png"),
        ("no prompt", [ok], "--prompt"),
        ("rank 0", [ok, "-p", "x", "--rank", "0"], "rank"),
        ("negative lr", [ok, "-p", "x", "--lr", "-1e-4"], "learning rate"),
        ("unknown model", [ok, "-p", "x", "--model", "someone/not-a-model"], "could not be found"),
        ("model path missing", [ok, "-p", "x", "--model", "./models/sd15.safetensors"], "does not exist"),
        ("pickled model", [ok, "-p", "x", "--model", tmp_path / "m.ckpt"], "pickle"),
        ("bad crop", [ok, "-p", "x", "--crop", "diagonal"], "crop"),
        ("bad config", [ok, "-p", "x", "--config", tmp_path / "nope.toml"], "does not exist"),
    ]


def test_bad_inputs_give_a_clear_error_and_no_files(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"not really a pickle")
    for name, argv, words in bad_inputs(tmp_path):
        out = tmp_path / "out" / name.replace(" ", "_")
        model = [] if "--model" in argv else ["--model", "tiny"]
        result = run("train", *argv, *model, "--steps", "2", "-o", out, "--quiet")
        assert result.exit_code not in (0, None), name
        assert result.exception is None or isinstance(result.exception, SystemExit), (name, result.exception)
        assert "Traceback" not in result.output, name
        assert "Error:" in result.output and words in result.output, (name, result.output)
        assert not list(out.rglob("*.safetensors")), name


def test_existing_lora_is_not_overwritten(tmp_path):
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "ok.png")
    args = ["train", tmp_path / "ok.png", "-p", "x", "--model", "tiny", "--steps", "2", "-o", tmp_path / "o", "-q"]
    assert run(*args).exit_code == 0
    before = (tmp_path / "o" / "ok.safetensors").read_bytes()
    result = run(*args, "--seed", "5")
    assert result.exit_code == 4 and "--overwrite" in result.output
    assert (tmp_path / "o" / "ok.safetensors").read_bytes() == before
    assert run(*args, "--seed", "5", "--overwrite").exit_code == 0
    assert (tmp_path / "o" / "ok.safetensors").read_bytes() != before


def test_console_script_runs_as_a_user_would(tmp_path):
    """The installed `morphkit` command, in a real process, on the example photo."""
    cmd = [sys.executable, "-m", "cli.main", "train", REPO / "dataset" / "photos" / "astronaut.jpg", "--prompt",
           "a photo of an astronaut", "--model", "tiny", "--steps", "5", "-o", tmp_path]
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "astronaut.safetensors").is_file()
    assert "LoRA:" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "cli.main", "train", str(tmp_path / "nope.jpg"), "-p", "x"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("Error: ")
