"""Split a training pool among sites (iid, label skew, size skew) and read/write the site manifest.

The site manifest is the single record of who holds what: the federated run, the centralized
baseline and local-only training all read it, so every method sees the identical split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from monai_fl.errors import ManifestError, MonaiFLError

MANIFEST_FORMAT = "monai-fl/site-manifest"
MANIFEST_VERSION = 1
MIN_SITE_SIZE = 10  # resample skewed splits until every site holds at least this many cases
MAX_RESAMPLES = 1000


@dataclass(frozen=True)
class Scheme:
    """A parsed partition scheme: ``iid``, ``dirichlet:<alpha>`` or ``quantity:<beta>``."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Scheme":
        kind, _, value = text.strip().lower().partition(":")
        if kind == "iid" and not value:
            return cls("iid")
        if kind in ("dirichlet", "quantity"):
            try:
                param = float(value)
            except ValueError:
                param = -1.0
            if param <= 0:
                raise MonaiFLError(f"partition scheme '{text}': {kind} needs a positive number, e.g. {kind}:0.5")
            return cls(kind, param)
        raise MonaiFLError(f"unknown partition scheme '{text}'; use iid, dirichlet:<alpha> or quantity:<beta>")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"


def site_names(n_sites: int) -> list[str]:
    """NVFlare-style site names ``site-1`` … ``site-N``."""
    return [f"site-{i + 1}" for i in range(n_sites)]


def partition(labels: np.ndarray, n_sites: int, scheme: str | Scheme, seed: int = 0) -> list[np.ndarray]:
    """Assign every index of ``labels`` to exactly one of ``n_sites`` sites.

    Args:
        labels: integer class label per case (for ``iid``/``quantity`` any array of the right length).
        n_sites: number of sites (≥ 1).
        scheme: ``iid``; ``dirichlet:<alpha>`` (per-class site proportions drawn from Dir(alpha), the
            label-skew scheme of Hsu et al. 2019 / NIID-Bench); ``quantity:<beta>`` (site sizes drawn
            from Dir(beta), labels iid within a site).
        seed: the split depends only on (labels, n_sites, scheme, seed).

    Returns:
        One sorted int64 index array per site.
    """
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    labels = np.asarray(labels)
    n = len(labels)
    if n_sites < 1:
        raise MonaiFLError("the number of sites must be at least 1")
    if n < n_sites * MIN_SITE_SIZE and n_sites > 1:
        raise MonaiFLError(f"{n} cases cannot give {n_sites} sites at least {MIN_SITE_SIZE} cases each")
    rng = np.random.default_rng(seed)
    if scheme.kind == "iid" or n_sites == 1:
        parts = np.array_split(rng.permutation(n), n_sites)
    elif scheme.kind == "quantity":
        parts = _resample(lambda: _quantity_split(n, n_sites, scheme.param, rng), scheme)
    else:
        parts = _resample(lambda: _dirichlet_split(labels, n_sites, scheme.param, rng), scheme)
    return [np.sort(p).astype(np.int64) for p in parts]


def _resample(draw, scheme: Scheme) -> list[np.ndarray]:
    for _ in range(MAX_RESAMPLES):
        parts = draw()
        if min(len(p) for p in parts) >= MIN_SITE_SIZE:
            return parts
    raise MonaiFLError(f"scheme {scheme} gave a site with fewer than {MIN_SITE_SIZE} cases in {MAX_RESAMPLES} draws; "
                       "use a larger alpha/beta or fewer sites")


