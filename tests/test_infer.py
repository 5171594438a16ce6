"""Inference on a folder: discovery, outputs consistent with one another, bad files reported,
resume, thresholds.json, the VIA project read back by the project's own reader."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils

from conftest import REPO, compose, write_image
from leukodet.config import input_name
from leukodet.data.via import LabelPolicy, read_via
from leukodet.engine.evaluate import CheckpointError, evaluate_checkpoint, operating_point, require_bias_per_class, run_config
from leukodet.engine.inference import run_inference
from leukodet.engine.inference.discovery import discover_images
from leukodet.engine.inference.store import RecordStore
from leukodet.engine.inference.writers import FolderSummary

GOOD = ["slideA/patient00_img000.jpg", "slideA/patient00_img001.jpg", "slideB/patient00_img002.JPEG",
        "slideB/gray.png", "slideB/rgba.PNG", "slideC/deep16.tif"]
BAD = {"slideB/not_an_image.png": "not an image file", "slideC/truncated.jpg": "not a decodable image",
       "slideC/huge.bmp": "above infer.max_megapixels"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A detector trained for 6 steps with the seed's segmented arm (min confidence 0.85) on generated
    256x192 smears (a run dir with config.yaml)."""
    tmp = tmp_path_factory.mktemp("infer_run")
    args = [sys.executable, str(REPO / "tools" / "train.py"), "+exp=segmented", f"data.root={tmp / 'data'}",
            "data.generate.n_images=16", "+data.generate.width=256", "+data.generate.height=192",
            "train.max_steps=6", "train.steps_per_epoch=6", "train.num_workers=0", "train.warmup_steps=2",
            "model.min_size=192", "model.max_size=256", f"train.run_dir={tmp / 'run'}", f"paths.output_dir={tmp / 'out'}"]
    args.append("train.choose_point=false")  # no thresholds.json: these tests set the point themselves
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


def infer_cfg(run: Path, folder: Path, out: Path, *overrides: str, min_confidence: str = "0.05"):
    point = [f"eval.min_confidence={min_confidence}"] if min_confidence else []
    return compose(f"ckpt={run / 'run' / 'checkpoints' / 'last.ckpt'}", f"input={folder}", f"infer.out_dir={out}",
                   "infer.max_megapixels=0.2", "infer.num_workers=0", *point, *overrides, config_name="inference")


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


def fake_run(tmp_path: Path, trained_eval: dict) -> Path:
    """A run directory holding a config.yaml with this eval and an (empty) checkpoint file."""
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(compose(*(f"eval.{k}={v}" for k, v in trained_eval.items()))))
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"")
    return tmp_path / "checkpoints" / "best.ckpt"


def test_operating_point_command_line_then_thresholds_json_then_the_trained_eval(tmp_path):
    ckpt = fake_run(tmp_path, {"min_confidence": 0.85, "nms": 0.4})

    def point(*overrides):
        return operating_point(run_config(compose(f"ckpt={ckpt}", *overrides, config_name="checkpoint")))

    assert (point().min_confidence, point().nms, point().max_detections) == (0.85, 0.4, 300)
    assert point().source == "min_confidence from training run's eval; nms from training run's eval; " \
                             "max_detections from training run's eval"
    (ckpt.parent / "thresholds.json").write_text(json.dumps({"min_confidence": 0.8, "nms": 0.3, "metric": "f1",
                                                             "split": "val"}))
    assert (point().min_confidence, point().nms) == (0.8, 0.3)
    assert "min_confidence from thresholds.json (best f1 on val)" in point().source
    given = point("eval.min_confidence=0.6")
    assert (given.min_confidence, given.nms) == (0.6, 0.3) and "min_confidence from command line" in given.source
    assert given.class_bias == () and "class_bias" not in given.source
    (ckpt.parent / "thresholds.json").write_text(json.dumps({"min_confidence": 0.8, "nms": 0.3, "class_bias": [1.5, 0],
                                                             "metric": "f1", "split": "calibration"}))
    assert point().class_bias == (1.5, 0.0) and "class_bias from thresholds.json" in point().source
    assert point("eval.class_bias=[0,-1]").class_bias == (0.0, -1.0)
    with pytest.raises(CheckpointError, match="class bias \\[2.0\\] \\(.*command line.*\\): give one value per class, "
                                              "in this order: lymphoblast, non_lymphoblast"):
        require_bias_per_class(point("eval.class_bias=[2]"), ["lymphoblast", "non_lymphoblast"])


