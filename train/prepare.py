"""Prepare a captioned EG3D-layout data set from aligned images, caption files and camera labels.

    python -m train.prepare --images ALIGNED/ --captions TEXTS/ --cameras dataset.json --out DATA/ [--resolution 512]

- ``--images``: aligned, square face crops (EG3D's FFHQ preprocessing, e.g. CelebAText-HQ
  images run through ``dataset_preprocessing/ffhq``), any of .png/.jpg/.jpeg/.webp.
- ``--captions``: one ``NAME.txt`` per image (same stem), one caption per line (CelebAText-HQ and
  FFHQ-Text ship captions this way).
- ``--cameras``: an EG3D ``dataset.json`` (``{"labels": [[name, [25 floats]], ...]}``) whose names
  match the images by file name or stem.

Writes ``OUT/dataset.json``, ``OUT/captions.json`` and the images as PNG under ``OUT/00000/...``
(resized with Lanczos when ``--resolution`` differs). No mirroring: a mirrored face would no
longer match its caption ("hair parted on the left"), as the paper notes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from dreamportrait.checkpoints import atomic_file, atomic_write
from train.data import LABEL_DIM

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class PrepareError(ValueError):
    """A missing or malformed input piece, with what to do about it."""


def read_cameras(path: Path) -> dict[str, list[float]]:
    """Camera labels keyed by file stem."""
    if not path.is_file():
        raise PrepareError(f"camera file {path} not found; pass EG3D's dataset.json with --cameras")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path} is not valid JSON ({e}); expected {{\"labels\": [[name, [25 floats]], ...]}}") from e
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, list):
        raise PrepareError(f"{path} has no 'labels' list; expected {{\"labels\": [[name, [25 floats]], ...]}}")
    out = {}
    for entry in labels:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], list) or len(entry[1]) != LABEL_DIM
                or not all(isinstance(v, (int, float)) for v in entry[1])):
            raise PrepareError(f"{path}: malformed label entry {str(entry)[:80]}; each must be [name, [25 numbers]]")
        out[Path(entry[0].replace("\\", "/")).stem] = [float(v) for v in entry[1]]
    return out


def read_captions(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    caps = [line for line in lines if line]
    if not caps:
        raise PrepareError(f"caption file {path} is empty; it must hold at least one caption per line")
    return caps


def prepare(images: Path, captions: Path, cameras: Path, out: Path, resolution: int | None = None,
            skip_incomplete: bool = False) -> dict:
    """Build the data set; returns counts. Every problem is found before anything is written."""
    for p, flag in ((images, "--images"), (captions, "--captions")):
        if not p.is_dir():
            raise PrepareError(f"{flag} folder {p} not found")
    labels = read_cameras(cameras)
    files = sorted(f for f in images.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrepareError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    items, problems = [], []
    for f in files:
        cap_file = captions / f"{f.stem}.txt"
        if not cap_file.is_file():
            problems.append(f"{f.name}: no caption file {cap_file.name} in {captions}")
            continue
        if f.stem not in labels:
            problems.append(f"{f.name}: no camera label in {cameras}")
            continue
        items.append((f, read_captions(cap_file), labels[f.stem]))
    if problems and not skip_incomplete:
        raise PrepareError(f"{len(problems)} of {len(files)} images are incomplete, e.g.:\n  " + "\n  ".join(problems[:5])
                           + "\nfix them, or pass --skip-incomplete to leave those images out")
    if not items:
        raise PrepareError("no complete image (image + captions + camera label) to write")
    sizes = {}
    for f, _, _ in items:
        try:
            with Image.open(f) as im:
                sizes[f] = im.size
        except OSError as e:
            raise PrepareError(f"cannot read image {f}: {e}") from e
    bad = [f.name for f, s in sizes.items() if s[0] != s[1]]
    if bad:
        raise PrepareError(f"{len(bad)} images are not square (e.g. {bad[:3]}); EG3D data sets use square aligned crops")
    res = resolution or next(iter(sizes.values()))[0]
    if res & (res - 1):
        raise PrepareError(f"resolution {res} is not a power of two; pass --resolution (e.g. 512)")
    entries, caps = [], {}
    for i, (f, cap, label) in enumerate(items):
        name = f"{i // 1000:05d}/img{i:08d}.png"
        with Image.open(f) as im, atomic_file(out / name) as tmp:
            im = im.convert("RGB")
            if im.size != (res, res):
                im = im.resize((res, res), Image.LANCZOS)
            im.save(tmp)
        entries.append([name, label])
        caps[name] = cap
    atomic_write(out / "dataset.json", json.dumps({"labels": entries}))
    atomic_write(out / "captions.json", json.dumps(caps))
    return {"written": len(items), "skipped": len(problems), "resolution": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of aligned square images")
    ap.add_argument("--captions", type=Path, required=True, help="folder of NAME.txt caption files")
    ap.add_argument("--cameras", type=Path, required=True, help="EG3D dataset.json with camera labels")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--resolution", type=int, default=None, help="output size (default: the input size)")
    ap.add_argument("--skip-incomplete", action="store_true", help="leave out images lacking captions or labels")
    args = ap.parse_args(argv)
    try:
        counts = prepare(args.images, args.captions, args.cameras, args.out, args.resolution, args.skip_incomplete)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['written']} images at {counts['resolution']}x{counts['resolution']} to {args.out}"
          + (f" (skipped {counts['skipped']} incomplete)" if counts["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
