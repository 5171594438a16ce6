"""Inference on a folder: discovery, outputs consistent with one another, bad files reported,
resume, thresholds.json, the VIA project read back by the project's own reader."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils

from conftest import REPO, compose, write_image
from leukodet.data.via import LabelPolicy, read_via
from leukodet.engine.infer import (discover_images, operating_point, overlay_path, run_inference,
                                   write_folder_summary)

GOOD = ["slideA/patient00_img000.jpg", "slideA/patient00_img001.jpg", "slideB/patient00_img002.JPEG",
        "slideB/gray.png", "slideB/rgba.PNG", "slideC/deep16.tif"]
BAD = {"slideB/not_an_image.png": "not an image file", "slideC/truncated.jpg": "not a decodable image",
       "slideC/huge.bmp": "above infer.max_megapixels"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A detector trained for 6 steps on generated 256x192 smears (a run dir with config.yaml)."""
    tmp = tmp_path_factory.mktemp("infer_run")
    args = [sys.executable, str(REPO / "tools" / "train.py"), f"data.root={tmp / 'data'}",
            "data.generate.n_images=16", "+data.generate.width=256", "+data.generate.height=192",
            "train.max_steps=6", "train.steps_per_epoch=6", "train.num_workers=0", "train.warmup_steps=2",
            "model.min_size=192", "model.max_size=256", f"train.run_dir={tmp / 'run'}", f"paths.output_dir={tmp / 'out'}"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


@pytest.fixture()
def smear_folder(trained_run, tmp_path) -> Path:
    """Generated smears in subfolders, in every supported flavour, plus three files that must fail."""
    images = trained_run / "data" / "images"
    folder = tmp_path / "smears"
    for name in GOOD[:3]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((images / Path(name).name.replace(".JPEG", ".jpg")).read_bytes())
    smear = cv2.imread(str(images / "patient00_img003.jpg"))
    cv2.imwrite(str(folder / "slideB/gray.png"), cv2.cvtColor(smear, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "slideB/rgba.PNG"), cv2.cvtColor(smear, cv2.COLOR_BGR2BGRA))
    (folder / "slideC").mkdir()
    cv2.imwrite(str(folder / "slideC/deep16.tif"), smear.astype(np.uint16) * 257)
    (folder / "slideB/not_an_image.png").write_text("this is text")
    (folder / "slideC/truncated.jpg").write_bytes((images / "patient01_img004.jpg").read_bytes()[:2500])
    write_image(folder / "slideC/huge.bmp", 800, 600)  # 0.48 MP, over the 0.2 MP limit the tests set
    (folder / "slideC/notes.txt").write_text("not an image suffix: ignored")
    return folder


def infer_cfg(run: Path, folder: Path, out: Path, *overrides: str):
    return compose(f"ckpt={run / 'run' / 'checkpoints' / 'last.ckpt'}", f"input={folder}", f"infer.out_dir={out}",
                   "infer.min_confidence=0.05", "infer.max_megapixels=0.2", "infer.num_workers=0", *overrides)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_discovery_is_recursive_case_blind_sorted_and_takes_one_file(tmp_path):
    for name in ["b/2.TIF", "a/1.jpeg", "a/z/3.Bmp", "c.png", "d.JPG", "e.tiff", "skip.gif", "skip.txt"]:
        write_image(tmp_path / name) if not name.endswith(".txt") else (tmp_path / name).write_text("x")
    root, images = discover_images(tmp_path)
    assert root == tmp_path
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a/1.jpeg", "a/z/3.Bmp", "b/2.TIF", "c.png",
                                                                    "d.JPG", "e.tiff"]
    assert discover_images(tmp_path / "c.png") == (tmp_path, [tmp_path / "c.png"])
    with pytest.raises(FileNotFoundError, match="missing"):
        discover_images(tmp_path / "missing")


def test_thresholds_json_is_used_unless_overridden(tmp_path):
    run_cfg = OmegaConf.create({"ckpt": str(tmp_path / "best.ckpt"),
                                "eval": {"min_confidence": 0.5, "nms": 0.5, "max_detections": 300}})
    none = OmegaConf.create({"min_confidence": None, "nms": None})
    point = operating_point(run_cfg, none)
    assert (point.min_confidence, point.nms, point.max_detections) == (0.5, 0.5, 300) and "eval config" in point.source
    (tmp_path / "thresholds.json").write_text(json.dumps({"min_confidence": 0.8, "nms": 0.3, "metric": "f1", "split": "val"}))
    point = operating_point(run_cfg, none)
    assert (point.min_confidence, point.nms) == (0.8, 0.3) and point.source == "thresholds.json (best f1 on val)"
    point = operating_point(run_cfg, OmegaConf.create({"min_confidence": 0.6, "nms": None}))
    assert (point.min_confidence, point.nms) == (0.6, 0.3) and "overridden: infer.min_confidence" in point.source


