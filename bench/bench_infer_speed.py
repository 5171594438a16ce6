"""Benchmark: CPU milliseconds per image of one inference (batch 1, one image at a time), per arm,
at equal thread counts, in one run on the same images:

- ``torch before``: leukodet as it was before issue 17 (torchvision's one-pass forward, masks pasted
  one detection at a time, backbone BatchNorm not folded, contiguous tensors, the checkpoint's
  RPN proposal counts: 500 before / 150 after NMS for the default model);
- ``torch``: ``adapter.for_inference()`` (BatchNorm folded, channels-last, two stages, masks pasted
  all at once) with ``--rpn-pre``/``--rpn-post`` test-time proposals (``infer.rpn_proposals`` in tools/infer.py);
- ``onnxruntime``: the exported graphs (``leukodet.models.onnx_runtime``), same proposals;
- ``yolov8n-seg``: only when ``ultralytics`` is importable (never a leukodet dependency: AGPL),
  built from its yaml (untrained weights, no download) at the same size, full-size masks. Its NMS
  sees whatever an untrained head scores above 0.25, so its NMS load differs from a trained one's.

Each leukodet arm times what a lab's run does per image: decode, preprocessing (the checkpoint's
mapper), model, masks at the file's size and the conversion to file pixels and RLE. Best of
``--passes`` passes after a warm-up pass; ratios printed against ``torch before`` and YOLO.

    python bench/bench_infer_speed.py --ckpt outputs/speed_wbc256/checkpoints/best.ckpt --profile

``--profile`` adds the per-stage table of the torch arms. Default images: segmentation_wbc
dataset2 031-060 (300x300, unseen by segmentation_wbc_cross training), from ../shared/datasets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchvision.models.detection.roi_heads import paste_masks_in_image

from leukodet.data.imageio import read_image
from leukodet.engine.evaluate import load_detector
from leukodet.engine.export import agreement
from leukodet.engine.train import trained_point
from leukodet.models.onnx_runtime import OnnxDetector, export_onnx
from leukodet.models.staged import inference_copy, mask_probabilities, paste_masks
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.structures import Detections, to_original

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "segmentation_wbc" / "dataset2" / "images"


class TorchvisionForward:
    """``predict`` as it was before issue 17: torchvision's own forward, point set on roi_heads."""

    def __init__(self, adapter):
        self.adapter = adapter

    @torch.no_grad()
    def predict(self, batch, prefilter):
        model = self.adapter.model.eval()
        heads = model.roi_heads
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = (
            prefilter.min_confidence, prefilter.nms, prefilter.max_detections)
        outputs = model(self.adapter._images(batch))
        return [Detections(out["boxes"].float().cpu(), out["scores"].float().cpu(), out["labels"].cpu() - 1,
                           (out["masks"][:, 0] > 0.5).cpu()) for out in outputs]


def leukodet_arm(detector, mapper, point):
    def run(path: Path):
        sample = mapper.map_image(path)
        detections = detector.predict([sample], point)[0]
        return to_original(detections, sample["scale"], (sample["orig_width"], sample["orig_height"]))
    return run