def _quantity_split(n: int, n_sites: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    props = rng.dirichlet(np.full(n_sites, beta))
    cuts = (np.cumsum(props)[:-1] * n).astype(int)
    return np.split(rng.permutation(n), cuts)


def _dirichlet_split(labels: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].append(chunk)
    return [np.concatenate(p) for p in parts]


def test_shards(train_parts: list[np.ndarray], train_labels: np.ndarray, test_labels: np.ndarray) -> list[np.ndarray]:
    """Split the pooled test set into disjoint per-site shards that mirror each site's class mix.

    For each class, its test cases are divided among sites in proportion to how many training cases
    of that class each site holds (largest-remainder rounding), so a site's shard looks like its own
    hold-out. Deterministic: no randomness beyond the order of test indices.
    """
    n_sites = len(train_parts)
    shards: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(test_labels):
        idx = np.flatnonzero(test_labels == c)
        counts = np.array([(train_labels[p] == c).sum() for p in train_parts], dtype=float)
        weights = counts / counts.sum() if counts.sum() > 0 else np.full(n_sites, 1.0 / n_sites)
        alloc = _largest_remainder(weights * len(idx), len(idx))
        start = 0
        # Interleave rather than take contiguous blocks so shards are not ordered by file position.
        order = np.concatenate([idx[i::n_sites] for i in range(n_sites)])
        for site, k in enumerate(alloc):
            shards[site].extend(order[start:start + k].tolist())
            start += k
    return [np.sort(np.array(s, dtype=np.int64)) for s in shards]


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    base = np.floor(quotas).astype(int)
    rest = total - base.sum()
    base[np.argsort(-(quotas - base), kind="stable")[:rest]] += 1
    return base


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Count of each class 0..num_classes-1."""
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def build_manifest(
    dataset: str,
    size: int,
    dataset_md5: str,
    pool_labels: np.ndarray,
    test_labels: np.ndarray,
    label_names: list[str],
    n_sites: int,
    scheme: str,
    seed: int,
) -> dict:
    """Partition the pool and describe the result as a site manifest (a JSON-ready dict)."""
    scheme_obj = Scheme.parse(scheme)
    k = len(label_names)
    parts = partition(pool_labels, n_sites, scheme_obj, seed)
    shards = test_shards(parts, pool_labels, test_labels)
    sites = {}
    for name, idx, tidx in zip(site_names(n_sites), parts, shards):
        sites[name] = {
            "n_train": int(len(idx)),
            "class_counts": class_counts(pool_labels[idx], k),
            "n_test": int(len(tidx)),
            "test_class_counts": class_counts(test_labels[tidx], k),
            "train_indices": idx.tolist(),
            "test_indices": tidx.tolist(),
        }
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "size": size,
        "dataset_md5": dataset_md5,
        "pool": "official train+val (train first)",
        "scheme": str(scheme_obj),
        "seed": seed,
        "label_names": label_names,
        "n_pool": int(len(pool_labels)),
        "n_test": int(len(test_labels)),
        "test_class_counts": class_counts(test_labels, k),
        "sites": sites,
    }


def write_manifest(manifest: dict, path: str | os.PathLike) -> Path:
    """Write the manifest atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path)
    return path


def read_manifest(path: str | os.PathLike, dataset_md5: str | None = None, n_pool: int | None = None) -> dict:
    """Read and validate a site manifest.

    Args:
        path: manifest file.
        dataset_md5: when given, the manifest must have been made from this exact dataset file.
        n_pool: when given, every index must lie in ``range(n_pool)``.

    Raises:
        ManifestError: with the file name and what is wrong.
    """
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"site manifest {path} does not exist; create it with `monai-fl partition`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"site manifest {path} is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a monai-fl site manifest (missing \"format\": \"{MANIFEST_FORMAT}\")")
    for key in ("dataset", "size", "dataset_md5", "sites", "label_names", "n_pool"):
        if key not in m:
            raise ManifestError(f"site manifest {path} lacks the field '{key}'")
    if not isinstance(m["sites"], dict) or not m["sites"]:
        raise ManifestError(f"site manifest {path} lists no sites")
    if dataset_md5 is not None and m["dataset_md5"] != dataset_md5:
        raise ManifestError(f"site manifest {path} was made from another file of {m['dataset']} "
                            f"(md5 {m['dataset_md5']}, data is {dataset_md5})")
    seen: set[int] = set()
    limit = n_pool if n_pool is not None else m["n_pool"]
    for site, entry in m["sites"].items():
        for key in ("train_indices", "test_indices"):
            idx = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(idx, list) or not all(isinstance(i, int) for i in idx):
                raise ManifestError(f"site manifest {path}: site '{site}' has no integer list '{key}'")
        bad = [i for i in entry["train_indices"] if not 0 <= i < limit]
        if bad:
            raise ManifestError(f"site manifest {path}: site '{site}' has indices outside the pool of {limit}: {bad[:5]}")
        dup = seen.intersection(entry["train_indices"])
        if dup:
            raise ManifestError(f"site manifest {path}: site '{site}' shares training cases with another site: {sorted(dup)[:5]}")
        seen.update(entry["train_indices"])
    return m


def site_entry(manifest: dict, site: str) -> dict:
    """The manifest entry for ``site``, with a clear error naming the known sites."""
    entry = manifest["sites"].get(site)
    if entry is None:
        raise ManifestError(f"site '{site}' is not in the site manifest (sites: {', '.join(manifest['sites'])})")
    return entry


def load_or_create_manifest(
    path: str | os.PathLike | None,
    create: bool,
    build: Callable[[], dict],
    dataset_md5: str,
    n_pool: int,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """Reuse the manifest at ``path`` (validated against the data, then ``check``), or build and
    write a new one when ``create`` allows it. Every task's experiment goes through here.

    Raises:
        ManifestError: the manifest is absent and may not be created, or does not fit the data.
    """
    path = Path(path) if path is not None else None
    if path is not None and path.exists():
        manifest = read_manifest(path, dataset_md5=dataset_md5, n_pool=n_pool)
        if check is not None:
            check(manifest)
        return manifest
    if not create:
        raise ManifestError(f"site manifest {path} does not exist; create it with `monai-fl partition`")
    manifest = build()
    if path is not None:
        write_manifest(manifest, path)
    return manifest
