"""detectron2's own trainer vs leukodet's loop on the same detectron2 model: loss parity and speed.

    python bench/bench_detectron2.py --steps 20            # R50-FPN, the generated sample at 0.4 scale

The same model (d2_mask_rcnn_R_50_FPN_3x), initial weights, data, batches and schedule (SGD,
constant lr, no clipping, no augmentation) are trained by detectron2's ``DefaultTrainer`` with
``Detectron2Mapper`` and by ``leukodet.engine.train.fit`` (Lightning) through the adapter.
detectron2 is handed the order leukodet's shuffled loader gives; the torch RNG (which RPN and RoI
sampling draw from) is reseeded at every training forward of either. Prints the loss per step of
each, the largest difference, and iterations/s of each, timed between training forwards (steps
2..N: the loop, not its setup), measured in this one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parity_config(workdir: Path, steps: int, n_images: int = 12, scale: float = 0.4, batch_size: int = 2):
    """A composed leukodet config for both trainers; no validation or checkpoint inside the run."""
    from hydra import compose, initialize_config_dir

    import leukodet  # noqa: F401  (registers the typed config schemas)

    overrides = ["model=d2_mask_rcnn_R_50_FPN_3x", "augment=none", f"data.root={workdir / 'data'}",
                 f"data.generate.n_images={n_images}", f"preprocess.scale={scale}", f"train.max_steps={steps}",
                 f"train.batch_size={batch_size}", "train.warmup_steps=0", "train.schedule=constant",
                 "train.grad_clip=null", "train.num_workers=0", f"train.steps_per_epoch={steps + 1}",
                 f"train.checkpoint_every_steps={steps + 1}", f"train.run_dir={workdir / 'leukodet'}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides)


class TrainingForwards:
    """Every training forward of a detectron2 model, in any trainer: reseeds the torch RNG with
    ``seed + step`` before it, records its start time and its total loss."""

    def __init__(self, seed: int):
        self.seed = seed
        self.times: list[float] = []
        self.losses: list[float] = []

    def __enter__(self):
        from detectron2.modeling import GeneralizedRCNN
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def before(module, args):
            if isinstance(module, GeneralizedRCNN) and module.training:
                self.times.append(time.perf_counter())
                torch.manual_seed(self.seed + len(self.times))

        def after(module, args, output):
            if isinstance(module, GeneralizedRCNN) and module.training:
                self.losses.append(float(sum(output.values()).detach()))

        self.handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def iterations_per_second(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def initial_weights(cfg, path: Path) -> Path:
    """One random initialisation, saved for both trainers (``model.weights``). Each FrozenBN of the
    backbone is then set to normalise its input on the first training images, as a pretrained
    backbone's statistics would: a randomly initialised R50 with FrozenBN (identity) otherwise
    amplifies its activations layer after layer and diverges within two steps."""
    import leukodet.integrations.detectron2 as d2  # registers the d2_* models
    from detectron2.layers import FrozenBatchNorm2d

    from leukodet.data.catalog import get_dataset_dicts, get_metadata
    from leukodet.registry import MODELS

    name = f"{cfg.data.name}_train"
    meta = get_metadata(name)
    torch.manual_seed(cfg.seed)
    adapter = MODELS.build(dict(cfg.model), num_classes=len(meta["thing_classes"]), masks=not meta["box_only"])
    model = adapter.model

    def normalise_input(module, args):
        module.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(normalise_input) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    mapper = d2.Detectron2Mapper(cfg.preprocess, input_format=model.input_format)
    with torch.no_grad():
        model.backbone(model.preprocess_image([mapper(r) for r in get_dataset_dicts(name)[:4]]).tensor)
    for hook in hooks:
        hook.remove()
    torch.save(model.state_dict(), path)
    return path


def leukodet_order(cfg) -> list[dict]:
    """The training records in the order of the first epoch of ``fit``'s loader (its own loader,
    shuffled with ``cfg.seed``). Only the first: Lightning starts the next epoch's permutation at
    another point of the loader's generator than a plain second pass does, which is not replicated
    here, so losses are compared over the first epoch (timing holds for any number of steps)."""
    from leukodet.data.catalog import get_dataset_dicts
    from leukodet.engine.data import make_loader

    loader = make_loader(get_dataset_dicts(f"{cfg.data.name}_train"), lambda record: record, cfg.train.batch_size,
                         True, 0, cfg.seed)
    return [record for batch in loader for record in batch]


def train_detectron2(cfg, records: list[dict], out_dir: Path) -> TrainingForwards:
    """detectron2's DefaultTrainer over ``records`` in this order (no shuffle), through the mapper."""
    from detectron2.data import build_detection_train_loader
    from detectron2.data.samplers import TrainingSampler
    from detectron2.engine import DefaultTrainer

    from leukodet.integrations.detectron2 import Detectron2Mapper, trainer_config

    class Trainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, d2_cfg):
            mapper = Detectron2Mapper(cfg.preprocess, cfg.augment, is_train=True, input_format=d2_cfg.INPUT.FORMAT)
            return build_detection_train_loader(records, mapper=mapper, sampler=TrainingSampler(len(records), shuffle=False),
                                                total_batch_size=cfg.train.batch_size, aspect_ratio_grouping=False,
                                                num_workers=0)

    d2_cfg = trainer_config(cfg, out_dir)
    d2_cfg.DATASETS.TEST = ()  # the losses are compared, not an evaluation
    trainer = Trainer(d2_cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS: the shared initial weights
    with TrainingForwards(cfg.seed) as forwards:
        trainer.train()
    return forwards


def train_leukodet(cfg) -> TrainingForwards:
    from leukodet.engine.train import fit

    with TrainingForwards(cfg.seed) as forwards:
        fit(cfg, cfg.train.run_dir)
    return forwards


def run_both(workdir: Path, steps: int, **config) -> tuple[TrainingForwards, TrainingForwards, int]:
    """(detectron2's trainer, leukodet's loop, the steps of leukodet's first epoch): same model,
    weights, batches (over that epoch) and random numbers."""
    from omegaconf import OmegaConf

    from leukodet.data.pipeline import ensure_prepared

    cfg = parity_config(workdir, steps, **config)
    ensure_prepared(cfg.data)
    OmegaConf.update(cfg, "model.weights", str(initial_weights(cfg, workdir / "init.pth")))
    order = leukodet_order(cfg)
    detectron2 = train_detectron2(cfg, order, workdir / "detectron2")
    leukodet = train_leukodet(cfg)
    return detectron2, leukodet, len(order) // cfg.train.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.4, help="preprocess.scale of the 512x384 sample")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        detectron2, leukodet, same_order = run_both(Path(tmp), args.steps, scale=args.scale)
    print("step  detectron2 DefaultTrainer  leukodet loop  difference")
    for step, (a, b) in enumerate(zip(detectron2.losses, leukodet.losses), start=1):
        print(f"{step:4d}  {a:24.6f}  {b:13.6f}  {b - a:+.2e}{'' if step <= same_order else '  (other batch order)'}")
    pairs = list(zip(detectron2.losses, leukodet.losses))[:same_order]
    worst = max(abs(a - b) / abs(a) for a, b in pairs)
    print(f"largest relative loss difference over the {len(pairs)} steps of the same batches: {worst:.2e}")
    d2_speed, ours = detectron2.iterations_per_second(), leukodet.iterations_per_second()
    device = "GPU" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{device}: detectron2 DefaultTrainer {d2_speed:.3f} it/s, leukodet loop {ours:.3f} it/s; "
          f"leukodet / detectron2 time per iteration = {d2_speed / ours:.3f}x (goal <= 1.1)")


if __name__ == "__main__":
    main()
