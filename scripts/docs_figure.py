"""Copy a figure into docs/figures as a small palette PNG (docs keep their figures to a few hundred KB).

    python scripts/docs_figure.py SRC.png docs/figures/NAME.png [--colors 64]

Line plots and heat-maps read the same with 64 colours; codebook mosaics and reconstructions need 256.
"""
import argparse
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--colors", type=int, default=64, help="palette size, 2-256 (default 64)")
    args = ap.parse_args()
    if not 2 <= args.colors <= 256:
        raise SystemExit(f"--colors must be in [2, 256], got {args.colors}")
    src_bytes = Path(args.src).stat().st_size
    image = Image.open(args.src).convert("RGB")
    small = image.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    dst = Path(args.dst)
    tmp = dst.with_name(dst.name + ".tmp")
    small.save(tmp, format="PNG", optimize=True)
    tmp.replace(dst)  # atomic: never a half-written figure
    print(f"{args.src} ({src_bytes:,} B) -> {dst} ({dst.stat().st_size:,} B)")


if __name__ == "__main__":
    main()
