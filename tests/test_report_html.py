"""report.html for a training run and for folder inference, opened in headless Chromium: no console
errors, every image loads, the tables hold the numbers of the CSV files, flags are shown; plus a
10,000-image inference page that stays small and shows one page of rows at a time.

Screenshots of both pages go to $LEUKODET_REPORT_SHOTS (default: <tmp>/leukodet_report_shots).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import compose, write_image
from headless_chromium import Chromium, find_chromium
from test_infer import trained_run  # noqa: F401  (the 6-step detector fixture, shared)

from leukodet.report import write_gallery, write_inference_report
from leukodet.report.html import THUMBS_DIR
from leukodet.structures import ImagePredictions

SHOTS = Path(os.environ.get("LEUKODET_REPORT_SHOTS", Path(tempfile.gettempdir()) / "leukodet_report_shots"))
# the 6-step detector scores most of its guesses between 0.1 and 0.3: at 0.1 there are FP and FN to mark
MIN_CONFIDENCE = 0.1

ROWS_OF = ("table => Array.from(document.querySelectorAll(table + ' tbody tr'), "
           "tr => Array.from(tr.cells, td => td.textContent.replace(/\\s+/g, ' ').trim()))")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def shown(text: str) -> str:
    """A CSV number as the pages print it: integers as they are, decimals to 4 places, "-" for none."""
    if text in ("", "nan"):
        return "-"
    value = float(text)
    if math.isnan(value):
        return "-"
    return text if value.is_integer() and "." not in text else f"{value:.4f}"


def rows_of(page, table: str) -> list[list[str]]:
    return page.evaluate(f"({ROWS_OF})({json.dumps(table)})")


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; or set LEUKODET_CHROMIUM): "
                    "the pages cannot be opened in a browser here")
    chromium = Chromium(binary)
    yield chromium
    chromium.close()


def open_checked(browser, report: Path):
    """The page, after checking it loaded every image and logged no error."""
    page = browser.open(report.as_uri())
    images = page.load_every_image()
    assert images and [i["src"] for i in images if not i["loaded"]] == []
    assert page.console_errors() == []
    return page


@pytest.fixture(scope="module")
def evaluated_run(trained_run):  # noqa: F811
    """tools/evaluate.py's route on the run's val split (the 16-image sample leaves test empty): a
    threshold sweep, then scoring at min confidence 0.1, which draws the gallery from the records
    and predictions it scores and writes the run's report beside the metrics."""
    from leukodet.engine.evaluate import evaluate_checkpoint

    run = trained_run / "run"
    checkpoint = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    evaluate_checkpoint(compose(checkpoint, "split=val", "sweep=true", config_name="checkpoint"), run)
    evaluate_checkpoint(compose(checkpoint, "split=val", f"eval.min_confidence={MIN_CONFIDENCE}",
                                config_name="checkpoint"), run)
    return run / "report.html"


@pytest.fixture(scope="module")
def inferred_folder(trained_run, tmp_path_factory):  # noqa: F811
    """Inference over two images per patient, one folder per patient, plus a file that fails."""
    from leukodet.engine.inference import run_inference

    folder = tmp_path_factory.mktemp("report_smears")
    for image in sorted((trained_run / "data" / "images").glob("*.jpg")):
        patient = folder / image.name.split("_")[0]
        patient.mkdir(exist_ok=True)
        if len(list(patient.iterdir())) < 2:
            shutil.copy(image, patient / image.name)
    (folder / "patient03" / "broken.jpg").write_text("not an image")
    out = folder.parent / f"{folder.name}_out"
    run_inference(compose(f"ckpt={trained_run / 'run' / 'checkpoints' / 'last.ckpt'}", f"input={folder}",
                          f"infer.out_dir={out}", f"eval.min_confidence={MIN_CONFIDENCE}", "infer.num_workers=0",
                          config_name="inference"), out)
    return out / "report.html"  # written by the run


def test_gallery_marks_add_up_to_the_metrics_and_come_worst_first(evaluated_run):
    run = evaluated_run.parent
    gallery = read_csv(run / "val_gallery" / "gallery.csv")
    overall = {r["class"]: r for r in read_csv(run / "val_metrics.csv")}["all"]
    assert sum(int(r["n_fp"]) for r in gallery) == int(overall["fp"])
    assert sum(int(r["n_fn"]) for r in gallery) == int(overall["fn"])
    assert int(overall["fp"]) > 0 and int(overall["fn"]) > 0  # both kinds of mark are drawn
    errors = [abs(int(r["count_error"])) for r in gallery]
    assert errors == sorted(errors, reverse=True)
    counts = {Path(r["image"]).name: r for r in read_csv(run / "val_counts_per_image.csv")}
    for row in gallery:
        truth = counts[row["image"]]
        assert int(row["true_count"]) == int(truth["true_lymphoblast"]) + int(truth["true_non_lymphoblast"])
        assert int(row["predicted_count"]) == int(truth["pred_lymphoblast"]) + int(truth["pred_non_lymphoblast"])
        thumbnail = cv2.imread(str(run / "val_gallery" / row["thumbnail"]))
        assert thumbnail is not None and thumbnail.shape[1] <= 480
        assert (run / "val_gallery" / row["full"]).is_file()


