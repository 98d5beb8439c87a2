import json

import numpy as np
import pytest

from monai_fl.data.partition import (
    MIN_SITE_SIZE,
    Scheme,
    build_manifest,
    partition,
    read_manifest,
    test_shards as make_test_shards,
    write_manifest,
)
from monai_fl.errors import ManifestError, MonaiFLError

RNG = np.random.default_rng(123)
LABELS = RNG.choice(3, size=2000, p=[0.6, 0.3, 0.1])
SCHEMES = ["iid", "dirichlet:0.5", "dirichlet:0.1", "quantity:0.5", "quantity:5"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_sites", [1, 3, 7])
def test_every_index_lands_in_exactly_one_site(scheme, n_sites):
    parts = partition(LABELS, n_sites, scheme, seed=0)
    assert len(parts) == n_sites
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= MIN_SITE_SIZE


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_for_a_seed_and_different_across_seeds(scheme):
    a = partition(LABELS, 4, scheme, seed=7)
    b = partition(LABELS, 4, scheme, seed=7)
    c = partition(LABELS, 4, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _label_skew(parts):
    """Mean total-variation distance between each site's class mix and the global mix."""
    glob = np.bincount(LABELS, minlength=3) / len(LABELS)
    return np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=3) / len(p) - glob).sum() for p in parts])


def test_dirichlet_skews_labels_and_quantity_skews_sizes():
    iid = partition(LABELS, 5, "iid", 0)
    dir_small = partition(LABELS, 5, "dirichlet:0.1", 0)
    dir_large = partition(LABELS, 5, "dirichlet:100", 0)
    assert _label_skew(iid) < 0.05
    assert _label_skew(dir_small) > 0.3 > _label_skew(dir_large)
    sizes_iid = [len(p) for p in iid]
    sizes_q = [len(p) for p in partition(LABELS, 5, "quantity:0.5", 0)]
    assert max(sizes_iid) - min(sizes_iid) <= 1
    assert np.std(sizes_q) > 10 * np.std(sizes_iid)
    assert _label_skew(partition(LABELS, 5, "quantity:0.5", 0)) < 0.1


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:-1", "quantity:abc", "label-skew", "iid:3"])
def test_bad_scheme_is_a_clear_error(text):
    with pytest.raises(MonaiFLError, match="scheme"):
        Scheme.parse(text)


def test_test_shards_are_disjoint_cover_and_follow_site_mix():
    parts = partition(LABELS, 3, "dirichlet:0.3", 1)
    test_labels = RNG.choice(3, size=600, p=[0.6, 0.3, 0.1])
    shards = make_test_shards(parts, LABELS, test_labels)
    joined = np.concatenate(shards)
    assert np.array_equal(np.sort(joined), np.arange(600))
    for p, s in zip(parts, shards):
        train_mix = np.bincount(LABELS[p], minlength=3) / len(p)
        # each class's test cases are allotted in proportion to the site's share of that class
        for c in range(3):
            share = (LABELS[p] == c).sum() / (LABELS == c).sum()
            assert abs((test_labels[s] == c).sum() - share * (test_labels == c).sum()) <= 1.0
        assert train_mix.sum() == pytest.approx(1)
    assert make_test_shards(parts, LABELS, test_labels)[0].tolist() == shards[0].tolist()


def _manifest():
    return build_manifest("toy", 28, "abc", LABELS, LABELS[:300], ["a", "b", "c"], 3, "dirichlet:0.5", 0)


def test_manifest_round_trip_and_counts(tmp_path):
    m = _manifest()
    path = write_manifest(m, tmp_path / "m.json")
    back = read_manifest(path, dataset_md5="abc", n_pool=len(LABELS))
    assert back == json.loads(json.dumps(m))
    for e in back["sites"].values():
        assert e["n_train"] == len(e["train_indices"])
        assert e["class_counts"] == np.bincount(LABELS[e["train_indices"]], minlength=3).tolist()
    assert sum(e["n_train"] for e in back["sites"].values()) == len(LABELS)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda m: m.pop("format"), "not a monai-fl site manifest"),
        (lambda m: m.pop("sites"), "lacks the field 'sites'"),
        (lambda m: m.update(dataset_md5="other"), "made from another file"),
        (lambda m: m["sites"]["site-1"].update(train_indices="x"), "no integer list 'train_indices'"),
        (lambda m: m["sites"]["site-1"]["train_indices"].append(99999), "outside the pool"),
        (lambda m: m["sites"]["site-2"]["train_indices"].append(m["sites"]["site-1"]["train_indices"][0]),
         "shares training cases"),
    ],
)
def test_malformed_manifest_is_rejected_clearly(tmp_path, mutate, msg):
    m = _manifest()
    mutate(m)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=msg) as exc:
        read_manifest(path, dataset_md5="abc", n_pool=len(LABELS))
    assert str(path) in str(exc.value)


def test_manifest_not_json_or_missing(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(bad)
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.json")
