"""Everything detectron2, in one module (an optional engine: built from source, never a dependency).

detectron2 is imported inside functions only, so the rest of leukodet imports and is tested
without it. Here: the adapter that runs model-zoo configs (e.g. the seed's R101-FPN) in leukodet's
loop, the registration of leukodet's catalog splits in detectron2's ``DatasetCatalog`` /
``MetadataCatalog``, and, for detectron2's own ``DefaultTrainer`` (see
``examples/detectron2_train_net.py``): a config made from leukodet's, a dataset mapper running
leukodet's preprocessing and augmentation, leukodet's metrics as a ``DatasetEvaluator``, the best
checkpoint by leukodet's AP50, and a metrics CSV in the format ``leukodet.engine.curves`` plots.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from leukodet.data.catalog import add_listener, get_dataset_dicts, get_metadata
from leukodet.evaluation.metrics import evaluate
from leukodet.io import atomic_write_text
from leukodet.models.base import DetectorAdapter
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.registry import MODELS
from leukodet.structures import RAW, Detections, OperatingPoint, to_original

# detectron2 0.6 and fvcore warn of their own deprecated calls (fvcore scripts its focal loss with
# torch.jit, the model zoo imports pkg_resources, the anchor generator calls meshgrid without
# indexing): nothing a user of leukodet can act on. pyproject.toml lists the same for pytest.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated as an API", category=UserWarning)
warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)

# leukodet's detectron2 models: registered name -> model-zoo config
ZOO_CONFIGS = {
    "d2_mask_rcnn_R_50_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    "d2_mask_rcnn_R_101_FPN_3x": "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",
}


INSTALL_HINT = (
    "detectron2 is an optional engine and is not installed. It is not on PyPI: clone "
    "facebookresearch/detectron2 and run `pip install 'setuptools<81' && pip install --no-build-isolation "
    "<clone>`; or use the default engine (model=maskrcnn_effnet_lite0, torchvision)."
)


def require_detectron2() -> None:
    if importlib.util.find_spec("detectron2") is None:
        raise ImportError(INSTALL_HINT)


class Detectron2Detector(DetectorAdapter):
    """A detectron2 GeneralizedRCNN behind the adapter protocol."""

    def __init__(self, cfg, num_classes: int, has_masks: bool):
        super().__init__()
        from detectron2.modeling import build_model

        self.cfg = cfg
        self.model = build_model(cfg)
        self.num_classes = num_classes
        self.has_masks = has_masks

    def _inputs(self, batch: list[dict], with_targets: bool) -> list[dict]:
        return [detectron2_input(sample, self.cfg.INPUT.FORMAT, with_targets) for sample in batch]

    def compute_losses(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        from detectron2.utils.events import EventStorage

        # detectron2 models log training statistics into an EventStorage, which its own trainer
        # opens; here the Lightning loop drives, so one is opened per step.
        with EventStorage():
            return self.model(self._inputs(batch, True))

    @torch.no_grad()
    def predict(self, batch: list[dict], prefilter: OperatingPoint = RAW) -> list[Detections]:
        self.model.eval()
        heads = self.model.roi_heads.box_predictor  # read by FastRCNNOutputLayers.inference on every call
        heads.test_score_thresh, heads.test_nms_thresh, heads.test_topk_per_image = (
            prefilter.min_confidence, prefilter.nms, prefilter.max_detections)
        outputs = self.model(self._inputs(batch, False))
        return [detections_of(out["instances"]) for out in outputs]


def detectron2_input(sample: Mapping, input_format: str, with_targets: bool) -> dict:
    """A leukodet mapper sample -> a detectron2 model input: ``image`` CHW in ``input_format``
    (RGB or BGR; uint8, which the model normalises), ``height``/``width`` of that image (the size
    detectron2 returns detections at) and, ``with_targets``, ``instances`` with ``gt_boxes``,
    ``gt_classes`` and ``gt_masks`` (``BitMasks``; none for box-only data). The adapter and
    ``Detectron2Mapper`` both convert here, so both trainers see the same tensors."""
    from detectron2.structures import BitMasks, Boxes, Instances

    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"INPUT.FORMAT={input_format!r}: leukodet's mapper gives RGB or BGR images")
    image = sample["image"].flip(0) if input_format == "BGR" else sample["image"]
    entry = {"image": image, "height": image.shape[1], "width": image.shape[2]}
    if with_targets:
        inst = sample["instances"]
        gt = Instances(tuple(image.shape[1:]))
        gt.gt_boxes = Boxes(inst["boxes"])
        gt.gt_classes = inst["labels"]
        if inst["masks"] is not None:
            gt.gt_masks = BitMasks(inst["masks"].bool())
        entry["instances"] = gt
    return entry


class Detectron2Mapper:
    """leukodet's ``DatasetMapper`` (preprocessing chain, and augmentation when ``is_train``) as a
    detectron2 dataset mapper: dataset dict -> ``{"image", "height", "width", "image_id",
    "file_name", "instances"}``. ``height``/``width`` are the file's, so a detectron2 model returns
    its detections in file pixels, where the catalog's annotations (and so the evaluator) are.
    As detectron2's own mapper does, ``instances`` are given for training only."""

    def __init__(self, preprocess_cfg, augment_cfg=None, is_train: bool = False, input_format: str = "BGR"):
        self.mapper = DatasetMapper(preprocess_cfg, augment_cfg, is_train)
        self.is_train = is_train
        self.input_format = input_format

    def __call__(self, dataset_dict: Mapping) -> dict:
        sample = self.mapper(dataset_dict)
        entry = detectron2_input(sample, self.input_format, self.is_train)
        entry.update(height=sample["orig_height"], width=sample["orig_width"], image_id=sample["image_id"],
                     file_name=sample["file_name"])
        return entry


