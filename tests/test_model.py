import pytest
import torch
from torchvision.models import mobilenet_v2

from cellmorph.config import ModelConfig
from cellmorph.errors import CellmorphError
from cellmorph.model import build_model


def test_shapes_for_five_channels_and_k_classes():
    net = build_model(ModelConfig(width_mult=0.5), in_channels=5, num_classes=7).eval()
    x = torch.randn(2, 5, 64, 64)
    logits, emb = net.forward_with_embedding(x)
    assert logits.shape == (2, 7)
    assert emb.shape == (2, net.embed_dim)
    assert torch.allclose(net(x), logits)


def test_pretrained_from_local_file_adapts_stem(tmp_path):
    ref = mobilenet_v2(weights=None)
    torch.nn.init.normal_(ref.features[0][0].weight)
    path = tmp_path / "mnv2.pth"
    torch.save(ref.state_dict(), path)
    net = build_model(ModelConfig(pretrained=str(path)), in_channels=5, num_classes=4)
    w_ref = ref.features[0][0].weight
    w = net.features[0][0].weight
    assert w.shape[1] == 5
    # RGB filters are kept (rescaled by 3/C); extra channels are their mean.
    assert torch.allclose(w[:, :3], w_ref * 3 / 5, atol=1e-6)
    assert torch.allclose(w[:, 3], w_ref.mean(1) * 3 / 5, atol=1e-6)
    # The rest of the backbone is the file's.
    assert torch.equal(net.features[5].conv[0][0].weight, ref.features[5].conv[0][0].weight)


def test_pretrained_errors_name_the_setting(tmp_path):
    with pytest.raises(CellmorphError, match="model.pretrained: no such file"):
        build_model(ModelConfig(pretrained=str(tmp_path / "missing.pth")), 5, 3)
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(CellmorphError, match="does not match mobilenet_v2"):
        build_model(ModelConfig(pretrained=str(bad)), 5, 3)


def test_unknown_backbone_and_single_class_rejected():
    with pytest.raises(Exception, match="backbone"):
        ModelConfig(backbone="resnet50")  # type: ignore[arg-type]
    with pytest.raises(CellmorphError, match="at least 2 classes"):
        build_model(ModelConfig(), 5, 1)