def yolo_arm(size: int):
    """YOLOv8n-seg from its yaml, or None when ultralytics is not importable."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no font or weight downloads
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from ultralytics import YOLO

            model = YOLO("yolov8n-seg.yaml")
    except Exception as err:  # noqa: BLE001 - an optional yardstick: any failure only drops the arm
        print(f"yolov8n-seg arm skipped: {type(err).__name__}: {err}")
        return None

    def run(path: Path):
        return model.predict(str(path), imgsz=size, retina_masks=True, verbose=False, device="cpu")
    return run


def best_ms(run, files, passes: int) -> float:
    with torch.inference_mode():
        for path in files:  # warm-up
            run(path)
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            for path in files:
                run(path)
            times.append((time.perf_counter() - start) / len(files) * 1000)
    return min(times)


def profile(adapter, mapper, point, files, legacy: bool) -> dict[str, float]:
    """Median ms per stage over ``files`` (after one warm-up image). ``legacy``: torchvision's
    mask paste, one detection at a time (before issue 17)."""
    model = adapter.model
    heads = model.roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = point.min_confidence, point.nms, point.max_detections
    stages = defaultdict(list)
    with torch.inference_mode():
        for index, path in enumerate([files[0], *files]):
            marks = [("start", time.perf_counter())]
            def mark(name, marks=marks):
                marks.append((name, time.perf_counter()))
            read_image(path)
            mark("decode")
            sample = mapper.map_image(path)  # decodes again: its own share is preprocessing
            mark("preprocess (+decode)")
            image_list, _ = model.transform(adapter._images([sample]))
            mark("resize + normalise")
            tensor = image_list.tensors.contiguous(memory_format=adapter.memory_format)
            body = model.backbone.body(tensor)
            mark("backbone")
            features = model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(body)))
            mark("FPN")
            proposals, _ = model.rpn(image_list, features)
            mark("RPN")
            box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
            boxes, scores, labels = heads.postprocess_detections(*heads.box_predictor(box_features), proposals,
                                                                 image_list.image_sizes)
            mark("RoI box head + NMS")
            probabilities = mask_probabilities(model, features, boxes, labels, image_list.image_sizes) if len(boxes[0]) else None
            mark("RoI mask head")
            height, width = sample["image"].shape[-2:]
            box = boxes[0] * torch.tensor([width / image_list.image_sizes[0][1], height / image_list.image_sizes[0][0]] * 2)
            if probabilities is None:
                masks = torch.zeros((0, height, width), dtype=torch.bool)
            elif legacy:
                masks = paste_masks_in_image(probabilities[:, None], box, (height, width))[:, 0] > 0.5
            else:
                masks = paste_masks(probabilities, box, height, width)
            mark("mask paste")
            to_original(Detections(box, scores[0], labels[0] - 1, masks), sample["scale"],
                        (sample["orig_width"], sample["orig_height"]))
            mark("to file pixels + RLE")
            if index:
                for (_, before), (name, after) in zip(marks, marks[1:]):
                    stages[name].append((after - before) * 1000)
    table = {name: statistics.median(values) for name, values in stages.items()}
    table["preprocess (+decode)"] -= table["decode"]
    table = {("preprocess" if k == "preprocess (+decode)" else k): v for k, v in table.items()}
    table["total"] = sum(table.values())
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(REPO / "outputs" / "speed_wbc256" / "checkpoints" / "best.ckpt"))
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--first", type=int, default=30, help="skip this many sorted images (dataset2 001-030 train)")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rpn-pre", type=int, default=None, help="RPN proposals before NMS (default: the model config's)")
    parser.add_argument("--rpn-post", type=int, default=None, help="RPN proposals after NMS (default: the model config's)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-yolo", action="store_true")
    args = parser.parse_args()

    from leukodet.config import EffNetLite0Config

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".bmp", ".jpg", ".png"))
    files = files[args.first:args.first + args.count]
    ckpt = Path(args.ckpt)
    cfg = OmegaConf.load(ckpt.parent.parent / "config.yaml")
    point = trained_point(cfg)
    mapper = DatasetMapper(cfg.preprocess)
    module = load_detector(ckpt)
    before = module.adapter
    trained_pre, trained_post = before.model.rpn._pre_nms_top_n["testing"], before.model.rpn._post_nms_top_n["testing"]
    pre = args.rpn_pre or EffNetLite0Config.rpn_pre_nms_top_n_test
    post = args.rpn_post or EffNetLite0Config.rpn_post_nms_top_n_test
    after = before.for_inference((pre, post))
    size = cfg.model.min_size
    print(f"checkpoint {ckpt} (model {cfg.model.name}, input {size} px); {len(files)} images from {args.images}; "
          f"{os.cpu_count()} CPUs; {point.describe()}\nproposals: before {trained_pre}/{trained_post}, "
          f"after {pre}/{post} (RPN pre/post NMS)")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_model = inference_copy(before.model, channels_last=False, rpn_proposals=(pre, post))
        export_onnx(export_model, mapper.map_image(files[0])["image"].float() / 255, onnx_path)
        yolo = None if args.no_yolo else yolo_arm(size)
        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            arms = {"torch before": leukodet_arm(TorchvisionForward(before), mapper, point),
                    "torch": leukodet_arm(after, mapper, point),
                    "onnxruntime": leukodet_arm(OnnxDetector(onnx_path, before.num_classes, size, cfg.model.max_size,
                                                             threads=threads), mapper, point)}
            if yolo is not None:
                arms["yolov8n-seg"] = yolo
            times = {name: best_ms(run, files, args.passes) for name, run in arms.items()}
            if threads == args.threads[0]:
                with torch.inference_mode():
                    outputs = {name: [arms[name](path) for path in files] for name in ("torch before", "torch", "onnxruntime")}
                for name in ("torch", "onnxruntime"):
                    print(f"{name} vs torch before: {agreement(outputs['torch before'], outputs[name]).describe()}")
            rows.append((threads, times))
            if args.profile:
                old = profile(before, mapper, point, files, legacy=True)
                new = profile(after, mapper, point, files, legacy=False)
                print(f"\nper stage, median ms, {threads} thread(s)\n| stage | before | after |\n| --- | --- | --- |")
                for stage in old:
                    print(f"| {stage} | {old[stage]:.2f} | {new[stage]:.2f} |")
            sys.stdout.flush()

    print("\n| threads | " + " | ".join(f"{name} ms/img" for name in rows[0][1]) + " | before / torch | before / onnxruntime"
          + (" | torch / yolo | onnxruntime / yolo |" if yolo else " |"))
    print("| --- " * (len(rows[0][1]) + 3 + (2 if yolo else 0)) + "|")
    for threads, t in rows:
        cells = [f"{v:.1f}" for v in t.values()]
        ratios = [f"{t['torch before'] / t['torch']:.2f}x", f"{t['torch before'] / t['onnxruntime']:.2f}x"]
        if yolo:
            ratios += [f"{t['torch'] / t['yolov8n-seg']:.2f}x", f"{t['onnxruntime'] / t['yolov8n-seg']:.2f}x"]
        print(f"| {threads} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