def test_folder_summary_flags_a_share_above_the_threshold(tmp_path):
    folders = {"p1": {"images": 2, "lymphoblast": 2, "non_lymphoblast": 8},  # 20%: not above
               "p2": {"images": 1, "lymphoblast": 3, "non_lymphoblast": 7},  # 30%
               "p3": {"images": 1, "lymphoblast": 0, "non_lymphoblast": 0}}  # no cells: no share
    write_folder_summary(tmp_path / "f.csv", folders, ["lymphoblast", "non_lymphoblast"], 0.2)
    rows = {r["folder"]: r for r in read_csv(tmp_path / "f.csv")}
    assert [rows[f]["share_above_0.2"] for f in ("p1", "p2", "p3")] == ["no", "yes", "no"]
    assert rows["p2"]["lymphoblast_share"] == "0.3000" and rows["p3"]["lymphoblast_share"] == ""
    assert "research aid, not a diagnosis" in rows["p2"]["note"] and rows["p1"]["note"] == ""
    assert rows["p1"]["total"] == "10" and rows["p1"]["images"] == "2"


def test_outputs_are_complete_and_consistent(trained_run, smear_folder, tmp_path):
    out = tmp_path / "out"
    summary = run_inference(infer_cfg(trained_run, smear_folder, out), out)
    assert (summary.images, summary.processed, summary.skipped) == (9, 6, 0)
    errors = {r["image"]: r["error"] for r in read_csv(out / "errors.csv")}
    assert set(errors) == set(BAD)
    for name, reason in BAD.items():
        assert reason in errors[name] and str(smear_folder / name) in errors[name]

    counts = read_csv(out / "counts.csv")
    assert [r["image"] for r in counts] == sorted(GOOD, key=str)  # input order
    detections = pd.read_csv(out / "detections.csv")
    assert len(detections) > 0
    for row in counts:
        mine = detections[detections.image == row["image"]]
        assert int(row["count_lymphoblast"]) == (mine["class"] == "lymphoblast").sum()
        assert int(row["count_non_lymphoblast"]) == (mine["class"] == "non_lymphoblast").sum()
        assert int(row["total"]) == len(mine)
        if len(mine):
            assert float(row["lymphoblast_share"]) == pytest.approx(int(row["count_lymphoblast"]) / len(mine), abs=1e-4)
        assert (row["min_confidence"], row["nms"], row["model"]) == ("0.05", "0.5", "maskrcnn_effnet_lite0")
        assert (int(row["width"]), int(row["height"])) == (256, 192)
        assert overlay_path(out, row["image"]).is_file()
    assert (detections.score > 0.05).all()

    results = json.loads((out / "results_coco.json").read_text())
    assert len(results) == len(detections)
    assert [r["score"] for r in results] == pytest.approx(detections.score.tolist(), abs=1e-4)
    assert [mask_utils.area(r["segmentation"]) for r in results] == detections.area.tolist()
    assert {r["image_id"]: r["file_name"] for r in results} == {i: r["image"] for i, r in enumerate(counts, 1)
                                                                  if int(r["total"])}

    folders = {r["folder"]: r for r in read_csv(out / "folders.csv")}
    assert set(folders) == {"slideA", "slideB", "slideC"}
    per_folder = defaultdict(Counter)
    for row in counts:
        per_folder[Path(row["image"]).parent.as_posix()].update(images=1, total=int(row["total"]))
    for name, row in folders.items():
        assert (int(row["images"]), int(row["total"])) == (per_folder[name]["images"], per_folder[name]["total"])


