"""Files read by region (TIFF, scanner slides through OpenSlide), the pixel size they state, and the
full-resolution overlay crops beside a big image's preview."""

from __future__ import annotations

import pickle
import sys

import cv2
import numpy as np
import pytest
import tifffile

from leukodet.data.imageio import ImageReadError, SlideRegions, TiffRegions, open_regions
from leukodet.engine.inference.run import image_record, write_overlay_crops
from leukodet.engine.inference.store import RecordStore
from leukodet.engine.inference.writers import CountsCsv
from leukodet.engine.tiling import Tiling, TrainedScale, predict_tiled
from leukodet.preprocess.mapper import DatasetMapper
from leukodet.viz import busiest_windows
from test_tiling import POINT, SCALE, DiscDetector, smear

CM, INCH = "CENTIMETER", "INCH"


def field(width=600, height=400, n=25, seed=4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sample, _ = smear(width, height, [rng.uniform(20, [width - 20, height - 20]) for _ in range(n)])
    return sample["image"].numpy().transpose(1, 2, 0).copy()


@pytest.mark.parametrize("resolution, unit, expected", [
    ((1e4 / 0.25, 1e4 / 0.25), CM, 0.25),  # 40,000 px a centimetre
    ((25400 / 0.5, 25400 / 0.5), INCH, 0.5),
    ((72, 72), INCH, None),  # a writer's default, not a microscope's pixel
    ((1e4 / 3.45, 1e4 / 3.45), CM, None),  # a camera's sensor pitch, no objective applied
    ((4, 4), 5, 0.25),  # tifffile's micrometre unit (outside the TIFF standard)
    ((4, 4), "um", 0.25),  # ImageJ: 4 px a micrometre, its unit in its description
    ((4, 4), "\\u00B5m", 0.25),  # as ImageJ itself writes the micro sign
    ((2000, 2000), "mm", 0.5),
    ((4, 4), None, None),  # tags without a unit state no size
    (None, None, None),
])
def test_a_tiff_states_its_pixel_size_only_when_it_is_a_microscopes(tmp_path, resolution, unit, expected):
    path = tmp_path / "f.tif"
    if unit in (CM, INCH, 5) or resolution is None:
        extra = {} if resolution is None else {"resolution": resolution, "resolutionunit": unit}
        tifffile.imwrite(path, field(), tile=(128, 128), photometric="rgb", **extra)
    else:
        tifffile.imwrite(path, field(), imagej=True, resolution=resolution, metadata={"unit": unit} if unit else {})
    regions = TiffRegions.open(path)
    assert regions.um_per_px == (None if expected is None else pytest.approx(expected))
    lazy = DatasetMapper({"steps": []}).map_regions(path)
    assert lazy["record"]["um_per_px"] == regions.um_per_px  # tiling reads the file's scale from here
    assert DatasetMapper({"steps": []}).map_image(path)["record"]["um_per_px"] == regions.um_per_px  # read whole too


def test_a_tiff_read_whole_still_states_its_pixel_size(tmp_path):
    path = tmp_path / "float.tif"  # float pixels are stretched over the whole image, so it is read whole
    tifffile.imwrite(path, field()[..., 0].astype(np.float32), resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit=CM)
    assert TiffRegions.open(path) is None
    assert DatasetMapper({"steps": []}).map_image(path)["record"]["um_per_px"] == pytest.approx(0.25)
    png = tmp_path / "f.png"
    cv2.imwrite(str(png), field())
    assert DatasetMapper({"steps": []}).map_image(png)["record"]["um_per_px"] is None


def test_openslide_reads_a_slide_by_region_with_its_pixel_size(tmp_path):
    pytest.importorskip("openslide", reason="the optional slides extra (pip install 'leukodet[slides]') is absent")
    image = field()
    path = tmp_path / "slide.tif"  # OpenSlide's generic tiled TIFF: a scanner format it reads like the others
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit=CM)
    slide = SlideRegions.open(path)
    assert (slide.width, slide.height) == (600, 400) and slide.um_per_px == pytest.approx(0.25)
    assert np.array_equal(slide.read(250, 100, 500, 380), image[100:380, 250:500])
    assert np.array_equal(slide.read(-10, 390, 20, 450), image[390:400, 0:20])  # clipped to the slide
    assert np.array_equal(slide.read(5, 5, 6, 6), image[5:6, 5:6])  # one pixel (PIL's buffer is read-only)
    thumbnail, factor = slide.preview(150)  # from the slide's own levels
    assert thumbnail.shape == (100, 150, 3) and factor == pytest.approx(0.25)
    assert np.abs(thumbnail.astype(float).mean(axis=(0, 1)) - image.mean(axis=(0, 1))).max() < 3
    passed = pickle.loads(pickle.dumps(slide))  # a loader worker hands it over: reopened with OpenSlide
    assert isinstance(passed, SlideRegions) and np.array_equal(passed.read(0, 0, 50, 50), image[:50, :50])
    passed.close()
    passed.close()  # a second close (then __del__) does nothing: OpenSlide refuses to close twice
    renamed = tmp_path / "slide.svs"
    renamed.write_bytes(path.read_bytes())
    assert DatasetMapper({"steps": []}).map_regions(renamed)["regions"].regions.um_per_px == pytest.approx(0.25)
    with pytest.raises(ImageReadError, match="slide.svs: a slide is read by region, which a preprocessing 'scale'"):
        DatasetMapper({"steps": [{"name": "scale", "factor": 0.5}]}).map_regions(renamed)
    with pytest.raises(ImageReadError, match="OpenSlide cannot read it"):
        bad = tmp_path / "bad.svs"
        bad.write_bytes(b"not a slide")
        SlideRegions.open(bad)


