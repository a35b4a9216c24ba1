import numpy as np
import pytest
from PIL import Image

from morphkit.errors import InputError
from morphkit.images import MAX_ASPECT, fit_size, load_image, open_image, save_image


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 24), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (24, 40)


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 100, (100, 100, 100)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white background
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("LA", (0, 128), (127, 127, 127)),
    ("I;16", 65535, (255, 255, 255)),  # 16-bit white stays white, not clipped garbage
    ("I;16", 32896, (128, 128, 128)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
])
def test_any_mode_becomes_8bit_rgb(tmp_path, mode, value, expected):
    Image.new(mode, (16, 16), value).save(tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg")
    img = open_image(tmp_path / ("x.png" if mode != "CMYK" else "x.jpg"))
    assert img.mode == "RGB"
    assert np.allclose(np.asarray(img)[8, 8], expected, atol=2)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    img.save(tmp_path / "p.png", transparency=0)
    assert open_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_size_policy_keeps_aspect_and_multiples_of_8():
    assert fit_size(512, 512, 512) == ((512, 512), (512, 512))
    scaled, final = fit_size(1000, 750, 512)  # 4:3 landscape
    assert scaled == (683, 512) and final == (680, 512)
    assert abs(final[0] / final[1] - 4 / 3) < 0.01
    _, final = fit_size(300, 3000, 64)  # 1:10 portrait: long side capped at MAX_ASPECT x short
    assert final == (64, int(64 * MAX_ASPECT))
    for w, h in [(77, 33), (33, 77), (1023, 511)]:
        _, final = fit_size(w, h, 64)
        assert all(side % 8 == 0 for side in final) and min(final) == 64


def test_load_image_applies_policy(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", resolution=64).size == (96, 64)
    assert load_image(tmp_path / "a.png").size == (300, 200)


def test_bad_images_have_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.png").mkdir()
    cases = {
        "missing.png": "does not exist",
        "empty.png": "empty",
        "garbage.png": "not an image",
        "cut.jpg": "corrupt or truncated",
        "folder.png": "is a directory",
    }
    for name, words in cases.items():
        with pytest.raises(InputError, match=words):
            open_image(tmp_path / name)


def test_absurdly_large_image_is_refused_before_decoding(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")  # 81 MP, a few KB on disk
    with pytest.raises(InputError, match="megapixels"):
        open_image(tmp_path / "huge.png")


def test_save_image_is_atomic_and_does_not_overwrite(tmp_path):
    img = Image.new("RGB", (8, 8), (9, 9, 9))
    path = save_image(img, tmp_path / "out.png")
    assert open_image(path).getpixel((0, 0)) == (9, 9, 9)
    from morphkit.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        save_image(img, path)
    save_image(Image.new("RGB", (8, 8), (7, 7, 7)), path, overwrite=True)
    assert open_image(path).getpixel((0, 0)) == (7, 7, 7)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left behind
