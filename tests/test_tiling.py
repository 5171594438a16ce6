"""Tiled whole-field prediction: grid, seam merge, masks by region, small images, the scale warning.

The detector here finds dark discs on a light background by connected components, so it reports
the piece of a disc cut by a tile edge as a detection of its own, as a real detector does: the
merge has to drop those pieces and keep each disc once, whole.
"""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from leukodet.engine.predictor import predict_original
from leukodet.engine.tiling import (TileGrid, TileScale, TrainedScale, Tiling, measure_trained_scale, merge_tiles,
                                    predict_tiled, run_tiling, seam_survivors, scale_warning)
from leukodet.data.via_export import mask_polygon
from leukodet.structures import ImagePredictions, OperatingPoint, crop_rle, mask_box, region_rle

DIAMETER = 30
POINT = OperatingPoint(0.5, 0.5, 300)


class DiscDetector:
    """Every connected dark blob of a tile is a detection (box, mask, score from its size)."""

    device = torch.device("cpu")

    def __init__(self):
        self.tile_shapes = []

    def predict(self, batch, prefilter):
        from leukodet.structures import Detections

        out = []
        for sample in batch:
            image = sample["image"].numpy()
            self.tile_shapes.append(tuple(image.shape[-2:]))
            dark = (image[0] < 128).astype(np.uint8)
            count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=4)
            boxes, masks = [], []
            for k in range(1, count):
                x, y, w, h, _ = stats[k]
                boxes.append([x, y, x + w, y + h])
                masks.append(labels == k)
            height, width = image.shape[-2:]
            out.append(Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                  torch.full((len(boxes),), 0.9), torch.zeros(len(boxes), dtype=torch.int64),
                                  torch.from_numpy(np.array(masks, bool).reshape(-1, height, width))))
        return out


def smear(width: int, height: int, centres) -> tuple[dict, list[np.ndarray]]:
    """A light field with dark discs at ``centres``: the mapper sample and each disc's true mask."""
    image = np.full((height, width, 3), 230, np.uint8)
    truths = []
    for cx, cy in centres:
        disc = np.zeros((height, width), np.uint8)
        cv2.circle(disc, (int(cx), int(cy)), DIAMETER // 2, 1, -1)
        image[disc.astype(bool)] = 60
        truths.append(disc.astype(bool))
    sample = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "file_name": "smear.png", "scale": (1.0, 1.0),
              "orig_width": width, "orig_height": height}
    return sample, truths


SCALE = TileScale(input_cell_px=DIAMETER, trained_cell_px=DIAMETER, network_px=128)  # tiles of 128 px, 38 px overlap


def matched(prediction, truths) -> list[float]:
    """The best mask IoU of each true disc among the predictions."""
    masks = [mask_utils.decode(r).astype(bool) for r in prediction.rles]
    return [max((np.logical_and(m, t).sum() / np.logical_or(m, t).sum() for m in masks), default=0.0) for t in truths]


def test_grid_cores_partition_the_image_and_overlap_at_least_as_asked():
    grid = TileGrid(128, 38)
    for length in (50, 128, 129, 300, 1000, 4097):
        cores = grid.cores(length)
        assert cores[0][2] == 0 and cores[-1][3] == length
        assert all(a[3] == b[2] for a, b in zip(cores, cores[1:]))  # no gap, no overlap between cores
        assert all(end - start == min(128, length) for start, end, _, _ in cores)
        assert all(a[1] - b[0] >= 38 for a, b in zip(cores, cores[1:]))
        # a point of a core is at least half the overlap inside its tile: a cell centred there is whole
        assert all(low - start >= 19 or start == 0 for start, _, low, _ in cores)


def test_seam_check_drops_only_the_weaker_of_two_tiles_views_of_one_cell():
    boxes = np.array([[100, 100, 130, 130], [102, 101, 131, 131],  # one cell seen by tiles 0 and 1
                      [200, 100, 230, 130], [201, 100, 231, 130],  # two raw candidates of one tile: kept
                      [400, 400, 430, 430], [1000, 50, 1060, 110]], np.float32)
    scores = np.array([0.6, 0.9, 0.8, 0.7, 0.5, 0.4], np.float32)
    tiles = np.array([0, 1, 2, 2, 3, 4])
    assert sorted(seam_survivors(boxes, scores, tiles).tolist()) == [1, 2, 3, 4, 5]


