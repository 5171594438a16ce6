"""Preprocessing steps, chains from config, image reading rules, previews."""

import cv2
import numpy as np
import pytest

from leukodet.data import imageio
from leukodet.data.imageio import ImageReadError, image_size, read_image
from leukodet.preprocess import PreprocessChain, PreprocessState
from leukodet.preprocess.preview import write_previews
from leukodet.registry import PREPROCESS, RegistryError
from conftest import compose


def run_step(name, image, **params):
    return PREPROCESS.get(name)(PreprocessState.start(image.copy()), **params)


@pytest.fixture(scope="module")
def smear(wbc_sample):
    return read_image(next((wbc_sample / "images").glob("*.jpg")))


@pytest.fixture
def drawn():
    """Pale background (green 220) with a stained disc (green 90) that has a pale centre (green
    230), a 1 px speck, and the disc's known area."""
    image = np.full((120, 160, 3), (230, 220, 225), np.uint8)
    cv2.circle(image, (60, 60), 30, (150, 90, 160), -1)
    cv2.circle(image, (60, 60), 8, (240, 230, 235), -1)
    image[10, 140] = (150, 90, 160)
    disc = np.zeros((120, 160), np.uint8)
    cv2.circle(disc, (60, 60), 30, 1, -1)
    return image, disc.astype(bool)


@pytest.mark.parametrize("name, params", [
    ("scale", {"factor": 0.5}), ("scale", {"max_size": 100}), ("scale", {"size": [64, 32]}),
    ("bilateral", {}), ("equalize", {"mode": "luma"}), ("equalize", {"mode": "per_channel"}),
    ("equalize", {"mode": "clahe", "clip_limit": 3.0, "tile_grid": 4}), ("white_balance", {}),
])
def test_image_steps_keep_dtype_channels_and_range(smear, name, params):
    out = run_step(name, smear, **params).image
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    expected = {"factor": (192, 256), "max_size": (75, 100), "size": (32, 64)}
    assert out.shape[:2] == (expected[next(iter(params))] if name == "scale" else smear.shape[:2])
    if name == "equalize" and params["mode"] != "clahe":
        assert out.max() >= 250 and out.min() <= 5  # stretched to the full range


def test_scale_records_its_transform(smear):
    state = run_step("scale", smear, factor=0.25)
    assert state.scale == (0.25, 0.25)
    assert state.transform_points([[100, 40]]).tolist() == [[25, 10]]
    assert state.raw is state.image  # later steps cut out of the scaled image


def test_green_threshold_fixed_value_opening_and_hole_filling(drawn):
    image, disc = drawn
    state = run_step("green_threshold", image, value=150, open_size=3, fill=True)
    assert state.foreground.dtype == bool and state.foreground.shape == image.shape[:2]
    assert np.array_equal(state.foreground, disc)  # speck opened away, pale centre filled
    assert np.array_equal(state.image, image)  # the threshold leaves the image alone
    unfilled = run_step("green_threshold", image, value=150, fill=False).foreground
    assert not unfilled[60, 60] and unfilled[10, 140]
    assert np.array_equal(run_step("green_threshold", image, value="otsu", open_size=3).foreground, disc)


def test_mask_and_cuts_from_raw_or_current(drawn):
    image, disc = drawn
    state = run_step("green_threshold", image, value=150, open_size=3)
    state.image = np.zeros_like(image)  # stands in for a filtered image
    cut = PREPROCESS.get("mask_and")(state, source="raw", background=[0, 255, 0]).image
    assert cut.dtype == np.uint8 and cut.shape == image.shape
    assert np.array_equal(cut[disc], image[disc]) and (cut[~disc] == (0, 255, 0)).all()
    state.image = np.full_like(image, 7)
    cut = PREPROCESS.get("mask_and")(state, source="current", background=0).image
    assert (cut[disc] == 7).all() and (cut[~disc] == 0).all()
    with pytest.raises(ValueError, match="put green_threshold before it"):
        run_step("mask_and", image)


def test_white_balance_makes_two_colour_casts_of_one_smear_alike(drawn):
    image, disc = drawn
    yellow = np.clip(image * np.array([1.0, 0.95, 0.65]), 0, 255).astype(np.uint8)  # dataset1's lamp
    pink = np.clip(image * np.array([0.95, 0.8, 0.85]), 0, 255).astype(np.uint8)
    assert np.abs(yellow.astype(int) - pink).mean() > 15
    balanced = [run_step("white_balance", cast, percentile=95) for cast in (yellow, pink)]
    for state in balanced:
        assert (state.image[~disc].mean(0) > 250).all()  # the background is white
        assert state.raw is state.image  # mask_and cuts the balanced cells out
    assert np.abs(balanced[0].image.astype(int) - balanced[1].image).mean() < 3
    chain = PreprocessChain(compose("preprocess=white_balanced").preprocess)
    assert [name for name, _, _ in chain.steps] == ["scale", "white_balance"]


