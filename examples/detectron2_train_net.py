"""Train a detectron2 model-zoo config with detectron2's own ``DefaultTrainer`` on a leukodet dataset.

    python examples/detectron2_train_net.py                    # R50-FPN on the generated sample
    python examples/detectron2_train_net.py data=segmentation_wbc +exp=seed_r101 \\
        model.weights=/path/to/model_final.pkl train.run_dir=outputs/d2_r101

Arguments are leukodet's Hydra overrides (conf/config.yaml; the model defaults to
d2_mask_rcnn_R_50_FPN_3x): images go through leukodet's preprocessing chain and augmentation
(``Detectron2Mapper``), ``train.*`` becomes detectron2's SOLVER, validation is leukodet's evaluator
(AP50, P/R/F1, counts, logged as ``leukodet/<metric>``) and the best checkpoint is chosen by its
AP50. ``train.run_dir`` (default outputs/d2_train_net) holds detectron2's outputs
(``model_final.pth``, ``model_best.pth``, ``metrics.json``, events) and makes a leukodet run
directory too: ``config.yaml``, ``logs/metrics.csv``, ``loss_curves.png`` and
``checkpoints/{best,last}.ckpt``, which the checkpoint tools take:

    python tools/evaluate.py ckpt=outputs/d2_train_net/checkpoints/best.ckpt
    python tools/infer.py ckpt=outputs/d2_train_net/checkpoints/best.ckpt input=datasets/sample/wbc/images
"""

import sys
from pathlib import Path

import lightning as L
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import leukodet  # noqa: F401  (registers the typed config schemas)
from leukodet.data.catalog import get_metadata
from leukodet.data.pipeline import ensure_prepared
from leukodet.engine.curves import plot_loss_curves
from leukodet.engine.module import DetectionModule
from leukodet.integrations import detectron2 as d2
from leukodet.io import atomic_write_text

CONF = Path(__file__).resolve().parents[1] / "conf"


class Trainer(DefaultTrainer):
    """DefaultTrainer fed by leukodet: its mapper, its evaluator, best checkpoint by its AP50,
    its metrics CSV. ``leukodet_cfg``, the composed leukodet config, is set before building:
    detectron2 builds loaders and evaluators in class methods that see only its own config."""

    leukodet_cfg = None

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = d2.Detectron2Mapper(cls.leukodet_cfg.preprocess, cls.leukodet_cfg.augment, is_train=True,
                                     input_format=cfg.INPUT.FORMAT)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = d2.Detectron2Mapper(cls.leukodet_cfg.preprocess, input_format=cfg.INPUT.FORMAT)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        point = cls.leukodet_cfg.eval
        return d2.build_detectron2_evaluator(dataset_name, min_confidence=point.min_confidence,
                                             iou_threshold=point.iou_threshold, share_class=point.share_class)

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks.insert(-1, d2.best_checkpointer(self))  # after the EvalHook it reads, before the writers
        return hooks

    def build_writers(self):
        return [*super().build_writers(), d2.metrics_csv_writer(Path(self.cfg.OUTPUT_DIR) / "logs" / "metrics.csv")]


def write_leukodet_checkpoint(cfg, weights: Path, out: Path) -> None:
    """detectron2's trained weights in a Lightning checkpoint of leukodet's adapter (the same
    model, built from the same zoo config), which the checkpoint tools load."""
    meta = get_metadata(f"{cfg.data.name}_train")
    model_cfg = {**OmegaConf.to_container(cfg.model, resolve=True), "weights": "none"}  # the state dict has them
    module = DetectionModule(model_cfg, OmegaConf.to_container(cfg.train, resolve=True, enum_to_str=True),
                             meta["thing_classes"], meta["box_only"])
    DetectionCheckpointer(module.adapter.model).load(str(weights))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(out)


def main(overrides: list[str]) -> Path:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["model=d2_mask_rcnn_R_50_FPN_3x", *overrides])
    run_dir = Path(cfg.train.run_dir or "outputs/d2_train_net")
    setup_logger(str(run_dir / "log.txt"))
    ensure_prepared(cfg.data)  # registers the splits in leukodet's catalog, mirrored into detectron2's
    Trainer.leukodet_cfg = cfg
    d2_cfg = d2.trainer_config(cfg, run_dir)
    seed_all_rng(d2_cfg.SEED)
    trainer = Trainer(d2_cfg)
    trainer.resume_or_load(resume=cfg.train.resume)
    trainer.train()

    plot_loss_curves(run_dir / "logs" / "metrics.csv", run_dir / "loss_curves.png")
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    best = run_dir / "model_best.pth"
    write_leukodet_checkpoint(cfg, best if best.is_file() else run_dir / "model_final.pth",
                              run_dir / "checkpoints" / "best.ckpt")
    write_leukodet_checkpoint(cfg, run_dir / "model_final.pth", run_dir / "checkpoints" / "last.ckpt")
    return run_dir


if __name__ == "__main__":
    main(sys.argv[1:])
