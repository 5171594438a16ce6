"""Adaptation to a new acquisition from its unlabelled images (issue 27): the stain normalization
step, AdaBN, and `tools/adapt.py`'s adapted run, which every checkpoint tool takes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, compose
from leukodet.models.adapt import adapt_batchnorm, running_statistics_layers
from leukodet.preprocess.steps import PreprocessState, fit_stain_reference, stain_normalize
from leukodet.registry import MODELS
from leukodet.structures import SAME_CELL_IOU, OperatingPoint
from test_infer import trained_run  # noqa: F401  (the 6-step detector fixture, shared)


def lab_statistics(image: np.ndarray) -> np.ndarray:
    """Each LAB channel's mean and spread (OpenCV's 8-bit LAB)."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    return np.concatenate([lab.mean(0), lab.std(0)])


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> list[np.ndarray]:
    """Generated smears (RGB), and the same fields as another scanner sees them: bluer, darker, flatter."""
    from leukodet.data.synthetic import generate_smears

    out = tmp_path_factory.mktemp("stain_smears")
    generate_smears(out, n_images=6, seed=3, kind="wbc")
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted((out / "images").glob("*.jpg"))]


def other_scanner(image: np.ndarray) -> np.ndarray:
    shifted = image.astype(np.float64) * [0.75, 0.8, 1.0] * 0.8 + [10, 20, 60]
    return np.clip(shifted, 0, 255).astype(np.uint8)


def as_another_scanner_saw_them(run: Path, folder: Path, n: int) -> Path:
    """``folder`` holding the first ``n`` of ``run``'s generated smears as ``other_scanner`` sees them."""
    folder.mkdir()
    for path in sorted((run / "data" / "images").glob("*.jpg"))[:n]:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        cv2.imwrite(str(folder / path.name), cv2.cvtColor(other_scanner(image), cv2.COLOR_RGB2BGR))
    return folder


def test_reinhard_maps_another_scanners_colours_onto_the_training_images(smears):
    reference = fit_stain_reference(smears[:4], "reinhard")
    typical = np.mean([lab_statistics(image) for image in smears[:4]], axis=0)
    for image in smears[4:]:
        shifted = other_scanner(image)
        normalized = stain_normalize(PreprocessState.start(shifted), method="reinhard", reference=reference)
        assert normalized.image.shape == image.shape and normalized.image.dtype == np.uint8
        assert normalized.raw is normalized.image  # the cells are cut out of the normalized image
        before = np.abs(lab_statistics(shifted) - typical)
        after = np.abs(lab_statistics(normalized.image) - typical)
        assert after.max() < 6, after  # every channel's mean and spread within a few LAB levels
        assert before.max() > 20 and after.sum() < before.sum() / 4


def test_stain_normalization_without_a_reference_or_with_an_unknown_method_says_what_to_do(smears):
    state = PreprocessState.start(smears[0])
    with pytest.raises(ValueError, match="needs a reference.*tools/adapt.py"):
        stain_normalize(state, method="reinhard", reference=None)
    with pytest.raises(ValueError, match="'vahadane'.*reinhard or macenko"):
        fit_stain_reference(smears[:2], "vahadane")


def test_macenko_reference_round_trips_and_a_stainless_image_is_left_as_it_is(smears):
    reference = json.loads(json.dumps(fit_stain_reference(smears[:4], "macenko")))  # as stored in config.yaml
    assert np.asarray(reference["stain_matrix"]).shape == (3, 2)
    normalized = stain_normalize(PreprocessState.start(smears[4]), method="macenko", reference=reference)
    assert normalized.image.shape == smears[4].shape and normalized.image.dtype == np.uint8
    blank = np.full((64, 64, 3), 250, np.uint8)  # background only: no stain to estimate
    assert stain_normalize(PreprocessState.start(blank), method="macenko", reference=reference).image is blank


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return MODELS.build({"name": "maskrcnn_effnet_lite0"}, num_classes=2, min_size=160, max_size=192,
                        weights="none").eval()


def sample(image: np.ndarray) -> dict:
    return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": image.shape[0],
            "width": image.shape[1]}