def test_folder_summary_flags_a_share_above_the_threshold(tmp_path):
    classes = ["lymphoblast", "non_lymphoblast"]
    records = [{"file": "p1/a.jpg", "counts": {"lymphoblast": 1, "non_lymphoblast": 4}},  # p1: 20%, not above
               {"file": "p1/b.jpg", "counts": {"lymphoblast": 1, "non_lymphoblast": 4}},
               {"file": "p2/c.jpg", "counts": {"lymphoblast": 3, "non_lymphoblast": 7}},  # 30%
               {"file": "p3/d.jpg", "counts": {"lymphoblast": 0, "non_lymphoblast": 0}}]  # no cells: no share
    with FolderSummary(tmp_path / "f.csv", classes, "lymphoblast", 0.2) as summary:
        for image_id, record in enumerate(records, 1):
            summary.add(image_id, record)
    rows = {r["folder"]: r for r in read_csv(tmp_path / "f.csv")}
    assert [rows[f]["share_above_0.2"] for f in ("p1", "p2", "p3")] == ["no", "yes", "no"]
    assert rows["p2"]["lymphoblast_share"] == "0.3000" and rows["p3"]["lymphoblast_share"] == ""
    assert "research aid, not a diagnosis" in rows["p2"]["note"] and rows["p1"]["note"] == ""
    assert rows["p1"]["total"] == "10" and rows["p1"]["images"] == "2"
    with FolderSummary(tmp_path / "g.csv", classes, "non_lymphoblast", 0.5) as summary:  # another share class
        summary.add(1, records[2])
    assert read_csv(tmp_path / "g.csv")[0]["non_lymphoblast_share"] == "0.7000"


def test_evaluate_and_infer_use_the_trained_point_then_the_sweep_then_the_command_line(trained_run, smear_folder,
                                                                                        tmp_path):
    """The seed's segmented arm trains at min confidence 0.85: evaluation and inference of its
    checkpoint use 0.85 without a sweep, the sweep's point after one, and a command-line value when given."""
    ckpt = trained_run / "run" / "checkpoints" / "last.ckpt"
    folder = smear_folder / "slideA"

    def infer(out, *overrides):
        run_inference(infer_cfg(trained_run, folder, out, "infer.overlays=false", *overrides, min_confidence=""), out)
        return json.loads((out / "run.json").read_text()), pd.read_csv(out / "counts.csv")

    settings, counts = infer(tmp_path / "trained")
    assert settings["min_confidence"] == 0.85 and "min_confidence from training run's eval" in settings["thresholds_from"]
    assert set(counts.min_confidence) == {0.85}

    def found(*overrides):  # cells found on the val split, as tools/evaluate.py scores them
        result = evaluate_checkpoint(compose(f"ckpt={ckpt}", "split=val", *overrides, config_name="checkpoint"),
                                     tmp_path / "ev")
        counts = [c for c in result.per_image if c.startswith("pred_") and not c.endswith("_share")]
        return int(result.per_image[counts].sum().sum())

    assert found() == found("eval.min_confidence=0.85") < found("eval.min_confidence=0.05")

    thresholds = ckpt.parent / "thresholds.json"
    try:
        evaluate_checkpoint(compose(f"ckpt={ckpt}", "split=val", "sweep=true", "eval.sweep_min_confidence=[0.2,0.4]",
                                    "eval.sweep_nms=[0.3]", config_name="checkpoint"), tmp_path / "sweep")
        best = json.loads(thresholds.read_text())
        assert best["split"] == "val" and best["min_confidence"] in (0.2, 0.4) and best["nms"] == 0.3
        settings, counts = infer(tmp_path / "swept")
        assert (settings["min_confidence"], settings["nms"]) == (best["min_confidence"], 0.3)
        assert "thresholds.json (best f1 on val)" in settings["thresholds_from"]
        assert set(counts.min_confidence) == {best["min_confidence"]}
        settings, counts = infer(tmp_path / "given", "eval.min_confidence=0.05")
        assert settings["min_confidence"] == 0.05 and "min_confidence from command line" in settings["thresholds_from"]
        assert settings["nms"] == 0.3 and set(counts.min_confidence) == {0.05}
    finally:
        thresholds.unlink(missing_ok=True)