def test_a_cell_on_a_seam_is_kept_once_and_whole():
    grid = SCALE.grid()
    seam = (grid.tiles(300, 128)[0][1][2])  # the x where the first tile's core ends
    sample, truths = smear(300, 128, [(seam, 64)])
    detector = DiscDetector()
    prediction = predict_tiled(detector, sample, SCALE, POINT)
    assert len(prediction) == 1
    assert matched(prediction, truths)[0] == 1.0
    assert sum(len(d) for d in detector.predict([{**sample, "image": sample["image"][:, :, :128]}], POINT)) == 1


class BlindInFirstTile(DiscDetector):
    """Finds nothing in the first tile it is shown: the cell it owns must come from a neighbour."""

    def predict(self, batch, prefilter):
        out = super().predict(batch, prefilter)
        if len(self.tile_shapes) == len(batch):  # the first batch holds the first tile
            from leukodet.structures import Detections

            out[0] = Detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                                torch.zeros((0, *batch[0]["image"].shape[-2:]), dtype=torch.bool))
        return out


def test_a_cell_its_own_tile_misses_is_kept_whole_from_a_neighbour_and_pieces_never():
    grid = SCALE.grid()
    (tile, core), _ = grid.tiles(300, 128)[:2]
    owned = (core[2] - 2, 64)  # in the first tile's core (up to x 107), whole in the second (from x 86) too
    cut = (tile[2] - 5, 30)  # cut by the first tile's right edge, owned by the second tile
    sample, truths = smear(300, 128, [owned])
    prediction = predict_tiled(BlindInFirstTile(), sample, SCALE, POINT, batch_size=1)
    assert len(prediction) == 1 and matched(prediction, truths)[0] == 1.0
    sample, truths = smear(300, 128, [owned, cut])
    prediction = predict_tiled(DiscDetector(), sample, SCALE, POINT, batch_size=1)
    assert len(prediction) == 2 and min(matched(prediction, truths)) == 1.0  # each once, whole


@pytest.mark.parametrize("scores", [(0.9, 0.95), (0.95, 0.9)])
def test_a_cell_both_tiles_see_cut_with_its_centre_in_the_others_core_is_kept_once(scores):
    # a cell wider than the overlap, cut by 1-2 px in either tile (seen in a 400-field mosaic): by
    # its own box centre each view belonged to the other tile, and both were dropped
    windows, cores = [(0, 0, 150, 120), (50, 0, 200, 120)], [(0, 0, 100, 120), (100, 0, 200, 120)]
    views = [np.array([[52, 10, 150, 110]], np.float32), np.array([[50, 10, 148, 110]], np.float32)]
    parts = [ImagePredictions(box, np.array([score], np.float32), np.zeros(1, np.int64), None)
             for box, score in zip(views, scores)]
    merged = merge_tiles(parts, cores, windows, (200, 120))
    best = int(np.argmax(scores))  # its centre lies in the other tile's core: that tile's view is kept
    assert len(merged) == 1 and merged.boxes[0].tolist() == views[1 - best][0].tolist()


def test_a_cell_on_the_corner_of_four_tiles_is_kept_once_and_whole():
    grid = SCALE.grid()
    (_, core) = grid.tiles(300, 300)[0]
    sample, truths = smear(300, 300, [(core[2], core[3])])
    prediction = predict_tiled(DiscDetector(), sample, SCALE, POINT)
    assert len(prediction) == 1 and matched(prediction, truths)[0] == 1.0


def test_a_field_of_many_cells_counts_each_once_with_its_whole_mask():
    rng = np.random.default_rng(0)
    centres = []
    while len(centres) < 120:  # discs at least 6 px apart, anywhere, seams and corners included
        c = rng.uniform(DIAMETER / 2 + 1, [900 - DIAMETER / 2 - 1, 700 - DIAMETER / 2 - 1])
        if all(np.hypot(*(c - d)) > DIAMETER + 6 for d in centres):
            centres.append(c)
    sample, truths = smear(900, 700, centres)
    detector = DiscDetector()
    prediction = predict_tiled(detector, sample, SCALE, POINT)
    assert len(prediction) == len(truths)  # none counted twice, none lost
    assert min(matched(prediction, truths)) == 1.0  # and never split
    assert set(detector.tile_shapes) == {(128, 128)}  # every tile reaches the detector at the trained scale
    untiled = predict_original(detector, [sample], POINT)[0]
    assert len(untiled) == len(truths)  # this detector needs no tiles; a network does (see the module doc)


def test_an_image_smaller_than_a_tile_is_one_padded_tile():
    sample, truths = smear(90, 60, [(45, 30)])
    detector = DiscDetector()
    prediction = predict_tiled(detector, sample, SCALE, POINT)
    assert detector.tile_shapes == [(128, 128)]  # padded, not resized: the scale stays the trained one
    assert len(prediction) == 1 and matched(prediction, truths)[0] == 1.0
    assert prediction.rles[0]["size"] == [60, 90]