def batchnorm_inputs(detector, image: np.ndarray) -> dict:
    """Each BatchNorm layer's input on one forward of ``image``."""
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda layer, inputs: seen.__setitem__(layer, inputs[0].double()))
             for layer in running_statistics_layers(detector)]
    try:
        with torch.no_grad():
            detector.backbone_features([sample(image)])
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_adabn_normalizes_every_layers_input_on_the_new_acquisition_and_touches_nothing_else(detector, smears):
    image = other_scanner(smears[0])
    weights = {k: v.clone() for k, v in detector.state_dict().items() if "running_" not in k}
    before = batchnorm_inputs(detector, image)
    assert adapt_batchnorm(detector, [sample(image)]) == 1
    after = batchnorm_inputs(detector, image)
    assert len(after) == len(running_statistics_layers(detector)) > 40
    worst_before = worst_after = 0.0
    for layer, x in after.items():
        normalized = (x - layer.running_mean.double()[None, :, None, None]) / torch.sqrt(
            layer.running_var.double()[None, :, None, None] + layer.eps)
        var = layer.running_var.double()
        worst_after = max(worst_after, normalized.mean((0, 2, 3)).abs().max().item(),  # var / (var + eps) when exact
                          (normalized.var((0, 2, 3), unbiased=False) - var / (var + layer.eps)).abs().max().item())
        x = before[layer]
        stale = (x - layer.running_mean.double()[None, :, None, None])  # the adapted mean on the unadapted input
        worst_before = max(worst_before, stale.mean((0, 2, 3)).abs().max().item())
    assert worst_after < 1e-3  # one image: its own statistics, to rounding
    assert worst_before > 0.1  # the first layer's input is the same, the deeper ones changed with the adaptation
    assert all(torch.equal(v, detector.state_dict()[k]) for k, v in weights.items())


def test_adabn_on_no_image_fails_and_leaves_the_statistics(detector):
    saved = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in running_statistics_layers(detector)]
    with pytest.raises(ValueError, match="no image"):
        adapt_batchnorm(detector, iter([]))
    for layer, (mean, var) in zip(running_statistics_layers(detector), saved):
        assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)


def test_adapted_run_is_a_run_evaluate_and_infer_take(trained_run, tmp_path):  # noqa: F811
    from leukodet.engine.adapt import adapt_run
    from leukodet.engine.evaluate import evaluate_checkpoint, read_checkpoint
    from leukodet.engine.inference import run_inference

    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    new_scanner = as_another_scanner_saw_them(trained_run, tmp_path / "new_scanner", 5)
    adapted = adapt_run(compose(f"ckpt={checkpoint}", f"input={new_scanner}", "adapt.stain=reinhard",
                                "adapt.batchnorm=true", "adapt.images=3", "adapt.choose_point=true", config_name="adapt"),
                        tmp_path / "adapted")

    assert adapted == tmp_path / "adapted" / "checkpoints" / "last.ckpt"
    config = OmegaConf.load(tmp_path / "adapted" / "config.yaml")
    assert config.adapted.stain == "reinhard" and config.adapted.batchnorm_images == 3
    # AdaBN moved the scores: the point is chosen again on the run's val split, as the adapted model sees it
    chosen = json.loads((adapted.parent / "thresholds.json").read_text())
    assert chosen["split"] == "val" and (tmp_path / "adapted" / "sweep_val.csv").is_file()
    assert config.adapted.point.startswith(f"chosen again on val after adapting: min confidence {chosen['min_confidence']}")
    assert Path(config.adapted["from"]) == checkpoint.resolve()
    steps = [s.name for s in config.preprocess.steps]
    trained_steps = [s.name for s in OmegaConf.load(trained_run / "run" / "config.yaml").preprocess.steps]
    assert steps == [*trained_steps[:1], "stain_normalize", *trained_steps[1:]] or (
        steps == ["stain_normalize", *trained_steps])
    assert len(config.preprocess.steps[steps.index("stain_normalize")].reference.means) == 3
    state, original = read_checkpoint(adapted), read_checkpoint(checkpoint)
    assert "optimizer_states" not in state and state["hyper_parameters"] == original["hyper_parameters"]
    changed = [k for k in original["state_dict"] if not torch.equal(state["state_dict"][k], original["state_dict"][k])]
    assert changed and all("running_" in k for k in changed)

    result = evaluate_checkpoint(compose(f"ckpt={adapted}", "split=val", "eval.min_confidence=0.05",
                                         "eval.report=false", config_name="checkpoint"), tmp_path / "eval")
    assert result is not None and (tmp_path / "eval" / "val_metrics.json").is_file()
    out = tmp_path / "infer"
    run_inference(compose(f"ckpt={adapted}", f"input={new_scanner}", f"infer.out_dir={out}", "infer.overlays=false",
                          "eval.min_confidence=0.05", "infer.num_workers=0", config_name="inference"), out)
    counts = pd.read_csv(out / "counts.csv")
    assert sorted(counts.image) == sorted(p.name for p in new_scanner.iterdir())
    assert not (out / "errors.csv").is_file() or len(pd.read_csv(out / "errors.csv")) == 0


