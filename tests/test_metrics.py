"""Morph metrics on synthetic sequences with known answers, and `morphkit eval` end to end (no model needed)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import morphkit
from cli.main import app
from morphkit.metrics import (DISTANCES, evaluate, get_distance, images_to_tensor, l2_distance, neighbour_distances,
                              pdv, ppl, psnr, read_frames, register_distance, ssim)
from morphkit.morph import alpha_schedule, even_alphas


def two_images(seed=0, size=(24, 20)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((3, size[1], size[0]), generator=g), torch.rand((3, size[1], size[0]), generator=g)


def crossfade(a, b, weights):
    """Frames (F, 3, H, W): a linear cross-fade from a to b at the given weights."""
    w = torch.as_tensor(weights, dtype=torch.float64).view(-1, 1, 1, 1)
    return ((1 - w) * a.double() + w * b.double()).float()


def test_identical_frames_have_no_path():
    a, _ = two_images()
    frames = a.expand(6, -1, -1, -1)
    d = neighbour_distances(frames, l2_distance)
    assert d.shape == (5,) and ppl(d) == 0 and pdv(d) == 0


def test_a_linear_crossfade_walks_equal_steps():
    a, b = two_images(1)
    frames = crossfade(a, b, torch.linspace(0, 1, 9))
    d = neighbour_distances(frames, l2_distance, batch_size=3)  # batches that do not divide the 8 pairs
    rms = (b.double() - a.double()).pow(2).mean().sqrt().item()
    assert torch.allclose(d, torch.full((8,), rms / 8, dtype=torch.float64), rtol=1e-5)
    assert ppl(d) == pytest.approx(rms, rel=1e-5) and pdv(d) < 1e-12


def test_an_uneven_crossfade_has_a_larger_pdv_and_even_pacing_fixes_it():
    """A cross-fade whose weight goes as α³ rushes at the end; the α that even pacing picks fix most of that."""
    a, b = two_images(2)
    alphas = alpha_schedule(9)
    first = neighbour_distances(crossfade(a, b, alphas**3), l2_distance)
    assert pdv(first) > 1e-4
    paced = even_alphas(alphas, first)
    assert paced[0] == 0 and paced[-1] == 1 and (paced.diff() > 0).all()
    again = neighbour_distances(crossfade(a, b, paced**3), l2_distance)
    assert pdv(again) < pdv(first) / 20
    assert ppl(again) == pytest.approx(ppl(first), rel=1e-5)  # the same path, walked evenly


def test_psnr_and_ssim_known_values():
    a, _ = two_images(3)
    assert psnr(a, a).item() == math.inf
    shifted = a.double() + 0.1  # an offset of 0.1 everywhere: MSE 0.01, 20 dB
    assert psnr(a, shifted).item() == pytest.approx(20.0, abs=1e-9)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, so SSIM is the luminance term (2xy + C1) / (x² + y² + C1)
    x, y, c1 = 0.3, 0.6, 0.01**2
    flat = ssim(torch.full((3, 16, 16), x), torch.full((3, 16, 16), y)).item()
    assert flat == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-6)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert 0 < ssim(a, noisy).item() < ssim(a, (a + noisy) / 2).item() < 1
    assert ssim(a, noisy).item() == pytest.approx(ssim(noisy, a).item(), abs=1e-12)
    assert ssim(a[:, :5, :7], a[:, :5, :7]).item() == pytest.approx(1.0)  # smaller than the 11 px window


def test_distance_registry():
    name, fn, note = get_distance("auto")
    assert name in DISTANCES and callable(fn)
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert name == "l2" and "lpips package is not installed" in note
        with pytest.raises(morphkit.ConfigError, match="lpips cannot run here"):
            get_distance("lpips")
    with pytest.raises(morphkit.ConfigError, match="Unknown distance"):
        get_distance("cosine")
    register_distance("halfl2", lambda device=None: lambda x, y: l2_distance(x, y) / 2, "half of l2")
    try:
        a, b = two_images(4)
        frames = crossfade(a, b, torch.linspace(0, 1, 4))
        assert torch.allclose(neighbour_distances(frames, get_distance("halfl2")[1]) * 2,
                              neighbour_distances(frames, l2_distance))
    finally:
        DISTANCES.pop("halfl2")


# ---- reading frames and `morphkit eval` ---------------------------------------------------------

def save_crossfade(folder, a_img, b_img, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    frames = [Image.blend(a_img, b_img, w) for w in np.linspace(0, 1, n)]
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame_{i:03d}.png")
    return frames


@pytest.fixture
def inputs(tmp_path):
    """Image A (the frame size, 40x32) and image B (another size and aspect: it is covered and cropped)."""
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    b_big = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    a.save(tmp_path / "a.png")
    b_big.save(tmp_path / "b.png")
    from morphkit.images import cover_resize

    return tmp_path / "a.png", tmp_path / "b.png", a, cover_resize(b_big, a.size)


def test_evaluate_a_crossfade_folder(tmp_path, inputs):
    path_a, path_b, a, b = inputs
    save_crossfade(tmp_path / "frames", a, b)
    result = evaluate(tmp_path / "frames", path_a, path_b, distance="l2")
    assert result.frames == 5 and result.size == (40, 32) and result.distance == "l2"
    assert result.psnr_a == math.inf and result.psnr_b == math.inf and result.ssim_a == pytest.approx(1.0)
    assert result.pdv < 1e-5 and len(result.distances) == 4
    data = result.to_dict()
    assert data["psnr_a"] is None and json.loads(json.dumps(data))["ppl"] == pytest.approx(result.ppl)
    # the API takes frames in memory too
    same = evaluate(images_to_tensor(read_frames(tmp_path / "frames")), a, b, distance="l2")
    assert same.ppl == pytest.approx(result.ppl)


def test_read_frames_refuses_what_is_not_a_morph(tmp_path, inputs):
    _, _, a, b = inputs
    (tmp_path / "empty").mkdir()
    with pytest.raises(morphkit.InputError, match="holds no images"):
        read_frames(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    save_crossfade(mixed, a, b, 3)
    a.resize((20, 16)).save(mixed / "frame_003.png")
    with pytest.raises(morphkit.InputError, match="differ in size"):
        read_frames(mixed)
    (tmp_path / "bad.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    with pytest.raises(morphkit.InputError, match="could not be read"):
        read_frames(tmp_path / "bad.gif")
    a.save(tmp_path / "still.png")
    with pytest.raises(morphkit.InputError, match="at least 2"):
        read_frames(tmp_path / "still.png")
    with pytest.raises(morphkit.InputError, match="does not exist"):
        read_frames(tmp_path / "nowhere")


def test_a_back_and_forth_gif_is_cut_to_its_first_half(tmp_path, inputs):
    from morphkit.export import boomerang, save_gif

    _, _, a, b = inputs
    frames = save_crossfade(tmp_path / "f", a, b, 4)
    save_gif(boomerang(frames), tmp_path / "bf.gif", 100)
    save_gif(frames, tmp_path / "plain.gif", 100)
    assert len(read_frames(tmp_path / "bf.gif")) == 4 and len(read_frames(tmp_path / "plain.gif")) == 4


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_cli(tmp_path, inputs):
    path_a, path_b, a, b = inputs
    save_crossfade(tmp_path / "frames", a, b)
    args = ["eval", tmp_path / "frames", "--a", path_a, "--b", path_b]
    table = run(*args, "--json", tmp_path / "m.json")
    assert table.exit_code == 0, table.output
    for words in ("PPL", "PDV", "PSNR", "SSIM", "Distance", "JSON:"):
        assert words in table.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["frames"] == 5 and written["psnr_a"] is None and written["distance"] in DISTANCES

    again = run(*args, "--json", tmp_path / "m.json")
    assert again.exit_code == 4 and "--overwrite" in again.output
    assert run(*args, "--json", tmp_path / "m.json", "--overwrite").exit_code == 0

    printed = run(*args, "--json", "-", "--distance", "l2")
    assert printed.exit_code == 0 and json.loads(printed.output)["distance"] == "l2"

    (tmp_path / "empty").mkdir()
    for argv, code, words in [
        (["eval", tmp_path / "empty", "--a", path_a, "--b", path_b], 2, "holds no images"),
        ([*args, "--distance", "cosine"], 2, "Unknown distance"),
        (["eval", tmp_path / "frames", "--a", tmp_path / "nope.png", "--b", path_b], 2, "does not exist"),
    ]:
        result = run(*argv)
        assert result.exit_code == code and words in result.output, (argv, result.output)
        assert "Traceback" not in result.output


# ---- the ends against the VAE round trip, and the DiffMorpher authors' protocol -------------------------

def test_eval_compares_the_ends_with_their_vae_round_trips(tmp_path, inputs, morphkit_cache):
    from morphkit.images import to_pil
    from morphkit.models import decode_latents, encode_image, load_pipeline

    path_a, path_b, a, b = inputs
    save_crossfade(tmp_path / "frames", a, b)
    result = evaluate(tmp_path / "frames", path_a, path_b, distance="l2", model="tiny")
    pipe = load_pipeline("tiny", device="cpu")
    for side, image in (("a", a), ("b", b)):
        round_trip = images_to_tensor(to_pil(decode_latents(pipe, encode_image(pipe, image))))
        assert result.vae[f"psnr_{side}"] == pytest.approx(psnr(images_to_tensor([image]), round_trip).item())
        assert -1 <= result.vae[f"ssim_{side}"] < 1  # the ends are the inputs, which the random VAE does not reproduce
    assert result.vae["model"] == "tiny" and result.psnr_a == math.inf
    assert json.loads(json.dumps(result.to_dict()))["vae"]["psnr_b"] == pytest.approx(result.vae["psnr_b"])
    assert evaluate(tmp_path / "frames", path_a, path_b, distance="l2").vae is None

    small = [img.resize((20, 20)) for img in (a, b)]
    with pytest.raises(morphkit.InputError, match="multiples of 8"):
        evaluate(images_to_tensor(small), small[0], small[1], distance="l2", model="tiny")


def test_eval_cli_with_and_without_a_model(tmp_path, inputs, morphkit_cache):
    path_a, path_b, a, b = inputs
    save_crossfade(tmp_path / "frames", a, b)
    args = ["eval", tmp_path / "frames", "--a", path_a, "--b", path_b, "--distance", "l2"]
    without = run(*args)
    assert without.exit_code == 0, without.output
    assert "VAE round trip: not measured" in without.output and "--model" in without.output
    with_model = run(*args, "--model", "tiny", "--json", tmp_path / "m.json")
    assert with_model.exit_code == 0, with_model.output
    assert "against its VAE round trip" in with_model.output and "VAE round trip by tiny" in with_model.output
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["vae"]["model"] == "tiny" and written["vae"]["psnr_a"] > 0 and written["protocol"] == "morphkit"


@pytest.fixture
def fake_lpips(tmp_path, monkeypatch):
    """An `lpips` package and AlexNet weights file that are not the real ones: records what LPIPS is given."""
    import sys
    import types

    seen = []

    class LPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()
            self.net, self.scale = net, torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            seen.append((self.net, tuple(x.shape[2:]), x.min().item(), x.max().item()))
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True) * self.scale

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=LPIPS))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return seen


def test_the_diffmorpher_protocol_is_lpips_alexnet_on_512px_frames_in_minus_one_to_one(tmp_path, inputs, fake_lpips):
    path_a, path_b, a, b = inputs
    save_crossfade(tmp_path / "frames", a, b)
    result = evaluate(tmp_path / "frames", path_a, path_b, protocol="diffmorpher")
    assert result.protocol == "diffmorpher" and result.distance == "lpips" and len(result.distances) == 4
    assert fake_lpips and all(net == "alex" and size == (512, 512) for net, size, _, _ in fake_lpips)
    low, high = min(s[2] for s in fake_lpips), max(s[3] for s in fake_lpips)
    assert -1 <= low < -0.9 and 0.9 < high <= 1
    printed = run("eval", tmp_path / "frames", "--a", path_a, "--b", path_b, "--protocol", "diffmorpher")
    assert printed.exit_code == 0 and "512x512" in printed.output, printed.output


def test_the_diffmorpher_protocol_says_plainly_when_lpips_cannot_run(tmp_path, inputs, monkeypatch):
    import sys

    path_a, path_b, a, b = inputs
    save_crossfade(tmp_path / "frames", a, b)
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed, whatever this machine has
    with pytest.raises(morphkit.ConfigError, match="lpips package is not installed"):
        evaluate(tmp_path / "frames", path_a, path_b, protocol="diffmorpher")
    args = ["eval", tmp_path / "frames", "--a", path_a, "--b", path_b]
    for extra, code, words in [
        (["--protocol", "diffmorpher"], 2, ["--protocol diffmorpher", "pip install lpips", "--protocol morphkit"]),
        (["--protocol", "diffmorpher", "--model", tmp_path / "no-such-model"], 2, ["pip install lpips"]),
        (["--protocol", "diffmorpher", "--distance", "l2"], 2, ["contradicts"]),
        (["--protocol", "paper"], 2, ["Unknown --protocol"]),
    ]:
        result = run(*args, *extra)
        assert result.exit_code == code and all(w in result.output for w in words), (extra, result.output)
        assert "Traceback" not in result.output


def test_metrics_and_inversion_import_neither_morph_nor_each_other():
    import ast
    from pathlib import Path

    import morphkit.inversion
    import morphkit.metrics
    import morphkit.similarity

    def relative_imports(module):
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert not {"morph", "inversion"} & relative_imports(morphkit.metrics)
    assert not {"morph", "metrics"} & relative_imports(morphkit.inversion)
    assert not relative_imports(morphkit.similarity)
