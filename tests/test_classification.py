import numpy as np
import pytest
import torch

from monai_fl.config import ExperimentConfig, NetworkConfig, TrainConfig
from monai_fl.errors import MonaiFLError
from monai_fl.experiment import prepare
from monai_fl.tasks.classification import TaskSpec, build_network, build_transforms, make_loader
from monai_fl.tasks.loop import build_optimizer, lr_at, train_epoch
from monai_fl.utils import seed_everything

SPEC_2D = TaskSpec(1, 2, 2, 28, ("a", "b"))
SPEC_3D = TaskSpec(1, 2, 3, 28, ("a", "b"))


@pytest.mark.parametrize(
    "name, spec, size",
    [("resnet18", SPEC_2D, 28), ("cnn", SPEC_2D, 28), ("resnet18", SPEC_3D, 28), ("cnn", SPEC_3D, 28),
     ("densenet121", TaskSpec(3, 5, 2, 64, tuple("abcde")), 64), ("resnet18", TaskSpec(3, 5, 2, 64, tuple("abcde")), 64)],
)
def test_networks_fit_their_inputs(name, spec, size):
    net = build_network(NetworkConfig(name, width=8), spec)
    net.eval()
    out = net(torch.zeros((2,) + spec.input_shape))
    assert out.shape == (2, spec.num_classes)


def test_group_norm_resnet_has_no_batch_statistics_and_ignores_the_batch_mix():
    net = build_network(NetworkConfig("resnet18", width=8, norm="group"), SPEC_2D)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) > 0
    assert not [k for k in net.state_dict() if "running" in k or "num_batches" in k]
    # Train mode normalises each image on its own, so an image's output does not depend on its batch.
    x = torch.randn(4, *SPEC_2D.input_shape)
    net.train()
    assert torch.allclose(net(x)[:1], net(x[:1]), atol=1e-5)


@pytest.mark.parametrize("cfg, message", [
    (NetworkConfig("resnet18", norm="layer"), "unknown network norm 'layer'"),
    (NetworkConfig("cnn", norm="group"), "available for resnet18 only"),
    (NetworkConfig("resnet18", width=12, norm="group"), "width divisible by 8"),
])
def test_bad_norm_is_named(cfg, message):
    with pytest.raises(MonaiFLError, match=message):
        build_network(cfg, SPEC_2D)


def test_densenet121_on_28px_fails_with_a_clear_message():
    with pytest.raises(MonaiFLError, match="densenet121 does not accept 2D inputs of 28 px"):
        build_network(NetworkConfig("densenet121"), SPEC_2D)


def test_unknown_network_is_named():
    with pytest.raises(MonaiFLError, match="unknown network 'vgg'"):
        build_network(NetworkConfig("vgg"), SPEC_2D)


@pytest.mark.parametrize("spec", [SPEC_2D, TaskSpec(3, 2, 2, 32, ("a", "b"), file_size=28),
                                  TaskSpec(1, 2, 3, 32, ("a", "b"), file_size=28)], ids=["2d", "2d-resize", "3d-resize"])
def test_cached_loader_equals_the_eval_transform_applied_per_image(spec):
    x = np.random.default_rng(0).integers(0, 256, (6, spec.in_channels) + (28,) * spec.spatial_dims, dtype=np.uint8)
    y = np.arange(6) % 2
    per_image = torch.stack([torch.as_tensor(build_transforms("eval", spec)(img)) for img in x])
    batch, labels = next(iter(make_loader(x, y, "eval", spec, 6)))
    assert batch.shape == (6,) + spec.input_shape
    assert torch.allclose(batch, per_image, atol=1e-6)
    assert labels.tolist() == y.tolist()
    assert batch.min() >= -1 - 1e-6 and batch.max() <= 1 + 1e-6


def test_densenet121_takes_28px_files_resized_to_32():
    spec = TaskSpec(1, 2, 2, 32, ("a", "b"), file_size=28)
    net = build_network(NetworkConfig("densenet121"), spec)
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    batch, _ = next(iter(make_loader(x, np.zeros(4, int), "train", spec, 4)))
    assert net.eval()(batch).shape == (4, 2)


def test_train_loader_augments_and_is_deterministic_for_a_seed():
    x = np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    y = np.zeros(64, int)
    a = next(iter(make_loader(x, y, "train", SPEC_2D, 64, seed=3)))[0]
    b = next(iter(make_loader(x, y, "train", SPEC_2D, 64, seed=3)))[0]
    e = next(iter(make_loader(x, y, "eval", SPEC_2D, 64)))[0]
    assert torch.equal(a, b)
    assert not torch.allclose(torch.sort(a.flatten())[0], torch.sort(e.flatten())[0])


def test_cosine_schedule_is_shared_by_round_and_epoch_index():
    cfg = TrainConfig(lr=1e-3, epochs=10)
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 5) == pytest.approx(5e-4)
    assert lr_at(cfg, 10) == pytest.approx(0.0)
    # round 3 with 2 local epochs starts at global epoch 6
    assert lr_at(cfg, 3 * 2, 10) == lr_at(cfg, 6)


@pytest.mark.slow
def test_short_real_training_lowers_the_loss(medmnist_dir):
    cfg = ExperimentConfig.from_dict({"dataset": {"name": "pneumoniamnist"}, "network": {"name": "cnn", "width": 8},
                                      "train": {"batch_size": 32, "augment": False}})
    exp = prepare(cfg, medmnist_dir)
    seed_everything(0)
    x, y = exp.site_train("site-1")
    loader = make_loader(x[:512], y[:512], "train", exp.spec, 32, augment=False)
    model = exp.build_model()
    opt = build_optimizer(model, cfg.train)
    before = exp.evaluate(model, make_loader(x[:512], y[:512], "eval", exp.spec, 256))["loss"]
    for _ in range(3):
        train_epoch(model, loader, opt, exp.loss())
    after = exp.evaluate(model, make_loader(x[:512], y[:512], "eval", exp.spec, 256))
    assert after["loss"] < 0.8 * before
    assert after["auc"] > 0.8


def test_a_last_training_batch_of_one_image_is_dropped():
    x = np.zeros((65, 1, 28, 28), dtype=np.uint8)
    sizes = [len(y) for _, y in make_loader(x, np.zeros(65, int), "train", SPEC_2D, 64)]
    assert sizes == [64]
    sizes = [len(y) for _, y in make_loader(x[:10], np.zeros(10, int), "train", SPEC_2D, 64)]
    assert sizes == [10], "a site smaller than one batch still trains"
    assert [len(y) for _, y in make_loader(x, np.zeros(65, int), "eval", SPEC_2D, 64)] == [64, 1]
