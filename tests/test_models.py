"""Model adapters: offline weights, the losses/predict protocol, thresholds, errors."""

import importlib.util

import numpy as np
import pytest
import timm
import torch

import leukodet.models  # noqa: F401
from leukodet.models import Detections, postprocess
from leukodet.models.backbones import effnet_lite0_imagenet_state_dict
from leukodet.registry import MODELS, RegistryError


def tiny_batch(masks=True, n=2, size=(160, 192)):
    """Two images with bright discs as cells."""
    batch = []
    rng = np.random.default_rng(0)
    for i in range(n):
        image = torch.full((3, *size), 200, dtype=torch.uint8)
        boxes, label_list, mask_list = [], [], []
        for k in range(3):
            x, y = int(rng.integers(10, size[1] - 50)), int(rng.integers(10, size[0] - 50))
            image[:, y:y + 36, x:x + 36] = torch.tensor([120, 60, 150], dtype=torch.uint8)[:, None, None]
            mask = torch.zeros(size, dtype=torch.uint8)
            mask[y:y + 36, x:x + 36] = 1
            boxes.append([x, y, x + 36, y + 36])
            label_list.append(k % 2)
            mask_list.append(mask)
        batch.append({"image": image, "instances": {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                                     "labels": torch.tensor(label_list),
                                                     "masks": torch.stack(mask_list) if masks else None}})
    return batch


def build(**kw):
    kw = {"num_classes": 2, "min_size": 160, "max_size": 192, **kw}
    return MODELS.build({"name": "maskrcnn_effnet_lite0"}, **kw)


def test_imagenet_weights_from_the_wheel_load_strictly_into_timm():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = effnet_lite0_imagenet_state_dict()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    # A real ImageNet classifier is far more certain about a picture than a random one (entropy
    # ~4.4 vs ~6.0 nats on a smear); a mis-mapped tensor, even one BatchNorm's weight and bias
    # swapped, pushes it above 5.
    from leukodet.data.synthetic import render_smear

    @torch.no_grad()
    def entropy(net, image):
        p = net(image).softmax(-1)
        return float(-(p * p.log()).sum())

    smear = render_smear(np.random.default_rng(0), 224, 224, "wbc")[0]
    image = torch.from_numpy(smear).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert entropy(model, image) < 5.0
    assert entropy(timm.create_model("tf_efficientnet_lite0", pretrained=False).eval(), image) > 5.5


def test_losses_backward_and_predict_shapes():
    torch.manual_seed(0)
    adapter = build()
    losses = adapter.losses(tiny_batch())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trained = [p for p in adapter.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    adapter.set_thresholds(min_confidence=0.0)
    (det, _) = adapter.predict(tiny_batch())
    assert isinstance(det, Detections) and det.boxes.shape[1] == 4
    assert det.masks.dtype == torch.bool and det.masks.shape[1:] == (160, 192)
    assert det.labels.min() >= 0 and det.labels.max() <= 1


def test_box_only_has_no_mask_branch():
    adapter = build(masks=False)
    losses = adapter.losses(tiny_batch(masks=False))
    assert "loss_mask" not in losses and not adapter.has_masks
    adapter.set_thresholds(min_confidence=0.0)
    assert adapter.predict(tiny_batch(masks=False))[0].masks is None


def briefly_trained(seed: int):
    """A randomly initialised detector after 3 SGD steps on the tiny batch, so scores spread out."""
    torch.manual_seed(seed)
    adapter = build(weights="none")
    optimizer = torch.optim.SGD([p for p in adapter.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        loss = sum(adapter.losses(tiny_batch()).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapter


def test_thresholds_and_postprocess_of_raw_predictions_match_the_model():
    adapter = briefly_trained(seed=1)
    batch = tiny_batch()
    with adapter.raw_predictions(floor=0.01, cap=1000):
        raw = adapter.predict(batch)
    assert adapter.thresholds() == (0.5, 0.5, 300)  # restored
    for min_confidence, nms in ((0.05, 0.3), (0.1, 0.5), (0.02, 0.7)):
        adapter.set_thresholds(min_confidence, nms, 50)
        direct = adapter.predict(batch)
        for r, d in zip(raw, direct):
            assert len(r) > len(d) or len(d) == 0
            again = postprocess(r, min_confidence, nms, 50)
            assert torch.equal(again.labels, d.labels)
            assert torch.allclose(again.boxes, d.boxes) and torch.allclose(again.scores, d.scores)
            assert torch.equal(again.masks, d.masks)


def test_resnet50_builds_offline_and_coco_weights_fail_with_a_way_out(monkeypatch):
    adapter = MODELS.build({"name": "maskrcnn_r50_fpn"}, num_classes=3, weights="none")
    assert adapter.model.roi_heads.box_predictor.cls_score.out_features == 4

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as err:
        MODELS.build({"name": "maskrcnn_r50_fpn_v2"}, num_classes=3, weights="coco")
    message = str(err.value)
    assert "maskrcnn_resnet50_fpn_v2" in message and "model.weights=/path/to/weights.pth" in message


def test_local_weights_round_trip(tmp_path):
    source = build(weights="none")
    torch.save(source.model.state_dict(), tmp_path / "detector.pth")
    loaded = build(weights=str(tmp_path / "detector.pth"))
    for (name, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="no such file"):
        build(weights=str(tmp_path / "missing.pth"))


def test_unknown_model_lists_choices():
    with pytest.raises(RegistryError, match="Did you mean 'maskrcnn_r50_fpn'"):
        MODELS.get("maskrcnn_r50")


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_detectron2_absent_gives_install_hint():
    with pytest.raises(ImportError, match="optional engine and is not installed"):
        MODELS.build({"name": "d2_mask_rcnn_R_101_FPN_3x"}, num_classes=2)


def test_detectron2_adapter_trains_and_predicts():
    pytest.importorskip("detectron2", reason="detectron2 is optional and not installed (built from source)")
    adapter = MODELS.build({"name": "d2_mask_rcnn_R_50_FPN_3x"}, num_classes=2, min_size=160, max_size=192,
                           device="cpu")
    losses = adapter.losses(tiny_batch())
    assert "loss_mask" in losses and torch.isfinite(sum(losses.values()))
    adapter.set_thresholds(min_confidence=0.0)
    assert adapter.predict(tiny_batch())[0].masks is not None