def detections_of(instances) -> Detections:
    """detectron2 ``Instances`` -> leukodet ``Detections`` (on the CPU)."""
    found = instances.to("cpu")
    masks = found.pred_masks.bool() if found.has("pred_masks") else None
    return Detections(found.pred_boxes.tensor.float(), found.scores.float(), found.pred_classes.long(), masks)


def model_config(config: str, num_classes: int, masks: bool = True, rpn_nms: float = 0.7, min_size: int = 800,
                 max_size: int = 1333, anchor_sizes=None, device: str | None = None):
    """The detectron2 ``CfgNode`` of a model-zoo config (e.g.
    ``COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml``) or a config file path, with
    leukodet's model keys; no weights (``MODEL.WEIGHTS`` empty)."""
    require_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config if config.endswith(".yaml") and "/" in config and not config.startswith("COCO")
                        else model_zoo.get_config_file(config))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.MASK_ON = masks
    cfg.MODEL.RPN.NMS_THRESH = rpn_nms
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min_size, max_size
    if anchor_sizes is not None:
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in anchor_sizes]
    cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.MODEL.WEIGHTS = ""
    return cfg


def build_detectron2(config: str, num_classes: int, masks: bool = True, weights: str = "none",
                     **model_keys) -> Detectron2Detector:
    """A detectron2 model (see ``model_config``). ``weights``: none | coco (the zoo checkpoint,
    downloaded) | a local file: detectron2's ``.pth`` or the zoo's ``.pkl`` (``{"model": {name:
    numpy array}, "__author__": ...}``); tensors whose shape differs (another number of classes)
    are skipped with a warning, as detectron2's checkpointer does."""
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer

    adapter = Detectron2Detector(model_config(config, num_classes, masks, **model_keys), num_classes, masks)
    if weights == "coco":
        url = model_zoo.get_checkpoint_url(config)
        try:
            DetectionCheckpointer(adapter.model).load(url)
        except Exception as err:
            raise RuntimeError(f"model.weights=coco needs {url}, which could not be downloaded ({err}). "
                               f"Download it elsewhere and pass model.weights=/path/to/model_final.pkl") from None
    elif weights != "none":
        if not Path(weights).is_file():  # detectron2's own message is a bare assertion
            raise FileNotFoundError(f"model.weights={weights}: no such file")
        DetectionCheckpointer(adapter.model).load(weights)
    return adapter


@MODELS.register(name="d2_mask_rcnn_R_50_FPN_3x")
def d2_mask_rcnn_r50_fpn_3x(num_classes: int, **kwargs) -> Detectron2Detector:
    return build_detectron2(ZOO_CONFIGS["d2_mask_rcnn_R_50_FPN_3x"], num_classes, **kwargs)


