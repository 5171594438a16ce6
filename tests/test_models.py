"""Model adapters: offline weights, the losses/predict protocol, thresholds, errors."""

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

import leukodet.models  # noqa: F401
from leukodet.models.backbones import effnet_lite_imagenet_state_dict
from leukodet.models.base import batchnorm_frozen
from leukodet.registry import MODELS, RegistryError
from leukodet.structures import RAW, Detections, OperatingPoint, refilter, to_original

# The ResNet-50 variants run the same torchvision postprocess as the default model but take 50-80 s
# each on 2 CPU cores: slow, so the default suite proves refilter on the default model only.
TORCHVISION_MODELS = ["maskrcnn_effnet_lite0"] + [
    pytest.param(name, marks=pytest.mark.slow) for name in ("maskrcnn_r50_fpn", "maskrcnn_r50_fpn_v2")]


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


def build(name="maskrcnn_effnet_lite0", **kw):
    kw = {"num_classes": 2, "min_size": 160, "max_size": 192, **kw}
    return MODELS.build({"name": name}, **kw)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_imagenet_weights_from_the_wheel_load_strictly_into_timm(variant):
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    state = effnet_lite_imagenet_state_dict(variant)
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
    torch.manual_seed(0)  # the random network's entropy varies with its draw (5.48 seen); seeded: 5.9
    assert entropy(timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval(), image) > 5.5


@pytest.mark.parametrize("name", ["maskrcnn_effnet_lite0", "maskrcnn_effnet_lite2"])
def test_losses_backward_and_predict_shapes(name):
    torch.manual_seed(0)
    adapter = build(name)
    losses = adapter.losses(tiny_batch())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trained = [p for p in adapter.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    (det, _) = adapter.predict(tiny_batch(), OperatingPoint(0.0))
    assert isinstance(det, Detections) and det.boxes.shape[1] == 4
    assert det.masks.dtype == torch.bool and det.masks.shape[1:] == (160, 192)
    assert det.labels.min() >= 0 and det.labels.max() <= 1


def test_box_only_has_no_mask_branch():
    adapter = build(masks=False)
    losses = adapter.losses(tiny_batch(masks=False))
    assert "loss_mask" not in losses and not adapter.has_masks
    assert adapter.predict(tiny_batch(masks=False))[0].masks is None


def briefly_trained(name: str, seed: int = 1, masks: bool = True):
    """A randomly initialised detector after 3 SGD steps on the tiny batch, so scores spread out."""
    torch.manual_seed(seed)
    adapter = MODELS.build({"name": name}, num_classes=2, min_size=160, max_size=192, weights="none", masks=masks)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    for _ in range(3):
        loss = sum(adapter.losses(tiny_batch(masks=masks)).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)  # as training does; ResNet-50 from scratch diverges without
        optimizer.step()
    return adapter


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_refiltered_raw_detections_equal_the_detectors_own_output(name):
    """The proof the one ``refilter`` rests on: raw detections (score floor, no final NMS) cut at a
    point are exactly what the detector gives when it cuts at that point itself."""
    adapter = briefly_trained(name)
    batch = tiny_batch()

    def predict(point):
        return [to_original(d, (1.0, 1.0), (192, 160)) for d in adapter.predict(batch, point)]

    # RAW's floor with a floor of 0: a ResNet-50 from scratch after 3 steps scores every box low
    raw = predict(replace(RAW, min_confidence=0.0))
    scores = np.concatenate([r.scores for r in raw])
    assert len(scores) > 20
    for quantile, nms, cap in ((0.0, 0.3, 50), (0.5, 0.5, 300), (0.7, 0.7, 5)):
        point = OperatingPoint(float(np.quantile(scores, quantile)), nms, cap)
        for r, direct in zip(raw, predict(point)):
            assert len(direct) < len(r)
            again = refilter(r, point)
            assert np.array_equal(again.labels, direct.labels) and np.allclose(again.scores, direct.scores)
            assert np.allclose(again.boxes, direct.boxes, atol=1e-4)
            assert [m["counts"] for m in again.rles] == [m["counts"] for m in direct.rles]


def test_validation_losses_leave_batchnorm_statistics_alone():
    """An R50 built without weights has ordinary BatchNorm: a validation pass must neither update
    its running statistics nor leave any module in another mode."""
    adapter = MODELS.build({"name": "maskrcnn_r50_fpn"}, num_classes=2, min_size=160, max_size=192, weights="none")
    norms = [m for m in adapter.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    adapter.train()
    losses = adapter.validation_losses(tiny_batch())
    assert "loss_mask" in losses and all(not v.requires_grad for v in losses.values())
    assert all(m.training for m in adapter.modules())
    for m, (mean, var) in zip(norms, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    adapter.losses(tiny_batch())  # a training pass does update them (the check above can fail)
    assert any(not torch.equal(m.running_mean, mean) for m, (mean, _) in zip(norms, before))
    with batchnorm_frozen(adapter.eval()):
        assert all(not m.training for m in norms)
    assert not any(m.training for m in adapter.modules())


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
    assert adapter.predict(tiny_batch(), OperatingPoint(0.0))[0].masks is not None
