"""Benchmark: the segmented chain on a 4100x3075 photographic JPEG vs full-size alternatives, and
the mapper's sample rate vs the model's training step rate. Prints ratios measured in this run.

    python bench/bench_preprocess.py [--repeats 7]

The JPEG is made from a real smear photo (../shared/datasets/bccd, upscaled with cubic
interpolation and mild noise) in a temp folder, or from a generated smear when that is absent.
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

from leukodet.data.synthetic import generate_smears, render_smear
from leukodet.preprocess import PreprocessChain

REPO = Path(__file__).resolve().parents[1]
BCCD_PHOTO = REPO.parent / "shared" / "datasets" / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
FILTERS = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "preprocess" / "segmented.yaml"))["steps"][1:]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_large_jpeg(folder: Path) -> Path:
    if BCCD_PHOTO.is_file():
        photo = cv2.imread(str(BCCD_PHOTO))
    else:
        photo = cv2.cvtColor(render_smear(np.random.default_rng(0), 640, 480, "wbc")[0], cv2.COLOR_RGB2BGR)
    large = cv2.resize(photo, (4100, 3075), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    large += np.random.default_rng(0).normal(0, 3, large.shape).astype(np.int16)
    path = folder / "smear_4100x3075.jpg"
    cv2.imwrite(str(path), np.clip(large, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return path


def bench_chain(path: Path, repeats: int) -> None:
    data = np.fromfile(str(path), np.uint8)
    chain = PreprocessChain([{"name": "scale", "factor": 0.2}, *FILTERS])
    filters_only = PreprocessChain(FILTERS)
    small = (820, 615)

    def full_decode():
        return cv2.imdecode(data, cv2.IMREAD_COLOR)

    def decode_resize_filter():
        image = cv2.cvtColor(cv2.resize(full_decode(), small, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        return filters_only.run(image)

    def filter_full_then_resize():
        state, _ = filters_only.run(cv2.cvtColor(full_decode(), cv2.COLOR_BGR2RGB))
        return cv2.resize(state.image, small, interpolation=cv2.INTER_AREA)

    t_chain = median_seconds(lambda: chain.run_on_file(path), repeats)
    t_decode = median_seconds(full_decode, repeats)
    t_b = median_seconds(decode_resize_filter, repeats)
    t_c = median_seconds(filter_full_then_resize, max(2, repeats // 3))
    print(f"segmented chain, reduced decode + scale 0.2 + filters : {t_chain * 1000:7.1f} ms")
    print(f"(a) bare full-size decode                             : {t_decode * 1000:7.1f} ms")
    print(f"(b) full decode, resize, then the same filters        : {t_b * 1000:7.1f} ms")
    print(f"(c) full decode, the same filters at full size, resize: {t_c * 1000:7.1f} ms")
    print(f"ratio chain / (a) = {t_chain / t_decode:.2f}  (goal <= 1.0)")
    print(f"ratio (b) / chain = {t_b / t_chain:.2f}  (goal >= 1.8)")
    print(f"ratio (c) / chain = {t_c / t_chain:.1f}  (goal >= 10)")


def bench_loader_vs_model(folder: Path, repeats: int) -> None:
    from leukodet.data.coco import load_dataset_dicts, write_coco
    from leukodet.data.mapper import DatasetMapper
    from leukodet.data.via import LabelPolicy, read_via
    from leukodet.registry import MODELS
    import leukodet.models  # noqa: F401

    generate_smears(folder / "sample", n_images=8, seed=0)
    parsed = read_via(folder / "sample" / "via_region_data.json", labels=LabelPolicy("cell_type"))
    classes = sorted({r.label for rec in parsed.records for r in rec.regions})
    records = load_dataset_dicts(write_coco(folder / "sample" / "all.json", parsed.records, classes))[0]
    augment = OmegaConf.load(REPO / "conf" / "augment" / "default.yaml")
    for arm in ("raw", "segmented"):
        mapper = DatasetMapper(OmegaConf.load(REPO / "conf" / "preprocess" / f"{arm}.yaml"), augment, is_train=True)
        per_sample = median_seconds(lambda: [mapper(r) for r in records], repeats) / len(records)
        print(f"mapper ({arm}, training augmentation), one worker: {1 / per_sample:6.1f} samples/s")
    mapper = DatasetMapper(OmegaConf.load(REPO / "conf" / "preprocess" / "raw.yaml"), augment, is_train=True)
    batch = [mapper(records[0]), mapper(records[1])]
    model = MODELS.build({"name": "maskrcnn_effnet_lite0"}, num_classes=len(classes))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001)

    def step():
        loss = sum(model.losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    per_step = median_seconds(step, max(3, repeats // 2))
    print(f"model training step (batch 2, 512x384, CPU)          : {2 / per_step:6.1f} samples/s")
    print(f"ratio mapper / model = {per_sample and (1 / per_sample) / (2 / per_step):.1f}  (> 1: the loader keeps up)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_chain(make_large_jpeg(Path(tmp)), args.repeats)
        bench_loader_vs_model(Path(tmp), args.repeats)