@MODELS.register(name="d2_mask_rcnn_R_101_FPN_3x")
def d2_mask_rcnn_r101_fpn_3x(num_classes: int, **kwargs) -> Detectron2Detector:
    """The seed's backbone (R101-FPN, COCO 3x schedule)."""
    return build_detectron2(ZOO_CONFIGS["d2_mask_rcnn_R_101_FPN_3x"], num_classes, **kwargs)


MODELS.register(build_detectron2, name="detectron2")


def trainer_config(cfg: Mapping, output_dir: str | Path, device: str | None = None):
    """detectron2's config for its ``DefaultTrainer``, from a composed leukodet config whose
    ``cfg.data`` is prepared and registered: ``cfg.model`` (a ``d2_*`` model: its zoo config, keys
    and weights), ``cfg.train`` as the solver, ``cfg.eval``'s operating point at test time (down to
    the scoring floor: AP is scored over all scores, as leukodet's validation does) and the data's
    train / val splits. Gradient clipping: detectron2 clips each parameter tensor to
    ``train.grad_clip`` (its config has no total-norm clipping, which leukodet's loop does)."""
    from detectron2 import model_zoo

    model = {k: v for k, v in cfg["model"].items() if k not in ("name", "weights")}
    zoo = ZOO_CONFIGS.get(cfg["model"]["name"])
    if zoo is None:
        raise ValueError(f"model={cfg['model']['name']}: detectron2's trainer needs one of {', '.join(ZOO_CONFIGS)}")
    train_split, val_split = f"{cfg['data']['name']}_train", f"{cfg['data']['name']}_val"
    meta = get_metadata(train_split)
    d2 = model_config(zoo, len(meta["thing_classes"]), not meta["box_only"], device=device, **model)
    weights = cfg["model"]["weights"]
    d2.MODEL.WEIGHTS = {"none": "", "coco": model_zoo.get_checkpoint_url(zoo)}.get(weights, weights)
    set_solver(d2, cfg["train"])
    point = OperatingPoint(cfg["eval"]["min_confidence"], cfg["eval"]["nms"], cfg["eval"]["max_detections"]).scored()
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST, d2.MODEL.ROI_HEADS.NMS_THRESH_TEST = point.min_confidence, point.nms
    d2.TEST.DETECTIONS_PER_IMAGE = point.max_detections
    d2.DATASETS.TRAIN, d2.DATASETS.TEST = (train_split,), (val_split,)
    d2.SEED = cfg["seed"]
    d2.OUTPUT_DIR = str(output_dir)
    return d2


def set_solver(d2, train: Mapping) -> None:
    """leukodet's ``train`` config as detectron2's SOLVER (SGD, batch, steps, warmup, schedule,
    checkpoint and evaluation cadence, loader workers). Warmup: detectron2 ramps linearly from
    1/warmup_steps, leukodet from 1/warmup_steps to 1 in steps of 1/warmup_steps: equal at the ends."""
    if train["optimizer"] != "sgd":
        raise ValueError(f"train.optimizer={train['optimizer']}: detectron2's DefaultTrainer builds SGD")
    solver = d2.SOLVER
    solver.BASE_LR, solver.MOMENTUM = train["lr"], train["momentum"]
    # leukodet decays every trained parameter alike
    solver.WEIGHT_DECAY = solver.WEIGHT_DECAY_NORM = train["weight_decay"]
    solver.IMS_PER_BATCH, solver.MAX_ITER = train["batch_size"], train["max_steps"]
    solver.WARMUP_ITERS, solver.WARMUP_FACTOR = train["warmup_steps"], 1.0 / max(train["warmup_steps"], 1)
    schedule = train["schedule"]  # a str Enum in a composed config: equal to its name
    solver.LR_SCHEDULER_NAME = "WarmupCosineLR" if schedule == "cosine" else "WarmupMultiStepLR"
    solver.BASE_LR_END = 0.0
    solver.STEPS = tuple(int(m * train["max_steps"]) for m in train["milestones"]) if schedule == "step" else ()
    solver.GAMMA = train["gamma"]
    solver.CLIP_GRADIENTS.ENABLED = train["grad_clip"] is not None
    solver.CLIP_GRADIENTS.CLIP_TYPE, solver.CLIP_GRADIENTS.CLIP_VALUE = "norm", train["grad_clip"] or 0.0
    solver.CHECKPOINT_PERIOD = train["checkpoint_every_steps"]
    d2.TEST.EVAL_PERIOD = train["steps_per_epoch"]
    d2.DATALOADER.NUM_WORKERS = train["num_workers"]