def test_outputs_are_complete_and_consistent(trained_run, smear_folder, tmp_path):
    out = tmp_path / "out"
    # 256x192 images drawn as previews of 200 px, each with full-resolution crops of 128 px beside it
    big = ["infer.overlay_max_side=200", "infer.overlay_crop_side=128", "infer.overlay_crops=2"]
    summary = run_inference(infer_cfg(trained_run, smear_folder, out, *big), out)
    assert (summary.images, summary.processed, summary.skipped) == (9, 6, 0)
    errors = {r["image"]: r["error"] for r in read_csv(out / "errors.csv")}
    assert set(errors) == set(BAD)
    for name, reason in BAD.items():
        assert reason in errors[name] and str(smear_folder / name) in errors[name]

    counts = read_csv(out / "counts.csv")
    assert [r["image"] for r in counts] == sorted(GOOD, key=str)  # input order
    tiling = json.loads((out / "run.json").read_text())["tiling"]  # the trained scale, recorded at training
    assert tiling["input_cell_px"] == tiling["cell_px"] > 0 and tiling["network_px"] == 192
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
        assert float(row["cell_diameter_px"]) == pytest.approx(tiling["input_cell_px"], abs=0.01)  # predicted tiled
        overlay = RecordStore(out, smear_folder).overlay_path(row["image"])
        assert cv2.imread(str(overlay)).shape[1] == 200
        crops = sorted(overlay.parent.glob(f"{overlay.stem}.x*_y*{overlay.suffix}"))
        assert 0 < len(crops) <= 2 if len(mine) else not crops
        for crop in crops:
            x, y = map(int, re.fullmatch(r".*\.x(\d+)_y(\d+)\.(jpg|JPEG)", crop.name).groups()[:2])
            assert x in (0, 128) and y in (0, 64) and cv2.imread(str(crop)).shape[1] == 128  # full resolution
    assert (detections.score > 0.05).all()

    results = json.loads((out / "results_coco.json").read_text())
    assert len(results) == len(detections)
    assert [r["score"] for r in results] == pytest.approx(detections.score.tolist(), abs=1e-4)
    assert [mask_utils.area(r["segmentation"]) for r in results] == detections.area.tolist()
    assert {r["image_id"]: r["file_name"] for r in results} == {i: r["image"] for i, r in enumerate(counts, 1)
                                                                  if int(r["total"])}

    for row in counts:  # QuPath's GeoJSON: a detection per cell, its outline inside its box, class and score
        features = json.loads((out / "geojson" / f"{row['image']}.geojson").read_text())["features"]
        mine = detections[detections.image == row["image"]]
        assert [f["properties"]["classification"]["name"] for f in features] == mine["class"].tolist()
        assert [f["properties"]["measurements"]["score"] for f in features] == pytest.approx(mine.score.tolist())
        for feature, (_, det) in zip(features, mine.iterrows()):
            ring = np.array(feature["geometry"]["coordinates"][0])
            assert feature["properties"]["objectType"] == "detection" and (ring[0] == ring[-1]).all()
            # the mask's outline around its box (a pasted mask may pass the box by a pixel or two)
            assert (ring.min(axis=0) >= [det.x - 3, det.y - 3]).all()
            assert (ring.max(axis=0) <= [det.x + det.width + 3, det.y + det.height + 3]).all()

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

    with pytest.raises(ValueError, match="min_confidence 0.05 -> 0.3.*infer.overwrite=true"):
        run_inference(infer_cfg(trained_run, smear_folder, out, min_confidence="0.3"), out)
    summary = run_inference(infer_cfg(trained_run, smear_folder, out, "infer.overwrite=true", "infer.overlays=false",
                                      min_confidence="0.3"), out)
    assert (summary.processed, summary.skipped) == (7, 0)
    assert set(pd.read_csv(out / "counts.csv").min_confidence) == {0.3}
    assert (pd.read_csv(out / "detections.csv").score >= 0.3).all()  # above 0.3, written to 4 decimals