def test_the_default_adaptation_needs_no_new_image_and_keeps_the_weights(trained_run, tmp_path):  # noqa: F811
    from leukodet.engine.adapt import adapt_run
    from leukodet.engine.evaluate import read_checkpoint

    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    adapted = adapt_run(compose(f"ckpt={checkpoint}", config_name="adapt"), tmp_path / "adapted")
    config = OmegaConf.load(tmp_path / "adapted" / "config.yaml")
    assert config.adapted.stain == "reinhard" and config.adapted.batchnorm_images == 0 and config.adapted.input is None
    assert config.adapted.point == "the trained run's"
    assert "stain_normalize" in [s.name for s in config.preprocess.steps]
    state, original = read_checkpoint(adapted), read_checkpoint(checkpoint)
    assert all(torch.equal(state["state_dict"][k], v) for k, v in original["state_dict"].items())


def test_pseudo_labels_are_the_outlines_of_the_models_masks(smears, tmp_path, monkeypatch):
    """Each confident detection becomes an annotation of its class whose outline covers its mask."""
    from pycocotools import mask as mask_utils

    from leukodet.engine import adapt
    from leukodet.structures import ImagePredictions

    paths, masks = [], []
    for i, image in enumerate(smears[:2]):
        paths.append(tmp_path / f"field{i}.png")
        cv2.imwrite(str(paths[-1]), image)
        masks.append([cv2.ellipse(np.zeros(image.shape[:2], np.uint8), (40 + 70 * k, 60 + 10 * i), (25, 18), 30 * k,
                                  0, 360, 1, -1) for k in range(3)])

    def predicted(run_cfg, module, records, point, desc):
        assert [r["file_name"] for r in records] == [str(p) for p in paths] and point.min_confidence == 0.9
        return [ImagePredictions(np.zeros((3, 4), np.float32), np.full(3, 0.95, np.float32), np.array([0, 1, 1]),
                                 [mask_utils.encode(np.asfortranarray(m)) for m in cells]) for cells in masks]

    monkeypatch.setattr(adapt, "predict_split", predicted)
    monkeypatch.setattr(adapt, "get_metadata", lambda name: {"thing_classes": ["lymphocyte", "other_wbc"]})
    run_cfg = OmegaConf.create({"data": {"name": "any"}})
    records = adapt.pseudo_labels(run_cfg, None, paths, OperatingPoint(0.9, 0.5, 300), tmp_path / "pseudo.json")
    assert [Path(r["file_name"]) for r in records] == [p.resolve() for p in paths]
    for record, cells, image in zip(records, masks, smears):
        assert (record["height"], record["width"]) == image.shape[:2]
        assert [a["category_id"] for a in record["annotations"]] == [0, 1, 1]
        for annotation, mask in zip(record["annotations"], cells):
            drawn = mask_utils.decode(mask_utils.frPyObjects(annotation["segmentation"], *image.shape[:2]))[..., 0]
            assert (drawn & mask).sum() / (drawn | mask).sum() > 0.9


def test_self_training_fine_tunes_on_the_new_images_labelled_by_the_model(trained_run, tmp_path):  # noqa: F811
    from leukodet.engine.adapt import adapt_run
    from leukodet.engine.evaluate import read_checkpoint

    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    new_images = trained_run / "data" / "images"
    cfg = compose(f"ckpt={checkpoint}", f"input={new_images}", "adapt.stain=none", "adapt.self_training.steps=4",
                  "adapt.self_training.min_confidence=0", "adapt.images=3", "eval.min_confidence=0.05",
                  config_name="adapt")
    adapted = adapt_run(cfg, tmp_path / "adapted")

    config = OmegaConf.load(tmp_path / "adapted" / "config.yaml")
    labels = json.loads((tmp_path / "adapted" / "self_training" / "pseudo_labels.json").read_text())
    assert config.adapted.self_training_steps == 4 and config.adapted.pseudo_labelled_images == len(labels["images"]) == 3
    assert config.adapted.pseudo_labelled_cells == len(labels["annotations"]) > 0
    tuned = OmegaConf.load(tmp_path / "adapted" / "self_training" / "config.yaml").train
    trained = OmegaConf.load(trained_run / "run" / "config.yaml").train
    assert tuned.max_steps == 4 and tuned.lr == pytest.approx(trained.lr * 0.1)
    state, original = read_checkpoint(adapted), read_checkpoint(checkpoint)
    assert any(not torch.equal(state["state_dict"][k], v) for k, v in original["state_dict"].items()
               if "running_" not in k)  # fine-tuned: weights moved