def test_gallery_of_box_only_data_with_count_only_points(tmp_path):
    """A box matched with another class is an FP and an FN; a box holding a count-only point of its
    class is a TP; a box on nothing is an FP."""
    record = {"file_name": str(write_image(tmp_path / "field.png", 80, 60)), "height": 60, "width": 80,
              "image_id": 1, "box_only": True, "points": [{"xy": [60.0, 40.0], "category_id": 1}],
              "annotations": [{"bbox": [10.0, 10.0, 20.0, 20.0], "category_id": 0}]}
    prediction = ImagePredictions(np.array([[10, 10, 30, 30], [52, 32, 68, 48], [40, 2, 50, 12]], np.float32),
                                  np.array([0.9, 0.8, 0.7], np.float32), np.array([1, 1, 0]), None)
    gallery = write_gallery([record], [prediction], ["a", "b"], 0.5, 0.5, tmp_path / "gallery")
    [row] = read_csv(gallery)
    assert (row["true_count"], row["predicted_count"], row["count_error"]) == ("2", "3", "1")
    assert (row["n_fp"], row["n_fn"], row["iou_type"]) == ("2", "1", "bbox")
    assert cv2.imread(str(gallery.parent / row["full"])).shape[1] > 2 * 80


def test_run_report_in_chromium(browser, evaluated_run):
    run = evaluated_run.parent
    assert re.search(r'(src|href)="(https?:)?//', evaluated_run.read_text()) is None  # nothing from outside
    page = open_checked(browser, evaluated_run)

    metrics = read_csv(run / "val_metrics.csv")
    assert rows_of(page, "table.metrics") == [[r["class"], *(shown(r[c]) for c in list(r)[1:])] for r in metrics]
    counts = rows_of(page, "table.counts")
    assert counts == [[r["class"], shown(r["count_mae"]), shown(r["count_bias"])] for r in metrics]

    gallery = read_csv(run / "val_gallery" / "gallery.csv")
    assert [row[:7] for row in rows_of(page, "#gallery-table")] == [
        [r["image"], r["true_count"], r["predicted_count"], r["count_error"], str(abs(int(r["count_error"]))),
         r["n_fp"], r["n_fn"]] for r in gallery]
    sources = page.evaluate("Array.from(document.images, img => img.getAttribute('src'))")
    for figure in ("loss_curves.png", "val_confusion.png", "val_pr_curves.png", "sweep_val_f1.png"):
        assert figure in sources
    assert sum(s.startswith("val_gallery/thumbs/") for s in sources) == len(gallery)
    page.screenshot(SHOTS / "run_report.png")


def test_inference_report_in_chromium(browser, inferred_folder):
    out = inferred_folder.parent
    page = open_checked(browser, inferred_folder)

    counts = read_csv(out / "counts.csv")
    shown_rows = rows_of(page, "#image-table")
    assert len(shown_rows) == len(counts) == 8
    folders = {r["folder"]: r for r in read_csv(out / "folders.csv")}
    for row, expected in zip(shown_rows, counts):
        flagged = folders[Path(expected["image"]).parent.as_posix()]["share_above_0.2"] == "yes"
        assert row[:6] == [expected["image"], "flagged" if flagged else "",
                           *(shown(expected[c]) for c in ("count_lymphoblast", "count_non_lymphoblast", "total",
                                                            "lymphoblast_share"))]
    links = page.evaluate("Array.from(document.querySelectorAll('#image-table td.picture a'), "
                          "a => a.getAttribute('href'))")
    assert len(links) == len(counts) and all((out / link).is_file() for link in links)

    folder_rows = rows_of(page, "table.folders")
    assert [r[0] for r in folder_rows] == list(folders)
    assert any(r["share_above_0.2"] == "yes" for r in folders.values())
    for row in folder_rows:
        if folders[row[0]]["share_above_0.2"] == "yes":
            assert row[-1] == "share above 0.2 research aid, not a diagnosis"
        else:
            assert row[-1] == ""
        assert row[5] == shown(folders[row[0]]["lymphoblast_share"])
    errors = rows_of(page, "table.error-list")
    assert [r[0] for r in errors] == ["patient03/broken.jpg"] and "not an image" in errors[0][1]
    tiling = json.loads((out / "run.json").read_text())["tiling"]  # the scale predicted at, in words
    assert f"input cells {tiling['input_cell_px']:.1f} px" in page.evaluate("document.body.innerText")
    page.screenshot(SHOTS / "inference_report.png")


