"""The web UI in a real browser: `morphkit ui --model tiny` in a subprocess, driven by headless Chromium.

Debian's `chromium` is driven through Playwright (Playwright's own browser download needs its CDN). The
tests skip only where no Chromium is installed, and say so; CI installs it (`.ci/run`).
Set MORPHKIT_UI_SCREENSHOT=docs/ui.png to also write the README's screenshot.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_photo
from PIL import Image
from safetensors.torch import save_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium (CI does)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SLOW = 90_000  # ms: the longest a job may take on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`morphkit ui --model tiny` on a free port; yields its URL and stops it afterwards."""
    tmp = tmp_path_factory.mktemp("ui-server")
    uploads = tempfile.mkdtemp(prefix="mk-ui-")  # short: messages cut paths at 120 characters, names last
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", MORPHKIT_CACHE=str(tmp / "cache"), GRADIO_TEMP_DIR=uploads,
               GRADIO_ANALYTICS_ENABLED="False", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--model", "tiny", "--port", str(port),
                             "--lora-dir", str(tmp / "loras"), "--device", "cpu", "--max-upload-mb", "1"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180  # imports and the model: seconds alone, minutes on a busy machine
    while True:
        if proc.poll() is not None:
            pytest.fail(f"morphkit ui exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"morphkit ui did not answer in 180 s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.rmtree(uploads, ignore_errors=True)
    print(f"server log: {tmp / 'server.log'}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    from playwright.sync_api import expect

    expect.set_options(timeout=SLOW)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(SLOW)
    page.goto(server)
    yield page
    context.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a Number or a Slider's number box and leave it (Gradio takes the value on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def seconds(text: str) -> float:
    """The first 'in N s' of a status message."""
    return float(re.search(r" in ([0-9.]+) s", text).group(1))


@needs_chromium
def test_morph_prepare_render_rerender_cancel_and_bad_uploads(page, tmp_path):
    from playwright.sync_api import expect

    a, b = make_photo(tmp_path / "a.png"), make_photo(tmp_path / "b.png", size=(64, 80), seed=1)
    status = page.locator("#morph-status textarea")
    page.locator("#image_a input[type=file]").set_input_files(str(a))
    expect(status).to_have_value(re.compile(r"a\.png: 80x64, ready"))
    page.locator("#image_b input[type=file]").set_input_files(str(b))
    expect(status).to_have_value(re.compile(r"b\.png: 64x80, ready"))
    for elem_id, value in (("frames", 5), ("steps", 10), ("lora_steps", 20), ("resolution", 64)):
        set_number(page, elem_id, value)

    page.locator("#prepare").click()
    expect(status).to_have_value(re.compile(r"^Prepared in"))
    prepare_s = seconds(status.input_value())
    assert "computed: lora_a, lora_b" in status.input_value()

    page.locator("#render").click()
    expect(status).to_have_value(re.compile(r"λ 0\.6.*reused the prepared pair"))
    expect(page.locator("#morph-gif img")).to_have_attribute("src", re.compile(r"\.gif"))
    expect(page.locator("#morph-frames img")).to_have_count(5)
    expect(page.locator("#morph-metrics")).to_contain_text("PPL")

    set_number(page, "attn_lambda", 0.2)  # a render setting: nothing is fitted or inverted again
    page.locator("#render").click()
    expect(status).to_have_value(re.compile(r"λ 0\.2.*reused the prepared pair \(no LoRA fitted"))
    render_s = seconds(status.input_value())
    print(f"Prepare {prepare_s:.2f} s; a render with a changed λ {render_s:.2f} s")
    for name in ("morph.gif", "morph.mp4", "frames.zip"):
        expect(page.locator(f"#morph-files a[href$='/{name}']")).to_have_count(1)
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MORPHKIT_UI_SCREENSHOT"):
        save_readme_screenshot(page, Path(os.environ["MORPHKIT_UI_SCREENSHOT"]))

    set_number(page, "lora_steps", 21)  # a prepare setting: Render prepares again, and says why
    page.locator("#render").click()
    expect(status).to_have_value(re.compile(r"^Prepared the pair \(a setting of the LoRAs or the inversion changed"))

    set_number(page, "lora_steps", 5000)  # a long job, cancelled while it fits
    page.locator("#prepare").click()
    expect(page.get_by_text(re.compile(r"fitting LoRAs"))).not_to_have_count(0)
    page.locator("#morph-cancel").click()
    expect(status).to_have_value(re.compile(r"^Cancelled\."))
    page.locator("#morph-cancel").click()
    expect(status).to_have_value("Nothing to cancel: no job of this page is running.")

    huge = tmp_path / "huge.png"  # 20 megapixels of one colour: a small file, too many pixels for the page
    Image.new("RGB", (5000, 4000), (90, 120, 200)).save(huge)
    page.locator("#image_b input[type=file]").set_input_files(str(huge))
    expect(status).to_have_value(re.compile(r"huge\.png is 5000x4000 pixels, more than this page accepts"))

    big = {"name": "big.png", "mimeType": "image/png", "buffer": os.urandom(1_200_000)}  # over --max-upload-mb 1
    assert page.request.post(page.url + "gradio_api/upload", multipart={"files": big}).status == 413

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(a.read_bytes()[:200])  # a PNG cut off after its header
    page.locator("#image_a input[type=file]").set_input_files(str(corrupt))
    expect(status).to_have_value(re.compile(r"broken\.png is corrupt or truncated"))
    page.locator("#prepare").click()
    expect(status).to_have_value(re.compile(r"^The image broken\.png is corrupt"))
    assert "Traceback" not in page.content() and "/tmp" not in status.input_value()


def save_readme_screenshot(page, target: Path) -> None:
    """A small PNG of the top of the page for the README (palette-reduced to stay small)."""
    raw = target.with_suffix(".raw.png")
    page.screenshot(path=str(raw), full_page=True)
    image = Image.open(raw).convert("RGB")
    image = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.Resampling.LANCZOS)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    raw.unlink()


@needs_chromium
def test_stylize_edges_preview_and_a_lora_for_another_model(page, tmp_path):
    from playwright.sync_api import expect

    photo = make_photo(tmp_path / "photo.png")
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = tmp_path / "sd15_sized.safetensors"  # a LoRA made for SD 1.5's sizes, not the tiny model's
    save_file({f"{attn}.lora_A.weight": torch.ones(4, 320), f"{attn}.lora_B.weight": torch.ones(320, 4)}, str(wrong))
    page.get_by_role("tab", name="Stylize").click()
    status = page.locator("#stylize-status textarea")
    page.locator("#stylize-images input[type=file]").set_input_files(str(photo))
    expect(page.locator("#stylize-edges img")).to_have_count(1)
    expect(page.locator("#stylize-edges")).to_contain_text(re.compile(r"photo\.png: Canny \d+/\d+"))
    page.locator("#canny-auto input").uncheck()
    set_number(page, "canny-low", 50)
    expect(page.locator("#stylize-edges")).to_contain_text("Canny 50/200")
    set_number(page, "stylize-steps", 4)

    page.locator("#stylize").click()
    expect(status).to_have_value(re.compile(r"^Stylized 1 of 1"))
    expect(page.locator("#stylize-results img")).to_have_count(2)  # the input and its result

    page.locator("#stylize-lora-upload input[type=file]").set_input_files(str(wrong))
    expect(page.locator("#stylize-loras textarea")).to_have_value("sd15_sized.safetensors: 1.0")
    page.locator("#stylize").click()
    expect(status).to_have_value(re.compile(r"^The LoRA sd15_sized.*does not fit"))
    assert "Traceback" not in page.content() and "/tmp" not in status.input_value()


# ---------------------------------------------------------------------------------------------
# the page's helpers, without a browser


def test_lora_lines_keep_typed_weights_and_resolve_only_known_files(tmp_path):
    from morphkit.errors import ConfigError
    from morphkit.ui.workspace import lora_lines, resolve_loras

    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "oil.safetensors").write_bytes(b"x")
    upload = tmp_path / "upload" / "ink.safetensors"
    text = lora_lines([upload], ["styles/oil.safetensors"], "ink.safetensors: 0.5\ngone.safetensors: 2")
    assert text == "ink.safetensors: 0.5\nstyles/oil.safetensors: 1.0"
    assert resolve_loras(text, [upload], folder) == [(upload, 0.5), (folder / "styles" / "oil.safetensors", 1.0)]
    with pytest.raises(ConfigError, match="neither uploaded nor in the LoRA folder"):
        resolve_loras("/etc/passwd: 1", [upload], folder)
    with pytest.raises(ConfigError, match="must be a number"):
        resolve_loras("ink.safetensors: lots", [upload], folder)


def test_page_messages_name_uploads_and_hide_tracebacks(tmp_path):
    from morphkit.errors import InputError
    from morphkit.ui.plot import pacing_plot
    from morphkit.ui.workspace import check_upload, page_message

    broken = tmp_path / "cache" / "0123abc" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    with pytest.raises(InputError) as info:
        check_upload(str(broken))
    message = page_message(info.value, [str(broken)])
    assert "broken.png" in message and str(tmp_path) not in message
    assert page_message(KeyError("x")).startswith("Unexpected KeyError") and "Traceback" not in page_message(KeyError())
    plot = pacing_plot([0, 0.5, 1], [0, 0.4, 1], [0.2, 0.1], [0.15, 0.15])
    assert plot.size == (720, 260) and plot.getextrema() != ((255, 255),) * 3