@pytest.mark.parametrize("kind", ["wbc", "rbc"])
def test_segmented_chain_recovers_the_generated_foreground(tmp_path, kind):
    from leukodet.data.synthetic import generate_smears

    chain = PreprocessChain(compose("+exp=segmented").preprocess)
    for truth in generate_smears(tmp_path, n_images=2, seed=3, kind=kind):
        state, _ = chain.run_on_file(truth.file_name)
        iou = (state.foreground & truth.foreground).sum() / (state.foreground | truth.foreground).sum()
        assert iou >= 0.9
        assert (state.image[~state.foreground] == 0).all()


def test_reduced_jpeg_decode_at_quarter_scale(tmp_path, monkeypatch):
    photo = cv2.resize(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8), (818, 614))
    cv2.imwrite(str(tmp_path / "big.jpg"), photo)
    cv2.imwrite(str(tmp_path / "big.png"), photo)
    seen = []
    monkeypatch.setattr("leukodet.preprocess.chain.read_image",
                        lambda p, reduce=1: seen.append(reduce) or imageio.read_image(p, reduce))
    state, _ = PreprocessChain([{"name": "scale", "factor": 0.25}]).run_on_file(tmp_path / "big.jpg")
    assert seen == [4]
    assert state.image.shape[:2] == (round(614 * 0.25), round(818 * 0.25))
    assert state.scale == pytest.approx((round(818 * 0.25) / 818, round(614 * 0.25) / 614))
    state, _ = PreprocessChain([{"name": "scale", "factor": 0.2}]).run_on_file(tmp_path / "big.jpg")
    assert seen[-1] == 4 and state.image.shape[:2] == (123, 164)  # 1/4 decode, then resized the rest
    png, _ = PreprocessChain([{"name": "scale", "factor": 0.2}]).run_on_file(tmp_path / "big.png")
    assert png.image.shape == state.image.shape and png.scale == pytest.approx(state.scale)  # full decode, same size
    assert read_image(tmp_path / "big.png", reduce=4).shape == (614, 818, 3)


def test_preview_panels_show_every_step(wbc_sample, tmp_path):
    images = sorted((wbc_sample / "images").glob("*.jpg"))[:2]
    chain = PreprocessChain(compose("+exp=segmented").preprocess)
    _, outputs = chain.run_on_file(images[0], keep_steps=True)
    assert [name for name, _ in outputs] == ["input", "scale", "bilateral", "equalize", "green_threshold", "mask_and"]
    assert set(np.unique(outputs[4][1])) <= {0, 255}  # the threshold's tile shows its mask
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    written = write_previews([*images, tmp_path / "bad.jpg"], compose("+exp=segmented").preprocess, tmp_path / "out",
                             height=64)
    assert [p.name for p in written] == [f"{p.stem}_steps.jpg" for p in images]  # the bad one is skipped
    assert read_image(written[0]).shape[0] == 64 + 24


@pytest.mark.parametrize("arm", ["raw", "segmented"])
def test_one_scale_key_sets_the_scale_step(arm):
    assert PreprocessChain(compose(f"preprocess={arm}").preprocess).steps[0][2] == {"factor": 1.0}
    chain = PreprocessChain(compose(f"preprocess={arm}", "preprocess.scale=0.2").preprocess)
    assert chain.steps[0][0] == "scale" and chain.steps[0][2] == {"factor": 0.2}


def test_bad_chain_configs_fail_when_built():
    with pytest.raises(RegistryError, match="Did you mean 'bilateral'"):
        PreprocessChain([{"name": "bilaterl"}])
    with pytest.raises(TypeError, match="'bilateral'.*sigma"):
        PreprocessChain({"steps": [{"name": "bilateral", "sigma": 3}]})


@pytest.mark.parametrize("kind", ["gray", "rgba", "uint16"])
def test_image_conversion_rules(tmp_path, kind):
    base = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    if kind == "gray":
        data, expected = base[..., 0], np.repeat(base[..., :1], 3, axis=2)
    elif kind == "rgba":
        data, expected = np.dstack([base, np.full((20, 30), 128, np.uint8)]), base[..., ::-1]  # alpha dropped
    else:
        data, expected = base.astype(np.uint16) * 256 + 255, base[..., ::-1]  # high byte kept
    cv2.imwrite(str(tmp_path / "x.png"), data)
    out = read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert np.array_equal(out, expected)


def test_non_ascii_paths(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (12, 16, 3), np.uint8)
    path = tmp_path / "frottis_é_血液.png"
    cv2.imencode(".png", image)[1].tofile(str(path))
    assert np.array_equal(read_image(path), image[..., ::-1]) and image_size(path) == (16, 12)


def test_unreadable_images_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.bmp").write_text("hello")
    for name in ("broken.jpg", "empty.png", "text.bmp", "missing.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)
        with pytest.raises(ImageReadError, match=name):
            image_size(tmp_path / name)


def test_truncated_jpeg_passes_the_header_check_but_not_the_decode(tmp_path):
    image = cv2.resize(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8), (200, 150))
    data = cv2.imencode(".jpg", image)[1].tobytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert image_size(tmp_path / "cut.jpg") == (200, 150)
    for reduce in (1, 2):
        with pytest.raises(ImageReadError, match="cut.jpg"):
            read_image(tmp_path / "cut.jpg", reduce=reduce)
