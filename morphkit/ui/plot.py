"""The pacing plot of the Morph tab, drawn with Pillow (no plotting library needed).

Two panels: the α of each frame, and the distance between each frame and the next, each before pacing
(the first pass, grey) and after it (the frames returned, coloured). Even pacing flattens the distances.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BEFORE = (150, 150, 150)
AFTER_ALPHA = (31, 119, 180)
AFTER_DISTANCE = (214, 96, 39)
INK = (40, 40, 40)
GRID = (225, 225, 225)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series: list[tuple[list[float], tuple]], x_label: str,
           y_range: tuple[float, float] | None = None) -> None:
    """One line chart inside `box` (left, top, right, bottom): each series is (values, colour), x = index."""
    left, top, right, bottom = box
    font = _font()
    draw.text(((left + right) // 2, top + 2), title, fill=INK, font=_font(13), anchor="mt")
    x0, y0, x1, y1 = left + 44, top + 22, right - 8, bottom - 26  # the plotting area
    values = [v for vs, _ in series for v in vs]
    lo, hi = y_range or ((min(values), max(values)) if values else (0.0, 1.0))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    for i in range(5):
        y = y1 - (y1 - y0) * i / 4
        draw.line((x0, y, x1, y), fill=GRID)
        draw.text((left, y - 6), f"{lo + (hi - lo) * i / 4:.3g}", fill=INK, font=font)
    draw.rectangle((x0, y0, x1, y1), outline=INK)
    count = max((len(vs) for vs, _ in series), default=0)
    draw.text((x0, y1 + 6), "0", fill=INK, font=font)
    draw.text((x1 - 16, y1 + 6), str(max(count - 1, 0)), fill=INK, font=font)
    draw.text(((x0 + x1) // 2 - 20, y1 + 6), x_label, fill=INK, font=font)
    for vs, colour in series:
        points = [(x0 + (x1 - x0) * i / max(count - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                  for i, v in enumerate(vs)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)


def pacing_plot(first_alphas: list[float], alphas: list[float], first_distances: list[float],
                distances: list[float], size: tuple[int, int] = (720, 260)) -> Image.Image:
    """α per frame and neighbour distances, before (grey) and after (colour) pacing, as an RGB image."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    half = width // 2
    alpha_series = [(list(first_alphas), BEFORE)] if first_alphas and list(first_alphas) != list(alphas) else []
    distance_series = [(list(first_distances), BEFORE)] if first_distances else []
    _panel(draw, (0, 0, half - 10, height - 18), "alpha per frame", alpha_series + [(list(alphas), AFTER_ALPHA)],
           "frame", y_range=(0.0, 1.0))
    _panel(draw, (half + 10, 0, width, height - 18), "distance to the next frame",
           distance_series + ([(list(distances), AFTER_DISTANCE)] if distances else []), "frame pair")
    draw.text((width // 2, height - 4), "grey: first pass (evenly spaced alpha)   colour: after pacing", fill=BEFORE,
              font=_font(11), anchor="md")
    return image
