"""Export a trained torchvision detector to ONNX beside its checkpoint, checked against PyTorch on
images first (same detections within tolerance, else nothing is written):

    python tools/export.py ckpt=outputs/demo/checkpoints/best.ckpt
    python tools/export.py ckpt=... input=path/to/images export.check_images=20

Then `python tools/infer.py ckpt=... input=... infer.backend=onnxruntime` runs the exported graphs.
"""

import hydra

from leukodet.cli import run_tool
from leukodet.engine.export import export_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg):
    run_tool(export_checkpoint, cfg)


if __name__ == "__main__":
    main()