def test_via_project_reads_back_into_the_same_regions(trained_run, smear_folder, tmp_path):
    out = tmp_path / "out"
    run_inference(infer_cfg(trained_run, smear_folder, out, "infer.overlays=false"), out)
    project = json.loads((out / "via_project.json").read_text())
    assert project["_via_data_format_version"] == "2.0.10"
    assert project["_via_image_id_list"] == list(project["_via_img_metadata"])
    assert set(project["_via_attributes"]["region"]["cell_type"]["options"]) == {"lymphoblast", "non_lymphoblast"}

    parsed = read_via(out / "via_project.json", image_dir=smear_folder, labels=LabelPolicy(attribute="cell_type"))
    assert parsed.skips == []
    back = {Path(r.file_name).relative_to(smear_folder).as_posix(): r for r in parsed.records}
    assert set(back) == set(GOOD)
    for name in GOOD:
        record = json.loads((out / "records" / f"{name}.json").read_text())
        regions = back[name].regions
        assert [r.label for r in regions] == [d["class"] for d in record["detections"]]
        for region, det in zip(regions, record["detections"]):
            if det["polygon"] is None:
                assert region.kind == "box"
            else:
                assert region.kind == "polygon" and np.array_equal(region.points, np.asarray(det["polygon"], float))


def test_resume_skips_done_images_and_settings_never_mix(trained_run, smear_folder, tmp_path):
    out = tmp_path / "out"
    run_inference(infer_cfg(trained_run, smear_folder, out, "infer.overlays=false"), out)
    record = out / "records" / "slideA" / "patient00_img000.jpg.json"
    stamp = record.stat().st_mtime_ns
    counts_before = (out / "counts.csv").read_text()  # then a new image arrives

    write_image(smear_folder / "slideD" / "new.png", 256, 192)
    summary = run_inference(infer_cfg(trained_run, smear_folder, out, "infer.overlays=false"), out)
    assert (summary.processed, summary.skipped, len(summary.errors)) == (1, 6, 3)
    assert record.stat().st_mtime_ns == stamp
    rows_now, rows_then = (out / "counts.csv").read_text().splitlines(), counts_before.splitlines()
    assert set(rows_then) <= set(rows_now) and len(rows_now) == len(rows_then) + 1 and "slideD/new.png" in rows_now[-1]

    with pytest.raises(ValueError, match="min_confidence differ.*infer.overwrite=true"):
        run_inference(infer_cfg(trained_run, smear_folder, out, "infer.min_confidence=0.3"), out)
    summary = run_inference(infer_cfg(trained_run, smear_folder, out, "infer.min_confidence=0.3",
                                      "infer.overwrite=true", "infer.overlays=false"), out)
    assert (summary.processed, summary.skipped) == (7, 0)
    assert set(pd.read_csv(out / "counts.csv").min_confidence) == {0.3}
    assert (pd.read_csv(out / "detections.csv").score > 0.3).all()


def test_tool_exit_status_and_output_folder(trained_run, smear_folder, tmp_path):
    ckpt = trained_run / "run" / "checkpoints" / "last.ckpt"
    tool = [sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={ckpt}", f"paths.output_dir={tmp_path}",
            "infer.min_confidence=0.05", "infer.num_workers=0"]
    done = subprocess.run(tool + [f"input={smear_folder / 'slideA'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results saved to {tmp_path / 'infer' / 'slideA'}" in done.stdout
    assert (tmp_path / "infer" / "slideA" / "counts.csv").is_file()

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_text("nope")
    done = subprocess.run(tool + [f"input={only_bad}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no image could be processed" in done.stderr
    assert "x.jpg" in (tmp_path / "infer" / "bad" / "errors.csv").read_text()
    done = subprocess.run(tool + [f"input={tmp_path / 'missing'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "does not exist" in done.stderr


def test_inference_runs_at_the_sweep_thresholds_beside_the_checkpoint(trained_run, smear_folder, tmp_path):
    thresholds = trained_run / "run" / "checkpoints" / "thresholds.json"
    thresholds.write_text(json.dumps({"min_confidence": 0.1, "nms": 0.3, "metric": "f1", "split": "val"}))
    try:
        out = tmp_path / "out"
        cfg = compose(f"ckpt={thresholds.parent / 'last.ckpt'}", f"input={smear_folder / 'slideA'}",
                      f"infer.out_dir={out}", "infer.num_workers=0", "infer.overlays=false")
        run_inference(cfg, out)
    finally:
        thresholds.unlink()
    settings = json.loads((out / "run.json").read_text())
    assert (settings["min_confidence"], settings["nms"]) == (0.1, 0.3)
    assert settings["thresholds_from"] == "thresholds.json (best f1 on val)"
    counts = pd.read_csv(out / "counts.csv")
    assert set(counts.min_confidence) == {0.1} and set(counts.nms) == {0.3}
    assert (pd.read_csv(out / "detections.csv").score > 0.1).all()
