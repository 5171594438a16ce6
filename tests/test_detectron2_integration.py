"""detectron2's own trainer fed by leukodet: the mapper, the metrics CSV, zoo .pkl weights, the
seed's R101 preset, and examples/detectron2_train_net.py end to end through the checkpoint tools."""

import json
import pickle
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO, compose

pytest.importorskip("detectron2", reason="detectron2 is optional and not installed (built from source)")

import leukodet.integrations.detectron2 as d2  # noqa: E402
from leukodet.data.catalog import get_dataset_dicts  # noqa: E402
from leukodet.data.pipeline import ensure_prepared  # noqa: E402
from leukodet.preprocess.mapper import DatasetMapper  # noqa: E402
from leukodet.registry import MODELS  # noqa: E402


@pytest.fixture(scope="module")
def sample_cfg(tmp_path_factory):
    cfg = compose(f"data.root={tmp_path_factory.mktemp('d2') / 'data'}", "data.generate.n_images=12",
                  "preprocess.scale=0.5")
    ensure_prepared(cfg.data)
    return cfg


def test_mapper_runs_leukodet_preprocessing_and_augmentation(sample_cfg):
    record = get_dataset_dicts("sample_wbc_train")[0]
    torch.manual_seed(0)
    ours = DatasetMapper(sample_cfg.preprocess, sample_cfg.augment, is_train=True)(record)
    torch.manual_seed(0)  # the same random augmentation
    entry = d2.Detectron2Mapper(sample_cfg.preprocess, sample_cfg.augment, is_train=True, input_format="BGR")(record)
    assert torch.equal(entry["image"], ours["image"].flip(0)) and entry["image"].dtype == torch.uint8
    assert (entry["height"], entry["width"]) == (record["height"], record["width"])  # detections come back in file pixels
    assert entry["image_id"] == record["image_id"]
    gt = entry["instances"]
    assert gt.image_size == tuple(ours["image"].shape[1:])
    assert torch.equal(gt.gt_boxes.tensor, ours["instances"]["boxes"])
    assert torch.equal(gt.gt_classes, ours["instances"]["labels"])
    assert type(gt.gt_masks).__name__ == "BitMasks" and torch.equal(gt.gt_masks.tensor, ours["instances"]["masks"].bool())

    box_only = d2.Detectron2Mapper(sample_cfg.preprocess, is_train=True, input_format="RGB")({**record, "box_only": True})
    assert not box_only["instances"].has("gt_masks") and len(box_only["instances"]) == len(record["annotations"])
    assert "instances" not in d2.Detectron2Mapper(sample_cfg.preprocess)(record)  # test time, as detectron2's mapper


def test_metrics_csv_is_what_the_loss_curves_read(tmp_path):
    from detectron2.utils.events import EventStorage

    from leukodet.engine.curves import plot_loss_curves

    writer = d2.metrics_csv_writer(tmp_path / "logs" / "metrics.csv")
    with EventStorage(0) as storage:
        for step in range(3):
            storage.iter = step
            storage.put_scalars(total_loss=3.0 - step, loss_cls=1.0, lr=0.01)
            writer.write()
        storage.put_scalars(**{"leukodet/ap50_segm": 0.7, "leukodet/f1": 0.5}, smoothing_hint=False)
        writer.write()
    table = pd.read_csv(tmp_path / "logs" / "metrics.csv")
    assert list(table["step"]) == [0, 1, 2]
    assert list(table["train/loss"]) == [3.0, 2.0, 1.0] and table["val/ap50_segm"].iloc[-1] == 0.7
    assert plot_loss_curves(tmp_path / "logs" / "metrics.csv", tmp_path / "curves.png").is_file()


def test_zoo_pkl_weights_load_through_the_registered_model(tmp_path):
    """The model zoo's layout: {"model": {name: numpy array}, "__author__": ...}, read by
    detectron2's checkpointer; tensors of another shape (another class count) are skipped."""
    keys = {"min_size": 160, "max_size": 192, "device": "cpu"}
    torch.manual_seed(0)
    source = MODELS.build({"name": "d2_mask_rcnn_R_50_FPN_3x"}, num_classes=3, **keys)
    zoo = {"model": {k: v.numpy() for k, v in source.model.state_dict().items()}, "__author__": "leukodet test"}
    with open(tmp_path / "model_final.pkl", "wb") as out:
        pickle.dump(zoo, out)
    torch.manual_seed(1)
    loaded = MODELS.build({"name": "d2_mask_rcnn_R_50_FPN_3x", "weights": str(tmp_path / "model_final.pkl")},
                          num_classes=2, **keys)
    skipped = []
    for name, tensor in loaded.model.state_dict().items():
        if tensor.shape == source.model.state_dict()[name].shape:
            assert torch.equal(tensor, source.model.state_dict()[name]), name
        else:
            skipped.append(name)
    assert skipped and all(n.startswith(("roi_heads.box_predictor", "roi_heads.mask_head.predictor")) for n in skipped)
    with pytest.raises(FileNotFoundError, match="no such file"):
        MODELS.build({"name": "d2_mask_rcnn_R_50_FPN_3x", "weights": str(tmp_path / "missing.pkl")}, num_classes=2,
                     **keys)


@pytest.mark.parametrize("arm, min_confidence, preprocess", [("raw", 0.70, "raw"), ("segmented", 0.85, "segmented")])
def test_seed_r101_preset_composes_with_each_arm(arm, min_confidence, preprocess):
    cfg = compose(f"+exp=[{arm},seed_r101]")
    assert cfg.model.name == "d2_mask_rcnn_R_101_FPN_3x" and cfg.train.lr == 0.001
    assert cfg.eval.nms == 0.2 and cfg.eval.min_confidence == min_confidence
    assert [s.name for s in cfg.preprocess.steps][-1] == ("scale" if preprocess == "raw" else "mask_and")


def run(*args):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.long
def test_example_trains_with_default_trainer_and_the_tools_load_its_checkpoint(tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    log = run(REPO / "examples/detectron2_train_net.py", f"data.root={data}", "data.generate.n_images=12",
              "preprocess.scale=0.25", "train.max_steps=2", "train.num_workers=0", "train.steps_per_epoch=2",
              "train.checkpoint_every_steps=100", f"train.run_dir={run_dir}")
    assert "copypaste: Task: leukodet" in log  # detectron2 printed the leukodet evaluator's figures
    metrics = pd.read_csv(run_dir / "logs" / "metrics.csv")
    assert {"train/loss", "val/ap50_segm", "val/f1"} <= set(metrics.columns)
    for name in ("model_final.pth", "model_best.pth", "loss_curves.png", "config.yaml", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name

    common = [f"paths.output_dir={tmp_path / 'outputs'}"]
    run(REPO / "tools/evaluate.py", f"ckpt={run_dir / 'checkpoints/best.ckpt'}", "split=val", *common,
        f"hydra.run.dir={tmp_path / 'evaluate'}")
    scored = json.loads((tmp_path / "evaluate" / "val_metrics.json").read_text())
    assert scored  # the checkpoint rebuilt as the adapter and scored the split
    run(REPO / "tools/infer.py", f"ckpt={run_dir / 'checkpoints/last.ckpt'}", f"input={data / 'images'}",
        f"infer.out_dir={tmp_path / 'infer'}", *common)
    counts = pd.read_csv(tmp_path / "infer" / "counts.csv")
    assert len(counts) == 12