def test_a_big_tiff_is_read_by_region_and_predicted_as_if_read_whole(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    from leukodet.data.imageio import TiffRegions
    from leukodet.preprocess.mapper import DatasetMapper

    rng = np.random.default_rng(3)
    centres = [rng.uniform(20, [1180, 880]) for _ in range(60)]
    sample, _ = smear(1200, 900, centres)
    path = tmp_path / "field.tif"
    tifffile.imwrite(path, sample["image"].numpy().transpose(1, 2, 0), tile=(128, 128), compression="zlib",
                     photometric="rgb")
    areas = []
    read = TiffRegions.read
    monkeypatch.setattr(TiffRegions, "read", lambda self, *box: areas.append(np.prod(read(self, *box).shape[:2]))
                        or read(self, *box))
    mapper = DatasetMapper({"steps": [{"name": "scale", "factor": 1.0}, {"name": "bilateral"}]})
    lazy = mapper.map_regions(path)
    assert lazy["image"] is None and (lazy["orig_width"], lazy["orig_height"]) == (1200, 900)
    by_region = predict_tiled(DiscDetector(), lazy, SCALE, POINT)
    whole = predict_tiled(DiscDetector(), mapper.map_image(path), SCALE, POINT)
    assert len(by_region) == len(whole) > 40
    assert np.array_equal(by_region.boxes, whole.boxes)
    assert max(areas) <= (128 + 2 * 16) ** 2 and len(areas) == len(SCALE.grid().tiles(1200, 900))
    passed = pickle.loads(pickle.dumps(lazy["regions"]))  # as a loader worker hands it over: reopened
    assert torch.equal(passed.tile(100, 50, 300, 200), lazy["regions"].tile(100, 50, 300, 200))
    assert DatasetMapper({"steps": [{"name": "scale", "factor": 0.5}]}).map_regions(path) is None  # read whole
    assert mapper.map_regions(tmp_path / "missing.png") is None


def test_tiles_follow_the_input_scale_and_masks_return_to_file_pixels():
    sample, truths = smear(400, 200, [(100, 100), (250, 90)])
    sample = {**sample, "image": torch.nn.functional.interpolate(sample["image"][None].float(), scale_factor=0.5,
                                                                 mode="nearest")[0].to(torch.uint8), "scale": (0.5, 0.5)}
    tiling = Tiling(TrainedScale(cell_px=DIAMETER, network_cell_px=DIAMETER / 2, network_px=64), DIAMETER)
    detector = DiscDetector()
    prediction = predict_original(detector, [sample], POINT, tiling)[0]
    assert set(detector.tile_shapes) == {(64, 64)}
    assert len(prediction) == 2 and min(matched(prediction, truths)) > 0.85  # nearest-neighbour 2x upsampling
    assert prediction.rles[0]["size"] == [200, 400]


def test_region_rle_equals_pycocotools_encoding_of_the_whole_canvas():
    rng = np.random.default_rng(1)
    for _ in range(100):
        height, width = rng.integers(5, 50, 2)
        crop = rng.random(rng.integers(1, 20, 2)) > 0.5
        x0, y0 = rng.integers(-10, 50, 2)
        canvas = np.zeros((height, width), np.uint8)
        ys, xs = np.nonzero(crop)
        ys, xs = ys + y0, xs + x0
        inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        canvas[ys[inside], xs[inside]] = 1
        assert region_rle(crop, x0, y0, height, width)["counts"] == mask_utils.encode(np.asfortranarray(canvas))["counts"]


def test_crop_rle_reads_a_mask_back_by_region():
    rng = np.random.default_rng(2)
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(1, 60, 2))
        canvas = np.asfortranarray((rng.random((height, width)) > rng.random()).astype(np.uint8))
        rle = mask_utils.encode(canvas)
        x0, x1 = sorted(int(v) for v in rng.integers(-5, width + 5, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(-5, height + 5, 2))
        crop = crop_rle(rle, (x0, y0, x1, y1))
        assert np.array_equal(crop, canvas[max(y0, 0):max(min(y1, height), 0), max(x0, 0):max(min(x1, width), 0)] > 0)
    disc = np.zeros((300, 400), np.uint8)
    cv2.circle(disc, (390, 150), 30, 1, -1)  # cut by the image's right edge
    rle = mask_utils.encode(np.asfortranarray(disc))
    box = mask_box(rle)
    outline = mask_polygon(crop_rle(rle, box)) + [max(box[0], 0), max(box[1], 0)]
    assert np.array_equal(outline, mask_polygon(disc))  # inference's outlines, read by region


def test_cells_far_from_the_trained_size_warn_of_a_wrong_scale():
    sample, _ = smear(200, 200, [(60, 60), (140, 140)])
    prediction = predict_tiled(DiscDetector(), sample, SCALE, POINT)
    assert scale_warning(prediction, expected_px=DIAMETER) is None
    warning = scale_warning(prediction, expected_px=DIAMETER * 2.5)
    assert "wrong scale" in warning and "infer.cell_diameter_px" in warning
    many = prediction.select(np.zeros(300, np.int64))  # over 255 masks: pycocotools' area alone overflows
    assert scale_warning(many, expected_px=DIAMETER) is None


def test_trained_scale_is_the_cells_median_diameter_as_the_network_saw_it():
    disc = {"bbox": [0, 0, 40, 40], "area": np.pi * 20 ** 2, "segmentation": [[0, 0, 1, 1, 2, 0]]}
    records = [{"width": 200, "height": 100, "annotations": [disc]}, {"width": 400, "height": 400, "annotations": [disc]}]
    scale = TrainedScale.measure(records, {"steps": [{"name": "scale", "factor": 1.0}]}, min_size=200, max_size=400)
    # the first image is resized by min(200/100, 400/200) = 2 (cell 80 px), the second by 0.5 (20 px)
    assert scale.cell_px == pytest.approx(40) and scale.network_cell_px == pytest.approx(50)
    assert scale.network_px == 200 and not scale.fixed


def test_a_model_that_sees_its_inputs_unresized_gets_tiles_resized_to_its_training_scale():
    from conftest import compose

    disc = {"bbox": [0, 0, 40, 40], "area": np.pi * 20 ** 2, "segmentation": [[0, 0, 1, 1, 2, 0]]}
    records = [{"width": 300, "height": 200, "annotations": [disc]}, {"width": 300, "height": 300, "annotations": [disc]}]
    d2 = measure_trained_scale(compose("model=d2_mask_rcnn_R_50_FPN_3x"), records)  # detectron2: no resize rule
    assert not d2.network_resizes and d2.network_cell_px == pytest.approx(40)  # cells as it saw them
    assert d2.network_px == 250  # its training images' median short side
    assert TrainedScale(**d2.as_dict()) == d2 and d2.as_dict()["network_resizes"] is False
    assert Tiling(d2).for_sample({"scale": (1.0, 1.0)}).grid().tile == 250  # the same scale: tiles as trained
    before = {"cell_px": 40, "network_cell_px": 106.67, "network_px": 800}  # saved before network_resizes
    cfg = compose("model=d2_mask_rcnn_R_50_FPN_3x")
    assert run_tiling(cfg, before, lambda: records).trained == d2  # measured again, as it sees its inputs
    assert run_tiling(compose(), before).trained.network_resizes  # a torchvision model's stands

    # cells twice the trained size: 256-px tiles, shown to it at 128 px, so each disc is 30 px again
    small, truths = smear(300, 260, [(70, 70), (200, 150), (120, 200)])
    big = cv2.resize(small["image"].numpy().transpose(1, 2, 0), (600, 520), interpolation=cv2.INTER_NEAREST)
    sample = {**small, "image": torch.from_numpy(big.transpose(2, 0, 1).copy()), "orig_width": 600, "orig_height": 520}
    detector = DiscDetector()
    unresized = TileScale(input_cell_px=2 * DIAMETER, trained_cell_px=DIAMETER, network_px=128, network_resizes=False)
    prediction = predict_tiled(detector, sample, unresized, POINT)
    assert set(detector.tile_shapes) == {(128, 128)}
    doubled = [cv2.resize(t.astype(np.uint8), (600, 520), interpolation=cv2.INTER_NEAREST).astype(bool) for t in truths]
    assert len(prediction) == 3 and min(matched(prediction, doubled)) > 0.9  # back in file pixels
    assert np.allclose(prediction.boxes[np.argsort(prediction.boxes[:, 0])][:, :2], [[110, 110], [210, 370], [370, 270]],
                       atol=4)


def test_a_model_trained_at_a_fixed_cell_size_tiles_each_source_at_its_own_scale():
    def cells(diameter, source, n):
        disc = {"bbox": [0, 0, diameter, diameter], "area": np.pi * (diameter / 2) ** 2, "segmentation": [[0, 0, 1, 1, 2, 0]]}
        return [{"width": 300, "height": 300, "source": source, "annotations": [disc]} for _ in range(n)]

    records = cells(80, "dataset1.json", 5) + cells(150, "dataset2.json", 2)
    scale = TrainedScale.measure(records, {"steps": []}, min_size=256, max_size=320, cell_px=48)
    assert scale.fixed and scale.network_cell_px == 48 and scale.network_px == 256
    assert scale.source_cell_px == {"dataset1.json": 80, "dataset2.json": 150} and scale.cell_px == 80
    tiling = Tiling(scale)
    # each image's tile holds as many of its cells as a 256-px window held at 48 px a cell
    for source, cell in (("dataset1.json", 80), ("dataset2.json", 150), ("a new scanner", 80)):
        sample = {"scale": (1.0, 1.0), "record": {"source": source}}
        assert tiling.for_sample(sample).grid().tile == round(256 * cell / 48)
    assert Tiling(scale, input_cell_px=100).for_sample(sample).grid().tile == round(256 * 100 / 48)  # given wins
    saved = scale.as_dict()  # a checkpoint's record of it
    assert TrainedScale(**saved) == scale
    # a model trained on windows predicts in tiles even where whole images are asked for
    assert run_tiling({"infer": {"tiling": False}}, saved) is not None
    assert run_tiling({"infer": {"tiling": False}}, {**saved, "fixed": False}) is None
    older = TrainedScale(cell_px=80, network_cell_px=150, network_px=256)  # a checkpoint from before these keys
    assert older.as_dict() == {"cell_px": 80, "network_cell_px": 150, "network_px": 256}  # run.json as it was


@pytest.mark.parametrize("overrides, message", [
    (["train.cell_px=300"], "between 0 and model.min_size"),
    (["train.cell_px=40", "model.max_size=200"], "max_size >= model.min_size"),
    (["train.cell_px=40", "model=d2_mask_rcnn_R_50_FPN_3x"], "detectron2 models"),
])
def test_training_at_a_cell_size_the_model_cannot_take_is_refused(overrides, message):
    from conftest import compose

    cfg = compose(*overrides) if "model=" in overrides[-1] else compose("model.min_size=256", *overrides)
    records = [{"width": 100, "height": 100, "annotations": [{"bbox": [0, 0, 30, 30]}]}]
    with pytest.raises(ValueError, match=message):
        measure_trained_scale(cfg, records)


def test_a_pixel_size_brings_another_microscopes_cells_to_the_trained_scale():
    def cells(diameter, source, um_per_px):
        disc = {"bbox": [0, 0, diameter, diameter]}
        return [{"width": 300, "height": 300, "source": source, "um_per_px": um_per_px, "annotations": [disc]}]

    # 8 um cells: 80 px at 0.1 um/px in one acquisition, 40 px at 0.2 in the other
    scale = TrainedScale.measure(cells(80, "d1.json", 0.1) + cells(40, "d2.json", 0.2), {"steps": []}, 256, 320)
    assert scale.cell_um == pytest.approx(8) and TrainedScale(**scale.as_dict()) == scale
    assert Tiling(scale, input_um_per_px=0.25).cell_px_for({}) == pytest.approx(32)  # given for the folder
    assert Tiling(scale).cell_px_for({"um_per_px": 0.05}) == pytest.approx(160)  # stated by the file
    assert Tiling(scale).cell_px_for({"source": "d2.json", "um_per_px": 0.05}) == 40  # a known source's own cells
    assert Tiling(scale, input_cell_px=70).cell_px_for({"um_per_px": 0.05}) == 70  # a given diameter wins
    assert Tiling(scale).as_dict()["cell_um"] == pytest.approx(8)
    unknown = TrainedScale.measure(cells(80, "d1.json", 0.1) + cells(40, "d3.json", None), {"steps": []}, 256, 320)
    assert unknown.cell_um is None and "cell_um" not in unknown.as_dict()
    assert Tiling(unknown).cell_px_for({"um_per_px": 0.05}) == unknown.cell_px  # no micrometres to go by
    with pytest.raises(ValueError, match="infer.um_per_px needs a checkpoint that knows"):
        Tiling(unknown, input_um_per_px=0.25)
    with pytest.raises(ValueError, match="both given"):
        Tiling(scale, input_cell_px=70, input_um_per_px=0.25)
    with pytest.raises(ValueError, match="infer: um_per_px=300 is outside"):
        run_tiling({"infer": {"tiling": True, "um_per_px": 300}}, scale.as_dict())
    given = run_tiling({"infer": {"tiling": True, "um_per_px": 0.25}}, scale.as_dict())  # as tools/infer.py sets it
    sample = {"scale": (1.0, 1.0), "record": {"source": "d1.json"}}
    assert given.for_sample(sample).grid().tile == round(scale.network_px * 32 / scale.network_cell_px)
