"""The morph as stages: the same frames as before the restructure, settings, and re-rendering a prepared pair."""

import json

import numpy as np
import pytest

import morphkit
from morphkit.morph import MorphSettings, prepare_pair, render_morph
from tests.conftest import REPO, make_photo

REFERENCE = REPO / "tests" / "data" / "morph_reference.npz"
# The settings the reference frames were rendered with, by the single morph() of before the restructure
# (commit 36ee6a6, one thread). Guided morphs are left out: their inversion is guided now, on purpose.
REFERENCE_RUNS = {
    "default": {},
    "factors": dict(lora_blend="factors", adain=False, pacing="linear", attn_lambda=0.3),
}
COMMON = dict(model="tiny", prompt="a photo", frames=5, steps=10, lora_steps=20, formats=(), cache=False,
              device="cpu", batch_size=3, inversion="ddim")  # the reference predates exact inversion


@pytest.fixture(scope="module")
def reference_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    return make_photo(d / "a.png", seed=1), make_photo(d / "b.png", size=(64, 80), seed=2)


@pytest.mark.parametrize("name", sorted(REFERENCE_RUNS))
def test_restructured_morph_gives_the_frames_of_before(reference_pair, name):
    reference = np.load(REFERENCE)
    result = morphkit.morph(*reference_pair, progress=False, **COMMON, **REFERENCE_RUNS[name])
    frames = np.stack([np.asarray(f) for f in result.frames]).astype(int)
    # the same up to float rounding (which changes with the number of threads): α to 1e-4, pixels to 2 levels
    np.testing.assert_allclose(result.alphas, reference[f"{name}_alphas"], atol=1e-4)
    assert np.abs(frames - reference[name]).max() <= 2


def test_a_prepared_pair_renders_again_without_refitting(reference_pair, monkeypatch):
    from morphkit import train

    settings = MorphSettings(**{**COMMON, "pacing": "linear"})
    prepared = prepare_pair(*reference_pair, settings, progress=False)
    first = render_morph(prepared, settings, progress=False)

    def no_fitting(*args, **kwargs):
        raise AssertionError("a render-only change must not fit again")

    monkeypatch.setattr(train, "fit_lora", no_fitting)
    monkeypatch.setattr(train, "fit_loras", no_fitting)
    changed = settings.replace(attn_lambda=0.0, frames=4, adain=False)
    assert prepared.matches(changed) and not prepared.matches(settings.replace(guidance=2.0))
    again = render_morph(prepared, changed, progress=False)
    assert len(again.frames) == 4 and len(first.frames) == 5
    # the ends are the same pictures whatever the render settings
    assert np.array_equal(np.asarray(again.frames[0]), np.asarray(first.frames[0]))
    assert np.array_equal(np.asarray(again.frames[-1]), np.asarray(first.frames[-1]))
    with pytest.raises(ValueError, match="prepare_pair again"):
        render_morph(prepared, settings.replace(seed=3), progress=False)


def test_settings_from_a_config_file_with_flags_on_top(tmp_path):
    config = tmp_path / "morph.toml"
    config.write_text('frames = 24\nattn-lambda = 0.4\nformats = "gif,png"\nprompt_a = "a cat"\n')
    settings = MorphSettings.resolve(config, frames=8)
    assert (settings.frames, settings.attn_lambda, settings.formats, settings.prompts) == \
        (8, 0.4, ("gif", "png"), ("a cat", ""))
    (tmp_path / "bad.json").write_text(json.dumps({"frame": 3}))
    with pytest.raises(morphkit.ConfigError, match="unknown settings: frame"):
        MorphSettings.resolve(tmp_path / "bad.json")
    for bad, words in [(dict(frames=1), "at least 2 frames"), (dict(frames=10**6), "--frames"),
                       (dict(guidance=float("inf")), "--guidance"), (dict(seed=-1), "--seed"),
                       (dict(seed=2**64), "--seed"), (dict(lora_lr=1e30), "--lora-lr"), (dict(fps=0), "--fps"),
                       (dict(formats=("avi",)), "--formats"), (dict(pacing="zigzag"), "--pacing")]:
        with pytest.raises(morphkit.ConfigError, match=words):
            MorphSettings(**bad).validate()
    assert set(MorphSettings.field_names("render")) >= {"frames", "attn_lambda", "adain", "lora_blend", "pacing"}


def test_frames_per_call_follow_the_device_unless_given():
    assert MorphSettings().frames_per_call("cpu") == 16  # the launch-bound CPU: a default morph in one batch
    assert MorphSettings().frames_per_call("cuda:0") == 8
    assert MorphSettings(batch_size=3).frames_per_call("cpu") == MorphSettings(batch_size=3).frames_per_call("cuda") == 3
    for bad in (0, 2.5, True):
        with pytest.raises(morphkit.ConfigError, match="--batch-size"):
            MorphSettings(batch_size=bad).validate()
