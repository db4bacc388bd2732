"""Training curves (a logged value against images seen) drawn as PNG panels with PIL alone.

    python -m world.curves --out assets/curves.png runs/clip/log.jsonl:clip/loss \\
        runs/judge/log.jsonl:train/loss

Each ``LOG:KEY`` becomes one panel: the raw values in light grey and a moving average on top,
with the first/last images seen and the value range on the axes. No plotting library is needed
(the project's requirements have none that writes PNG files offline).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dreamportrait.synthetic.contact_sheet import _font

W, H, PAD_L, PAD_B, PAD_T = 360, 220, 56, 30, 26


def read_series(log: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images seen, value) of every line of a log.jsonl that has ``key``."""
    xs, ys = [], []
    for line in Path(log).read_text().splitlines():
        rec = json.loads(line)
        if key in rec and rec[key] is not None:
            xs.append(rec.get("nimg", rec.get("kimg", 0) * 1000))
            ys.append(float(rec[key]))
    if not xs:
        raise ValueError(f"{log} has no values of {key!r}")
    return np.asarray(xs, float), np.asarray(ys, float)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), window)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def panel(title: str, x: np.ndarray, y: np.ndarray) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    lo, hi = float(np.min(y)), float(np.max(y))
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = float(x[0]), float(x[-1]) if x[-1] > x[0] else float(x[0]) + 1.0
    px = lambda v: PAD_L + (v - x0) / (x1 - x0) * (W - PAD_L - 10)
    py = lambda v: H - PAD_B - (v - lo) / (hi - lo) * (H - PAD_B - PAD_T)
    d.rectangle((PAD_L, PAD_T, W - 10, H - PAD_B), outline=(160, 160, 160))
    d.text((PAD_L, 6), title, fill="black", font=font)
    for value in (lo, hi):
        d.text((4, py(value) - 7), f"{value:.3g}", fill="black", font=font)
    d.text((PAD_L, H - PAD_B + 6), f"{x0 / 1000:.3g}k", fill="black", font=font)
    end = f"{x1 / 1000:.3g}k images"
    d.text((W - 10 - d.textlength(end, font=font), H - PAD_B + 6), end, fill="black", font=font)
    d.line(list(zip(map(px, x), map(py, y))), fill=(200, 200, 200), width=1)
    d.line(list(zip(map(px, x), map(py, smooth(y, max(1, len(y) // 25))))), fill=(30, 90, 200), width=2)
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m world.curves", description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="+", help="LOG.jsonl:KEY[:TITLE]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cols", type=int, default=3)
    args = ap.parse_args(argv)
    panels = []
    for spec in args.series:
        parts = spec.split(":")
        if len(parts) < 2:
            ap.error(f"{spec!r} must look like LOG.jsonl:KEY or LOG.jsonl:KEY:TITLE")
        log, key = parts[0], parts[1]
        title = ":".join(parts[2:]) or f"{key} ({Path(log).parent.name})"
        panels.append(panel(title, *read_series(log, key)))
    cols = min(args.cols, len(panels))
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * W, rows * H), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * W, (i // cols) * H))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
