"""Keyframe chains: A → B → C as one morph, each keyframe one frame, frames shared out by segment length."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

import morphkit
from cli.main import app
from morphkit.metrics import pdv
from morphkit.morph import MorphSettings, allot_steps, respace
from tests.conftest import make_photo

FAST = dict(model="tiny", steps=4, lora_steps=4, device="cpu", batch_size=4, distance="l2",
            progress=False)


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_steps_go_to_segments_by_length_and_alpha_cuts_a_segment_evenly():
    assert allot_steps(torch.tensor([1.0, 1.0, 1.0]), 7) == [3, 2, 2]  # even, the first take the remainder
    assert allot_steps(torch.tensor([1.0, 3.0]), 8) == [2, 6]  # every step 0.5 long
    assert allot_steps(torch.tensor([0.0, 5.0]), 4) == [1, 3]  # at least one step each
    assert allot_steps(torch.zeros(2), 4) == [2, 2]
    # a segment measured at α 0, 0.5, 1 whose first half is three times as long as its second
    alphas = respace(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([3.0, 1.0]), 4)
    torch.testing.assert_close(alphas, torch.tensor([0.0, 1 / 6, 1 / 3, 0.5, 1.0], dtype=torch.float64))


PROMPTS = ("a photo", "a photo of sks", "a photo")


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory):
    """B is A's picture under another prompt (a short segment), C another picture (a long one)."""
    d = tmp_path_factory.mktemp("chain")
    a = make_photo(d / "a.png", seed=1)
    b = make_photo(d / "b.png", seed=1)
    c = d / "c.png"
    ImageOps.invert(Image.open(make_photo(d / "c0.png", size=(64, 80), seed=3))).save(c)
    return a, b, c


@pytest.fixture(scope="module")
def chain(keyframes, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain-out") / "abc"
    return morphkit.morph_chain(keyframes, frames=9, prompt_for=PROMPTS, formats=("png",), output_dir=str(out),
                                **FAST)


def test_a_three_keyframe_chain(keyframes, chain, monkeypatch):
    from morphkit import train

    # the frame count is as asked, each keyframe one frame, the middle one where its segments meet
    assert len(chain.frames) == 9 and len(chain.alphas) == 9
    first, middle, last = chain.keyframes
    assert (first, last) == (0, 8) and sum(chain.segments) == 8 and chain.segments[0] < chain.segments[1]
    assert chain.alphas[middle] == 1.0 and sorted(chain.alphas) == chain.alphas
    frames = [np.asarray(f).astype(int) for f in chain.frames]
    assert not np.array_equal(frames[middle - 1], frames[middle])  # never twice at the join
    assert not np.array_equal(frames[middle + 1], frames[middle])

    # the middle keyframe's frame is B's end frame of A → B rendered alone (LoRAs and noises from the cache)
    def no_fitting(*args, **kwargs):
        raise AssertionError("the keyframes' LoRAs are in the cache")

    monkeypatch.setattr(train, "fit_lora", no_fitting)
    monkeypatch.setattr(train, "fit_loras", no_fitting)
    alone = morphkit.morph(keyframes[0], keyframes[1], prompt_a=PROMPTS[0], prompt_b=PROMPTS[1], frames=3,
                           formats=(), **FAST)
    assert all(alone.cache_hits.values())
    # (equal up to float rounding: the UNet's batches differ in size, the pixels by at most a level)
    assert np.abs(np.asarray(alone.frames[-1]).astype(int) - frames[middle]).max() <= 1

    # even pacing over the whole chain evens the neighbour distances across the two segments
    assert len(chain.first_distances) == len(chain.distances) == 8
    assert pdv(torch.tensor(chain.distances)) < 0.7 * pdv(torch.tensor(chain.first_distances))


def test_a_loop_closes_back_to_the_first_keyframe(keyframes, chain):
    looped = morphkit.morph_chain(keyframes, frames=9, loop=True, prompt_for=PROMPTS, formats=(), **FAST)
    assert all(looped.cache_hits.values())  # every keyframe prepared once, by the chain above
    assert len(looped.frames) == 9 and len(looped.keyframes) == 3 and sum(looped.segments) == 9
    assert looped.keyframes[0] == 0 and looped.alphas[-1] < 3  # the first image is not shown again at the end
    assert np.array_equal(np.asarray(looped.frames[0]), np.asarray(chain.frames[0]))


def test_eval_measures_a_chain_at_its_keyframes(keyframes, chain):
    result = run_cli("eval", chain.output_dir / "frames", *[x for k in keyframes for x in ("--keyframe", k)],
                     "--distance", "l2")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Keyframe")]
    assert [int(line.split()[2]) for line in lines] == chain.keyframes
    both = run_cli("eval", chain.output_dir / "frames", "--a", keyframes[0], "--keyframe", keyframes[1])
    assert both.exit_code != 0 and "not both" in both.output


def test_chain_settings_and_bad_inputs(keyframes, tmp_path):
    config = tmp_path / "chain.toml"
    config.write_text('prompts = ["a cat", "a dog", "a fox"]\nloop = true\ngif_loops = 2\n')
    settings = MorphSettings.resolve(config)
    assert settings.keyframe_prompts(3) == ["a cat", "a dog", "a fox"] and settings.loop and settings.gif_loops == 2
    with pytest.warns(FutureWarning, match="gif_loops"):
        old = MorphSettings.resolve(None, loop=3)  # the GIF loop count of before
    assert (old.loop, old.gif_loops) == (False, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MorphSettings(loop=True).loop is True

    common = ["--model", "tiny", "--steps", "4", "--lora-steps", "4", "-q", "-o", tmp_path / "x"]
    cases = [
        ([*keyframes, "--prompt-for", "a cat", *common], "--prompt-for gives 1 prompt for 3 images"),
        ([*keyframes, "--prompt-a", "a cat", *common], "--prompt-for once per image"),
        ([*keyframes, "--frames", "2", *common], "fewer than the 3 keyframes"),
        ([keyframes[0], keyframes[1], "3", *common], "--gif-loops 3"),
        ([keyframes[0], keyframes[2], keyframes[2], *common], "Keyframes 2 and 3 are the same image"),
        ([*keyframes, "--lora-a", keyframes[0], *common], "a chain fits one LoRA per keyframe"),
    ]
    for argv, words in cases:
        result = run_cli("morph", *argv)
        assert result.exit_code == 2 and words in result.output, (argv, result.output)
    assert not (tmp_path / "x").exists()

    # the old meaning of loop, from a config file: one "Warning:" line in the user's words, no Python source lines
    old_config = tmp_path / "old.toml"
    old_config.write_text("loop = 3\n")
    result = run_cli("morph", keyframes[0], tmp_path / "missing.png", "--config", old_config, *common)
    assert result.exit_code == 2 and "Warning: The setting loop (--loop)" in result.output, result.output
    assert "FutureWarning" not in result.output and "settings.py" not in result.output
