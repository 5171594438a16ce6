"""torchvision detectors exported to ONNX and run by ONNX Runtime behind the adapter's ``predict``.

The export is the two stages of ``leukodet.models.staged``: ``<name>.onnx`` (image -> raw
detections cut at ``EXPORT_POINT`` + feature maps) and ``<name>.masks.onnx`` (kept boxes + feature
maps -> mask probabilities). Between them ``structures.refilter`` applies the operating point, and
``paste_masks`` pastes the masks, the same functions the PyTorch path runs, so the two backends
differ only in which library runs the graphs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leukodet.io import file_sha256
from leukodet.models.staged import DetectStage, MaskStage, mask_feature_names, paste_masks, resized_size
from leukodet.structures import RAW, Detections, ImagePredictions, OperatingPoint, refilter

OPSET = 17
# The first graph's cut: every detection a sweep could want (score floor, no NMS, cap); the
# operating point is applied after it, by refilter.
EXPORT_POINT = RAW


def onnx_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's export lives (``tools/export.py``): best.ckpt -> best.onnx beside it."""
    return Path(checkpoint).with_suffix(".onnx")


def info_path(checkpoint: str | os.PathLike) -> Path:
    """The export's record: the checkpoint's SHA-256, classes, input size rule, agreement measured."""
    return Path(checkpoint).with_suffix(".onnx.json")


def masks_path(detector_path: str | os.PathLike) -> Path:
    """The mask graph beside the detector graph: best.onnx -> best.masks.onnx."""
    return Path(detector_path).with_suffix(".masks.onnx")


def export_onnx(model: nn.Module, image: torch.Tensor, path: str | os.PathLike) -> list[Path]:
    """Export a torchvision Mask R-CNN (eval mode; BatchNorm best folded, see ``inference_copy``)
    as the two graphs, traced on ``image`` (3, H, W) float in [0, 1]; image size and detection
    count are dynamic. Returns the files written."""
    path = Path(path)
    model = model.eval()
    heads = model.roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = (
        EXPORT_POINT.min_confidence, EXPORT_POINT.nms, EXPORT_POINT.max_detections)
    names = mask_feature_names(model)
    feature_axes = {f"feature_{n}": {2: f"height_{n}", 3: f"width_{n}"} for n in names}
    detect_stage = DetectStage(model, names).eval()
    with torch.no_grad():
        boxes, _, labels, *features = detect_stage(image)
    if len(boxes) == 0:  # the mask graph is traced on one box; any will do
        boxes, labels = torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.ones(1, dtype=torch.int64)
    with warnings.catch_warnings():  # the tracer's notes on Python values taken as constants
        warnings.simplefilter("ignore")
        torch.onnx.export(detect_stage, (image,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["boxes", "scores", "labels", *feature_axes],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                        "scores": {0: "detections"}, "labels": {0: "detections"}, **feature_axes})
        if model.roi_heads.has_mask():
            mask_stage = MaskStage(model, names, tuple(image.shape[-2:])).eval()
            torch.onnx.export(mask_stage, (boxes, labels, *features), str(masks_path(path)), dynamo=False,
                              opset_version=OPSET, input_names=["boxes", "labels", *feature_axes],
                              output_names=["masks"],
                              dynamic_axes={"boxes": {0: "detections"}, "labels": {0: "detections"},
                                            "masks": {0: "detections"}, **feature_axes})
    return [path, masks_path(path)] if model.roi_heads.has_mask() else [path]


def providers(device: str = "auto") -> list[str]:
    """CUDA first when ONNX Runtime has it and ``device`` allows, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if device in ("auto", "cuda") else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxDetector:
    """The adapter's ``predict`` over the exported graphs (see the module doc). ``threads``: ONNX
    Runtime's intra-op threads (None: its default, one per physical core)."""

    def __init__(self, path: str | os.PathLike, num_classes: int, min_size: int, max_size: int,
                 threads: int | None = None, device: str = "auto"):
        import onnxruntime as ort
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ONNX model; export one with tools/export.py ckpt=...")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        # idle workers sleep instead of spinning: between and after the two graphs torch's threads
        # paste the masks and the loader worker decodes, on the same cores (not timed separately)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        chosen = providers(device)
        self.detector = ort.InferenceSession(str(path), options, providers=chosen)
        self.masks = (ort.InferenceSession(str(masks_path(path)), options, providers=chosen)
                      if masks_path(path).is_file() else None)
        self.feature_names = [i.name for i in self.detector.get_outputs()[3:]]
        self.num_classes = num_classes
        self.has_masks = self.masks is not None
        # the resize rule only (its mean and std are inside the graph)
        self.transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
        self.device = torch.device("cuda" if chosen[0] == "CUDAExecutionProvider" else "cpu")
        self.rpn_proposals: list[int] | None = None  # set by load_exported from the export's record

    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        if prefilter.min_confidence < EXPORT_POINT.min_confidence:
            raise ValueError(f"min confidence {prefilter.min_confidence:g} is below the ONNX model's score floor "
                             f"{EXPORT_POINT.min_confidence:g}; use infer.backend=torch")
        return [self._predict_one(sample, prefilter) for sample in batch]

    def _predict_one(self, sample: dict, point: OperatingPoint) -> Detections:
        image = sample["image"].numpy().astype(np.float32) / np.float32(255)
        height, width = image.shape[1:]
        boxes, scores, labels, *features = self.detector.run(None, {"image": image})
        kept = refilter(ImagePredictions(boxes, scores, labels - 1, None), point)
        resized = resized_size(self.transform, height, width)
        scale = np.array([width / resized[1], height / resized[0]] * 2, np.float32)
        masks = None
        if self.has_masks:
            if len(kept):
                probabilities = self.masks.run(None, {"boxes": kept.boxes, "labels": kept.labels + 1,
                                                      **dict(zip(self.feature_names, features))})[0]
                masks = paste_masks(torch.from_numpy(probabilities), torch.from_numpy(kept.boxes * scale),
                                    height, width)
            else:
                masks = torch.zeros((0, height, width), dtype=torch.bool)
        return Detections(torch.from_numpy(kept.boxes * scale), torch.from_numpy(kept.scores),
                          torch.from_numpy(kept.labels), masks)


def load_export_info(checkpoint: str | os.PathLike) -> dict:
    """The export's record (``info_path``); a missing export says how to make one."""
    checkpoint = Path(checkpoint)
    path, info_file = onnx_path(checkpoint), info_path(checkpoint)
    if not path.is_file() or not info_file.is_file():
        raise FileNotFoundError(f"{path}: no ONNX export of {checkpoint.name}; make one with "
                                f"python tools/export.py ckpt={checkpoint}")
    return json.loads(info_file.read_text())


def load_exported(checkpoint: str | os.PathLike, threads: int | None = None, device: str = "auto") -> OnnxDetector:
    """The ONNX Runtime detector ``tools/export.py`` made from ``checkpoint``; refuses graphs that are
    missing or were exported from another checkpoint (another content at that path included)."""
    checkpoint = Path(checkpoint)
    path, info = onnx_path(checkpoint), load_export_info(checkpoint)
    if info.get("checkpoint_sha256") != file_sha256(checkpoint):
        raise ValueError(f"{path} was exported from another {checkpoint.name} than the one there now; "
                         f"export again: python tools/export.py ckpt={checkpoint}")
    detector = OnnxDetector(path, len(info["classes"]), info["min_size"], info["max_size"], threads=threads, device=device)
    detector.rpn_proposals = info.get("rpn_proposals")  # baked into the graph at export
    return detector