class ShiftingAdapter(torch.nn.Module):
    """Finds one cell, its box shifted by its own weight: what a teacher labels shows whose weights it has."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def predict(self, batch, point):
        from leukodet.structures import Detections

        assert point.min_confidence == 0.9 and not any(point.class_bias)
        return [Detections(torch.tensor([[1.0, 2.0, 5.0, 6.0]]) + self.weight[0].detach(), torch.tensor([0.95]),
                           torch.tensor([1]), torch.ones((1, 8, 8), dtype=torch.bool)) for _ in batch]


def labelled_copy(trained_run: Path, folder: Path, categories: list[str] | None = None) -> Path:
    """The run's prepared val split as another scanner sees it: a COCO file of those images
    (``other_scanner``'s colours, in ``folder``) with their labels, the classes renamed if given."""
    prepared = Path(OmegaConf.load(trained_run / "run" / "config.yaml").data.prepared_dir)
    coco = json.loads((prepared / "val.json").read_text())
    folder.mkdir()
    for image in coco["images"]:
        pixels = cv2.imread(str((prepared / image["file_name"]).resolve()))[..., ::-1]
        cv2.imwrite(str(folder / Path(image["file_name"]).name), other_scanner(pixels)[..., ::-1])
        image["file_name"] = Path(image["file_name"]).name
    for category, name in zip(coco["categories"], categories or []):
        category["name"] = name
    (folder / "labels.json").write_text(json.dumps(coco))
    return folder / "labels.json"


def test_a_few_labelled_images_fine_tune_the_model_shown_as_half_of_what_it_sees(trained_run, tmp_path,  # noqa: F811
                                                                                 monkeypatch, caplog):
    from leukodet.engine import adapt
    from leukodet.engine.evaluate import read_checkpoint

    labels = labelled_copy(trained_run, tmp_path / "scanner2")
    shown = []
    real_fit = adapt.fit
    monkeypatch.setattr(adapt, "fit", lambda *args, **kwargs: shown.append(kwargs["extra_train"]) or real_fit(
        *args, **kwargs))
    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    cfg = compose(f"ckpt={checkpoint}", "adapt.stain=none", f"adapt.labelled={labels}", "adapt.fine_tune.steps=4",
                  config_name="adapt")
    with caplog.at_level(logging.INFO, logger="leukodet.engine.adapt"):
        adapted = adapt.adapt_run(cfg, tmp_path / "adapted")

    coco = json.loads(labels.read_text())
    prepared = Path(OmegaConf.load(trained_run / "run" / "config.yaml").data.prepared_dir)
    train_images = len(json.loads((prepared / "train.json").read_text())["images"])
    repeats = round(train_images / len(coco["images"]))  # labelled_share 0.5: as many as the train split
    assert len(shown) == 1 and len(shown[0]) == repeats * len(coco["images"])
    assert {record["file_name"] for record in shown[0]} == {str((labels.parent / i["file_name"]).resolve())
                                                           for i in coco["images"]}
    assert sum(len(r["annotations"]) for r in shown[0]) == repeats * len(coco["annotations"]) > 0
    assert f"each repeated {repeats} times" in caplog.text
    tuned = OmegaConf.load(tmp_path / "adapted" / "labelled_fine_tuning" / "config.yaml")
    trained = OmegaConf.load(trained_run / "run" / "config.yaml").train
    assert tuned.train.max_steps == 4 and tuned.train.lr == pytest.approx(trained.lr * 0.1)
    assert tuned.fine_tuning.labelled_share == 0.5
    state, original = read_checkpoint(adapted), read_checkpoint(checkpoint)
    assert any(not torch.equal(state["state_dict"][k], v) for k, v in original["state_dict"].items()
               if v.is_floating_point())
    record = OmegaConf.load(tmp_path / "adapted" / "config.yaml").adapted
    assert record.labelled == str(labels.resolve()) and record.labelled_images == len(coco["images"])
    assert record.labelled_fine_tuning_steps == 4 and record.input is None  # no unlabelled folder read

    # the tuning folder is reused for the same weights, images and settings, and refused for others
    module, records = adapt.load_detector(checkpoint), shown[0]
    again = adapt.fine_tune(OmegaConf.load(trained_run / "run" / "config.yaml"), module, records, cfg.adapt.fine_tune,
                            tmp_path / "adapted" / "labelled_fine_tuning")
    assert len(shown) == 2 and all(torch.equal(v, state["state_dict"][k]) for k, v in again.state_dict().items())
    with pytest.raises(adapt.RunConfigError, match="labelled_fine_tuning was fine-tuned from other weights, on "
                                                   "other images or with other settings; delete it"):
        adapt.fine_tune(OmegaConf.load(trained_run / "run" / "config.yaml"), module, records[1:], cfg.adapt.fine_tune,
                        tmp_path / "adapted" / "labelled_fine_tuning")
    with pytest.raises(ValueError, match="fine-tuning steps=0: give 1 or more"):
        adapt.fine_tune(OmegaConf.load(trained_run / "run" / "config.yaml"), module, records,
                        OmegaConf.merge(cfg.adapt.fine_tune, {"steps": 0}), tmp_path / "elsewhere")


def test_after_fine_tuning_on_labelled_images_the_boundary_is_moved_as_the_tuned_model_sees_the_new_images(
        trained_run, tmp_path, monkeypatch):  # noqa: F811
    from leukodet.engine import adapt
    from leukodet.engine.evaluate import read_checkpoint

    labels = labelled_copy(trained_run, tmp_path / "scanner2")
    new_scanner = as_another_scanner_saw_them(trained_run, tmp_path / "new_scanner", 4)
    measured_by = []
    monkeypatch.setattr(adapt, "class_boundary_shift", lambda run_cfg, module, images: measured_by.append(
        (module.state_dict(), images)) or (1.5, "lymphoblast boundary moved +1.50 logits"))
    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    adapted = adapt.adapt_run(compose(f"ckpt={checkpoint}", f"input={new_scanner}", "adapt.stain=none",
                                      f"adapt.labelled={labels}", "adapt.fine_tune.steps=2", "adapt.class_bias=otsu",
                                      config_name="adapt"), tmp_path / "adapted")

    (weights, images), = measured_by
    tuned = read_checkpoint(adapted)["state_dict"]
    original = read_checkpoint(checkpoint)["state_dict"]
    assert all(torch.equal(weights[k], v) for k, v in tuned.items())  # the fine-tuned model's margins
    assert any(not torch.equal(tuned[k], v) for k, v in original.items() if v.is_floating_point())
    assert sorted(p.name for p in images) == sorted(p.name for p in new_scanner.iterdir())
    assert json.loads((adapted.parent / "thresholds.json").read_text())["class_bias"] == [1.5, 0.0]
    record = OmegaConf.load(tmp_path / "adapted" / "config.yaml").adapted
    assert record.labelled == str(labels.resolve()) and record.labelled_fine_tuning_steps == 2
    assert record.class_bias.startswith("lymphoblast boundary moved +1.50 logits")


def test_labelled_images_of_other_classes_boxes_only_or_a_missing_file_are_refused_by_name(trained_run, tmp_path):  # noqa: F811
    from leukodet.engine.adapt import adapt_run

    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    renamed = labelled_copy(trained_run, tmp_path / "scanner2", categories=["blast", "other"])
    with pytest.raises(ValueError, match=rf"adapt.labelled={re.escape(str(renamed))}: its classes are \['blast', "
                                         r"'other'\], the checkpoint's"):
        adapt_run(compose(f"ckpt={checkpoint}", f"adapt.labelled={renamed}", config_name="adapt"), tmp_path / "a")
    boxes = labelled_copy(trained_run, tmp_path / "scanner3")
    boxes.write_text(json.dumps({**json.loads(boxes.read_text()), "leukodet": {"box_only": True}}))
    with pytest.raises(ValueError, match="scanner3/labels.json: its labels are boxes only, and the checkpoint segments"):
        adapt_run(compose(f"ckpt={checkpoint}", f"adapt.labelled={boxes}", config_name="adapt"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapt.labelled=.*nowhere.json: no such file"):
        adapt_run(compose(f"ckpt={checkpoint}", f"adapt.labelled={tmp_path / 'nowhere.json'}", config_name="adapt"),
                  tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_mean_teacher_labels_only_the_new_images_and_follows_the_model_slowly():
    from types import SimpleNamespace

    from leukodet.engine.adapt import TARGET_SOURCE, MeanTeacher

    module = SimpleNamespace(adapter=ShiftingAdapter())
    teacher = MeanTeacher(OperatingPoint(0.9, 0.5, 100), decay=0.9)
    teacher.on_train_start(None, module)

    def batch():
        none = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "masks": None}
        return [{"record": {"source": "dataset1"}, "image": torch.zeros(3, 8, 8), "instances": none},
                {"record": {"source": TARGET_SOURCE}, "image": torch.zeros(3, 8, 8), "instances": dict(none)}]

    first = batch()
    own = first[0]["instances"]
    teacher.on_train_batch_start(None, module, first, 0)
    assert first[0]["instances"] is own  # a labelled image keeps its labels
    labels = first[1]["instances"]
    assert labels["boxes"].tolist() == [[1, 2, 5, 6]] and labels["labels"].tolist() == [1]
    assert labels["masks"].dtype == torch.uint8 and labels["masks"].shape == (1, 8, 8)
    assert (teacher.cells, teacher.images) == (1, 1)

    with torch.no_grad():  # the model moves a whole unit in one step; the teacher a tenth of it
        module.adapter.weight.fill_(1.0)
        module.adapter.steps.fill_(1)
    teacher.on_train_batch_end(None, module, None, first, 0)
    assert torch.allclose(teacher.teacher.weight, torch.full((2,), 0.1)) and int(teacher.teacher.steps) == 1
    second = batch()
    teacher.on_train_batch_start(None, module, second, 1)
    assert second[1]["instances"]["boxes"][0, 0].item() == pytest.approx(1.1)  # the teacher's weights label
    saved = teacher.state_dict()  # in the run's checkpoints: a resumed run resumes the teacher too
    resumed = MeanTeacher(OperatingPoint(0.9, 0.5, 100), decay=0.9)
    resumed.load_state_dict(saved)
    resumed.on_train_start(None, module)
    assert torch.allclose(resumed.teacher.weight, torch.full((2,), 0.1)) and (resumed.cells, resumed.images) == (2, 2)
    teacher.on_train_end(None, module)
    assert torch.allclose(module.adapter.weight, torch.full((2,), 0.1))  # training leaves the teacher's weights
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        MeanTeacher(OperatingPoint(0.9, 0.5, 100), decay=1.0)


class TwoClassesOneCell(ShiftingAdapter):
    def predict(self, batch, point):
        from leukodet.structures import Detections

        return [Detections(torch.tensor([[1.0, 2.0, 5.0, 6.0], [1.0, 2.0, 5.0, 6.5]]), torch.tensor([0.95, 0.92]),
                           torch.tensor([0, 1]), torch.ones((2, 8, 8), dtype=torch.bool)) for _ in batch]


def test_a_mean_teacher_labels_a_cell_once_where_the_point_suppresses_across_classes():
    from types import SimpleNamespace

    from leukodet.engine.adapt import TARGET_SOURCE, MeanTeacher

    module = SimpleNamespace(adapter=TwoClassesOneCell())
    none = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "masks": None}
    for across, labels in ((None, [0, 1]), (0.5, [0])):
        teacher = MeanTeacher(OperatingPoint(0.9, 0.5, 100, cross_class_nms=across), decay=0.9)
        teacher.on_train_start(None, module)
        batch = [{"record": {"source": TARGET_SOURCE}, "image": torch.zeros(3, 8, 8), "instances": dict(none)}]
        teacher.on_train_batch_start(None, module, batch, 0)
        assert batch[0]["instances"]["labels"].tolist() == labels
        assert len(batch[0]["instances"]["masks"]) == len(labels)


def test_mean_teacher_self_training_runs_from_the_tool(trained_run, tmp_path, monkeypatch):  # noqa: F811
    from leukodet.engine import adapt
    from leukodet.engine.adapt import adapt_run
    from leukodet.engine.evaluate import read_checkpoint

    weights = {}
    ending = adapt.MeanTeacher.on_train_end

    def recorded(self, trainer, module):  # what the model and its teacher hold when training ends
        weights["student"] = {k: v.clone() for k, v in module.adapter.state_dict().items()}
        weights["teacher"] = {k: v.clone() for k, v in self.teacher.state_dict().items()}
        ending(self, trainer, module)

    monkeypatch.setattr(adapt.MeanTeacher, "on_train_end", recorded)

    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    cfg = compose(f"ckpt={checkpoint}", f"input={trained_run / 'data' / 'images'}", "adapt.stain=none",
                  "adapt.self_training.steps=4", "adapt.self_training.mean_teacher=true",
                  "adapt.self_training.min_confidence=0", "adapt.images=3", "eval.min_confidence=0.05",
                  config_name="adapt")
    adapted = adapt_run(cfg, tmp_path / "adapted")

    config = OmegaConf.load(tmp_path / "adapted" / "config.yaml")
    assert config.adapted.self_training == "mean teacher" and config.adapted.pseudo_labelled_cells > 0
    assert not (tmp_path / "adapted" / "self_training" / "pseudo_labels.json").exists()  # labelled as it trains
    state, original = read_checkpoint(adapted), read_checkpoint(checkpoint)
    assert any(not torch.equal(state["state_dict"][k], v) for k, v in original["state_dict"].items()
               if "running_" not in k)  # the teacher followed the tuned model
    saved = {k.removeprefix("adapter."): v for k, v in state["state_dict"].items()}
    assert all(torch.equal(saved[k], v) for k, v in weights["teacher"].items())  # the teacher's weights are kept
    assert any(not torch.equal(saved[k], v) for k, v in weights["student"].items())  # not the student's
    tuned = OmegaConf.load(tmp_path / "adapted" / "self_training" / "config.yaml")
    assert tuned.fine_tuning.mean_teacher  # a folder tuned offline is not resumed as a mean teacher's


def test_the_class_boundary_moves_by_the_valley_of_the_new_images_margins(trained_run, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    from leukodet.engine.adapt import adapt_run
    from leukodet.engine.evaluate import operating_point, run_config
    from leukodet.evaluation import boundary

    # the 6-step detector is unsure of everything: every box it gives counts as a cell here
    monkeypatch.setattr(boundary, "CELL_SCORE", 0.0)
    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    new_scanner = as_another_scanner_saw_them(trained_run, tmp_path / "new_scanner", 6)
    adapted = adapt_run(compose(f"ckpt={checkpoint}", f"input={new_scanner}", "adapt.stain=none",
                                "adapt.class_bias=otsu", config_name="adapt"), tmp_path / "adapted")

    config = OmegaConf.load(tmp_path / "adapted" / "config.yaml")
    saved = json.loads((adapted.parent / "thresholds.json").read_text())
    shift = saved["class_bias_shift"]
    trained = operating_point(run_config(compose(f"ckpt={checkpoint}", config_name="checkpoint")))
    assert shift != 0 and saved["class_bias"] == [shift, 0.0]  # the share class (the first) moves, alone
    assert (saved["min_confidence"], saved["nms"]) == (trained.min_confidence, trained.nms)
    # one class a cell: the bias would otherwise lift a hesitant cell's second box over the min confidence
    assert trained.cross_class_nms is None and saved["cross_class_nms"] == SAME_CELL_IOU
    assert config.adapted.input == str(new_scanner.resolve())
    assert config.adapted.class_bias.startswith(f"lymphoblast boundary moved {shift:+.2f} logits")
    # the move is from the val valley drawn toward margin 0 (as if ROUGH_CELLS more cells sat there)
    new, val, cells, taken = re.search(r"([-+][\d.]+) on \d+ cells of 6 new images of \S+, ([-+][\d.]+) on (\d+) "
                                       r"cells of the val split, taken as ([-+][\d.]+)",
                                       config.adapted.class_bias).groups()
    assert float(taken) == pytest.approx(boundary.reference_valley(float(val), int(cells)), abs=0.01)
    assert shift == pytest.approx(float(taken) - float(new), abs=0.02)
    assert "of 6 new images" in config.adapted.class_bias
    point = operating_point(run_config(compose(f"ckpt={adapted}", config_name="checkpoint")))
    assert point.class_bias == (shift, 0.0)  # what evaluate and infer use

    again = r"already has its class boundary moved \(lymphoblast boundary moved .*adapt the checkpoint it came from"
    with pytest.raises(ValueError, match=again):  # a second shift would add the same move twice
        adapt_run(compose(f"ckpt={adapted}", f"input={new_scanner}", "adapt.stain=none", "adapt.class_bias=otsu",
                          config_name="adapt"), tmp_path / "again")
    assert not (tmp_path / "again").exists()

    blank = tmp_path / "blank"  # no cell: no valley to find, and nothing written
    blank.mkdir()
    for i in range(3):
        cv2.imwrite(str(blank / f"{i}.png"), np.full((192, 256, 3), 235, np.uint8))
    monkeypatch.setattr(boundary, "CELL_SCORE", 0.5)  # the blank fields' faint boxes are no cells
    refused = rf"adapt.class_bias=otsu: 3 new images of {re.escape(str(blank))}: \d cells.*: at least 10"
    with pytest.raises(ValueError, match=refused):
        adapt_run(compose(f"ckpt={checkpoint}", f"input={blank}", "adapt.stain=none", "adapt.class_bias=otsu",
                          config_name="adapt"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_val_split_too_small_for_a_valley_leaves_the_models_own_boundary_as_reference(  # noqa: F811
        trained_run, tmp_path, monkeypatch, caplog):
    from leukodet.engine import adapt
    from leukodet.evaluation import boundary

    monkeypatch.setattr(boundary, "CELL_SCORE", 0.0)  # as above: every box of the 6-step detector is a cell
    measured = []

    def val_of_three_cells(predictions, bias_class):  # the val split is measured first
        margins = boundary.class_margins(predictions, bias_class)
        measured.append(margins)
        return margins[:3] if len(measured) == 1 else margins

    monkeypatch.setattr(adapt, "class_margins", val_of_three_cells)
    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    new_scanner = as_another_scanner_saw_them(trained_run, tmp_path / "new_scanner", 6)
    with caplog.at_level(logging.WARNING):
        adapted = adapt.adapt_run(compose(f"ckpt={checkpoint}", f"input={new_scanner}", "adapt.stain=none",
                                          "adapt.class_bias=otsu", config_name="adapt"), tmp_path / "adapted")
    assert "the val split: 3 cells" in caplog.text and "the reference is the model's own boundary" in caplog.text
    shift = json.loads((adapted.parent / "thresholds.json").read_text())["class_bias_shift"]
    assert shift == pytest.approx(-boundary.otsu_threshold(measured[1]))  # the new images' valley put at margin 0
    assert "+0.00 on 3 cells of the val split, taken as +0.00" in OmegaConf.load(
        tmp_path / "adapted" / "config.yaml").adapted.class_bias


@pytest.mark.parametrize("overrides, message", [
    (["adapt.stain=none", "adapt.batchnorm=false"], "nothing to adapt"),
    (["adapt.stain=grey"], "adapt.stain=grey: use none, reinhard, macenko"),
    (["input=null", "adapt.batchnorm=true"], "adapt.batchnorm, adapt.self_training and adapt.class_bias need input="),
    (["input=null", "adapt.self_training.steps=2"], "adapt.self_training and adapt.class_bias need input="),
    (["input=null", "adapt.class_bias=otsu"], "adapt.class_bias need input=..."),
    (["adapt.class_bias=prior"], "adapt.class_bias=prior: use none or otsu"),
])
def test_adapt_refuses_what_it_cannot_do(trained_run, tmp_path, overrides, message):  # noqa: F811
    from leukodet.engine.adapt import adapt_run

    checkpoint = trained_run / "run" / "checkpoints" / "last.ckpt"
    cfg = compose(f"ckpt={checkpoint}", f"input={trained_run / 'data' / 'images'}", *overrides, config_name="adapt")
    with pytest.raises(ValueError, match=message):
        adapt_run(cfg, tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()


def test_the_tool_names_a_missing_checkpoint_in_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "best.ckpt"
    done = subprocess.run([sys.executable, str(REPO / "tools/adapt.py"), f"ckpt={missing}",
                           f"hydra.run.dir={tmp_path / 'adapted'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {missing}: no such checkpoint file")
    assert not (tmp_path / "adapted" / "checkpoints").exists()
