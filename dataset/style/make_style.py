"""Regenerate the tiny "mkstyle" example style set (images + metadata.jsonl).

Deterministic: fixed seed, numpy + pillow only. Output is CC0 (own work).

    python dataset/style/make_style.py            # writes next to this file
    python dataset/style/make_style.py OUT_DIR

The "mkstyle" look: bold flat-colour geometric shapes with thick dark
outlines on a warm off-white paper background with a light grain.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SEED = 1234
SS = 4  # supersampling factor for smooth edges
PAPER = (244, 236, 220)
INK = (34, 30, 40)
COLOURS = {
    "red": (214, 56, 52),
    "blue": (40, 92, 178),
    "yellow": (242, 190, 40),
    "green": (52, 150, 96),
    "orange": (236, 120, 36),
    "purple": (118, 70, 160),
}

# (file name, shape, colour names, caption(s)) -- a list of captions means
# one is drawn at random per training step.
ITEMS = [
    ("red_circles.png", "circle", ["red", "yellow"],
     "a painting in mkstyle style, red circles"),
    ("blue_squares.png", "square", ["blue", "orange"],
     ["a painting in mkstyle style, blue squares",
      "mkstyle style artwork of bold blue squares on paper"]),
    ("yellow_triangles.png", "triangle", ["yellow", "purple"],
     "a painting in mkstyle style, yellow triangles"),
    ("green_stripes.png", "stripe", ["green", "red"],
     "a painting in mkstyle style, green stripes"),
    ("orange_sun.png", "sun", ["orange", "blue"],
     ["a painting in mkstyle style, an orange sun over hills",
      "mkstyle style landscape, orange sun and blue hills"]),
    ("purple_mix.png", "mix", ["purple", "green", "yellow"],
     "a painting in mkstyle style, purple and green shapes"),
]


def _shape(draw, rng, kind, colour, S):
    w = int(S * 0.035)  # outline width
    cx, cy = rng.uniform(0.2, 0.8, 2) * S
    r = rng.uniform(0.10, 0.22) * S
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=INK, width=w)
    elif kind == "square":
        a = rng.uniform(0, np.pi / 2)
        pts = [(cx + r * 1.3 * np.cos(a + k * np.pi / 2),
                cy + r * 1.3 * np.sin(a + k * np.pi / 2)) for k in range(4)]
        draw.polygon(pts, fill=colour, outline=INK, width=w)
    elif kind == "triangle":
        a = rng.uniform(0, 2 * np.pi)
        pts = [(cx + r * 1.4 * np.cos(a + k * 2 * np.pi / 3),
                cy + r * 1.4 * np.sin(a + k * 2 * np.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=colour, outline=INK, width=w)


def make_image(kind, colours, rng):
    S = SIZE * SS
    img = Image.new("RGB", (S, S), PAPER)
    d = ImageDraw.Draw(img)
    cols = [COLOURS[c] for c in colours]
    w = int(S * 0.035)
    if kind in ("circle", "square", "triangle"):
        for i in range(int(rng.integers(4, 7))):
            _shape(d, rng, kind, cols[0] if i % 3 else cols[1], S)
    elif kind == "stripe":
        n = int(rng.integers(4, 6))
        for i in range(n):
            y0 = (i + 0.15) * S / n
            y1 = (i + 0.75) * S / n
            off = rng.uniform(-0.08, 0.08) * S
            d.polygon([(0, y0), (S, y0 + off), (S, y1 + off), (0, y1)],
                      fill=cols[i % 2], outline=INK, width=w)
    elif kind == "sun":
        d.rectangle([0, 0, S, S], fill=PAPER)
        r = 0.18 * S
        cx, cy = 0.62 * S, 0.36 * S
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=cols[0], outline=INK, width=w)
        for k, h in enumerate((0.62, 0.74)):
            xs = np.linspace(0, S, 9)
            ys = h * S + rng.uniform(-0.07, 0.07, xs.size) * S
            pts = list(zip(xs, ys)) + [(S, S), (0, S)]
            shade = tuple(int(c * (1.0 - 0.25 * k)) for c in cols[1])
            d.polygon(pts, fill=shade, outline=INK, width=w)
    elif kind == "mix":
        for i in range(6):
            _shape(d, rng, ("circle", "square", "triangle")[i % 3], cols[i % len(cols)], S)
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    # light paper grain
    a = np.asarray(img).astype(np.int16)
    a += rng.integers(-6, 7, size=(SIZE, SIZE, 1), dtype=np.int16)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    rows = []
    for name, kind, colours, text in ITEMS:
        make_image(kind, colours, rng).save(out / name, optimize=True)
        rows.append({"file_name": name, "text": text})
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} images + metadata.jsonl to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent)
