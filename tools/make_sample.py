"""Generate synthetic smears with VIA 2.x annotations: `python tools/make_sample.py --out datasets/sample/wbc`."""

import argparse

from leukodet.data.synthetic import generate_smears

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default="datasets/sample/wbc", help="folder for images/ and via_region_data.json")
parser.add_argument("--n", type=int, default=40, help="number of images (4 per patient)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--kind", choices=["wbc", "rbc"], default="wbc",
                    help="wbc: white cells annotated by type; rbc: red cells by size")
parser.add_argument("--width", type=int, default=512)
parser.add_argument("--height", type=int, default=384)
args = parser.parse_args()
images = generate_smears(args.out, n_images=args.n, width=args.width, height=args.height, seed=args.seed,
                         kind=args.kind)
print(f"{len(images)} images, {sum(len(i.labels) for i in images)} annotated cells; results saved to {args.out}")