def fake_inference_folder(out: Path, images: int, per_folder: int = 50) -> list[dict]:
    """An inference output as tools/infer.py leaves it, for ``images`` images, without a model:
    folders alternate between a lymphoblast share of ~0.5 (flagged) and ~0.1; the first three
    images have overlays; one image name holds HTML."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({
        "checkpoint": "/runs/x/checkpoints/best.ckpt", "model": "maskrcnn_effnet_lite0",
        "classes": ["lymphoblast", "non_lymphoblast"], "min_confidence": 0.5, "nms": 0.5, "max_detections": 300,
        "thresholds_from": "the training run's eval config", "input": "/slides"}))
    rows, folders = [], {}
    for i in range(images):
        folder = f"p{i // per_folder:03d}"
        name = "<i>odd & 'name'.jpg" if i == 3 else f"img{i:05d}.jpg"
        total = int(rng.integers(20, 60))
        blasts = total // 2 if (i // per_folder) % 2 == 0 else total // 10
        rows.append({"image": f"{folder}/{name}", "width": 512, "height": 384, "count_lymphoblast": blasts,
                     "count_non_lymphoblast": total - blasts, "total": total,
                     "lymphoblast_share": f"{blasts / total:.4f}", "min_confidence": 0.5, "nms": 0.5,
                     "model": "maskrcnn_effnet_lite0"})
        sums = folders.setdefault(folder, [0, 0, 0])
        sums[0], sums[1], sums[2] = sums[0] + 1, sums[1] + blasts, sums[2] + total
    write_rows(out / "counts.csv", rows)
    write_rows(out / "folders.csv", [
        {"folder": f, "images": n, "count_lymphoblast": b, "count_non_lymphoblast": t - b, "total": t,
         "lymphoblast_share": f"{b / t:.4f}", "share_above_0.2": "yes" if b / t > 0.2 else "no",
         "note": "lymphoblast share above 20%: research aid, not a diagnosis" if b / t > 0.2 else ""}
        for f, (n, b, t) in folders.items()])
    write_rows(out / "errors.csv", [{"image": "p001/bad.jpg", "error": "ImageReadError: not an image file"}])
    for row in rows[:3]:
        overlay = out / "overlays" / row["image"]
        overlay.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(overlay), np.full((384, 512, 3), 200, np.uint8))
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_inference_report_for_10000_images_is_small_and_paged(browser, tmp_path):
    out = tmp_path / "infer"
    rows = fake_inference_folder(out, 10_000)
    report = write_inference_report(out)
    assert report.stat().st_size < 800_000
    thumbnails = sorted((out / THUMBS_DIR).rglob("*.jpg"))
    assert len(thumbnails) == 3
    made = [t.stat().st_mtime_ns for t in thumbnails]
    write_inference_report(out)
    assert [t.stat().st_mtime_ns for t in thumbnails] == made  # made once

    page = open_checked(browser, report)
    position = "document.querySelector('#image-table .position').textContent"
    assert page.evaluate(position) == "page 1 of 200 (10000 rows)"
    shown_rows = rows_of(page, "#image-table")
    assert len(shown_rows) == 50 and page.evaluate("document.querySelectorAll('#image-table img').length") == 3
    assert shown_rows[3][0] == "p000/<i>odd & 'name'.jpg"  # shown as text, never as markup
    assert page.evaluate("document.querySelectorAll('#image-table tbody i').length") == 0

    page.evaluate("document.querySelector('#image-table .next').click()")
    assert page.evaluate(position) == "page 2 of 200 (10000 rows)"
    assert rows_of(page, "#image-table")[0][0] == rows[50]["image"]

    page.evaluate("""(() => { const select = document.querySelector('#image-table select.filter');
                              select.value = 'yes'; select.dispatchEvent(new Event('change')); })()""")
    assert page.evaluate(position) == "page 1 of 100 (5000 rows)"
    assert {row[1] for row in rows_of(page, "#image-table")} == {"flagged"}

    page.evaluate("document.querySelector('#image-table th[data-key=total] button').click()")
    flagged_totals = [r["total"] for r in rows if int(r["image"][1:4]) % 2 == 0]
    assert int(rows_of(page, "#image-table")[0][4]) == min(flagged_totals)
    assert page.console_errors() == []
