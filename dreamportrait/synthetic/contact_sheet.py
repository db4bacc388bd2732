"""Contact sheet of the synthetic world: sample identities with a caption, and a turntable strip.

    python -m dreamportrait.synthetic.contact_sheet --out assets/synthetic_contact_sheet.png

Every render is 64x64 (the training resolution) enlarged with nearest-neighbour sampling, so
the sheet shows exactly what the models see.
"""
from __future__ import annotations

import argparse
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..cameras import camera_label
from ..grid import save_png, to_uint8
from .attributes import sample_identities
from .captions import make_captions
from .dataset_writer import identity_views
from .render import HeadBatch, render

RES = 64


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(seed: int = 0, cols: int = 6, rows: int = 3, scale: int = 3, strip_views: int = 8) -> Image.Image:
    """The sheet as a PIL image: ``cols x rows`` identities at their data set view, then a yaw
    strip from -35 to +35 degrees of the first identity."""
    identities = sample_identities(seed, cols * rows, "train")
    labels = torch.cat([identity_views(ident, 1)[0] for ident in identities])
    tiles = to_uint8(render(HeadBatch(identities), labels, RES)["rgb"], value_range=(0, 1))
    yaws = np.linspace(-35.0, 35.0, strip_views)
    strip = to_uint8(render(HeadBatch([identities[0]] * strip_views),
                            camera_label(yaws.tolist(), [0.0] * strip_views), RES)["rgb"], value_range=(0, 1))
    cell, pad, text_h = RES * scale, 8, 78
    font, title_font = _font(11), _font(15)
    width = cols * (cell + pad) + pad
    strip_scale = max(1, (width - pad) // (strip_views * RES))
    strip_cell = RES * strip_scale
    height = 34 + rows * (cell + text_h + pad) + 30 + strip_cell + 22 + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), f"Synthetic portrait world: {cols * rows} training identities (seed {seed}), "
                        "64x64 renders at their data set pose, first caption of ten", fill=(0, 0, 0), font=title_font)
    for k, (ident, tile) in enumerate(zip(identities, tiles)):
        r, c = divmod(k, cols)
        x, y = pad + c * (cell + pad), 34 + r * (cell + text_h + pad)
        sheet.paste(Image.fromarray(tile).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(make_captions(ident)[0], width=cell // 6)[:6]
        draw.multiline_text((x, y + cell + 3), "\n".join(lines), fill=(30, 30, 30), font=font, spacing=1)
    y = 34 + rows * (cell + text_h + pad) + 4
    draw.text((pad, y), "Multi-view: the first identity from yaw -35 to +35 degrees (pitch 0)",
              fill=(0, 0, 0), font=title_font)
    for k, tile in enumerate(strip):
        sheet.paste(Image.fromarray(tile).resize((strip_cell, strip_cell), Image.NEAREST),
                    (pad + k * strip_cell, y + 26))
        draw.text((pad + k * strip_cell + 4, y + 28 + strip_cell), f"{yaws[k]:+.0f} deg", fill=(0, 0, 0), font=font)
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamportrait.synthetic.contact_sheet",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/synthetic_contact_sheet.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = save_png(np.asarray(contact_sheet(args.seed)), args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