def build_detectron2_evaluator(dataset_name: str, iou_type: str | None = None, min_confidence: float = 0.0,
                               iou_threshold: float = 0.5, share_class: str | None = None):
    """A DatasetEvaluator scoring a registered split (leukodet's catalog mirrors every split into
    detectron2's) with the evaluator of ``leukodet.evaluation.metrics``; its results are
    ``{"leukodet": summary}``, logged by detectron2's ``EvalHook`` as ``leukodet/<metric>``."""
    require_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import DatasetEvaluator

    class LeukodetEvaluator(DatasetEvaluator):
        def __init__(self):
            self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
            self.class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
            self.reset()

        def reset(self):
            self._pairs = []

        def process(self, inputs, outputs):
            for given, output in zip(inputs, outputs):
                det = detections_of(output["instances"])  # already at the input's height x width
                prediction = to_original(det, (1.0, 1.0), (given["width"], given["height"]))
                self._pairs.append((self.records[given["image_id"]], prediction))

        def evaluate(self):
            records = [record for record, _ in self._pairs]
            predictions = [prediction for _, prediction in self._pairs]
            result = evaluate(records, predictions, self.class_names, iou_type, min_confidence, iou_threshold,
                              share_class)
            return {"leukodet": result.summary()}

    return LeukodetEvaluator()


def best_metric(box_only: bool) -> str:
    """The storage name of the metric the best checkpoint is chosen by: leukodet's AP50 (masks,
    boxes for box-only data), as its own loop's ``train.best_metric=auto``."""
    return "leukodet/ap50_bbox" if box_only else "leukodet/ap50_segm"


def best_checkpointer(trainer):
    """detectron2's ``BestCheckpointer`` on leukodet's AP50 (boxes when the model has no mask
    head): ``model_best.pth`` in the output directory. Place it after the ``EvalHook``, whose
    results it reads."""
    from detectron2.engine import hooks

    metric = best_metric(box_only=not trainer.cfg.MODEL.MASK_ON)
    return hooks.BestCheckpointer(trainer.cfg.TEST.EVAL_PERIOD, trainer.checkpointer, metric, mode="max",
                                  file_prefix="model_best")


def storage_column(name: str) -> str:
    """A detectron2 storage name as the column leukodet's loop logs it (``engine.curves`` reads
    ``train/loss`` and ``val/<metric>``)."""
    if name == "total_loss":
        return "train/loss"
    if name.startswith("loss_"):
        return f"train/{name}"
    if name.startswith("leukodet/"):
        return "val/" + name.removeprefix("leukodet/")
    return name


def metrics_csv_writer(path: str | Path):
    """A detectron2 ``EventWriter`` keeping every scalar it is given (unsmoothed: the values of the
    iterations it writes at) in a CSV of leukodet's format: a ``step`` column (detectron2's
    iteration) and leukodet's column names, so ``leukodet.engine.curves.plot_loss_curves`` draws it.
    The file is rewritten whole at each write: columns appear as evaluations add metrics."""
    from detectron2.utils.events import EventWriter, get_event_storage

    class MetricsCSVWriter(EventWriter):
        def __init__(self):
            self.path = Path(path)
            self.rows: dict[int, dict] = {}

        def write(self):
            for name, (value, step) in get_event_storage().latest().items():
                self.rows.setdefault(step, {"step": step})[storage_column(name)] = value
            table = pd.DataFrame([self.rows[step] for step in sorted(self.rows)])
            atomic_write_text(self.path, table.to_csv(index=False))

    return MetricsCSVWriter()


def register_in_detectron2(name: str) -> None:
    """Mirror one leukodet catalog split into detectron2's catalogs (idempotent: a Hydra multirun
    registers the same names again)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    metadata = get_metadata(name)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: get_dataset_dicts(name))
    # The prepared JSON numbers categories from 1; detectron2 maps them to its 0-based ids with this.
    id_map = {i + 1: i for i in range(len(metadata["thing_classes"]))}
    MetadataCatalog.get(name).set(thing_classes=metadata["thing_classes"], thing_colors=metadata["thing_colors"],
                                  json_file=metadata["json_file"], evaluator_type="coco",
                                  thing_dataset_id_to_contiguous_id=id_map)


if importlib.util.find_spec("detectron2") is not None:
    add_listener(register_in_detectron2)
