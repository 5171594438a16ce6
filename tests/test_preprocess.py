"""Preprocessing steps, chains from config, image reading rules."""

import cv2
import numpy as np
import pytest

from leukodet.data import imageio
from leukodet.data.imageio import ImageReadError, image_size, read_image
from leukodet.preprocess import PreprocessChain, PreprocessState
from leukodet.registry import PREPROCESS, RegistryError
from tests.conftest import compose


def state_of(image):
    return PreprocessState(image=image, raw=image, orig_size=(image.shape[1], image.shape[0]))


@pytest.fixture(scope="module")
def smear(wbc_sample):
    return read_image(next((wbc_sample / "images").glob("*.jpg")))


@pytest.mark.parametrize("name, params", [
    ("scale", {"factor": 0.5}), ("scale", {"max_size": 100}), ("bilateral", {}),
    ("equalize", {"mode": "luma"}), ("equalize", {"mode": "per_channel"}), ("equalize", {"mode": "clahe"}),
])
def test_image_steps_keep_dtype_channels_and_range(smear, name, params):
    out = PREPROCESS.get(name)(state_of(smear.copy()), **params).image
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if name == "scale":
        expected = (192, 256) if "factor" in params else (75, 100)
        assert out.shape[:2] == expected
    else:
        assert out.shape == smear.shape
    if name == "equalize" and params["mode"] != "clahe":
        assert out.max() >= 250 and out.min() <= 5  # stretched to the full range


def test_green_threshold_and_mask_and(smear):
    state = PREPROCESS.get("green_threshold")(state_of(smear.copy()), value="otsu", open_size=3)
    assert state.foreground.dtype == bool and state.foreground.shape == smear.shape[:2]
    assert 0.05 < state.foreground.mean() < 0.6
    assert np.array_equal(state.image, smear)  # the threshold does not change the image
    cut = PREPROCESS.get("mask_and")(state, source="raw", background=0).image
    assert (cut[~state.foreground] == 0).all()
    assert np.array_equal(cut[state.foreground], smear[state.foreground])
    with pytest.raises(ValueError, match="put green_threshold before it"):
        PREPROCESS.get("mask_and")(state_of(smear))


def test_segmented_chain_recovers_the_generated_foreground(tmp_path):
    from leukodet.data.synthetic import generate_smears

    truths = generate_smears(tmp_path, n_images=4, seed=3)
    chain = PreprocessChain(compose("+exp=segmented").preprocess.steps)
    for truth in truths:
        state, _ = chain.run_on_file(truth.file_name)
        overlap = (state.foreground & truth.foreground).sum() / (state.foreground | truth.foreground).sum()
        assert overlap >= 0.9
        assert (state.image[~state.foreground] == 0).all()


def test_reduced_jpeg_decode_at_quarter_scale(tmp_path, monkeypatch):
    photo = cv2.resize(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8), (818, 614))
    cv2.imwrite(str(tmp_path / "big.jpg"), photo)
    seen = []
    real = imageio.read_image
    monkeypatch.setattr("leukodet.preprocess.chain.read_image", lambda p, reduce=1: seen.append(reduce) or real(p, reduce))
    state, _ = PreprocessChain([{"name": "scale", "factor": 0.25}]).run_on_file(tmp_path / "big.jpg")
    assert seen == [4]
    assert state.image.shape[:2] == (round(614 * 0.25), round(818 * 0.25))
    assert state.scale == pytest.approx((round(818 * 0.25) / 818, round(614 * 0.25) / 614))
    state, _ = PreprocessChain([{"name": "scale", "factor": 0.2}]).run_on_file(tmp_path / "big.jpg")
    assert seen[-1] == 4 and state.image.shape[:2] == (123, 164)  # 1/4 decode, then resized the rest


def test_preview_outputs_every_step(wbc_sample):
    chain = PreprocessChain(compose("+exp=segmented").preprocess.steps)
    _, outputs = chain.run_on_file(next((wbc_sample / "images").glob("*.jpg")), keep_steps=True)
    assert [name for name, _ in outputs] == ["input", "scale", "bilateral", "equalize", "green_threshold", "mask_and"]


def test_unknown_step_suggests(tmp_path):
    with pytest.raises(RegistryError, match="Did you mean 'bilateral'"):
        PreprocessChain([{"name": "bilaterl"}])


@pytest.mark.parametrize("kind", ["gray", "rgba", "uint16"])
def test_image_conversion_rules(tmp_path, kind):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (20, 30, 3), np.uint8)
    if kind == "gray":
        data, expected = base[..., 0], np.repeat(base[..., :1], 3, axis=2)
    elif kind == "rgba":
        data = np.dstack([base, np.full((20, 30), 128, np.uint8)])
        expected = base[..., ::-1]
    else:
        data = base.astype(np.uint16) * 257
        expected = base[..., ::-1]
    cv2.imwrite(str(tmp_path / "x.png"), data)
    out = read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert np.array_equal(out, expected)


def test_unreadable_images_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.bmp").write_text("hello")
    for name in ("broken.jpg", "empty.png", "text.bmp", "missing.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)
        with pytest.raises(ImageReadError, match=name):
            image_size(tmp_path / name)