class FakeSlide:
    """What OpenSlide gives for a slide whose left half was not scanned (transparent)."""

    dimensions = (40, 30)

    def __init__(self, background=None):
        self.properties = {"openslide.mpp-x": "0.11", **({"openslide.background-color": background} if background else {})}

    def read_region(self, location, level, size):
        rgba = np.full((size[1], size[0], 4), (90, 40, 120, 255), np.uint8)
        rgba[:, : size[0] // 2] = 0
        return rgba

    def close(self):
        pass


@pytest.mark.parametrize("background, fill", [(None, (255, 255, 255)), ("F0E0D0", (240, 224, 208))])
def test_a_slides_unscanned_glass_is_its_background_not_black(tmp_path, background, fill):
    slide = SlideRegions(tmp_path / "s.svs", FakeSlide(background))
    pixels = slide.read(0, 0, 40, 30)
    assert slide.um_per_px == pytest.approx(0.11)
    assert (pixels[:, :20] == fill).all() and (pixels[:, 20:] == (90, 40, 120)).all()


def test_a_slide_without_openslide_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now raises ImportError
    (tmp_path / "a.svs").write_bytes(b"II*\x00")
    with pytest.raises(ImageReadError, match=r"a.svs: a slide scanner file needs OpenSlide: pip install 'leukodet\[slides\]'"):
        open_regions(tmp_path / "a.svs")
    assert open_regions(tmp_path / "a.png") is None  # read whole


def test_busiest_windows_are_those_holding_the_most_cells():
    centres = [(50, 50), (60, 70), (80, 20), (150, 40), (290, 290)]  # 3 cells in the first window, 1, 1
    boxes = np.array([[x - 5, y - 5, x + 5, y + 5] for x, y in centres], np.float32)
    # ties go in reading order
    assert busiest_windows(boxes, 300, 300, 100, 2) == [(0, 0, 100, 100), (100, 0, 200, 100)]
    assert busiest_windows(boxes, 300, 300, 100, 9)[-1] == (200, 200, 300, 300)
    # 250 px: the last column and row move in to 150 so windows stay whole; (290, 290) is outside
    assert busiest_windows(boxes, 250, 250, 100, 9) == [(0, 0, 100, 100), (100, 0, 200, 100), (150, 0, 250, 100)]
    assert busiest_windows(boxes[:0], 300, 300, 100, 4) == [] and busiest_windows(boxes, 300, 300, 100, 0) == []
    assert busiest_windows(boxes[:1] - 35, 50, 40, 100, 1) == [(0, 0, 50, 40)]  # an image smaller than a crop is one crop
    with pytest.raises(ValueError, match="infer.overlay_crop_side > 0"):
        busiest_windows(boxes, 300, 300, 0, 4)


def test_overlay_crops_are_full_resolution_where_the_cells_are(tmp_path):
    image = field(1200, 900, n=60, seed=3)
    tifffile.imwrite(tmp_path / "field.tif", image, tile=(128, 128), photometric="rgb")
    cv2.imwrite(str(tmp_path / "field.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    mapper, colors = DatasetMapper({"steps": []}), [(255, 0, 0)]
    written = {}
    for name, sample in (("tif", mapper.map_regions(tmp_path / "field.tif")), ("png", mapper.map_image(tmp_path / "field.png"))):
        prediction = predict_tiled(DiscDetector(), sample, SCALE, POINT)
        assert len(prediction) > 40
        written[name] = write_overlay_crops(tmp_path / "overlays" / f"field.{name}.jpg", sample, prediction, ["cell"],
                                            colors, count=3, side=256)
    windows = busiest_windows(prediction.boxes, 1200, 900, 256, 3)
    assert [p.name for p in written["png"]] == [f"field.png.x{x}_y{y}.jpg" for x, y, _, _ in windows]
    # read by region or read whole, the same crops
    assert [p.read_bytes() for p in written["tif"]] == [p.read_bytes() for p in written["png"]]
    for path, (x0, y0, x1, y1) in zip(written["png"], windows):
        crop = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert crop.shape[1] == 256 and crop.shape[0] > 256  # full resolution, with the legend strip below
        inside = [(b[0] + b[2]) / 2 - x0 for b in prediction.boxes], [(b[1] + b[3]) / 2 - y0 for b in prediction.boxes]
        for cx, cy in zip(*inside):
            if 0 <= cx < 256 and 0 <= cy < 256:  # a cell's centre is tinted with its class colour
                tinted = 0.6 * image[int(y0 + cy), int(x0 + cx)] + 0.4 * np.array(colors[0])
                assert np.abs(crop[int(cy), int(cx)].astype(float) - tinted).max() < 12
        empty = np.all(image[y0:y1, x0:x1] == 230, axis=2)  # background is left as it was
        assert np.abs(crop[:256][empty].astype(float) - 230).mean() < 3


def test_each_image_is_counted_at_the_scale_its_file_states(tmp_path):
    trained = TrainedScale(cell_px=60, network_cell_px=40, network_px=256, source_cell_px={"d1.json": 60}, cell_um=9.0)
    tiling = Tiling(trained)
    rows = []
    for name, record in (("plain.png", {}), ("stated.tif", {"um_per_px": 0.25}), ("known.png", {"source": "d1.json"})):
        sample = {"orig_width": 100, "orig_height": 80, "file_identity": {}, "record": record}
        rows.append(image_record(name, tmp_path / name, sample, predict_tiled(DiscDetector(), smear(100, 80, [])[0],
                                                                                SCALE, POINT), ["cell"], 0.1, tiling))
    assert [r["cell_diameter_px"] for r in rows] == [60, 36, 60]  # 9 um at 0.25 um/px is 36 px
    assert tiling.stated_scale({"um_per_px": 0.25}) == ", at the file's 0.25 um/px: cells 36 px"
    assert tiling.stated_scale({}) == "" and Tiling(trained, input_cell_px=50).stated_scale({"um_per_px": 0.25}) == ""
    from leukodet.structures import describe_tiling  # the report's "scale" line

    assert "input cells 60.0 px, trained cells 60.0 px, 9 um (40.0 px" in describe_tiling(tiling.as_dict())
    assert "input cells 36.0 px (at 0.25 um/px)" in describe_tiling(Tiling(trained, input_um_per_px=0.25).as_dict())
    settings = {"tiling": tiling.as_dict(), "class_bias": None, "min_confidence": 0.5, "nms": 0.5, "model": "m"}
    with CountsCsv(tmp_path / "counts.csv", ["cell"], None, settings) as counts:
        for i, row in enumerate(rows):
            counts.add(i, row)
    written = [float(line.rsplit(",", 1)[1]) for line in (tmp_path / "counts.csv").read_text().splitlines()[1:]]
    assert written == [60, 36, 60]


def test_a_forgotten_image_loses_its_overlay_crops_too(tmp_path):
    store = RecordStore(tmp_path / "out", tmp_path)
    overlay = store.overlay_path("sub/a.png")
    overlay.parent.mkdir(parents=True)
    for name in ("a.png.jpg", "a.png.x0_y0.jpg", "a.png.x1024_y0.jpg", "a.png.xnotes.jpg", "ab.png.x0_y0.jpg"):
        (overlay.parent / name).write_bytes(b"x")
    assert [p.name for p in store.overlay_crops("sub/a.png")] == ["a.png.x0_y0.jpg", "a.png.x1024_y0.jpg"]
    store.forget("sub/a.png")
    assert sorted(p.name for p in overlay.parent.iterdir()) == ["a.png.xnotes.jpg", "ab.png.x0_y0.jpg"]
