"""Shared fixtures: every test runs the real code on the tiny SD model, offline, on the CPU."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Under pytest-xdist (`-n 2`, the README's command) each worker computes on one thread: two workers on two cores
# run the suite in about 60 % of the time one process with two threads takes (small models are launch-bound).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def morphkit_cache(tmp_path_factory):
    """A private cache per test session: the tiny model is built there once (about a second)."""
    path = tmp_path_factory.mktemp("morphkit-cache")
    os.environ["MORPHKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_path(morphkit_cache):
    from morphkit.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture
def tiny_pipe(tiny_path):
    """A freshly loaded tiny pipeline (loading takes about 0.1 s)."""
    from morphkit.models import load_pipeline

    return load_pipeline("tiny", device="cpu")


@pytest.fixture
def photo(tmp_path) -> Path:
    """A small photo-like RGB image with structure (gradients and a disc)."""
    return make_photo(tmp_path / "photo.png")


def make_photo(path: Path, size=(80, 64), seed=0) -> Path:
    g = torch.Generator().manual_seed(seed)
    w, h = size
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    disc = (((x - 0.5) ** 2 + (y - 0.5) ** 2) < 0.08).float()
    rgb = torch.stack([x, y, disc]) * 200 + torch.rand((3, h, w), generator=g) * 40
    Image.fromarray(rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path)
    return path


def unet_probe(unet, seed=0):
    """The UNet's output on a fixed random input: for comparing weights by what they do."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn((2, 4, size, size), generator=g)
    emb = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 20]), emb).sample


def interrupted_training(monkeypatch, call: int):
    """Make the `call`-th training loss of a run raise KeyboardInterrupt (a run killed mid-step); returns a
    function that undoes it."""
    from morphkit.train import loop

    real, calls = loop.diffusion_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", interrupted)
    return lambda: monkeypatch.setattr(loop, "diffusion_loss", real)