def test_tool_exit_status_and_output_folder(trained_run, smear_folder, tmp_path):
    ckpt = trained_run / "run" / "checkpoints" / "last.ckpt"
    tool = [sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={ckpt}", f"paths.output_dir={tmp_path}",
            "eval.min_confidence=0.05", "infer.num_workers=0"]
    done = subprocess.run(tool + [f"input={smear_folder / 'slideA'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # one output folder per input path: its name, then a hash of the path (two `images` folders differ)
    slide_out = tmp_path / "infer" / input_name(smear_folder / "slideA")
    assert re.fullmatch(r"slideA-[0-9a-f]{8}", slide_out.name) and input_name(tmp_path / "x" / "slideA") != slide_out.name
    assert f"results saved to {slide_out}\n" in done.stdout
    assert (slide_out / "counts.csv").is_file() and not (slide_out / ".hydra").exists()  # run.json holds the settings

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_text("nope")
    done = subprocess.run(tool + [f"input={only_bad}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no image could be processed" in done.stderr
    assert "x.jpg" in (tmp_path / "infer" / input_name(only_bad) / "errors.csv").read_text()
    done = subprocess.run(tool + [f"input={tmp_path / 'missing'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (hidden ones too) with its bytes, to show that nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_input_folder_with_the_same_names_is_refused_not_mixed(trained_run, tmp_path):
    """Issue 14, finding 1: /a/images and /b/images into one output folder used to report the first
    folder's results for the second's files of the same name."""
    images = trained_run / "data" / "images"
    first, second = tmp_path / "a" / "images", tmp_path / "b" / "images"
    for folder, source in ((first, "patient00_img000.jpg"), (second, "patient01_img004.jpg")):
        folder.mkdir(parents=True)
        (folder / "x.jpg").write_bytes((images / source).read_bytes())
    out = tmp_path / "out"
    run_inference(infer_cfg(trained_run, first, out, "infer.overlays=false"), out)
    before = snapshot(out)
    with pytest.raises(ValueError, match=f"input {first} -> {second}.*infer.overwrite=true"):
        run_inference(infer_cfg(trained_run, second, out, "infer.overlays=false"), out)
    assert snapshot(out) == before  # a refused run writes nothing
    run_inference(infer_cfg(trained_run, second, out, "infer.overlays=false", "infer.overwrite=true"), out)
    alone = tmp_path / "alone"
    run_inference(infer_cfg(trained_run, second, alone, "infer.overlays=false"), alone)
    assert (out / "counts.csv").read_bytes() == (alone / "counts.csv").read_bytes()
    assert (out / "detections.csv").read_bytes() == (alone / "detections.csv").read_bytes()


def test_a_changed_input_file_is_refused_and_a_touched_one_reused(trained_run, tmp_path):
    """Finding 1: a record counted as done whenever it existed; size and mtime were never compared."""
    images = trained_run / "data" / "images"
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        (folder / f"{k}.jpg").write_bytes((images / f"patient00_img00{k}.jpg").read_bytes())
    out = tmp_path / "out"
    run_inference(infer_cfg(trained_run, folder, out, "infer.overlays=false"), out)
    os.utime(folder / "0.jpg", ns=(1, 1))  # touched (or copied) but the same bytes: reused
    summary = run_inference(infer_cfg(trained_run, folder, out, "infer.overlays=false"), out)
    assert (summary.processed, summary.skipped) == (0, 2)
    (folder / "1.jpg").write_bytes((images / "patient01_img004.jpg").read_bytes())  # another picture, same name
    with pytest.raises(ValueError, match=r"1 input file\(s\) differ.*1\.jpg \(changed since its result was made\)"):
        run_inference(infer_cfg(trained_run, folder, out, "infer.overlays=false"), out)
    summary = run_inference(infer_cfg(trained_run, folder, out, "infer.overlays=false", "infer.overwrite=true"), out)
    assert summary.processed == 2


def test_a_retrained_checkpoint_at_the_same_path_is_another_model(trained_run, smear_folder, tmp_path):
    """Finding 1: the checkpoint was compared by path, so a retrained best.ckpt passed for the old one."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes((trained_run / "run" / "config.yaml").read_bytes())
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.write_bytes((trained_run / "run" / "checkpoints" / "last.ckpt").read_bytes())
    cfg = compose(f"ckpt={ckpt}", f"input={smear_folder / 'slideA'}", "infer.num_workers=0", "infer.overlays=false",
                  "eval.min_confidence=0.05", config_name="inference")
    out = tmp_path / "out"
    run_inference(cfg, out)
    retrained = torch.load(ckpt, map_location="cpu", weights_only=True)
    retrained["global_step"] += 1  # any change of content: another model for all we know
    torch.save(retrained, ckpt)
    with pytest.raises(ValueError, match="checkpoint_sha256 .* -> .*infer.overwrite=true"):
        run_inference(cfg, out)


def test_outputs_are_readable_by_others_and_an_empty_image_says_so(trained_run, tmp_path):
    """Finding 7: outputs written through mkstemp were 0600; an empty file was 'format not recognised'."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((trained_run / "data" / "images" / "patient00_img000.jpg").read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        run_inference(infer_cfg(trained_run, folder, out), out)
    finally:
        os.umask(old)
    for name in ("counts.csv", "run.json", "records/a.jpg.json", "overlays/a.jpg", "errors.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert "empty.jpg: file is empty" in (out / "errors.csv").read_text()


def test_a_refused_tool_run_writes_nothing_and_the_log_holds_the_run(trained_run, smear_folder, tmp_path):
    """Finding 7: the empty infer.log; a refused run rewrote the output folder's .hydra/ (here with
    hydra.output_subdir=null, which conf/inference.yaml should make the default: run.json holds the settings)."""
    ckpt = trained_run / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    tool = [sys.executable, str(REPO / "tools" / "infer.py"), f"ckpt={ckpt}", f"input={smear_folder / 'slideA'}",
            f"infer.out_dir={out}", "infer.num_workers=0", "infer.overlays=false", "hydra.output_subdir=null"]
    done = subprocess.run(tool + ["eval.min_confidence=0.05"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 images under" in (out / "infer.log").read_text()
    before = snapshot(out)
    done = subprocess.run(tool + ["eval.min_confidence=0.3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {out}: holds results made with other settings")
    assert "Traceback" not in done.stderr and snapshot(out) == before


def test_export_then_onnxruntime_inference_gives_the_torch_results(trained_run, smear_folder, tmp_path):
    """tools/export.py checks the graphs on the images before writing them; infer.backend=onnxruntime
    then gives the torch backend's counts and detections, and refuses graphs of another checkpoint."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes((trained_run / "run" / "config.yaml").read_bytes())
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes((trained_run / "run" / "checkpoints" / "last.ckpt").read_bytes())
    export = [sys.executable, str(REPO / "tools" / "export.py"), f"ckpt={ckpt}", f"input={smear_folder / 'slideA'}",
              "eval.min_confidence=0.05", f"paths.output_dir={tmp_path / 'logs'}"]
    done = subprocess.run(export, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((run / "checkpoints" / "last.onnx.json").read_text())
    assert (run / "checkpoints" / "last.onnx").is_file() and (run / "checkpoints" / "last.masks.onnx").is_file()
    checked = info["agreement"]["0.05"]
    assert checked["images"] == 2 and checked["same_count_and_classes"] == 2 and checked["detections"] > 0
    assert stat.S_IMODE((run / "checkpoints" / "last.onnx").stat().st_mode) == 0o644

    def infer(backend: str) -> Path:
        out = tmp_path / backend
        cfg = compose(f"ckpt={ckpt}", f"input={smear_folder / 'slideA'}", f"infer.out_dir={out}",
                      "infer.num_workers=0", "eval.min_confidence=0.05", "infer.overlays=false", "infer.report=false",
                      f"infer.backend={backend}", config_name="inference")
        run_inference(cfg, out)
        return out

    torch_out, onnx_out = infer("torch"), infer("onnxruntime")
    columns = ["image", "count_lymphoblast", "count_non_lymphoblast", "total"]
    assert pd.read_csv(torch_out / "counts.csv")[columns].equals(pd.read_csv(onnx_out / "counts.csv")[columns])
    by_torch, by_onnx = pd.read_csv(torch_out / "detections.csv"), pd.read_csv(onnx_out / "detections.csv")
    assert len(by_torch) > 10 and list(by_torch["class"]) == list(by_onnx["class"])
    assert np.allclose(by_torch.score, by_onnx.score, atol=1e-3)
    assert np.abs(by_torch.area - by_onnx.area).max() <= 0.02 * by_torch.area.max()
    assert json.loads((onnx_out / "run.json").read_text())["backend"] == "onnxruntime"

    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # another model at the same path
    with pytest.raises(ValueError, match="exported from another last.ckpt.*tools/export.py"):
        infer("onnxruntime")
