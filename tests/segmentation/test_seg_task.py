"""The segmentation task module: spec checks, networks (2D/3D), the one transform builder, loaders,
inference back to the input grid, the model-from-config path, and the contour figures."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_fl.config import ExperimentConfig, NetworkConfig, SegmentationConfig
from monai_fl.data.msd import read_datalist
from monai_fl.errors import DataFormatError, MonaiFLError
from monai_fl.experiment import model_for_config, prepare
from monai_fl.report.slices import contour_figure, pick_slices, save_case_figures
from monai_fl.tasks import segmentation as seg

from seg_fixtures import write_msd_task

pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
LABELS = ("background", "a", "b")


def _spec(dims: int = 3, roi=(16, 16, 16), **kw) -> seg.SegSpec:
    return seg.SegSpec.from_config(SegmentationConfig(spatial_dims=dims, roi_size=list(roi), **kw), 1, LABELS)


@pytest.mark.parametrize("settings, message", [
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
    ({"roi_size": [16, 16]}, "roi_size needs 3 positive sizes"),
    ({"roi_size": [16, 0, 16]}, "roi_size needs 3"),
    ({"pixdim": [1.0, 1.0]}, "pixdim needs 3 positive"),
    ({"intensity": "minmax"}, "intensity must be zscore or range"),
    ({"intensity": "range"}, "needs intensity_range"),
    ({"class_names": ["only_one"]}, "lists 1 names, the dataset has 2 foreground classes"),
])
def test_spec_rejects_bad_settings(settings, message):
    with pytest.raises(MonaiFLError, match=message):
        seg.SegSpec.from_config(SegmentationConfig(**settings), 1, LABELS)


def test_spec_2d_takes_the_first_two_roi_sizes_and_names_from_the_datalist():
    spec = _spec(2, (32, 48, 32))
    assert spec.roi_size == (32, 48) and spec.patch_size == (32, 48, 1)
    assert spec.class_names == ("a", "b") and spec.num_classes == 3


@pytest.mark.parametrize("name", ["unet", "segresnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_networks_map_roi_to_class_logits(name, dims):
    spec = _spec(dims, (16, 24, 16)[:dims])
    net = seg.build_seg_network(NetworkConfig(name=name, width=8), spec)
    out = net(torch.zeros((2, 1) + spec.roi_size))
    assert out.shape == (2, 3) + spec.roi_size


@pytest.mark.parametrize("network, spec_kw, message", [
    (NetworkConfig(name="resnet18"), {}, "unknown segmentation network 'resnet18'"),
    (NetworkConfig(name="unet", width=8), {"roi": (20, 16, 16)}, r"multiple of 8 .*unet"),
    (NetworkConfig(name="segresnet", width=12), {}, "divisible by 8"),
    (NetworkConfig(name="unet", width=4), {"roi": (8, 8, 8)}, "too small"),
    (NetworkConfig(name="unet", norm="batch"), {}, "network.norm is a classification option"),
])
def test_network_errors(network, spec_kw, message):
    with pytest.raises(MonaiFLError, match=message):
        seg.build_seg_network(network, _spec(**spec_kw))


def _phantom(tmp_path, affine=None):
    js = write_msd_task(tmp_path / "Task99_Phantom", n_cases=3, shape=(24, 20, 16))
    if affine is not None:  # rewrite case 0 on another grid
        data = read_datalist(js, validate=False)
        for f in (data.cases[0].image, data.cases[0].label):
            img = nib.load(f)
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), f)
    return read_datalist(js)


@pytest.mark.parametrize("dims", [2, 3])
def test_train_and_eval_transforms_share_preprocessing(tmp_path, dims):
    data = _phantom(tmp_path)
    cfg = SegmentationConfig(spatial_dims=dims, roi_size=[16, 16, 16][:dims], samples_per_volume=2)
    spec = seg.SegSpec.from_config(cfg, 1, ("background", "sphere"))
    train = seg.build_seg_transforms("train", spec, cfg)(data.datalist([0])[0])
    assert len(train) == 2  # samples_per_volume patches
    assert train[0]["image"].shape == (1,) + spec.roi_size and train[0]["label"].shape == (1,) + spec.roi_size
    ev = seg.build_seg_transforms("eval", spec, cfg)(data.datalist([0])[0])
    assert ev["image"].shape == (1, 24, 20, 16)  # whole volume
    img = ev["image"][0]
    assert float(img.mean()) == pytest.approx(0.0, abs=1e-4) and float(img.std()) == pytest.approx(1.0, abs=1e-2)
    assert set(np.unique(ev["label"].numpy())) <= {0.0, 1.0}
    assert type(ev["image"]) is torch.Tensor  # plain tensors for the loop and for FL


def test_orientation_and_spacing_and_inverse(tmp_path):
    # Case 0 stored LPS at 2 mm in x: eval sees it RAS at 1 mm; inference maps back to the stored grid.
    lps = np.diag([-2.0, -1.0, 1.0, 1.0])
    data = _phantom(tmp_path, affine=lps)
    cfg = SegmentationConfig(roi_size=[16, 16, 16])
    spec = seg.SegSpec.from_config(cfg, 1, ("background", "sphere"))
    ev = seg.build_seg_transforms("eval", spec, cfg)(data.datalist([0])[0])
    raw = np.asanyarray(nib.load(data.cases[0].label).dataobj)
    assert ev["label"].shape == (1, 47, 20, 16)  # x resampled 24 × 2 mm → 47 voxels at 1 mm
    assert np.array_equal(ev["label"][0, ::2].numpy(), raw[::-1, ::-1][:24])  # flipped to RAS
    net = seg.build_seg_network(NetworkConfig(name="unet", width=4), spec)
    labels, affine = seg.infer_file(net, str(data.cases[0].image), spec, cfg)
    assert labels.shape == raw.shape and labels.dtype == np.uint8
    assert np.allclose(affine, lps)


def test_loaders_yield_pairs_and_replay_with_a_seed(tmp_path):
    data = _phantom(tmp_path)
    cfg = SegmentationConfig(roi_size=[16, 16, 16])
    spec = seg.SegSpec.from_config(cfg, 1, ("background", "sphere"))
    ds = seg.make_seg_dataset(data.datalist(), "train", spec, cfg)
    first = [next(iter(seg.make_seg_loader(ds, "train", 2, seed=5))) for _ in range(2)]
    assert isinstance(first[0], tuple) and first[0][0].shape == (2, 1, 16, 16, 16)
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    other = next(iter(seg.make_seg_loader(ds, "train", 2, seed=6)))
    assert not torch.equal(first[0][0], other[0])
    ev = list(seg.make_seg_loader(seg.make_seg_dataset(data.datalist(), "eval", spec, cfg), "eval", 8))
    assert len(ev) == 3 and ev[0][0].shape == (1, 1, 24, 20, 16)


def test_model_for_config_matches_the_sites_model(tmp_path):
    write_msd_task(tmp_path / "Task99_Phantom", n_cases=25, shape=(20, 20, 16))
    cfg = ExperimentConfig.from_dict({
        "task": "segmentation", "dataset": {"name": "Task99_Phantom"}, "partition": {"n_sites": 2, "scheme": "iid"},
        "network": {"name": "unet", "width": 4}, "segmentation": {"roi_size": [16, 16, 16]}})
    with pytest.raises(MonaiFLError, match="set segmentation.in_channels and segmentation.class_names"):
        model_for_config(cfg)
    cfg.segmentation.in_channels, cfg.segmentation.class_names = 1, ["sphere"]
    server = model_for_config(cfg).state_dict()
    site = prepare(cfg, tmp_path).build_model().state_dict()
    assert {k: v.shape for k, v in server.items()} == {k: v.shape for k, v in site.items()}
    cfg.segmentation.in_channels = 2  # the server would build a 2-channel network; the data has 1
    with pytest.raises(DataFormatError, match="declares 1 modalities and 2 classes .* means 2 and 2"):
        prepare(cfg, tmp_path)
    cfg.segmentation.in_channels, cfg.segmentation.class_names = 1, ["sphere", "cube"]
    with pytest.raises(MonaiFLError, match="lists 2 names, the dataset has 1 foreground"):
        prepare(cfg, tmp_path)


def test_official_task_builds_without_data():
    cfg = ExperimentConfig.from_dict({"task": "segmentation", "dataset": {"name": "msd_hippocampus"},
                                      "network": {"name": "unet", "width": 4}})
    net = model_for_config(cfg)
    assert net(torch.zeros(1, 1, 32, 48, 32)).shape == (1, 3, 32, 48, 32)


def test_contour_figures(tmp_path):
    ref = np.zeros((20, 24, 16), np.int64)
    ref[5:12, 6:14, 4:10] = 1
    ref[12:15, 6:14, 4:10] = 2
    assert pick_slices(ref, 3, axis=2) == [5, 6, 8]
    assert pick_slices(np.zeros_like(ref), 2) == [5, 10]
    pred = np.roll(ref, 1, axis=0)
    fig = contour_figure(np.random.rand(*ref.shape), ref, pred, ["anterior", "posterior"], "case", n_slices=3)
    path = tmp_path / "fig.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = seg.SegSpec(1, 3, 3, (16, 16, 16), (1.0, 1.0, 1.0), ("anterior", "posterior"))
    loader = [(torch.as_tensor(ref)[None, None].float(), torch.as_tensor(ref)[None, None].float())] * 3
    net = seg.build_seg_network(NetworkConfig(name="unet", width=4), spec)
    paths = save_case_figures(net, loader, spec, SegmentationConfig(roi_size=[16, 16, 16]), tmp_path / "figs",
                              n_cases=2, names=["x", "y"])
    assert [p.name for p in paths] == ["x.png", "y.png"] and all(p.stat().st_size > 1000 for p in paths)
