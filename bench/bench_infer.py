"""Benchmark: inference on a folder, the tool (batched, read ahead by a loader worker, streamed
to disk) vs a plain per-image loop doing the same work; and peak memory over 1,000 images vs 100.

    python bench/bench_infer.py --ckpt outputs/runs/<date>/<time>/checkpoints/best.ckpt
(default: outputs/demo/checkpoints/best.ckpt, trained by `make demo`)

Images are generated smears at the sample's size (512x384, the default model's input size), 50
distinct ones repeated under other names. Both arms write the same outputs (records, overlays).
Each tool run is its own process, so its peak resident memory is read cleanly.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from leukodet.data.catalog import class_colors
from leukodet.data.synthetic import generate_smears
from leukodet.engine.evaluate import load_detector
from leukodet.engine.inference.discovery import discover_images, relative_name
from leukodet.engine.inference.run import InferenceReader, image_record
from leukodet.engine.inference.store import RecordStore
from leukodet.engine.predictor import predict_original
from leukodet.engine.tiling import run_tiling
from leukodet.engine.train import trained_point
from leukodet.viz import draw_predictions, write_rgb

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(done.stdout[-4000:]); print(done.stderr[-2000:], file=sys.stderr); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def make_folder(folder: Path, n_images: int, distinct: Path) -> Path:
    folder.mkdir(parents=True)
    sources = sorted(distinct.glob("*.jpg"))
    for i in range(n_images):
        shutil.copyfile(sources[i % len(sources)], folder / f"slide{i // 100:02d}_img{i:04d}.jpg")
    return folder


def run_tool(ckpt: Path, folder: Path, out: Path, overrides: list[str]) -> tuple[float, float]:
    """(images/s as the tool reports it, peak resident MB of the tool's process)."""
    command = [sys.executable, "-c", PEAK_RSS, sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={ckpt}",
               f"input={folder}", f"infer.out_dir={out}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    rate = float(re.search(r"\(([\d.]+) images/s\)", done.stdout).group(1))
    return rate, int(re.search(r"PEAK_KB (\d+)", done.stdout).group(1)) / 1024


def plain_loop(ckpt: Path, folder: Path, out: Path) -> float:
    """images/s of the obvious loop: read + preprocess, predict one image (the tool's detector and
    tiling), write its outputs."""
    cfg = OmegaConf.load(ckpt.parent.parent / "config.yaml")
    module = load_detector(ckpt)
    detector = module.adapter.for_inference()
    tiling = run_tiling(cfg, module.hparams.get("trained_scale"))
    point = trained_point(cfg)
    class_names = list(module.hparams.class_names)
    colors = class_colors(len(class_names))
    reader = InferenceReader(cfg.preprocess, 100, with_display=True)
    root, images = discover_images(folder)
    store = RecordStore(out, root)
    start = time.perf_counter()
    with torch.inference_mode():
        for path in images:
            image_start = time.perf_counter()
            sample = reader(path)
            prediction = predict_original(detector, [sample], point, tiling)[0]
            rel = relative_name(path, root)
            write_rgb(store.overlay_path(rel), draw_predictions(sample["display"], prediction, class_names, colors))
            store.save(image_record(rel, path, sample, prediction, class_names, time.perf_counter() - image_start))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(REPO / "outputs" / "demo" / "checkpoints" / "best.ckpt"))
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--tool-args", default="", help="extra overrides for the tool, e.g. 'infer.num_workers=4'")
    args = parser.parse_args()
    ckpt = Path(args.ckpt)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"checkpoint {ckpt}; {device}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_smears(tmp / "distinct", n_images=50, seed=123)
        small = make_folder(tmp / "small", args.small, tmp / "distinct" / "images")
        large = make_folder(tmp / "large", args.large, tmp / "distinct" / "images")

        loop_rate = plain_loop(ckpt, small, tmp / "out_loop")
        tool_rate, small_peak = run_tool(ckpt, small, tmp / "out_small", args.tool_args.split())
        large_rate, large_peak = run_tool(ckpt, large, tmp / "out_large", args.tool_args.split())

    print("\n| run | images | images/s | peak memory (MB) |\n| --- | --- | --- | --- |")
    print(f"| plain per-image loop | {args.small} | {loop_rate:.2f} | - |")
    print(f"| tools/infer.py {args.tool_args or '(default batching and workers)'} | {args.small} | {tool_rate:.2f} | "
          f"{small_peak:.0f} |")
    print(f"| tools/infer.py | {args.large} | {large_rate:.2f} | {large_peak:.0f} |")
    print(f"\ntool / plain loop: {tool_rate / loop_rate:.2f}x images/s; "
          f"peak memory {args.large} vs {args.small} images: {large_peak / small_peak:.2f}x")


if __name__ == "__main__":
    main()
