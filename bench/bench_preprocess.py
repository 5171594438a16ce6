"""Benchmark: the segmented chain on a 4100x3075 photographic JPEG against full-size alternatives,
and the mapper's sample rate with training augmentation against the model's CPU training step
rate. Prints ratios measured in this run (absolute times depend on the machine).

    python bench/bench_preprocess.py [--repeats 7] [--bilateral-diameter 9]

The JPEG is a real smear photo (../shared/datasets/bccd) upscaled with cubic interpolation plus
mild noise, saved at quality 95 in a temp folder (never in the repo); a generated smear stands in
when the shared datasets are absent.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf

from leukodet.data.imageio import read_image
from leukodet.preprocess import PreprocessChain

REPO = Path(__file__).resolve().parents[1]
BCCD_PHOTO = REPO.parent / "shared" / "datasets" / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
SEGMENTED = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "preprocess" / "segmented.yaml"), resolve=True)["steps"]
FILTERS = SEGMENTED[1:]  # everything after the scale step
FULL, SMALL = (4100, 3075), (820, 615)  # the seed's images and its 0.2 scale


def median_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each function. Runs are interleaved, so a busy spell on a shared machine
    slows all of them alike and the ratios stay fair."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_large_jpeg(folder: Path) -> Path:
    if BCCD_PHOTO.is_file():
        photo, source = cv2.imread(str(BCCD_PHOTO)), f"real photo {BCCD_PHOTO.name}"
    else:
        from leukodet.data.synthetic import render_smear

        photo, source = cv2.cvtColor(render_smear(np.random.default_rng(0), 640, 480, "wbc")[0], cv2.COLOR_RGB2BGR), \
            "generated smear (shared datasets absent)"
    large = cv2.resize(photo, FULL, interpolation=cv2.INTER_CUBIC).astype(np.int16)
    large += np.random.default_rng(0).normal(0, 3, large.shape).astype(np.int16)
    path = folder / "smear_4100x3075.jpg"
    cv2.imwrite(str(path), np.clip(large, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    print(f"test image: {FULL[0]}x{FULL[1]} JPEG q95 from {source}, {path.stat().st_size / 1e6:.1f} MB; "
          f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads")
    return path


def bench_chain(path: Path, filter_steps: list[dict], repeats: int) -> None:
    chain = PreprocessChain([{"name": "scale", "factor": SMALL[0] / FULL[0]}, *filter_steps])
    filters = PreprocessChain(filter_steps)

    def full_decode():
        return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)

    def decode_resize_filter():
        return filters.run(cv2.resize(read_image(path), SMALL, interpolation=cv2.INTER_AREA))

    def filter_then_resize():
        state, _ = filters.run(read_image(path))
        return cv2.resize(state.image, SMALL, interpolation=cv2.INTER_AREA)

    t = median_seconds({"chain": lambda: chain.run_on_file(path), "a": full_decode, "b": decode_resize_filter,
                        "c": filter_then_resize, "reduced": lambda: read_image(path, reduce=4)}, repeats)
    t_chain, t_a, t_b, t_c = t["chain"], t["a"], t["b"], t["c"]
    print(f"segmented chain (1/4 decode, scale 0.2, filters) : {t_chain * 1000:7.1f} ms")
    print(f"    of which the 1/4 JPEG decode                 : {t['reduced'] * 1000:7.1f} ms")
    print(f"(a) bare full-size decode                         : {t_a * 1000:7.1f} ms")
    print(f"(b) full decode, resize, the same filters         : {t_b * 1000:7.1f} ms")
    print(f"(c) full decode, the same filters full size, resize: {t_c * 1000:7.1f} ms")
    print(f"chain / (a) = {t_chain / t_a:.2f}  (goal <= 1.0)")
    print(f"(b) / chain = {t_b / t_chain:.2f}  (goal >= 1.8)")
    print(f"(c) / chain = {t_c / t_chain:.1f}  (goal >= 10)")


def bench_loader_vs_model(folder: Path, large_jpeg: Path, filter_steps: list[dict], repeats: int) -> None:
    import leukodet.models  # noqa: F401  (registers the models)
    from leukodet.data.coco import load_dataset_dicts, write_coco
    from leukodet.preprocess.mapper import DatasetMapper
    from leukodet.data.synthetic import generate_smears
    from leukodet.data.via import LabelPolicy, read_via
    from leukodet.registry import MODELS

    generate_smears(folder / "sample", n_images=8, seed=0)
    parsed = read_via(folder / "sample" / "via_region_data.json", labels=LabelPolicy("cell_type"))
    classes = sorted({r.label for rec in parsed.records for r in rec.regions})
    records = load_dataset_dicts(write_coco(folder / "sample" / "all.json", parsed.records, classes))[0]
    augment = OmegaConf.load(REPO / "conf" / "augment" / "default.yaml")

    mappers = {arm: DatasetMapper(OmegaConf.load(REPO / "conf" / "preprocess" / f"{arm}.yaml"), augment, is_train=True)
               for arm in ("raw", "segmented")}
    large = DatasetMapper({"steps": [{"name": "scale", "factor": 0.2}, *filter_steps]}, augment, is_train=True)
    # one thread each, as in a DataLoader worker (PyTorch sets 1 there; OpenCV should be set alike)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    t = median_seconds({"raw": lambda: [mappers["raw"](r) for r in records],
                        "segmented": lambda: [mappers["segmented"](r) for r in records],
                        "large": lambda: large.map_image(large_jpeg)}, repeats)
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(-1)
    rates = {"raw": len(records) / t["raw"], "segmented": len(records) / t["segmented"], "large": 1 / t["large"]}
    for arm in ("raw", "segmented"):
        print(f"mapper, {arm} chain + training augmentation, 512x384 sample, one worker: {rates[arm]:6.1f} samples/s")
    print(f"mapper, segmented chain + augmentation, 4100x3075 JPEG at 0.2, one worker: {rates['large']:6.1f} samples/s")

    model = MODELS.build({"name": "maskrcnn_effnet_lite0"}, num_classes=len(classes))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)
    mapper = DatasetMapper(OmegaConf.load(REPO / "conf" / "preprocess" / "raw.yaml"), augment, is_train=True)
    batch = [mapper(records[0]), mapper(records[1])]

    def train_step():
        loss = sum(model.losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model_rate = len(batch) / median_seconds({"step": train_step}, max(3, repeats // 2))["step"]
    print(f"model training step, EfficientNet-Lite0 Mask R-CNN, batch 2, CPU ({torch.get_num_threads()} threads): "
          f"{model_rate:6.3f} samples/s ({len(batch) / model_rate:.1f} s per step)")
    slowest = min(rates.values())
    print(f"slowest mapper / model = {slowest / model_rate:.1f}  (> 1: one loader worker keeps up)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bilateral-diameter", type=int, default=None,
                        help="override the config's bilateral diameter (the issue's figures used 9)")
    args = parser.parse_args()
    filter_steps = [{**spec, "diameter": args.bilateral_diameter}
                    if spec["name"] == "bilateral" and args.bilateral_diameter else spec for spec in FILTERS]
    print("filters:", ", ".join(f"{s['name']}({', '.join(f'{k}={v}' for k, v in s.items() if k != 'name')})"
                                for s in filter_steps))
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = make_large_jpeg(Path(tmp))
        bench_chain(jpeg, filter_steps, args.repeats)
        bench_loader_vs_model(Path(tmp), jpeg, filter_steps, args.repeats)
