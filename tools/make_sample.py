"""Generate synthetic smears with VIA annotations: `python tools/make_sample.py --out datasets/sample/wbc`."""

import argparse

from leukodet.data.synthetic import generate_smears

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default="datasets/sample/wbc")
parser.add_argument("--n", type=int, default=40, help="number of images")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--kind", choices=["wbc", "rbc"], default="wbc")
parser.add_argument("--width", type=int, default=512)
parser.add_argument("--height", type=int, default=384)
args = parser.parse_args()
images = generate_smears(args.out, args.n, args.width, args.height, args.seed, args.kind)
print(f"{len(images)} images, {sum(len(i.labels) for i in images)} annotated cells; results saved to {args.out}")
