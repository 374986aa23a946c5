"""The test suite: `python -m pytest -q test_all.py`. Tiny configs only; no timings."""
import csv
import dataclasses
import json
import errno
import math
import os
import re
import shutil
import textwrap
import socket
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import data
import emberformer as em
import finetune_cbh as ft
import losses
import mae

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.abspath(__file__))


# ==============================================================================================
# shared fixtures: tiny embedded-style datasets written in the real schemas

@pytest.fixture(scope="session")
def tiny_clouds(tmp_path_factory):
    """(unlabelled_path, labelled_path) of a tiny cloud dataset: 3 flights x 400 frames."""
    d = tmp_path_factory.mktemp("clouds")
    u, l = data.generate_clouds(n_flights=3, frames_per_flight=400, n_labelled=120, seed=1)
    data.write_clouds(d / "unlab.h5", **u)
    data.write_clouds(d / "lab.h5", **l)
    return str(d / "unlab.h5"), str(d / "lab.h5")


@pytest.fixture(scope="session")
def tiny_fires(tmp_path_factory):
    path = tmp_path_factory.mktemp("fires") / "fires.h5"
    data.write_fire(path, **data.generate_fires(n_seq=40, size=32, n_frames=12, seed=1))
    return str(path)


def run_script(*args, timeout=300):
    """Run a stage script as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_one_line_error(proc, *words):
    """Exit code 2, a single 'error:' line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# ==============================================================================================
# data.py: schemas and validation

def test_cloud_schema_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(1000, 50, (7, 440)).astype(np.float32)
    meta = np.stack([np.zeros(7), np.arange(7), np.full(7, 30.0), np.full(7, 120.0)], 1)
    cbh = rng.uniform(0.2, 1.5, 7).astype(np.float32)
    data.write_clouds(tmp_path / "c.h5", images, meta, cbh)
    with h5py.File(tmp_path / "c.h5") as f:  # the on-disk schema itself, as the real files have it
        assert f["images"].dtype == np.float32 and f["images"].shape == (7, 440)
        assert tuple(v.decode() if isinstance(v, bytes) else v for v in f["metadata"].attrs["columns"]) \
            == data.CLOUD_COLUMNS
    d = data.load_clouds(str(tmp_path / "c.h5"), labelled=True)
    np.testing.assert_array_equal(d["images"], images)
    np.testing.assert_array_equal(d["cbh_km"], cbh)
    np.testing.assert_array_equal(d["frame"], np.arange(7))
    assert d["flight"].dtype == np.int64 and (d["sza"] == 30).all()
    assert len(data.load_clouds(str(tmp_path / "c.h5"), max_samples=3)["images"]) == 3


def test_fire_schema_round_trip(tmp_path):
    d = data.generate_fires(n_seq=3, size=16, n_frames=5, seed=0)
    data.write_fire(tmp_path / "f.h5", **d)
    r = data.load_fire(str(tmp_path / "f.h5"))
    np.testing.assert_array_equal(r["fire"], d["fire"])
    np.testing.assert_array_equal(r["static"], d["static"])
    np.testing.assert_array_equal(r["wind"], d["wind"])
    assert r["channels"] == list(data.FIRE_CHANNELS) and r["fire"].dtype == np.uint8


def _write_h5(path, **datasets):
    """Write raw datasets; a value (array, {attr: value}) also sets attributes."""
    with h5py.File(path, "w") as f:
        for name, v in datasets.items():
            arr, attrs = v if isinstance(v, tuple) else (v, {})
            ds = f.create_dataset(name, data=arr)
            for k, a in attrs.items():
                ds.attrs[k] = a


def _good_clouds(n=5):
    meta = np.stack([np.zeros(n), np.arange(n), np.full(n, 30.0), np.full(n, 100.0)], 1).astype(np.float32)
    cols = {"columns": np.array(data.CLOUD_COLUMNS, dtype=h5py.string_dtype())}
    return dict(images=np.ones((n, 440), np.float32), metadata=(meta, cols), cbh_km=np.ones(n, np.float32))


def _with(base, **changes):
    d = dict(base)
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("change, words", [
    (dict(images=None), ["'images'", "missing"]),
    (dict(images=np.ones((5, 440), np.int32)), ["'images'", "dtype"]),
    (dict(images=np.ones((5, 440, 2), np.float32)), ["'images'", "dimensions"]),
    (dict(images=np.full((5, 440), np.nan, np.float32)), ["'images'", "NaN"]),
    (dict(metadata=np.ones((4, 4), np.float32)), ["'metadata'", "shape"]),
    (dict(cbh_km=None), ["'cbh_km'", "missing"]),
    (dict(cbh_km=np.array([1, 1, np.nan, 1, 1], np.float32)), ["'cbh_km'", "NaN"]),
    (dict(cbh_km=np.array([1, -0.5, 1, 1, 1], np.float32)), ["'cbh_km'", "outside"]),
    (dict(cbh_km=np.ones(3, np.float32)), ["'cbh_km'", "rows"]),
])
def test_bad_cloud_files_raise_named_errors(tmp_path, change, words):
    path = str(tmp_path / "bad.h5")
    _write_h5(path, **_with(_good_clouds(), **change))
    with pytest.raises(data.DataError) as e:
        data.load_clouds(path, labelled=True)
    assert path in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_bad_cloud_paths_and_metadata(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.load_clouds(str(tmp_path / "nope.h5"))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(data.DataError, match="not an HDF5 file"):
        data.load_clouds(str(tmp_path / "text.h5"))
    g = _good_clouds()
    meta, _ = g["metadata"]
    _write_h5(tmp_path / "nocols.h5", images=g["images"], metadata=meta)
    with pytest.raises(data.DataError, match="columns"):
        data.load_clouds(str(tmp_path / "nocols.h5"))
    bad_angle = meta.copy()
    bad_angle[0, 2] = 400
    _write_h5(tmp_path / "angle.h5", images=g["images"], metadata=(bad_angle, g["metadata"][1]))
    with pytest.raises(data.DataError, match="solar angles"):
        data.load_clouds(str(tmp_path / "angle.h5"))
    _write_h5(tmp_path / "empty.h5", images=np.ones((0, 440), np.float32),
              metadata=(np.ones((0, 4), np.float32), g["metadata"][1]))
    with pytest.raises(data.DataError, match="empty"):
        data.load_clouds(str(tmp_path / "empty.h5"))


def _good_fire(S=2, T=4, H=8, W=8):
    chans = {"channels": np.array(["elevation_m", "fuel_type"], dtype=h5py.string_dtype())}
    return dict(fire=np.zeros((S, T, H, W), np.uint8), static=(np.zeros((S, 2, H, W), np.float32), chans),
                wind=np.zeros((S, T, 2), np.float32))


@pytest.mark.parametrize("change, words", [
    (dict(fire=np.zeros((2, 4, 8, 8), np.float32)), ["'fire'", "dtype"]),
    (dict(fire=np.full((2, 4, 8, 8), 2, np.uint8)), ["'fire'", "binary"]),
    (dict(fire=np.zeros((2, 1, 8, 8), np.uint8), wind=np.zeros((2, 1, 2), np.float32)), ["'fire'", "T=1"]),
    (dict(static=(np.zeros((2, 2, 8, 9), np.float32),
                  {"channels": np.array(["a", "b"], dtype=h5py.string_dtype())})), ["'static'", "shape"]),
    (dict(static=np.zeros((2, 2, 8, 8), np.float32)), ["'static'", "channels"]),
    (dict(wind=np.full((2, 4, 2), np.nan, np.float32)), ["'wind'", "NaN"]),
    (dict(wind=np.full((2, 4, 2), 500, np.float32)), ["'wind'", "m/s"]),
    (dict(wind=np.zeros((2, 3, 2), np.float32)), ["'wind'", "shape"]),
    (dict(static=None), ["'static'", "missing"]),
    (dict(fire=np.zeros((2, 4, 0, 0), np.uint8), static=(np.zeros((2, 2, 0, 0), np.float32),
          {"channels": np.array(["a", "b"], dtype=h5py.string_dtype())})), ["'fire'", "empty grid"]),
])
def test_bad_fire_files_raise_named_errors(tmp_path, change, words):
    path = str(tmp_path / "bad.h5")
    _write_h5(path, **_with(_good_fire(), **change))
    with pytest.raises(data.DataError) as e:
        data.load_fire(path)
    assert path in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_good_fire_file_loads(tmp_path):
    _write_h5(tmp_path / "ok.h5", **_good_fire())
    assert data.load_fire(str(tmp_path / "ok.h5"))["channels"] == ["elevation_m", "fuel_type"]


def test_atomic_save_never_leaves_partial_files(tmp_path):
    path = tmp_path / "ck" / "a.pth"
    data.atomic_torch_save({"x": 1}, path)
    with pytest.raises((TypeError, AttributeError)):  # an unpicklable object fails mid-write...
        data.atomic_torch_save({"x": lambda: 0}, path)
    assert data.load_checkpoint(str(path)) == {"x": 1}  # ...and the previous file is untouched
    assert os.listdir(path.parent) == ["a.pth"]  # no temp files left behind
    with pytest.raises(data.DataError, match="not found"):
        data.load_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(data.DataError, match="not a readable"):
        data.load_checkpoint(str(tmp_path / "junk.pth"))


# ==============================================================================================
# data.py: synthetic generators

def test_cloud_generator_deterministic_and_physical():
    a_u, a_l = data.generate_clouds(n_flights=4, frames_per_flight=3000, n_labelled=400, seed=0)
    b_u, b_l = data.generate_clouds(n_flights=4, frames_per_flight=3000, n_labelled=400, seed=0)
    np.testing.assert_array_equal(a_u["images"], b_u["images"])
    np.testing.assert_array_equal(a_l["cbh_km"], b_l["cbh_km"])
    c_u, _ = data.generate_clouds(n_flights=4, frames_per_flight=3000, n_labelled=400, seed=1)
    assert not np.array_equal(a_u["images"], c_u["images"])
    assert a_u["images"].shape == (12000, 440) and a_u["images"].dtype == np.float32
    cbh, flight = a_l["cbh_km"], a_l["metadata"][:, 0]
    assert 300 <= len(cbh) <= 400 and (cbh > 0).all() and (cbh < 2.2).all()
    assert all((flight == f).sum() == 100 for f in range(4))  # every flight has lidar labels
    # higher cloud -> colder top -> lower signal in the coldest pixel. Compared within each flight (surface
    # temperature and calibration differ between flights) and pooled: a flight holds few independent
    # cloud regimes, so one flight's correlation alone is noisy
    big_u, big_l = data.generate_clouds(n_flights=8, frames_per_flight=2000, n_labelled=800, seed=0)
    fl, cbh, coldest = big_l["metadata"][:, 0], big_l["cbh_km"], big_l["images"].min(1)
    z = lambda v: np.concatenate([(v[fl == f] - v[fl == f].mean()) / v[fl == f].std() for f in range(8)])
    assert np.corrcoef(z(cbh), z(coldest))[0, 1] < -0.4
    # neighbouring frames strongly correlated, distant frames much less
    im = a_u["images"][:3000] - a_u["images"][:3000].mean(0)  # anomalies: drop the shared vignetting
    near = np.mean([np.corrcoef(im[i], im[i + 1])[0, 1] for i in range(0, 2900, 97)])
    far = np.mean([np.corrcoef(im[i], im[(i + 1500) % 3000])[0, 1] for i in range(0, 2900, 97)])
    assert near > 0.7 and far < 0.3, (near, far)
    # flights differ (surface temperature, calibration, CBH regime)
    fl = a_u["metadata"][:, 0]
    means = [a_u["images"][fl == f].mean() for f in range(4)]
    assert np.ptp(means) > 50
    # solar angles are physical and vary smoothly in time
    sza = a_u["metadata"][:, 2]
    assert (sza >= 0).all() and (sza <= 90).all() and np.abs(np.diff(sza[:3000])).max() < 0.1


def _centroid(m):
    rr, cc = np.mgrid[0:m.shape[-2], 0:m.shape[-1]]
    a = m.sum((-1, -2)) + 1e-9
    return (m * cc).sum((-1, -2)) / a, (m * rr).sum((-1, -2)) / a


def test_fire_generator_deterministic_monotone_downwind():
    d = data.generate_fires(n_seq=60, size=48, n_frames=16, seed=5)
    np.testing.assert_array_equal(d["fire"],
                                  data.generate_fires(n_seq=60, size=48, n_frames=16, seed=5)["fire"])
    f = d["fire"]
    assert set(np.unique(f)) <= {0, 1} and f[:, -1].sum() > f[:, 0].sum() * 20
    assert (np.diff(f.astype(int), axis=1) >= 0).all()  # cumulative burned area never shrinks
    # the fire front moves downwind: centroid displacement along the mean wind (east = +col, north = -row)
    x0, y0 = _centroid(f[:, 0])
    x1, y1 = _centroid(f[:, -1])
    w = d["wind"].mean(1)
    speed = np.hypot(w[:, 0], w[:, 1])
    along = ((x1 - x0) * w[:, 0] - (y1 - y0) * w[:, 1]) / (speed + 1e-9)
    across = np.abs((x1 - x0) * w[:, 1] + (y1 - y0) * w[:, 0]) / (speed + 1e-9)
    strong = speed > 6
    assert strong.sum() >= 10
    assert along[strong].mean() > 3 and along[strong].mean() > 1.5 * across[strong].mean()
    # and it reaches farther downwind than upwind of the ignition point
    rr, cc = np.mgrid[0:48, 0:48]
    down, up = [], []
    for s in np.flatnonzero(strong):
        m = f[s, -1].astype(bool)
        proj = ((cc[m] - x0[s]) * w[s, 0] - (rr[m] - y0[s]) * w[s, 1]) / speed[s]
        down.append(proj.max())
        up.append(-proj.min())
    assert np.mean(down) > 1.5 * np.mean(up), (np.mean(down), np.mean(up))


def test_fire_climbs_uphill():
    """Without wind, the slope term biases spread uphill: burned cells sit higher than with slope_coef=0."""
    def mean_rise(slope_coef):
        d = data.generate_fires(n_seq=40, size=48, n_frames=14, seed=7, max_wind=0.0, slope_coef=slope_coef)
        elev, f = d["static"][:, 0], d["fire"]
        start = (elev * f[:, 0]).sum((1, 2)) / f[:, 0].sum((1, 2))
        new = f[:, -1] & ~f[:, 0]
        return ((elev * new).sum((1, 2)) / np.maximum(new.sum((1, 2)), 1) - start).mean()
    assert mean_rise(0.078) > mean_rise(0.0) + 5  # metres


def test_default_datasets_use_real_schema(monkeypatch, tmp_path):
    """The embedded default is generated once into DATA_DIR and read back by the validating readers."""
    real = data.generate_clouds
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "generate_clouds",
                        lambda: real(n_flights=2, frames_per_flight=300, n_labelled=40))
    u, l = data.default_cloud_paths()
    assert os.path.dirname(u) == str(tmp_path)
    assert len(data.load_clouds(u)["images"]) == 600
    assert len(data.load_clouds(l, labelled=True)["cbh_km"]) > 0
    mtime = os.path.getmtime(u)
    data.default_cloud_paths()  # cached: not regenerated
    assert os.path.getmtime(u) == mtime


# ==============================================================================================
# data.py: splits and batching

def test_split_blocked_leaves_gap_and_lofo_separates_flights():
    flight = np.repeat([0, 1, 2], 100)
    frame = np.tile(np.arange(100), 3)
    for k in range(5):
        tr, te = data.split_blocked(flight, frame, n_blocks=5, test_block=k, gap=7)
        assert len(np.intersect1d(tr, te)) == 0 and len(te) == 60
        for f in range(3):
            te_f, tr_f = frame[te][flight[te] == f], frame[tr][flight[tr] == f]
            dist = np.abs(tr_f[:, None] - te_f[None, :]).min(1)
            assert dist.min() > 7  # nothing within the gap
        assert len(tr) == 300 - 60 - 3 * (14 if k in (1, 2, 3) else 7)  # the gap is exactly what is cut
    folds = data.split_lofo(flight)
    assert [f[0] for f in folds] == [0, 1, 2]
    for held, tr, te in folds:
        assert set(flight[te]) == {held} and held not in set(flight[tr]) and len(tr) + len(te) == 300
    rnd = data.split_random(50, n_folds=5, seed=0)
    assert sorted(np.concatenate([te for _, te in rnd]).tolist()) == list(range(50))


def test_batch_indices_and_norm_stats():
    g = torch.Generator().manual_seed(0)
    b = data.batch_indices(10, 4, shuffle=True, generator=g)
    assert [len(x) for x in b] == [4, 4, 2] and sorted(torch.cat(b).tolist()) == list(range(10))
    assert torch.equal(torch.cat(data.batch_indices(10, 4, shuffle=False)), torch.arange(10))
    m, s = data.norm_stats(np.array([[1.0, 3.0], [1.0, 3.0]]))
    assert m == pytest.approx(2.0) and s == pytest.approx(1.0, abs=1e-5)


def test_augment_profiles():
    x = torch.randn(64, 440)
    assert torch.equal(data.augment_profiles(x, flip=False, crop=False, jitter=False), x)
    g = torch.Generator().manual_seed(0)
    y = data.augment_profiles(x, generator=g, flip=True, crop=False, jitter=False)
    flipped = (y == x.flip(1)).all(1)
    assert torch.equal(y[~flipped], x[~flipped]) and 10 < flipped.sum() < 54  # about half flipped
    ramp = torch.linspace(0, 1, 440).repeat(32, 1)
    c = data.augment_profiles(ramp, generator=g, flip=False, crop=True, jitter=False)
    span = c[:, -1] - c[:, 0]  # a crop keeps 80-100% of the ramp, resized back to 440 px
    assert (c.shape == ramp.shape and (span > 0.79).all() and (span <= 1.0 + 1e-6).all()
            and (span < 0.99).any())
    assert torch.all(torch.diff(c, dim=1) >= -1e-6)  # linear interpolation keeps it monotone
    j = data.augment_profiles(x, generator=g, flip=False, crop=False, jitter=True)
    ratio = j.std(1) / x.std(1)
    assert (ratio > 0.69).all() and (ratio < 1.31).all() and ratio.std() > 0.05


def test_fire_batch_right_pads_history():
    S, T, H, W = 2, 6, 3, 3
    fire = torch.zeros(S, T, H, W, dtype=torch.uint8)
    for t in range(T):
        fire[:, t, 0, :t % 4] = 1  # frame t has t % 4 burning cells in row 0
    fire[1] = 1
    wind = torch.arange(S * T * 2, dtype=torch.float32).reshape(S, T, 2)
    hist, wh, L, target = data.fire_batch(fire, wind, torch.tensor([0, 0, 1]), torch.tensor([0, 4, 2]), K=3)
    assert hist.shape == (3, 3, H, W) and wh.shape == (3, 3, 2) and target.shape == (3, H, W)
    assert L.tolist() == [1, 3, 3]
    assert (hist[0].sum((1, 2)).tolist() == [0, 0, 0] and (wh[0, 1:] == 0).all()
            and wh[0, 0].tolist() == [0, 1])
    assert hist[1].sum((1, 2)).tolist() == [2, 3, 0]  # frames 2, 3, 4 oldest first
    assert wh[1, :, 0].tolist() == [4, 6, 8]
    assert torch.equal(target[1], fire[0, 5].float())
    # padding is zeros, not a repeat of the last real frame: sequence 1 burns everywhere from frame 0
    hist, wh, L, _ = data.fire_batch(fire, wind, torch.tensor([1]), torch.tensor([0]), K=3)
    assert L.tolist() == [1] and (hist[0, 0] == 1).all() and (hist[0, 1:] == 0).all()
    assert wh[0, 0].tolist() == [12, 13] and (wh[0, 1:] == 0).all()
    s, t = data.fire_sample_index([3, 5], n_frames=4)
    assert s.tolist() == [3, 3, 3, 5, 5, 5] and t.tolist() == [0, 1, 2, 0, 1, 2]
    tr, va = data.split_sequences(10, val_frac=0.3, seed=0)
    assert len(va) == 3 and len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 10


# ==============================================================================================
# losses.py

def test_masked_mse_counts_only_masked_patches():
    pred = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])  # (B=1, N=2, P=2)
    target = torch.zeros(1, 2, 2)
    assert losses.masked_mse(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(9.0)
    assert losses.masked_mse(pred, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.0)
    assert losses.masked_mse(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(5.0)
    assert losses.masked_mse(pred, target, torch.zeros(1, 2)).item() == 0.0  # empty mask
    # norm_pix: target [0, 2] -> [-1, 1]
    t = torch.tensor([[[0.0, 2.0]]])
    p = torch.tensor([[[-1.0, 1.0]]])
    assert losses.masked_mse(p, t, torch.ones(1, 1), norm_pix=True).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.masked_mse(p, t, torch.ones(1, 1), norm_pix=False).item() == pytest.approx(1.0)


def test_bce_dice_hand_values():
    logits = torch.tensor([[[0.0, 0.0]]])  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0]]])
    loss, bce, dice = losses.bce_dice_loss(logits, target, smooth=0.0)
    assert bce.item() == pytest.approx(np.log(2))
    assert dice.item() == pytest.approx(1 - 2 * 0.5 / (1.0 + 1.0))
    assert loss.item() == pytest.approx(0.5 * np.log(2) + 0.5 * 0.5)
    # weights, and BCE positive-class weight: only the positive pixel's term is scaled
    loss2, bce2, _ = losses.bce_dice_loss(logits, target, bce_weight=1.0, dice_weight=0.0, pos_weight=3.0)
    assert (bce2.item() == pytest.approx((3 * np.log(2) + np.log(2)) / 2)
            and loss2.item() == pytest.approx(bce2.item()))
    # empty target and (near) empty prediction: Dice loss ~0, not 0/0
    _, _, d_empty = losses.bce_dice_loss(torch.full((2, 4, 4), -30.0), torch.zeros(2, 4, 4))
    assert d_empty.item() == pytest.approx(0.0, abs=1e-6)
    # all correct vs all wrong
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    _, b_ok, d_ok = losses.bce_dice_loss((t * 2 - 1) * 30, t)
    _, b_bad, d_bad = losses.bce_dice_loss((1 - 2 * t) * 30, t)
    assert b_ok.item() < 1e-6 and d_ok.item() < 1e-6 and b_bad.item() > 20 and d_bad.item() > 0.6


def test_regression_metrics_hand_values():
    m = losses.regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    # SS_res = 4, SS_tot = 8 + 2/3 ... mean(true) = 8/3
    ss_tot = sum((v - 8 / 3) ** 2 for v in [1, 2, 5])
    assert m["r2"] == pytest.approx(1 - 4 / ss_tot)
    assert m["mae"] == pytest.approx(2 / 3) and m["rmse"] == pytest.approx(np.sqrt(4 / 3))
    assert losses.regression_metrics([1, 2], [1, 2])["r2"] == 1.0
    assert np.isnan(losses.regression_metrics([1, 2], [3, 3])["r2"])


def test_seg_metrics_edge_cases_and_accumulation():
    p = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    t = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    c = losses.confusion_counts(p, t)
    assert c.tolist() == [2, 1, 1, 1]
    m = losses.seg_metrics(c)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert (m["f1"] == pytest.approx(2 / 3) and m["iou"] == pytest.approx(0.5)
            and m["accuracy"] == pytest.approx(0.6))
    # mask restricts the counted pixels
    assert losses.confusion_counts(
        p, t, mask=torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)).tolist() == [1, 1, 0, 0]
    # empty: nothing to find and nothing found is perfect
    z = torch.zeros(4, dtype=torch.bool)
    assert losses.seg_metrics(losses.confusion_counts(z, z)) == dict(precision=1.0, recall=1.0, f1=1.0,
                                                                     iou=1.0, accuracy=1.0)
    # all wrong
    o = torch.ones(4, dtype=torch.bool)
    assert losses.seg_metrics(losses.confusion_counts(o, z)) == dict(precision=0.0, recall=0.0, f1=0.0,
                                                                     iou=0.0, accuracy=0.0)
    assert losses.seg_metrics(losses.confusion_counts(z, o))["precision"] == 0.0
    # summing counts over batches equals counting the whole epoch at once
    g = torch.Generator().manual_seed(0)
    P, T = torch.rand(6, 8, 8, generator=g) > 0.5, torch.rand(6, 8, 8, generator=g) > 0.7
    total = sum(losses.confusion_counts(P[i:i + 2], T[i:i + 2]) for i in range(0, 6, 2))
    assert torch.equal(total, losses.confusion_counts(P, T))


# ==============================================================================================
# mae.py: masked-autoencoder pre-training

# fixed precision: runs compare exactly
MAE_TINY = ["--model_size", "tiny", "--batch_size", "32", "--lr", "2e-3", "--warmup_epochs", "1",
            "--num_threads", "1", "--n_plot", "2", "--cpu_bf16", "off"]


@pytest.fixture(scope="module")
def mae_run4(tiny_clouds, tmp_path_factory):
    """An uninterrupted 4-epoch tiny run, shared by the tests below."""
    out = str(tmp_path_factory.mktemp("mae_run4"))
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4",
                   "--save_every", "2", *MAE_TINY)
    assert r.returncode == 0, r.stderr
    return out


def test_mae_shapes_and_param_counts():
    x = torch.randn(5, 1, 440)
    for size, n_params, n_enc, n_patch, patch, dim in [("tiny", 662_036, 600_832, 22, 20, 128),
                                                      ("small", 1_923_568, 1_788_672, 27, 16, 192)]:
        m = mae.MAE(**mae.model_config(dict(model_size=size), 440))
        assert sum(p.numel() for p in m.parameters()) == n_params
        assert sum(p.numel() for p in m.encoder.parameters()) == n_enc
        n_keep = int(n_patch * 0.25)
        latent, mask, ids_restore = m.encoder(x, 0.75, torch.Generator().manual_seed(0))
        assert latent.shape == (5, 1 + n_keep, dim) and mask.shape == ids_restore.shape == (5, n_patch)
        assert (mask.sum(1) == n_patch - n_keep).all()
        pred, mask = m(x, 0.75)
        assert pred.shape == (5, n_patch, patch)
        assert m.encoder.features(x).shape == m.encoder.features(x, "mean").shape == (5, dim)
        assert m.encoder.patchify(x).shape == (5, n_patch, patch)


def test_mae_two_channel_input_patches_both_channels_and_predicts_them():
    """--input both: 2 input channels; a patch holds both channels' pixels of the same columns."""
    m = mae.MAE(**mae.model_config(dict(model_size="tiny"), 440, in_chans=2))
    assert m.encoder.patch_embed.in_features == 2 * 20 and m.head.out_features == 2 * 20
    x = torch.arange(2 * 440.0).reshape(1, 2, 440)
    p = m.encoder.patchify(x)  # (1, 22, 40); crop of 440 - 22 * 20 = 0 px
    assert p.shape == (1, 22, 40)
    assert torch.equal(p[0, 3, :20], x[0, 0, 60:80]) and torch.equal(p[0, 3, 20:], x[0, 1, 60:80])
    pred, mask = m(x, 0.75)
    assert pred.shape == (1, 22, 40)
    assert mae.encoder_config(mae.model_config(dict(model_size="tiny"), 440, in_chans=2))["in_chans"] == 2


def test_profile_channels_contrast_drops_the_absolute_level():
    rng = np.random.default_rng(0)
    x = rng.normal(10_000, 300, (4, 440)).astype(np.float32)
    raw, con, both = (data.profile_channels(x, m) for m in ("raw", "contrast", "both"))
    assert raw.shape == con.shape == (4, 1, 440) and both.shape == (4, 2, 440)
    np.testing.assert_array_equal(raw[:, 0], x)
    # warmer sea: same
    np.testing.assert_allclose(data.profile_channels(x + 700.0, "contrast"), con, atol=1e-2)
    assert np.allclose(np.percentile(con[:, 0], data.WARM_PERCENTILE, axis=1), 0, atol=1e-2)
    np.testing.assert_array_equal(both[:, 0], x)
    np.testing.assert_array_equal(both[:, 1], con[:, 0])
    with pytest.raises(data.DataError, match="--input"):
        data.profile_channels(x, "brightness")


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    enc = mae.build_encoder(mae.encoder_config(dict(mae.MODEL_SIZES["tiny"], width=440)), drop_path=0.5)
    assert [b.drop_path for b in enc.blocks] == [0.0, 0.25, 0.5]
    x = torch.randn(8, 1, 440)
    enc.eval()
    assert torch.equal(enc.features(x), enc.features(x))  # eval: deterministic
    enc.train()
    assert not torch.equal(enc.features(x), enc.features(x))  # training: random branches dropped


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_mae_masked_content_cannot_influence_prediction(size):
    torch.manual_seed(0)
    m = mae.MAE(**mae.MODEL_SIZES[size]).eval()
    x = torch.randn(4, 1, 440)
    latent, mask, _ = m.encoder(x, 0.75, torch.Generator().manual_seed(7))
    pred, _ = m(x, 0.75, torch.Generator().manual_seed(7))
    enc = m.encoder
    x2 = x.clone()
    hidden = enc.patchify(x2)  # a view into x2's pixels
    hidden[mask.bool()] = 100 * torch.randn_like(hidden[mask.bool()])  # scramble every masked patch
    x2[..., :enc.crop] = 55.0  # and the pixels cropped away (small: 4 on each side)
    x2[..., enc.crop + enc.num_patches * enc.patch_size:] = -55.0
    assert not torch.equal(x, x2)
    latent2, mask2, _ = m.encoder(x2, 0.75, torch.Generator().manual_seed(7))
    pred2, _ = m(x2, 0.75, torch.Generator().manual_seed(7))
    assert torch.equal(mask, mask2) and torch.equal(latent, latent2) and torch.equal(pred, pred2)
    # a visible pixel does change them (so the test above can fail)
    x3 = x.clone()
    enc.patchify(x3)[~mask.bool()] += 1.0
    assert not torch.equal(latent, m.encoder(x3, 0.75, torch.Generator().manual_seed(7))[0])


def test_mae_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    m = mae.MAE(**mae.MODEL_SIZES["tiny"])
    x = torch.randn(4, 1, 440)
    with torch.no_grad():
        pred, mask = m(x, 0.75)
    target = m.encoder.patchify(x)
    for norm_pix in (False, True):
        loss = losses.masked_mse(pred, target, mask, norm_pix)
        vis = ~mask.bool()
        p2 = pred.clone()
        p2[vis] += 10.0
        assert torch.equal(losses.masked_mse(p2, target, mask, norm_pix), loss)
        p3 = pred.clone()
        p3[~vis] += 10.0
        assert losses.masked_mse(p3, target, mask, norm_pix) > loss


def test_mae_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = mae.MAE(**mae.MODEL_SIZES["tiny"])
    x = torch.randn(16, 1, 440)  # 16 samples: every patch position is visible in some of them
    pred, mask = m(x, 0.75, torch.Generator().manual_seed(0))
    losses.masked_mse(pred, m.encoder.patchify(x), mask).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mae_optimizer_groups_exclude_norms_biases_embeddings():
    m = mae.MAE(**mae.MODEL_SIZES["tiny"])
    cfg = dict(mae.parse_config([]))
    opt = mae.make_optimizer(m, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token", "dec_pos_embed"} <= plain
    assert all(n.endswith("weight") and "ln" not in n and "norm" not in n for n in decayed)
    assert len(decayed) + len(plain) == len(names)


@pytest.mark.parametrize("stage", [mae, ft, em])
def test_lr_schedule_is_one_pure_function_in_every_stage(stage):
    """get_lr(step, total, warmup, peak, min_lr) in all three stages: linear warmup over 10 steps, then
    half-cosine from the peak to min_lr at step 50 (exact values: a flat or linear schedule fails them)."""
    lrs = [stage.get_lr(s, 50, 10, 1e-3, 1e-5) for s in range(51)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[30] == pytest.approx((1e-3 + 1e-5) / 2)
    assert lrs[20] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)))
    assert lrs[50] == pytest.approx(1e-5) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))

def test_mae_training_loss_is_the_masked_mse_on_the_same_mask():
    """mae.loss_fn (what the loop minimises) = masked_mse over the hidden patches of the same mask; a loss
    that also counted visible patches would give the all-patch MSE instead, which differs here."""
    torch.manual_seed(0)
    m = mae.MAE(**mae.MODEL_SIZES["tiny"])
    x = torch.randn(8, 1, 440)
    cfg = dict(mask_ratio=0.75, norm_pix_loss=False)
    loss = mae.loss_fn(m, x, cfg, torch.Generator().manual_seed(3), None)
    pred, mask = m(x, 0.75, torch.Generator().manual_seed(3))
    target = m.encoder.patchify(x)
    assert loss.item() == pytest.approx(losses.masked_mse(pred, target, mask).item(), rel=1e-6)
    assert abs(loss.item() - ((pred - target) ** 2).mean().item()) > 1e-3


def test_cpu_precision_choice_times_both_and_obeys_on_off():
    clock = [0.0]
    ran = []

    def step(dtype):  # a fake training step: bf16 takes 1 s, fp32 3 s on the fake clock
        ran.append(dtype)
        clock[0] += 1.0 if dtype is torch.bfloat16 else 3.0
    dtype, msg = data.choose_cpu_dtype("auto", step, timer=lambda: clock[0], warmup=1, timed=2, rounds=2)
    assert dtype is torch.bfloat16 and "fp32 0.3 steps/s, bf16 1.0 steps/s -> bf16" in msg
    bf16 = torch.bfloat16  # warm-up in each precision, then alternating timed rounds
    assert ran == [bf16, None] + ([None] * 2 + [bf16] * 2) * 2

    def slow_bf16(dtype):
        clock[0] += 5.0 if dtype is torch.bfloat16 else 1.0
    assert data.choose_cpu_dtype("auto", slow_bf16, timer=lambda: clock[0])[0] is None

    def no_bf16(dtype):
        if dtype is torch.bfloat16:
            raise RuntimeError("bf16 not supported")
    dtype, msg = data.choose_cpu_dtype("auto", no_bf16)
    assert dtype is None and "failed" in msg and "fp32" in msg
    ran.clear()
    assert (data.choose_cpu_dtype("on", step)[0] is torch.bfloat16
            and data.choose_cpu_dtype("off", step)[0] is None)
    assert ran == []  # on/off never time anything


@pytest.mark.parametrize("stored,flag", [("bf16", "off"), ("fp32", "on")])
def test_mae_resume_keeps_the_stored_cpu_precision(mae_run4, tiny_clouds, tmp_path, stored, flag):
    """A resumed run uses the precision its checkpoint stored, without choosing again (choose_cpu_dtype prints
    a cpu_bf16 line whenever it runs), whatever --cpu_bf16 says now."""
    ckpt = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/epoch_002.pth"))
    ckpt["cpu_autocast"] = stored
    data.atomic_torch_save(ckpt, tmp_path / "stored.pth")
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", tmp_path / "out", "--epochs", "4",
                   "--save_every", "2", *MAE_TINY, "--cpu_bf16", flag, "--resume", tmp_path / "stored.pth")
    assert r.returncode == 0, r.stderr
    assert "cpu_bf16" not in r.stdout, r.stdout
    assert ("autocast torch.bfloat16" if stored == "bf16" else "autocast off (fp32)") in r.stdout, r.stdout
    assert data.load_checkpoint(tmp_path / "out/checkpoints/latest.pth")["cpu_autocast"] == stored


def test_mae_tiny_run_loss_falls_and_writes_outputs(mae_run4):
    rows = read_csv(os.path.join(mae_run4, "log.csv"))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    for f in ["mae_encoder_pretrained.pth", "checkpoints/best.pth", "checkpoints/latest.pth",
              "checkpoints/epoch_002.pth", "checkpoints/epoch_004.pth", "plots/loss.png",
              "plots/recon_epoch_001.png", "plots/recon_epoch_004.png"]:
        assert os.path.isfile(os.path.join(mae_run4, f)), f
    ck = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/latest.pth"))
    assert ck["epoch"] == 4 and ck["bad_epochs"] >= 0 and "rng" in ck and "optimizer" in ck


def test_mae_exact_resume(mae_run4, tiny_clouds, tmp_path):
    """A run resumed after epoch 2 reproduces the uninterrupted 4-epoch run exactly. The out_dir holds the
    run's epoch-2 checkpoint and its full 4-row log (as after resuming an older checkpoint): the log is
    trimmed back to epoch 2 and continued, never listing an epoch twice."""
    out = tmp_path / "resumed"
    os.makedirs(out / "checkpoints")
    shutil.copy(os.path.join(mae_run4, "checkpoints/epoch_002.pth"), out / "checkpoints/latest.pth")
    shutil.copy(os.path.join(mae_run4, "log.csv"), out / "log.csv")
    flags = ["--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4", "--save_every", "2", *MAE_TINY]
    r = run_script("mae.py", *flags, "--resume", out / "checkpoints/latest.pth")
    assert r.returncode == 0, r.stderr
    full, resumed = read_csv(os.path.join(mae_run4, "log.csv")), read_csv(out / "log.csv")
    assert [int(r["epoch"]) for r in resumed] == [1, 2, 3, 4]  # header once, no epoch twice
    for a, b in zip(full, resumed):
        assert (a["train_loss"], a["val_loss"], a["lr"]) == (b["train_loss"], b["val_loss"], b["lr"])
    ck_a = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/latest.pth"))
    ck_b = data.load_checkpoint(out / "checkpoints/latest.pth")
    assert all(torch.equal(ck_a["model"][k], ck_b["model"][k]) for k in ck_a["model"])
    # other settings would silently make another run: refused, naming the flag to pass
    r = run_script("mae.py", *flags, "--epochs", "6", "--resume", out / "checkpoints/latest.pth")
    assert_one_line_error(r, "different settings", "--epochs 4")


def test_mae_resume_of_a_checkpoint_holding_another_model_is_refused(mae_run4, tiny_clouds, tmp_path):
    """A checkpoint whose model differs from what today's preset builds (as 'small' with its former 2-block
    decoder) stops with one line, not a load_state_dict traceback, and writes nothing."""
    ckpt = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/epoch_002.pth"))
    extra = {k.replace("dec_blocks.0.", "dec_blocks.1."): v for k, v in ckpt["model"].items()
             if "dec_blocks.0." in k}
    ckpt["model"].update(extra)  # a second decoder block
    path = tmp_path / "two_block_decoder.pth"
    torch.save(ckpt, path)
    out = tmp_path / "out"
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4",
                   "--save_every", "2", *MAE_TINY, "--resume", path)
    assert_one_line_error(r, str(path), "another model", "--model_size tiny")
    assert not os.path.exists(out / "log.csv")
    # another --model_size is a setting to name, not a changed preset
    flags = [f if f != "tiny" else "small" for f in MAE_TINY]
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4",
                   "--save_every", "2", *flags,
                   "--resume", os.path.join(mae_run4, "checkpoints/epoch_002.pth"))
    assert_one_line_error(r, "different settings", "--model_size 'tiny'")
    assert not os.path.exists(out / "log.csv")
    # the custom-only sizes of a preset run are not settings of its model: a change of them does not block
    # its resume (the constants block's dec_depth was 2 when 'small' had 2 decoder blocks)
    ckpt = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/epoch_002.pth"))
    torch.save(dict(ckpt, config=dict(ckpt["config"], dec_depth=2, embed_dim=7)), path)
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4",
                   "--save_every", "2", *MAE_TINY, "--resume", path)
    assert r.returncode == 0, r.stderr


def test_mae_sigkill_mid_run_then_resume_gives_the_uninterrupted_losses(mae_run4, tiny_clouds, tmp_path):
    """Kill -9 the run as soon as its first latest.pth exists (an event, not a clock: wherever the kill lands,
    in epoch 2 or later), resume from latest.pth: log.csv equals the uninterrupted 4-epoch run's."""
    out = tmp_path / "killed"
    flags = ["--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4", "--save_every", "2", *MAE_TINY]
    proc = subprocess.Popen([sys.executable, "mae.py", *map(str, flags)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest.pth"
    while not latest.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and data.load_checkpoint(latest)["epoch"] < 4  # killed mid-run
    r = run_script("mae.py", *flags, "--resume", latest)
    assert r.returncode == 0, r.stderr
    full, resumed = read_csv(os.path.join(mae_run4, "log.csv")), read_csv(out / "log.csv")
    assert [(a["epoch"], a["train_loss"], a["val_loss"]) for a in full] == \
        [(b["epoch"], b["train_loss"], b["val_loss"]) for b in resumed]


def test_mae_export_and_reload_encoder(mae_run4, tmp_path):
    enc, meta = mae.load_encoder(os.path.join(mae_run4, "mae_encoder_pretrained.pth"))
    ck = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/best.pth"))
    m = mae.MAE(**ck["model_config"])
    m.load_state_dict(ck["model"])
    x = torch.randn(3, 1, 440)
    assert torch.equal(enc.eval().features(x), m.encoder.eval().features(x))
    assert meta["config"] == mae.encoder_config(ck["model_config"]) and meta["config"]["width"] == 440
    assert meta["input"] == "relative" and meta["config"]["in_chans"] == 1  # mae.py's default input
    # its file's flat field
    assert len(meta["flat_field"]) == 440 and abs(np.mean(meta["flat_field"]) - 1) < 1e-9
    assert (meta["norm_mean"] == ck["norm_mean"] and meta["norm_std"] == ck["norm_std"]
            and min(meta["norm_std"]) > 0)
    assert len(enc.blocks) == 3 and enc.embed_dim == 128 and enc.num_patches == 22 and enc.patch_size == 20
    with pytest.raises(data.DataError, match="python mae.py"):
        mae.load_encoder(str(tmp_path / "missing.pth"))
    with pytest.raises(data.DataError, match="not an exported MAE encoder"):
        mae.load_encoder(os.path.join(mae_run4, "checkpoints/latest.pth"))


def test_mae_bad_inputs_give_one_line_error(tiny_clouds, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("this is not HDF5\n")
    cases = [(["--data_path", str(tmp_path / "missing.h5")], "not found"),
             (["--data_path", str(junk)], "not an HDF5 file"),
             (["--data_path", str(junk), "--model_size", "huge"], "--model_size"),
             (["--data_path", tiny_clouds[0], "--resume", str(tmp_path / "nope.pth")], "nope.pth")]
    for i, (flags, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        # flags last: they win
        r = run_script("mae.py", "--out_dir", str(out), "--epochs", "1", *MAE_TINY, *flags)
        assert_one_line_error(r, words)
        assert not out.exists()  # nothing written on bad input


@pytest.mark.parametrize("flags,words", [
    (["--mask_ratio", "0"], "--mask_ratio 0.0"), (["--mask_ratio", "1"], "--mask_ratio 1.0"),
    (["--lr", "nan"], "--lr nan"), (["--min_lr", "-1"], "--min_lr"), (["--beta1", "1.5"], "--beta1"),
    (["--weight_decay", "-0.1"], "--weight_decay"), (["--num_heads", "0"], "--num_heads"),
    (["--model_size", "custom", "--embed_dim", "0"], "--embed_dim"), (["--grad_clip", "inf"], "--grad_clip"),
])
def test_mae_flags_out_of_range_are_one_line_and_write_nothing(tmp_path, flags, words):
    # checked before any data is read: the data file need not exist
    r = run_script("mae.py", "--out_dir", tmp_path / "out", "--data_path", tmp_path / "none.h5", *flags)
    assert_one_line_error(r, words)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_data_file_that_changed_under_the_same_name(tmp_path):
    """Every stage stores a fingerprint of its data: a resumed run on other data (same path) is refused with
    one line naming the file."""
    u, l = data.generate_clouds(n_flights=3, frames_per_flight=400, n_labelled=120, seed=0)
    u2, l2 = data.generate_clouds(n_flights=3, frames_per_flight=400, n_labelled=120, seed=1)
    data.write_clouds(tmp_path / "unlab.h5", **u)
    data.write_clouds(tmp_path / "lab.h5", **l)
    mae_args = ["mae.py", "--data_path", tmp_path / "unlab.h5", "--out_dir", tmp_path / "m", *MAE_TINY]
    ft_args = ["finetune_cbh.py", "--data_path", tmp_path / "lab.h5", "--out_dir", tmp_path / "f",
               "--pretrained", "none", "--methods", "physics", "--budgets", "1"]
    assert run_script(*mae_args, "--epochs", "1").returncode == 0
    assert run_script(*ft_args).returncode == 0
    data.write_clouds(tmp_path / "unlab.h5", **u2)  # the same names, other profiles and labels
    data.write_clouds(tmp_path / "lab.h5", **l2)
    r = run_script(*mae_args, "--epochs", "1", "--resume", tmp_path / "m/checkpoints/latest.pth")
    assert_one_line_error(r, "unlab.h5", "fingerprint")
    r = run_script(*ft_args, "--resume", tmp_path / "f/checkpoints/latest.pth")
    assert_one_line_error(r, "lab.h5", "fingerprint")
    em_args = ["emberformer.py", "--data_path", tmp_path / "fires.h5", "--out_dir", tmp_path / "e",
               "--patch_size", "4", "--history", "3", "--batch_size", "8", "--num_threads", "1"]
    data.write_fire(tmp_path / "fires.h5", **data.generate_fires(n_seq=6, size=16, n_frames=5, seed=0))
    assert run_script(*em_args, "--epochs", "1").returncode == 0
    data.write_fire(tmp_path / "fires.h5", **data.generate_fires(n_seq=6, size=16, n_frames=5, seed=1))
    r = run_script(*em_args, "--epochs", "1", "--resume", tmp_path / "e/checkpoints/latest.pth")
    assert_one_line_error(r, "fires.h5", "fingerprint")


def test_mae_writes_best_and_the_encoder_before_latest(monkeypatch, tmp_path):
    """A kill between two writes must never leave latest.pth recording a best that best.pth and the exported
    encoder do not hold: they are written first (an event order, not a clock)."""
    written = []
    monkeypatch.setattr(data, "atomic_torch_save", lambda obj, path: written.append(os.path.basename(path)))
    model = mae.MAE(**mae.MODEL_SIZES["tiny"])
    cfg = dict(out_dir=str(tmp_path), input="relative", save_every=1)
    ckpt = dict(epoch=3, model_config=dict(mae.MODEL_SIZES["tiny"], width=440))
    mae.save_checkpoints(ckpt, model, cfg, True, ([0.0], [1.0], None))
    assert written == ["best.pth", "mae_encoder_pretrained.pth", "latest.pth", "epoch_003.pth"]


def test_mae_resume_survives_a_partial_last_log_line(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss\n1,0.5\n2,0.4\n3,0.3\n4,0.2")  # a kill while appending epoch 4's row
    data.trim_log(str(log), 3)
    assert log.read_text() == "epoch,train_loss\n1,0.5\n2,0.4\n3,0.3\n"
    log.write_text("epoch,train_loss\n1,0.5\n\n")
    data.trim_log(str(log), 3)
    assert log.read_text() == "epoch,train_loss\n1,0.5\n"
    # emberformer's log_steps.csv: epoch not first
    log.write_text("step,epoch,loss\n1,1,0.5\n2,1,0.4\n3,2,0.")
    data.trim_log(str(log), 2)
    assert log.read_text() == "step,epoch,loss\n1,1,0.5\n2,1,0.4\n"
    log.write_text("epo")  # a kill while writing the header: nothing to keep
    data.trim_log(str(log), 2)
    assert not log.exists()


def test_outputs_follow_the_umask_and_stale_temp_files_are_removed(tmp_path):
    old = os.umask(0o002)
    try:
        data.atomic_torch_save({"a": 1}, tmp_path / "x.pth")
        data.atomic_write_csv(tmp_path / "x.csv", [dict(a=1)])
    finally:
        os.umask(old)
    assert all((tmp_path / n).stat().st_mode & 0o777 == 0o664 for n in ("x.pth", "x.csv"))
    stale = tmp_path / "run" / "checkpoints" / ".tmp_latest.pthab12"  # a kill during a checkpoint write
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    data.claim_out_dir(tmp_path / "run")
    assert not stale.exists()


def test_mae_nonfinite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoints(tiny_clouds, tmp_path,
                                                                                    monkeypatch, capsys):
    """A NaN loss in epoch 2 (injected into the training path's loss) stops the run with one line and exit
    3; latest.pth and best.pth stay those of epoch 1 and load; the log holds epoch 1 only."""
    real = mae.loss_fn
    seen = dict(evaluated=False, steps_after=0)

    def nan_in_epoch_2(model, x, cfg, generator, dtype):  # the 3rd training step after the first val pass
        loss = real(model, x, cfg, generator, dtype)
        if not model.training:
            seen["evaluated"] = True
        elif seen["evaluated"]:
            seen["steps_after"] += 1
        return loss * float("nan") if seen["steps_after"] == 3 else loss
    monkeypatch.setattr(mae, "loss_fn", nan_in_epoch_2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        mae.main(["--data_path", tiny_clouds[0], "--out_dir", str(out), "--epochs", "3", "--cpu_bf16", "off",
                  *MAE_TINY])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss" in err[0] and "epoch 2" in err[0] and "--lr" in err[0], err
    for name in ("latest.pth", "best.pth"):
        ckpt = data.load_checkpoint(out / "checkpoints" / name)
        assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["epoch"] for r in read_csv(out / "log.csv")] == ["1"]
    # in-process: this process holds it until exit
    assert int((out / ".lock").read_text().split()[0]) == os.getpid()


def test_progress_lines_in_a_file_every_minute_and_in_place_in_a_terminal():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def run(stream):  # 100 steps of one second each (a fake clock), 32 samples a step
        clock = [0.0]
        p = data.Progress(100, "epoch 3", stream=stream, clock=lambda: clock[0])
        for step in range(1, 101):
            clock[0] += 1.0
            p.update(step, 32 * step, lambda: 0.5)
        p.close()
        return stream.getvalue()
    in_file = run(io.StringIO())  # one plain line a minute: only at step 60 (the last step prints nothing)
    assert in_file == "  epoch 3: step 60/100 | loss 0.50000 | 32 samples/s | ETA 40s\n"
    on_screen = run(Terminal())  # rewritten in place every 2 s (steps 2..98), cleared at the end
    assert on_screen.count("\r") == 49 + 1 and "\n" not in on_screen and on_screen.endswith("\r\033[K")
    assert "\r  epoch 3: step 98/100 | loss 0.50000 | 32 samples/s | ETA 2s" in on_screen


def test_out_dir_unwritable_or_held_by_a_live_run_is_refused(tiny_clouds, tmp_path):
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", "/proc/nope", "--epochs", "1",
                   *MAE_TINY)
    assert_one_line_error(r, "/proc/nope", "not a writable folder")
    out = tmp_path / "held"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))  # this test process is alive: the folder is taken
    for script, extra in (("mae.py", MAE_TINY),
                          ("finetune_cbh.py", ["--methods", "physics", "--pretrained", "none"])):
        r = run_script(script, "--data_path", tiny_clouds[int(script != "mae.py")], "--out_dir", out, *extra)
        assert_one_line_error(r, f"in use by process {os.getpid()}")
    assert sorted(os.listdir(out)) == [".lock"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(str(dead.pid))  # a lock left by a process that has ended is taken over
    r = run_script("finetune_cbh.py", "--data_path", tiny_clouds[1], "--out_dir", out, "--methods", "physics",
                   "--budgets", "1", "--pretrained", "none")
    assert r.returncode == 0, r.stderr
    assert "stale lock" in r.stdout and not (out / ".lock").exists()  # released at exit


def test_mae_help_lists_every_constant():
    src = open(os.path.join(REPO, "mae.py")).read()
    block = src.split("# --- config ---\n")[1].split("# --- end config ---")[0]
    consts = re.findall(r"^(\w+) = (.+?)\s+# (.*)$", block, re.M)
    names = [c[0] for c in consts]
    assert len(consts) == len(re.findall(r"^\w+ = ", block, re.M)) >= 30  # every line follows the pattern
    assert {"mask_ratio", "model_size", "norm_pix_loss", "augment", "patience"} <= set(names)
    r = run_script("mae.py", "-h")
    assert r.returncode == 0
    text = "".join(r.stdout.split())  # undo argparse's line wrapping (it also breaks at hyphens)
    for name, _, comment in consts:
        assert f"--{name}" in text and "".join(comment.split()) in text, name
    assert "(default:0.75)" in text


def test_mae_import_runs_no_training(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import mae"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == ""


# ==============================================================================================
# finetune_cbh.py: label efficiency of the fine-tuned encoder vs scratch and baselines

FT_TINY = ["--head_epochs", "1", "--epochs", "1", "--num_threads", "1", "--n_trees", "10",
           "--batch_size", "16", "--seeds", "1", "--budgets", "1", "--cpu_bf16", "off"]


@pytest.fixture(scope="module")
def ft_tiny(tmp_path_factory):
    """Tiny labelled file (3 flights x 40 labels) and a tiny random encoder exported in mae.py's format
    (input relative, with its flat field and normalisation from the unlabelled profiles); enc_raw: one
    pre-trained on raw."""
    root = tmp_path_factory.mktemp("cbh")
    unlab, lab = data.generate_clouds(n_flights=3, frames_per_flight=400, n_labelled=120)
    data.write_clouds(root / "lab.h5", **lab)
    torch.manual_seed(0)
    enc_cfg = mae.encoder_config(dict(mae.MODEL_SIZES["tiny"], width=440))
    gain = data.flat_field(unlab["images"], "unlab")
    rel = data.profile_channels(unlab["images"], "relative", unlab["metadata"][:, 0].round(), gain)
    mean, std = data.norm_stats(rel)
    state = mae.build_encoder(enc_cfg).state_dict()
    data.atomic_torch_save(dict(encoder=state, config=enc_cfg, input="relative", norm_mean=mean, norm_std=std,
                                flat_field=gain.tolist()), root / "enc.pth")
    data.atomic_torch_save(dict(encoder=state, config=enc_cfg, input="raw", norm_mean=mean, norm_std=std),
                           root / "enc_raw.pth")
    return dict(root=root, lab=str(root / "lab.h5"), enc=str(root / "enc.pth"),
                enc_raw=str(root / "enc_raw.pth"), d=data.load_clouds(str(root / "lab.h5"), labelled=True),
                gain=gain)


def ft_cfg(ft_tiny, *argv):
    return ft.parse_config(["--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], *FT_TINY, *argv])


def ft_setup(ft_tiny, *argv):
    """What a comparison holds after load_inputs: (cfg, d, prep, folds, names, budgets, enc, t)."""
    cfg = ft_cfg(ft_tiny, *argv)
    d, prep, folds, names, budgets, enc, t = ft.load_inputs(cfg, torch.device("cpu"))
    return cfg, d, prep, folds, names, budgets, enc, t


def test_ft_budgets_are_one_nested_contiguous_stretch_per_flight_and_never_cut_test_flights(ft_tiny):
    d = ft_tiny["d"]
    folds = ft.make_folds(d, ft_cfg(ft_tiny))
    for fold in folds:
        prev = None
        for b in (1.0, 0.5, 0.25, 0.1, 0.05):
            kept = ft.budget_frames(fold["train"], d["flight"], d["frame"], b)
            assert np.isin(kept, fold["train"]).all() and not np.isin(kept, fold["test"]).any()
            for fl in np.unique(d["flight"][fold["train"]]):
                mine = fold["train"][d["flight"][fold["train"]] == fl]
                order = mine[np.argsort(d["frame"][mine], kind="stable")]  # the flight's frames in time
                pos = np.flatnonzero(np.isin(order, kept))
                assert len(pos) == max(1, round(b * len(order)))
                assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))  # one contiguous stretch
            if prev is not None:
                assert np.isin(kept, prev).all()  # nested: inside the larger budget's stretch
            prev = kept
        assert np.array_equal(ft.budget_frames(fold["train"], d["flight"], d["frame"], 1.0), fold["train"])


def test_ft_every_method_and_seed_sees_the_same_budgeted_labels_and_tests_on_the_whole_flight(ft_tiny,
                                                                                              monkeypatch):
    cfg, d, prep, folds, names, budgets, enc, t = ft_setup(ft_tiny, "--budgets", "0.25,1")
    seen = {}
    monkeypatch.setattr(ft, "train_network",
                        lambda m, fit, val, *a: seen.setdefault(("net", m, a[-2]), (fit, val))
                        and (None, None, 0.0))
    monkeypatch.setattr(ft, "network_km", lambda net, stats, t, idx, amp: np.zeros(len(idx)))
    real_fit = ft.gbrt_fit
    monkeypatch.setattr(ft, "gbrt_fit",
                        lambda X, y, *a: seen.setdefault("trees", X) is not None and real_fit(X, y, *a))
    want = ft.budget_frames(folds[1]["train"], d["flight"], d["frame"], 0.25)
    units = [ft.run_unit((m, 0, 1, s), folds, budgets, d, prep, t, enc, cfg, (None, False), lambda r: None)
             for m, s in (("finetune", 0), ("finetune", 1), ("scratch", 0), ("trees", 0), ("physics", 0))]
    assert all(u["n_labels"] == len(want) and len(u["pred"]) == len(folds[1]["test"]) for u in units)
    np.testing.assert_array_equal(seen["trees"], prep["features"][want])
    stopping = set()
    for key, (fit, val) in ((k, v) for k, v in seen.items() if k != "trees"):
        # fit + stopping = the budget
        np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), want)
        assert len(np.unique(d["flight"][val])) == 1 and not np.isin(d["flight"][fit], d["flight"][val]).any()
        stopping.add((key[1], int(d["flight"][val][0])))
    # each seed stops on another training flight
    assert len({fl for m, fl in stopping if m == "finetune"}) == 2


def test_ft_trees_see_no_absolute_level_and_no_angles():
    """Preprocessing is relative to each flight's clear-sky level: a warmer sea (every raw value of a flight
    shifted) and other solar angles leave every method's inputs unchanged."""
    u, _ = data.generate_clouds(n_flights=2, frames_per_flight=300, n_labelled=20, seed=3)
    flight = u["metadata"][:, 0].round()
    d = dict(images=u["images"], flight=flight)
    shifted = dict(d, images=u["images"] + 700.0 * (flight == 1)[:, None])
    a, b = (ft.preprocess(x, np.ones(440), "f") for x in (d, shifted))
    for k in ("rel", "phys", "features"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-3 * np.abs(a[k]).max())
    assert a["features"].shape[1] == 21  # the profile's own statistics only: no solar-angle columns
    np.testing.assert_allclose(ft.profile_features(a["rel"][[4, 1]]), a["features"][[4, 1]])  # per frame


def test_ft_flat_field_and_flight_level_are_label_free_and_fall_back_in_one_line(capsys):
    rng = np.random.default_rng(0)
    vignette = 1 - 0.04 * np.linspace(-1, 1, 440) ** 2
    scene = 1000 + 10 * rng.standard_normal((500, 440))
    gain = data.flat_field(scene * vignette, "cam.h5")
    np.testing.assert_allclose(gain, vignette / vignette.mean(), atol=5e-3)
    # an overcast profile: its own warmest pixel is cloud; the flight's clear profiles set its level
    flight = np.zeros(40)
    profiles = np.full((40, 440), 1000.0)
    profiles[0] = 600.0
    rel = data.relative_profiles(profiles, flight, np.ones(440), "f.h5")
    assert rel[0].max() == pytest.approx(-400.0) and rel[1].max() == 0.0
    assert capsys.readouterr().out == ""
    assert np.all(data.flat_field(scene[:50], "cam.h5") == 1.0)  # too few profiles: none
    rel = data.relative_profiles(profiles[:5], flight[:5], np.ones(440), "f.h5")
    assert rel[0].max() == 0.0  # too few for a flight level: the profile's own warmest pixel
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and all(line.startswith("warning:") for line in out) and "cam.h5" in out[0], out


def test_ft_untrained_network_is_the_physics_line_and_gradients_reach_every_parameter(ft_tiny):
    cfg, d, prep, folds, names, budgets, enc, t = ft_setup(ft_tiny)
    labelled = torch.as_tensor(folds[0]["train"])
    stats = ft.target_stats(t, labelled)
    np.testing.assert_allclose(stats["line"], ft.physics_line(prep["phys"][folds[0]["train"]],
                                                              d["cbh_km"][folds[0]["train"]]))
    for method in ("finetune", "scratch", "probe"):
        net = ft.build_network(method, enc, cfg)
        pred = ft.network_km(net, stats, t, folds[0]["test"], None)
        np.testing.assert_allclose(pred, np.polyval(stats["line"], prep["phys"][folds[0]["test"]]), atol=1e-5)
    net = ft.build_network("finetune", enc, cfg).train()
    torch.nn.init.normal_(net.head[-1].weight)  # past the first step: the head's output layer is not zero
    net(t["x"][:8], t["phys"][:8]).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_ft_stage1_trains_only_the_head_and_stage2_the_encoder(ft_tiny):
    cfg, d, prep, folds, names, budgets, enc, t = ft_setup(ft_tiny, "--head_epochs", "2", "--epochs", "0")
    fit, val = ft.stopping_split(folds[0]["train"], d["flight"], 0, 0)
    net, _, mse = ft.train_network("finetune", fit, val, t, enc, cfg, (None, False), 0, lambda r: None)
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in enc["state"].items())
    assert net.head[-1].weight.abs().sum() > 0 and math.isfinite(mse)
    cfg["epochs"] = 2
    seen, real = [], ft.predict_std  # called once an epoch, to score the stopping flight

    def spy(net, x, line, idx, amp_dtype, feats=None):
        same = all(torch.equal(net.encoder.state_dict()[k], v) for k, v in enc["state"].items())
        seen.append((feats is not None, same))
        return real(net, x, line, idx, amp_dtype, feats)
    ft.predict_std, _ = spy, None
    try:
        ft.train_network("finetune", fit, val, t, enc, cfg, (None, False), 0, lambda r: None)
    finally:
        ft.predict_std = real
    assert seen == [(True, True)] * 2 + [(False, False)] * 2  # stage 1 on cached features, stage 2 moves it


def test_ft_frozen_features_are_the_encoders_for_the_rows_read_and_their_mirror_images(ft_tiny):
    cfg, d, prep, folds, names, budgets, enc, t = ft_setup(ft_tiny)
    net = ft.build_network("probe", enc, cfg)
    rows = torch.tensor([3, 0, 17])
    feats = ft.frozen_features(net.encoder, t["x"], rows, None)  # (2, N, D)
    with torch.no_grad():
        want = net.encoder.eval().features(t["x"][rows])
        mirrored = net.encoder.features(t["x"][rows].flip(-1))
    torch.testing.assert_close(feats[0, rows], want)
    torch.testing.assert_close(feats[1, rows], mirrored)
    assert not torch.allclose(want, mirrored)  # the profiles are not symmetric: the flip is real
    others = torch.ones(len(t["x"]), dtype=torch.bool)
    others[rows] = False
    assert feats.shape == (2, len(t["x"]), net.encoder.embed_dim) and not feats[:, others].any()


def test_ft_small_budgets_still_take_steps_and_a_tiny_run_learns(ft_tiny):
    cfg, d, prep, folds, names, budgets, enc, t = ft_setup(ft_tiny, "--head_epochs", "0", "--epochs", "6",
                                                           "--patience", "100", "--pretrained", "none")
    assert len(ft.epoch_batches(5, cfg, torch.Generator())) == math.ceil(
        math.ceil(ft.MIN_EPOCH_SAMPLES / 5) * 5 / 16)
    assert len(ft.epoch_batches(1000, cfg, torch.Generator())) == math.ceil(1000 / 16)
    fit, val = ft.stopping_split(folds[0]["train"], d["flight"], 0, 0)
    rows = []
    ft.train_network("scratch", fit, val, t, enc, cfg, (None, False), 0, rows.append)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_ft_layer_decay_groups():
    enc = mae.build_encoder(mae.encoder_config(dict(mae.MODEL_SIZES["tiny"], width=440)))
    model = ft.CBHNet(enc, 8)
    groups = ft.param_groups(model, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    depth = len(enc.blocks)  # 3; MAE's layer ids: embeddings 0, blocks 1..3, final norm and head 4
    assert scale[id(enc.patch_embed.weight)] == 0.5 ** (depth + 1)  # embeddings get the smallest LR
    assert scale[id(enc.pos_embed)] == 0.5 ** (depth + 1) and wd[id(enc.pos_embed)] == 0.0
    assert scale[id(enc.blocks[-1].qkv.weight)] == 0.5  # the last block is NOT at the full LR (as MAE)
    assert scale[id(enc.norm.weight)] == 1.0 and scale[id(model.head[0].weight)] == 1.0
    assert wd[id(model.head[0].weight)] == 0.05 and wd[id(model.head[0].bias)] == 0.0
    assert len(scale) == sum(1 for _ in model.parameters())


def test_ft_test_labels_never_reach_training(ft_tiny):
    """Junk labels on the test flight leave every method's test predictions bit-identical."""
    cfg, d, prep, folds, names, budgets, enc, t = ft_setup(ft_tiny)
    junk = dict(d, cbh_km=d["cbh_km"].copy())
    junk["cbh_km"][folds[0]["test"]] = 19.0
    preds = []
    for dd in (d, junk):
        tt = dict(t, y=torch.as_tensor(dd["cbh_km"]))
        preds.append([ft.run_unit((m, 0, 0, 0), folds, budgets, dd, prep, tt, enc, cfg, (None, False),
                                  lambda r: None)["pred"] for m in ft.METHODS])
    for a, b in zip(*preds):
        np.testing.assert_array_equal(a, b)


def test_ft_end_to_end_two_budgets(ft_tiny, tmp_path):
    out = tmp_path / "out"
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"],
                   "--out_dir", out, *FT_TINY, "--seeds", "2", "--budgets", "0.5,1")
    assert r.returncode == 0, r.stderr
    eff = read_csv(out / "label_efficiency.csv")
    assert [(x["budget"], x["method"]) for x in eff if " - " not in x["method"]] == [
        (b, m) for b in ("0.5", "1.0") for m in ft.METHODS]
    units = read_csv(out / "results.csv")
    assert len(units) == 2 * 3 * (3 * 2 + 2)  # budgets x folds x (3 networks x 2 seeds + trees + physics)
    preds = read_csv(out / "predictions.csv")
    assert len(preds) == 2 * 5 * len(ft_tiny["d"]["cbh_km"])  # every frame tested once per method and budget
    for x in eff:
        at = [p for p in preds if p["budget"] == x["budget"]]
        if " - " not in x["method"]:
            mine = [p for p in at if p["method"] == x["method"]]
            true, pred = (np.array([float(p[c]) for p in mine]) for c in ("cbh_km", "pred_km"))
            assert float(x["committee_r2"]) == pytest.approx(losses.regression_metrics(pred, true)["r2"],
                                                             abs=1e-6)
            assert float(x["r2_std"]) >= 0 and (x["inner_val_mse_km2"] != "") == (x["method"] in ft.NETWORKS)
            continue
        a, c = x["method"].split(" - ")
        mse = lambda m, f: np.mean([(float(p["pred_km"]) - float(p["cbh_km"])) ** 2 for p in at
                                    if p["method"] == m and p["flight"] == str(f)])
        gain = np.array([mse(c, f) - mse(a, f) for f in range(3)])  # > 0: a wins on flight f
        tie = np.isclose([mse(a, f) for f in range(3)], [mse(c, f) for f in range(3)],
                         rtol=ft.TIE_RTOL, atol=0)
        assert (int(x["flights_better"]), int(x["flights_worse"])) == (sum((gain > 0) & ~tie),
                                                                       sum((gain < 0) & ~tie))
        assert float(x["r2_lo"]) <= float(x["r2"]) <= float(x["r2_hi"])
        assert float(x["r2_lo_flights"]) <= float(x["r2"]) <= float(x["r2_hi_flights"])
    for p in ("label_efficiency.png", "pred_vs_true.png"):
        assert (out / "plots" / p).stat().st_size > 1000
    assert {x["method"] for x in read_csv(out / "log.csv")} == set(ft.NETWORKS)


def test_ft_resume_skips_finished_units_and_reproduces_the_uninterrupted_run(ft_tiny, tmp_path, monkeypatch):
    args = ["--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], *FT_TINY,
            "--methods", "finetune,trees"]
    ft.main(args + ["--out_dir", str(tmp_path / "a")])
    real, calls = ft.run_unit, []

    def stop_at_third(unit, *a):
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill while the third unit trains
        return real(unit, *a)
    monkeypatch.setattr(ft, "run_unit", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        ft.main(args + ["--out_dir", str(tmp_path / "b")])
    monkeypatch.setattr(ft, "run_unit", lambda unit, *a: calls.append(unit) or real(unit, *a))
    ft.main(args + ["--out_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b/checkpoints/latest.pth")])
    assert calls[3:] == ft.units(["finetune", "trees"], [1.0], [0, 1, 2], dict(seeds=1))[2:]  # the rest, once
    for name in ("results.csv", "label_efficiency.csv", "log.csv"):
        untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
        assert untimed(read_csv(tmp_path / "a" / name)) == untimed(read_csv(tmp_path / "b" / name)), name


def test_ft_resume_with_other_settings_is_refused(ft_tiny, tmp_path):
    out = tmp_path / "out"
    args = ["finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"],
            "--methods", "trees", "--out_dir", out, "--budgets", "1"]
    assert run_script(*args, "--n_trees", "5").returncode == 0
    r = run_script(*args, "--n_trees", "6", "--resume", out / "checkpoints" / "latest.pth")
    assert_one_line_error(r, "latest.pth", "settings")


def test_ft_nonfinite_comparison_exits_3(ft_tiny, tmp_path):
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], *FT_TINY,
                   "--methods", "scratch", "--lr", "1e30", "--ft_lr", "1e30", "--grad_clip", "0",
                   "--out_dir", tmp_path / "out")
    assert r.returncode == 3, (r.returncode, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "finite" in err[0], err
    assert not (tmp_path / "out" / "results.csv").exists()


def test_ft_final_takes_its_scores_from_the_completed_comparison_only(ft_tiny, tmp_path):
    out = tmp_path / "out"
    base = ["finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], *FT_TINY,
            "--out_dir", out]
    assert run_script(*base, "--methods", "physics,trees").returncode == 0
    full = {r["method"]: float(r["r2"]) for r in read_csv(out / "label_efficiency.csv")}
    assert run_script(*base, "--final", "physics").returncode == 0
    assert ft.load_cbh_model(out / "cbh_model.pth")["cv"]["r2"] == pytest.approx(full["physics"])
    assert run_script(*base, "--final", "physics", "--n_trees", "7").returncode == 0  # other settings
    assert ft.load_cbh_model(out / "cbh_model.pth")["cv"] == "not cross-validated"
    ck = data.load_checkpoint(out / "checkpoints" / "latest.pth")
    data.atomic_torch_save(dict(ck, data_hash="other"), out / "checkpoints" / "latest.pth")  # other data
    assert run_script(*base, "--final", "physics").returncode == 0
    assert ft.load_cbh_model(out / "cbh_model.pth")["cv"] == "not cross-validated"
    # a newer run, interrupted
    data.atomic_torch_save(dict(ck, complete=False), out / "checkpoints" / "latest.pth")
    assert_one_line_error(run_script(*base, "--final", "physics"), "incomplete", "--resume")


def test_ft_final_model_predicts_like_its_own_forward_pass_and_needs_no_labels(ft_tiny, tmp_path):
    out = tmp_path / "out"
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"],
                   "--out_dir", out, "--final", "finetune", *FT_TINY)
    assert r.returncode == 0, r.stderr
    m = ft.load_cbh_model(out / "cbh_model.pth")
    assert m["method"] == "finetune" and m["flights"] == [0, 1, 2] and m["cpu_autocast"] == "fp32"
    d = ft_tiny["d"]
    nolabel = tmp_path / "day1.h5"  # real lidar files mark "no cloud base" with NaN: prediction must not care
    data.write_clouds(nolabel, d["images"], d["metadata"])
    with h5py.File(nolabel, "a") as f:
        f.create_dataset("cbh_km", data=np.full(len(d["images"]), np.nan, np.float32))
    r = run_script("finetune_cbh.py", "--predict", nolabel, "--model", out / "cbh_model.pth",
                   "--out_dir", out)
    assert r.returncode == 0, r.stderr
    with h5py.File(out / "cbh_pred_day1.h5") as f:
        pred, meta = f["cbh_pred_km"][:], f["metadata"][:]
    np.testing.assert_array_equal(meta, d["metadata"])
    # by hand: the stored flat field and normalisation, each flight's level from the file, line + head
    np.testing.assert_allclose(m["flat_field"], ft_tiny["gain"])
    rel = data.relative_profiles(d["images"], d["flight"], np.array(m["flat_field"]), "x")
    net = ft.CBHNet(mae.build_encoder(m["encoder_config"]), m["head_hidden"]).eval()
    net.load_state_dict(m["state"])
    s = m["stats"]
    line = (np.polyval(s["line"], ft.physics_feature(rel)) - s["y_mean"]) / s["y_std"]
    with torch.no_grad():
        out_std = net(torch.as_tensor((rel[:, None] - m["norm"][0]) / m["norm"][1]),
                      torch.as_tensor(line, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(pred, np.clip(out_std * s["y_std"] + s["y_mean"], 0, 20), atol=1e-4)
    assert len(list((out / "plots").glob("cbh_day1_flight_*.png"))) == 3


def test_ft_predict_bad_inputs_fail_with_one_line_and_write_nothing(ft_tiny, tmp_path):
    out = tmp_path / "model"
    assert run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--final", "physics",
                      "--out_dir", out, "--pretrained", "none").returncode == 0
    narrow = tmp_path / "narrow.h5"
    data.write_clouds(narrow, ft_tiny["d"]["images"][:, :400], ft_tiny["d"]["metadata"])
    cases = [(narrow, out / "cbh_model.pth", ["narrow.h5", "400 px", "440"]),
             (ft_tiny["lab"], tmp_path / "missing.pth", ["missing.pth", "not found"]),
             (ft_tiny["lab"], ft_tiny["enc"], ["enc.pth", "not a CBH model"])]
    for i, (path, model, words) in enumerate(cases):
        dest = tmp_path / f"pred{i}"
        r = run_script("finetune_cbh.py", "--predict", path, "--model", model, "--out_dir", dest)
        assert_one_line_error(r, *words)
        assert not dest.exists()


def test_ft_splits_blocked_leaves_the_gap_and_random_warns(ft_tiny, capsys):
    d = ft_tiny["d"]
    for fold in ft.make_folds(d, ft_cfg(ft_tiny, "--split", "blocked", "--n_folds", "4")):
        gap = int(fold["name"].split("gap ")[1].rstrip(")"))
        for fl in np.unique(d["flight"]):
            tr, te = (d["frame"][i][d["flight"][i] == fl] for i in (fold["train"], fold["test"]))
            assert len(te) and np.min(np.abs(tr[:, None] - te[None])) > gap
    ft.make_folds(d, ft_cfg(ft_tiny, "--split", "random"))
    assert "optimistic" in capsys.readouterr().out


def test_ft_decorrelation_lag_of_a_known_process():
    """AR(1) labels with correlation 0.9 per 10 frames (rho(lag) = 0.9^(lag/10)): it falls below 0.2 at ~153
    frames; a white-noise series decorrelates within the first lag bin."""
    rng = np.random.default_rng(0)
    n, frames = 400, np.arange(0, 4000, 10)  # a label every 10 frames
    y = np.zeros((3, n))
    for i in range(1, n):
        y[:, i] = 0.9 * y[:, i - 1] + np.sqrt(1 - 0.81) * rng.standard_normal(3)
    flight = np.repeat(np.arange(3), n)
    lag = data.decorrelation_lag(y.ravel(), flight, np.tile(frames, 3), 0.2)
    assert 120 <= lag <= 200, lag
    assert data.decorrelation_lag(rng.standard_normal(3 * n), flight, np.tile(frames, 3), 0.2) <= 20


def test_ft_pretrained_none_skips_finetune_and_probe(ft_tiny, tmp_path):
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", "none",
                   "--methods", "finetune,probe,trees", "--out_dir", tmp_path, *FT_TINY)
    assert r.returncode == 0, r.stderr
    assert "skipping finetune and probe" in r.stdout
    assert {x["method"] for x in read_csv(tmp_path / "results.csv")} == {"trees"}


def test_ft_frames_without_a_cloud_base_are_left_out_with_a_count(ft_tiny, tmp_path):
    """Real lidar files mark "no cloud base" with NaN or a fill value: a comparison leaves those frames out
    and says how many, instead of refusing the file."""
    d = ft_tiny["d"]
    cbh = d["cbh_km"].copy()
    cbh[[3, 50, 90]], cbh[[7, 8]] = np.nan, -9999.0
    data.write_clouds(tmp_path / "gaps.h5", d["images"], d["metadata"], cbh)
    r = run_script("finetune_cbh.py", "--data_path", tmp_path / "gaps.h5", "--pretrained", "none",
                   "--methods", "physics", "--budgets", "1", "--out_dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "5 of 120 frames have no cloud base" in r.stdout
    assert len(read_csv(tmp_path / "out" / "predictions.csv")) == 115


@pytest.mark.parametrize("problem,cbh,words", [
    ("inf", np.inf, ["cbh_km", "Inf"]),
    ("negative", -0.5, ["cbh_km", "outside"]),
    ("missing", None, ["cbh_km", "missing"]),
])
def test_ft_bad_label_files_fail_with_one_line(ft_tiny, tmp_path, problem, cbh, words):
    d = ft_tiny["d"]
    labels = None if cbh is None else np.where(np.arange(len(d["cbh_km"])) == 5, cbh, d["cbh_km"])
    data.write_clouds(tmp_path / "bad.h5", d["images"], d["metadata"], labels)
    r = run_script("finetune_cbh.py", "--data_path", tmp_path / "bad.h5", "--pretrained", ft_tiny["enc"],
                   "--out_dir", tmp_path / "out")
    assert_one_line_error(r, *words)
    assert not (tmp_path / "out").exists()  # nothing written on bad input


@pytest.mark.parametrize("flags,words", [
    (["--pretrained", "nope.pth"], ["nope.pth", "python mae.py", "--pretrained none"]),
    (["--pretrained", "RAW"], ["enc_raw.pth", "--input raw", "relative"]),
    (["--lr", "nan"], ["--lr nan"]), (["--tree_lr", "nan"], ["--tree_lr"]),
    (["--head_hidden", "-4"], ["--head_hidden"]), (["--weight_decay", "-1"], ["--weight_decay"]),
    (["--layer_decay", "0"], ["--layer_decay"]), (["--drop_path", "1"], ["--drop_path"]),
    (["--budgets", "0,1"], ["--budgets"]), (["--budgets", "x"], ["--budgets"]),
    (["--methods", "finetune,svm"], ["--methods"]), (["--split", "time"], ["--split"]),
    (["--batch_size", "0"], ["--batch_size"]), (["--n_folds", "1"], ["--n_folds"]),
])
def test_ft_bad_flags_one_line_and_nothing_written(ft_tiny, tmp_path, flags, words):
    flags = [ft_tiny["enc_raw"] if f == "RAW" else str(tmp_path / f) if f.endswith(".pth") else f
             for f in flags]
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], *flags,
                   "--out_dir", tmp_path / "out")
    assert_one_line_error(r, *words)
    assert not (tmp_path / "out").exists()


def test_ft_help_lists_every_constant_on_two_screens():
    r = run_script("finetune_cbh.py", "-h")
    assert r.returncode == 0
    src = (open(os.path.join(REPO, "finetune_cbh.py")).read()
           .split("# --- config ---")[1].split("# --- end")[0])
    names = [line.split(" = ")[0] for line in src.strip().splitlines()]
    assert 20 < len(names) <= 30 and all(f"--{n}" in r.stdout for n in names)
    assert len(r.stdout.splitlines()) <= 100  # two screens of 50 lines


def toy_regression(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n, 6))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2 - X[:, 0] * X[:, 2] + 0.1 * rng.standard_normal(n)
    return X, y


def test_ft_trees_fit_known_function_and_match_sklearn():
    X, y = toy_regression(1000, 0)
    m = ft.gbrt_fit(X[:700], y[:700])
    r2 = 1 - ((ft.gbrt_predict(m, X[700:]) - y[700:]) ** 2).sum() / ((y[700:] - y[700:].mean()) ** 2).sum()
    assert r2 > 0.9
    sklearn = pytest.importorskip("sklearn.ensemble")
    # exact candidate thresholds: features on a 0.02 grid (201 unique values <= max_bins + 1), test points
    # on the same grid (some lie exactly on a threshold). min_leaf 10 keeps two features from splitting
    # a node's samples identically, a tie scikit-learn breaks by a random feature order.
    X = np.round(X / 0.02) * 0.02
    assert max(len(np.unique(c)) for c in X[:700].T) <= 256
    m = ft.gbrt_fit(X[:700], y[:700], n_trees=100, depth=5, lr=0.1, min_leaf=10)
    sk = sklearn.GradientBoostingRegressor(n_estimators=100, max_depth=5, learning_rate=0.1,
                                           min_samples_leaf=10, random_state=0).fit(X[:700], y[:700])
    np.testing.assert_allclose(ft.gbrt_predict(m, X[700:]), sk.predict(X[700:]), rtol=0, atol=1e-6)


def test_ft_trees_threshold_is_the_midpoint_of_the_values_around_the_split_in_the_node():
    # root splits on x0; in the x0 = 0 node x1 takes 0, 1, 8, 9 (2..7 only occur in the other node), so
    # every threshold between 1 and 8 ties: the cut must be 4.5, not 1.5 (the lowest tied bin)
    x1 = np.array([0, 1, 8, 9, 2, 3, 4, 5, 6, 7], float)
    x0 = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], float)
    y = np.where(x0 == 1, 10.0, (x1 > 4.5).astype(float))
    m = ft.gbrt_fit(np.stack([x0, x1], 1), y, n_trees=1, depth=2, lr=1.0)
    p = ft.gbrt_predict(m, np.array([[0, 0], [0, 4], [0, 4.4], [0, 4.6], [0, 5], [0, 9.0]]))
    np.testing.assert_allclose(p, [0, 0, 0, 1, 1, 1], atol=1e-12)


def bootstrap_frames(seed, n_flights=5, per_flight=200):
    """Test frames of a few flights in shuffled order: a smooth CBH-like target and two methods whose
    errors drift slowly along each flight (autocorrelated, as real errors are)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_flights), per_flight)
    order = np.tile(np.arange(per_flight) * 60, n_flights)
    y = 2 + np.sin(order / 2000 + groups) + 0.1 * rng.standard_normal(len(groups))
    drift = lambda: np.repeat(rng.standard_normal(len(groups) // 20), 20) * 0.3  # constant over 20 frames
    pred_a, pred_b = y + drift(), y + drift()
    shuffle = rng.permutation(len(groups))
    return [v[shuffle] for v in (y, pred_a, pred_b, groups, order)]


def test_bootstrap_diff_identical_methods_give_exactly_zero():
    y, a, _, groups, order = bootstrap_frames(0)
    assert losses.block_bootstrap_diff(y, a, a.copy(), groups, order) == (0.0, 0.0, 0.0)


def test_bootstrap_diff_point_is_the_r2_difference_inside_its_interval_and_deterministic():
    y, a, b, groups, order = bootstrap_frames(1)
    d, lo, hi = losses.block_bootstrap_diff(y, a, b, groups, order)
    r2 = lambda p: losses.regression_metrics(p, y)["r2"]
    assert d == pytest.approx(r2(a) - r2(b), abs=1e-12)
    assert lo < d < hi
    assert losses.block_bootstrap_diff(y, a, b, groups, order) == (d, lo, hi)
    assert losses.block_bootstrap_diff(y, a, b, groups, order, seed=1)[1:] != (lo, hi)


def test_bootstrap_diff_clearly_better_method_has_interval_above_zero():
    y, a, b, groups, order = bootstrap_frames(2)
    better = y + 0.3 * (a - y)  # a's errors, shrunk
    d, lo, hi = losses.block_bootstrap_diff(y, better, a, groups, order)
    assert 0 < lo < d < hi


def test_bootstrap_diff_blocks_widen_the_interval_for_autocorrelated_errors():
    # errors constant over 20 frames: resampling single frames pretends there are 20x more independent
    # errors than there are, so its interval is much narrower than the block bootstrap's
    y, a, b, groups, order = bootstrap_frames(3)
    _, lo1, hi1 = losses.block_bootstrap_diff(y, a, b, groups, order, block=1)
    _, lo20, hi20 = losses.block_bootstrap_diff(y, a, b, groups, order, block=20)
    assert hi20 - lo20 > 2 * (hi1 - lo1)


def test_bootstrap_diff_with_flights_resampled_is_exact_for_identical_methods_and_holds_the_point():
    y, a, b, groups, order = bootstrap_frames(4)
    assert losses.block_bootstrap_diff(y, a, a.copy(), groups, order, resample_groups=True) == (0.0, 0.0, 0.0)
    d, lo, hi = losses.block_bootstrap_diff(y, a, b, groups, order, resample_groups=True)
    assert d == losses.block_bootstrap_diff(y, a, b, groups, order)[0]  # the same point, another interval
    assert lo < d < hi
    assert losses.block_bootstrap_diff(y, a, b, groups, order, resample_groups=True) == (d, lo, hi)


def test_bootstrap_diff_with_flights_resampled_carries_the_flight_to_flight_spread():
    # b is a with a large extra error on flight 0 only: keeping every flight in every resample, a always wins
    # by about as much; drawing flights, some resamples lack flight 0 and the difference falls to ~0
    y, a, _, groups, order = bootstrap_frames(5)
    b = a + np.where(groups == 0, 0.5, 0.0)
    d, lo, hi = losses.block_bootstrap_diff(y, a, b, groups, order)
    _, lo_f, hi_f = losses.block_bootstrap_diff(y, a, b, groups, order, resample_groups=True)
    assert 0 < lo < d < hi
    assert lo_f < lo and hi_f > hi
    assert lo_f == pytest.approx(0.0, abs=1e-12)  # resamples without flight 0: a and b differ by nothing else


# ==============================================================================================
# emberformer.py: next-step wildfire spread

@pytest.fixture(scope="module")
def ember_fires():
    return data.generate_fires(n_seq=6, size=32, n_frames=12, seed=1)


def ember_batch(fires, s, t, K):
    fire, wind = torch.from_numpy(fires["fire"]), torch.from_numpy(fires["wind"])
    s, t = torch.tensor(s), torch.tensor(t)
    hist, w, lengths, target = data.fire_batch(fire, wind, s, t, K)
    return hist, w, lengths, torch.from_numpy(fires["static"])[s], target


@pytest.mark.parametrize("H,W,K,lengths", [(32, 32, 8, [8, 1]), (64, 64, 3, [2, 3]), (48, 40, 5, [5, 4]),
                                           (30, 26, 2, [1, 2]), (8, 8, 4, [4, 2])])
def test_ember_output_shapes(H, W, K, lengths):
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4).eval()
    hist = (torch.rand(2, K, H, W) > 0.5).float()
    with torch.no_grad():
        out = model(hist, torch.randn(2, K, 2) * 5, torch.tensor(lengths), torch.randn(2, 4, H, W))
    assert out.shape == (2, H, W)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("target", ["full", "new"])
def test_ember_padding_invariance(ember_fires, target):
    """A short history gives the same logits alone (unpadded) and beside a longer one (padded to K).
    Gathering position K-1 instead of lengths-1 would read a padded slot and break the equality."""
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4, target=target).eval()
    hist, w, lengths, st, _ = ember_batch(ember_fires, [0, 1], [10, 2], K=8)  # lengths 8 and 3
    assert lengths.tolist() == [8, 3]
    with torch.no_grad():
        both = model(hist, w, lengths, st)
        alone = model(hist[1:, :3], w[1:, :3], lengths[1:], st[1:])  # no padding at all
        alone_padded = model(hist[1:], w[1:], lengths[1:], st[1:])
        wrong = model(hist, w, torch.tensor([8, 8]), st)  # what gathering the last (padded) position sees
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert torch.allclose(alone_padded[0], alone[0], atol=1e-5)
    assert (wrong[1] - alone[0]).abs().max() > 1e-3


def test_ember_gradient_reaches_every_parameter_and_optimizer_holds_all(ember_fires):
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4)
    hist, w, lengths, st, target = ember_batch(ember_fires, [0, 1, 2, 3], [10, 2, 0, 7], K=8)
    logits = model(hist, w, lengths, st)
    loss, _, _ = losses.bce_dice_loss(logits, target)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    opt = em.make_optimizer(em.parse_config([]), model)
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(set(in_opt))
    assert set(in_opt) == {id(p) for p in model.parameters()}
    # the startup check refuses groups that leave a module out (e.g. the refinement) or hold one twice
    refine = {id(p) for p in model.refine.parameters()}
    groups = [dict(params=[p for p in g["params"] if id(p) not in refine]) for g in opt.param_groups]
    with pytest.raises(RuntimeError):
        em.check_groups(model, groups)
    with pytest.raises(RuntimeError):
        em.check_groups(model, [dict(params=list(model.parameters()))] * 2)


def test_ember_refine_runs_on_the_front_only_and_equals_the_dense_head_there():
    """Refine's tiles (with their halo) give exactly the dense head's correction (3x3 convolutions with zero
    padding) on every tile of the front, including tiles cut by the grid's edges, and leave the coarse logits
    alone elsewhere. The front holds every cell not burning within the reach of the fire (--target new) and
    every burning cell within it of one not burning (--target full). No fire: no tiles, and a training step
    leaves the BatchNorm statistics finite."""
    torch.manual_seed(0)
    refine = em.Refine(2 + 3 + 2, 8, tile=16, reach=4)
    for m in refine.net:
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics that are not the identity
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_(), m.bias.data.normal_()
    refine.eval()
    B, H, W, T, R = 3, 37, 53, 16, 4  # neither side a multiple of the tile
    last = torch.zeros(B, 1, H, W)
    last[0, 0, 5, 14], last[1, 0, 30:, 40:], last[2, 0, 20, 0] = 1, 1, 1  # by a tile edge, corner, grid edge
    last[0, 0, :, 32:48] = 1  # a whole burning column of tiles, the front 4 cells to either side of it
    coarse, static, wind = torch.randn(B, 1, H, W), torch.randn(B, 3, H, W), torch.randn(B, 2)
    with torch.no_grad():
        out = refine(coarse, last, static, wind)
        x = torch.cat([coarse, last, static, wind[:, :, None, None].expand(-1, -1, H, W)], 1)
        n, conv = refine.net, torch.nn.functional.conv2d
        dense = coarse + n[6](n[5](n[4](conv(n[2](n[1](conv(x, n[0].weight, padding=1))),
                                             n[3].weight, padding=1))))
    on = torch.zeros(B, H, W, dtype=torch.bool)
    for b, i, j in zip(*em.front_tiles(last, T, R)):
        on[b, i * T:(i + 1) * T, j * T:(j + 1) * T] = True
    assert on[1].any() and on[2, :, 0].any() and not on.all()
    torch.testing.assert_close(out[:, 0][on], dense[:, 0][on], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 0][~on], coarse[:, 0][~on])
    burning = last[:, 0] > 0.5
    assert on[em.near_fire(burning, R) & ~burning].all()
    assert on[em.near_fire(~burning, R) & burning].all() and on[0, :, 32:48].any()
    refine.train()
    none = torch.zeros_like(last)
    assert len(em.front_tiles(none, T, R)[0]) == 0
    c = coarse.clone().requires_grad_()
    out = refine(c, none, static, wind)
    out.sum().backward()
    assert torch.equal(out.detach(), coarse) and torch.equal(c.grad, torch.ones_like(c))
    assert all(torch.isfinite(b).all() for b in refine.buffers())


def test_ember_bf16_patch_merging_on_a_one_cell_wide_map_gives_the_same_gradient_every_time():
    """torch's CPU bf16 conv backward gives a stride-2 3x3 conv on a map one cell wide a different weight
    gradient on every call (up to 1e20; it made bf16 training diverge on small grids). OverlapEmbed runs that
    case in fp32: identical gradients each time, equal to the fp32 ones."""
    torch.manual_seed(0)
    embed = em.OverlapEmbed(64, 128, 2)
    x = torch.randn(8, 64, 2, 1)  # (B, C, H, W): W = 1

    def weight_grad(dtype):
        embed.zero_grad()
        with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
            out = embed(x)[0]
        out.float().square().mean().backward()
        return embed.conv.weight.grad.clone()
    want = weight_grad(None)
    for _ in range(6):
        torch.testing.assert_close(weight_grad(torch.bfloat16), want, rtol=0, atol=0)


def test_ember_cpu_precision_is_timed_once_and_kept_on_resume(ember_fires, capsys):
    """auto times real steps on a copy (the model and the global RNG are left as they were); a stored choice
    is used without timing; on/off are obeyed."""
    model = em.EmberFormer(4, 4)
    fire, wind = torch.from_numpy(ember_fires["fire"]), torch.from_numpy(ember_fires["wind"])
    D = dict(fire=fire, wind=wind, static=torch.from_numpy(ember_fires["static"]),
             train=(torch.tensor([0, 1, 2]), torch.tensor([3, 5, 7])))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cfg = em.parse_config(["--cpu_bf16", "auto"])
    assert em.cpu_precision(cfg, model, D, None) in (None, torch.bfloat16)
    assert "cpu_bf16 auto: fp32" in capsys.readouterr().out
    assert (torch.equal(torch.get_rng_state(), rng)
            and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()))
    assert (em.cpu_precision(cfg, model, D, "bf16") is torch.bfloat16
            and em.cpu_precision(cfg, model, D, "fp32") is None)
    assert capsys.readouterr().out == ""  # a stored choice is not timed again
    assert em.cpu_precision(dict(cfg, cpu_bf16="off"), model, D, None) is None
    assert em.cpu_precision(dict(cfg, cpu_bf16="on"), model, D, None) is torch.bfloat16


def test_ember_one_training_step_sets_and_steps_both_lr_groups(tmp_path):
    """After one real train_epoch step both groups carry base_lr x get_lr(0), and parameters of both the
    temporal and the spatial part moved (a group whose LR is never set, or never stepped, fails)."""
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=6, size=16, n_frames=3, seed=3))
    cfg = em.parse_config(["--data_path", str(path), "--batch_size", "64", "--num_threads", "1"])
    D = em.load_data(cfg, torch.device("cpu"))
    model = em.build_model(cfg, D, torch.device("cpu"))
    opt = em.make_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, step = em.train_epoch(cfg, model, opt, scaler, D, torch.Generator().manual_seed(0),
                             0, 100, None, [], 1)
    assert step == 1  # 4 training fires x 2 samples fit one batch
    mult = em.get_lr(0, 100, 5, 1.0, cfg["min_lr_frac"])  # warmup: --warmup_frac 0.05 of 100 steps
    assert em.group_lr(opt, "temporal") == pytest.approx(cfg["lr_temporal"] * mult)
    assert em.group_lr(opt, "spatial") == pytest.approx(cfg["lr_spatial"] * mult)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("temporal.") for n in moved) and any(n.startswith("decode.") for n in moved)
    assert any(n.startswith("encoder.") for n in moved) and any(n.startswith("refine.") for n in moved)


def test_ember_wind_dilation_goes_downwind():
    cur = torch.zeros(2, 5, 5, dtype=torch.bool)
    cur[:, 2, 2] = True
    cfg = em.parse_config([])  # --dil_wind 6
    out = em.wind_dilation(cfg, cur, torch.tensor([[12.0, 0.0], [0.0, 0.0]]))  # strong east wind; calm
    assert out[0, 2, 3] and not out[0, 2, 1] and not out[0, 1, 2]  # east neighbour only (col grows east)
    assert out[1, 1:4, 1:4].all() and out[1].sum() == 9  # calm: all 8 neighbours
    north = em.wind_dilation(cfg, cur[:1], torch.tensor([[0.0, 12.0]]))
    assert north[0, 1, 2] and not north[0, 3, 2]  # v north -> row 0 side


# one thread: on a busy 2-core box, torch's default 2 threads made this run ~20x slower
# (thread oversubscription)
EMBER_TINY = ["--epochs", "10", "--patch_size", "8", "--history", "4", "--lr", "2e-3", "--batch_size", "16",
              "--num_threads", "1"]


def test_ember_tiny_run_beats_both_baselines_on_new_burn(tiny_fires, tmp_path):
    """The issue's bar, on tiny synthetic fires (40 x 32x32 x 12 frames, ~70 s): the model's val F1 on
    newly burned cells beats persistence (0 by construction) and the wind-aware dilation baseline."""
    out = tmp_path / "run"
    r = run_script("emberformer.py", "--data_path", tiny_fires, "--out_dir", out, *EMBER_TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[Epoch 1/" in r.stdout and "BCE+Dice | train: loss=" in r.stdout and "samples/s" in r.stdout
    rows = read_csv(out / "log.csv")
    base = data.load_checkpoint(out / "checkpoints" / "best.pth")["baselines"]
    new_f1 = [float(row["val_new_f1"]) for row in rows]
    print("val new_f1 per epoch", new_f1, "persistence", base["persistence"]["new_f1"],
          "dilation", base["dilation"]["new_f1"])
    assert base["persistence"]["new_f1"] == 0.0  # next = current never predicts a new cell
    assert base["dilation"]["new_f1"] > 0.5  # a real bar, not a strawman
    assert max(new_f1[-3:]) > base["dilation"]["new_f1"] and new_f1[-1] > new_f1[0]
    for name in ("log_steps.csv", "curves.png", "checkpoints/latest.pth", "plots/preview_epoch_001.png"):
        assert (out / name).is_file(), name


def test_ember_exact_resume(tmp_path):
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=8, size=16, n_frames=5, seed=2))
    flags = ["--data_path", path, "--epochs", "4", "--batch_size", "8", "--lr", "1e-3", "--num_threads", "1",
             "--cpu_bf16", "off"]  # a fixed precision: the independent runs a and c must compare exactly
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "b", "--stop_after", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_csv(tmp_path / "b" / "log.csv")) == 2
    # a paused run reports the test split at its end
    assert not (tmp_path / "b" / "test_metrics.json").exists()
    # --stop_after 2 again: it ends at the last epoch, where the run is complete, not paused
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "b", "--stop_after", "2",
                   "--resume", tmp_path / "b" / "checkpoints" / "latest.pth")
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(line.startswith("test (") for line in r.stdout.strip().splitlines()[-2:])  # then calibration
    a, b = read_csv(tmp_path / "a" / "log.csv"), read_csv(tmp_path / "b" / "log.csv")
    assert len(a) == len(b) == 4
    keys = ([k for k in a[0] if k.endswith(("loss", "bce", "dice", "f1", "new_ap"))]
            + ["lr_temporal", "lr_spatial"])
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[1]["train_loss"] != a[2]["train_loss"]
    test_a, test_b = [json.loads((tmp_path / d / "test_metrics.json").read_text()) for d in "ab"]
    assert test_a == test_b and {"model", "persistence", "dilation"} <= set(test_a)
    # SIGKILL as soon as the first latest.pth exists (an event, not a clock), then resume: same losses
    proc = subprocess.Popen([sys.executable, "emberformer.py", *map(str, flags),
                             "--out_dir", str(tmp_path / "c")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "c" / "checkpoints" / "latest.pth"
    while not latest.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and data.load_checkpoint(latest)["epoch"] < 4  # killed mid-run
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "c", "--resume", latest)
    assert r.returncode == 0, r.stderr[-2000:]
    c = read_csv(tmp_path / "c" / "log.csv")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in c]
    assert test_a["test_samples"] == 4  # round(0.1 * 8) = 1 test fire x 4 samples


def test_ember_nonfinite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                   capsys):
    """A NaN loss in the 2nd epoch (5 fires x 4 samples / batch 8 = 3 steps an epoch; NaN at training step 4)
    stops with one line and exit 3; latest.pth stays epoch 1's, finite, and the log holds epoch 1 only."""
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=8, size=16, n_frames=5, seed=2))
    real, calls = em.forward_batch, [0]

    def nan_at_step_4(cfg, model, D, s, t, amp, unroll=1):
        out = real(cfg, model, D, s, t, amp, unroll)
        if model.training:
            calls[0] += 1
            if calls[0] == 4:
                return (out[0] * float("nan"), out[1] * float("nan"), *out[2:])
        return out
    monkeypatch.setattr(em, "forward_batch", nan_at_step_4)
    with pytest.raises(SystemExit) as e:
        em.main(["--data_path", str(path), "--epochs", "3", "--batch_size", "8", "--num_threads", "1",
                 "--cpu_bf16", "off",  # no precision timing: it would call forward_batch too
                 "--out_dir", str(tmp_path / "out")])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss" in err[0] and "epoch 2" in err[0], err
    ckpt = data.load_checkpoint(tmp_path / "out" / "checkpoints" / "latest.pth")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
    assert [r["epoch"] for r in read_csv(tmp_path / "out" / "log.csv")] == ["1"]


def test_ember_new_target_keeps_burning_cells_burning_with_no_loss_on_them(ember_fires):
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4, target="new")
    hist, w, lengths, st, target = ember_batch(ember_fires, [0, 1, 2], [10, 5, 7], K=8)
    current = hist[torch.arange(3), lengths - 1] > 0.5
    assert current.any() and (~current).any()
    logits = model(hist, w, lengths, st)
    # burning at t -> burning at t+1, probability exactly 1
    assert (torch.sigmoid(logits[current]) == 1).all()
    logits.retain_grad()
    loss, _, _ = losses.bce_dice_loss(logits, target, mask=~current)
    loss.backward()
    assert (logits.grad[current] == 0).all() and logits.grad[~current].abs().sum() > 0
    flipped = torch.where(current, 1 - target, target)  # what the burning cells "should" be cannot matter
    assert torch.equal(losses.bce_dice_loss(logits.detach(), flipped, mask=~current)[0], loss.detach())
    full = em.EmberFormer(4, 4, target="full")  # same weights: the cells not burning get the network's logits
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model.eval()(hist, w, lengths, st), full.eval()(hist, w, lengths, st)
    assert torch.equal(a[~current], b[~current]) and (a[current] == em.BURNING_LOGIT).all()


def test_ember_average_precision_hand_values():
    def ap(scores, labels, mask=None):
        logits = torch.logit(torch.tensor(scores, dtype=torch.float64)).float()
        labels = torch.tensor(labels, dtype=torch.float32)
        mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else torch.tensor(mask)
        return losses.average_precision(losses.pr_histogram(logits, labels, mask))
    # ranked pos, neg, pos, neg: precision 1 at recall 1/2, 2/3 at recall 1 -> (1 + 2/3) / 2
    assert abs(ap([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) - 5 / 6) < 1e-9
    assert ap([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0  # perfect ranking
    assert abs(ap([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) - (1 / 3 + 2 / 4) / 2) < 1e-9  # worst ranking
    assert abs(ap([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) - 0.25) < 1e-9  # ties are one threshold: the base rate
    # masked cells ignored
    assert ap([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0], mask=[True, False, True, True]) == 1.0
    assert ap([0.9, 0.1], [0, 0]) == 1.0  # nothing to find
    # histograms add up over batches: two halves give the AP of the whole
    logits, labels = torch.tensor([2.0, 1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    keep = torch.ones(4, dtype=torch.bool)
    halves = (losses.pr_histogram(logits[:2], labels[:2], keep[:2])
              + losses.pr_histogram(logits[2:], labels[2:], keep[2:]))
    assert losses.average_precision(halves) == losses.average_precision(
        losses.pr_histogram(logits, labels, keep))
    # a hard mask (the baselines): AP is precision x recall at its one operating point
    counts = torch.stack([torch.tensor([3, 1, 1, 5]), torch.tensor([1, 1, 3, 5])])  # new burn: tp 1 fp 1 fn 3
    assert abs(em.scores(counts)["new_ap"] - 0.5 * 0.25) < 1e-9


def test_ember_splits_whole_fires_and_keep_val_fixed():
    cfg = dict(seed=0, val_frac=0.2, test_frac=0.1)
    train, val, test = em.split_fires(cfg, 50, "f.h5")
    assert (len(train), len(val), len(test)) == (35, 10, 5)
    assert set(train) | set(val) | set(test) == set(range(50)) and not set(train) & set(test)
    # val ignores --test_frac
    assert list(em.split_fires(dict(cfg, test_frac=0.0), 50, "f.h5")[1]) == list(val)
    assert list(data.split_sequences(50, 0.2, 0)[1]) == list(val)  # ...and is the pre-test-split val
    with pytest.raises(data.DataError, match="no training fire"):
        em.split_fires(dict(cfg, val_frac=0.5, test_frac=0.5), 4, "f.h5")


def test_ember_eval_is_deterministic_with_stochastic_depth(ember_fires):
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4)
    rates = [blk.drop_path.p for stage in model.encoder.stages for blk in stage]
    assert len(rates) == 8 and rates[0] == 0 and abs(rates[-1] - 0.1) < 1e-6
    assert all(b > a for a, b in zip(rates, rates[1:]))  # rising linearly
    hist, w, lengths, st, _ = ember_batch(ember_fires, [0, 1], [10, 2], K=8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(hist, w, lengths, st), model(hist, w, lengths, st))
    drop = em.DropPath(0.5).train()
    x = torch.ones(1000, 3)
    y = drop(x)
    # whole samples dropped, rest rescaled
    assert set(y[:, 0].tolist()) == {0.0, 2.0} and (y == y[:, :1]).all()


def test_ember_no_weight_decay_on_norms_and_biases_and_lrs_logged_by_name():
    model = em.EmberFormer(4, 4)
    cfg = em.parse_config([])
    opt = em.make_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            decayed = g["weight_decay"] > 0
            assert decayed == (p.ndim > 1), (g["name"], names[id(p)])
    assert any("norm" in names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0
               for p in g["params"])
    for g in opt.param_groups:  # as train_epoch sets them
        g["lr"] = g["base_lr"] * 0.5
    assert em.group_lr(opt, "temporal") == cfg["lr_temporal"] * 0.5
    assert em.group_lr(opt, "spatial") == cfg["lr_spatial"] * 0.5
    conv = model.encoder.embeds[0].conv
    fan_out_std = math.sqrt(2 / (9 * conv.out_channels))
    assert 0.8 < conv.weight.std().item() / fan_out_std < 1.2  # SegFormer's conv init


def test_ember_refuses_checkpoints_of_the_dense_refinement_head(tmp_path, capsys):
    """Their weights would load into the front-only head and forecast differently without a word."""
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=6, size=8, n_frames=3, seed=0))
    arch = {k: v for k, v in dataclasses.asdict(em.Arch()).items() if k not in ("refine_tile", "refine_reach")}
    old = tmp_path / "old.pth"
    torch.save(dict(model={}, optimizer={}, epoch=1, config=em.parse_config([]), rng={}, channels=["a"] * 4,
                    arch=arch), old)
    for flags in (["--resume", str(old)], ["--eval_only", "--model", str(old)]):
        with pytest.raises(SystemExit) as e:
            em.main(["--data_path", str(path), "--out_dir", str(tmp_path / "o")] + flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "8cc068f" in err and str(old) in err, err
        assert not (tmp_path / "o").exists()


def test_ember_unburning_file_names_the_sequence_and_frame(tmp_path):
    path = tmp_path / "active.h5"
    write_bad_fire(path, unburning_fire())
    with pytest.raises(data.DataError) as e:
        data.load_fire(str(path))
    assert ("'fire'" in str(e.value) and "sequence 1" in str(e.value)
            and "frame 2 and not at frame 3" in str(e.value))


def write_bad_fire(path, fire, static=None, wind=None):
    S, T, H, W = fire.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("fire", data=fire)
        d = f.create_dataset("static", data=np.zeros((S, 4, H, W), np.float32) if static is None else static)
        d.attrs["channels"] = np.array(list(data.FIRE_CHANNELS), dtype=h5py.string_dtype())
        f.create_dataset("wind", data=np.zeros((S, T, 2), np.float32) if wind is None else wind)


def unburning_fire():
    """Cumulative except sequence 1, where a cell burning at frame 2 is not burning at frame 3."""
    fire = np.zeros((3, 5, 8, 8), np.uint8)
    fire[:, 1:, 4, 4] = 1
    fire[1, 3, 4, 4] = 0
    return fire


def bad_nan_wind():
    wind = np.zeros((3, 5, 2), np.float32)
    wind[1, 2, 0] = np.nan
    return dict(fire=np.zeros((3, 5, 8, 8), np.uint8), wind=wind)


EMBER_BAD = {"dtype": lambda: dict(fire=np.zeros((3, 5, 8, 8), np.float32)),
       "nonbinary": lambda: dict(fire=np.full((3, 5, 8, 8), 2, np.uint8)),
       "one_frame": lambda: dict(fire=np.zeros((3, 1, 8, 8), np.uint8)),
       "static_shape": lambda: dict(fire=np.zeros((3, 5, 8, 8), np.uint8),
                                    static=np.zeros((3, 4, 8, 6), np.float32)),
       "nan_wind": bad_nan_wind, "unburns": lambda: dict(fire=unburning_fire())}


@pytest.mark.parametrize("kind", sorted(EMBER_BAD))
def test_ember_bad_fire_file_one_line_error(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.h5"
    write_bad_fire(path, **EMBER_BAD[kind]())
    with pytest.raises(SystemExit) as e:
        em.main(["--data_path", str(path), "--out_dir", str(tmp_path / "out"), "--epochs", "1"])
    assert_one_line_error(subprocess.CompletedProcess([], e.value.code, "", capsys.readouterr().err),
                          str(path))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ember_bad_flag_and_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        em.main(["--monitor", "val/acc", "--out_dir", str(tmp_path / "o")])
    assert_one_line_error(subprocess.CompletedProcess([], e.value.code, "", capsys.readouterr().err),
                          "--monitor")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=3, size=8, n_frames=3, seed=0))
    with pytest.raises(SystemExit) as e:
        em.main(["--data_path", str(path), "--resume", str(junk), "--out_dir", str(tmp_path / "o")])
    assert_one_line_error(subprocess.CompletedProcess([], e.value.code, "", capsys.readouterr().err),
                          "junk.pth")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,words", [
    ("--lr_temporal", "-1", "must be finite and > 0"), ("--lr", "nan", "--lr nan"),
    ("--pos_weight", "-2", ">= 0"), ("--dil_wind", "0", "--dil_wind 0.0"),
    ("--weight_decay", "-1", "--weight_decay"), ("--lr_spatial", "inf", "inf"),
])
def test_ember_numeric_flags_out_of_range_are_one_line_and_write_nothing(tmp_path, flag, value, words):
    r = run_script("emberformer.py", flag, value, "--out_dir", tmp_path / "out")
    assert_one_line_error(r, flag, words)
    assert not (tmp_path / "out").exists()


def test_ember_help_lists_constants():
    r = subprocess.run([sys.executable, "emberformer.py", "-h"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    for name in em.parse_config([]):
        assert f"--{name}" in r.stdout, name
    assert "(default: 10)" in r.stdout and "patience" in r.stdout


def test_ember_resume_trims_logs_and_bad_flags_write_nothing(tmp_path, capsys):
    log = tmp_path / "log.csv"
    data.append_csv(str(log), [dict(epoch=e, loss=1.0 / e) for e in (1, 2, 3, 4)])
    data.trim_log(str(log), 2)  # resuming the epoch-2 checkpoint: epochs 3 and 4 are re-run, not repeated
    assert [int(r["epoch"]) for r in read_csv(log)] == [1, 2]
    data.trim_log(str(log), 0)
    assert read_csv(log) == []
    for flags in (["--val_frac", "1.0"], ["--pred_thresh", "0"], ["--wind_scale", "0"],
                  ["--test_frac", "1.0"], ["--target", "burned"], ["--monitor", "val/ap"],
                  ["--cpu_bf16", "maybe"]):
        with pytest.raises(SystemExit) as e:
            em.main([*flags, "--out_dir", str(tmp_path / "out")])
        assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {flags[0]}")
    assert not (tmp_path / "out").exists()


# ==============================================================================================
# data-parallel mae.py (torchrun, gloo on the CPU): a run must not depend on the number of processes.
# Several processes are started either by torchrun itself or, where each process's exit code and output are
# checked, the way torchrun starts them (its environment variables and a free port). Tiny model and data, 1
# thread per process; every launch has a timeout, so a rank left waiting in a collective fails a test instead
# of hanging it.
DDP_TIMEOUT = 180  # seconds; a safety net against a hang, far above a launch's normal few seconds
# the training set below has 320 profiles: batch 29 splits 15/14 over 2 processes, and the last batch of each
# epoch (320 = 11 * 29 + 1) holds one profile, so one process gets an empty slice
DDP_MAE_TINY = ["--model_size", "tiny", "--batch_size", "29", "--lr", "2e-3", "--warmup_epochs", "1",
                "--num_threads", "1", "--n_plot", "2", "--cpu_bf16", "off"]  # fixed precision: runs compare


@pytest.fixture(scope="module")
def ddp_clouds(tmp_path_factory):
    """An unlabelled cloud file: 2 flights x 200 frames -> 320 train / 40 val profiles."""
    path = tmp_path_factory.mktemp("ddp_clouds") / "unlab.h5"
    unlabelled, _ = data.generate_clouds(n_flights=2, frames_per_flight=200, n_labelled=10, seed=1)
    data.write_clouds(path, **unlabelled)
    return str(path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs, timeout):
    """Wait for every process (each started in its own session); on a timeout kill them all, children too."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def launch(n, argv_of_rank, tmp_path, timeout=DDP_TIMEOUT):
    """Start n processes as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT),
    process `rank` running `python *argv_of_rank(rank)` in the repo. Returns [(exit code, stdout, stderr)]."""
    port, procs, files = _free_port(), [], []
    for rank in range(n):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        out, err = open(tmp_path / f"rank{rank}.out", "w+"), open(tmp_path / f"rank{rank}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *map(str, argv_of_rank(rank))], cwd=REPO, env=env,
                                      stdout=out, stderr=err, text=True, start_new_session=True))
    _wait_all(procs, timeout)
    results = []
    for p, (out, err) in zip(procs, files):
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def torchrun(n, *args, timeout=DDP_TIMEOUT, script="mae.py"):
    """`torchrun --standalone --nproc_per_node n script *args`; -> (exit code, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", str(n), script, *map(str, args)],
                         cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out, err


def one_process(*args, timeout=DDP_TIMEOUT, script="mae.py"):
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r.returncode, r.stdout, r.stderr


def ddp_read_log(out_dir):
    with open(os.path.join(out_dir, "log.csv")) as f:
        return {int(r["epoch"]): r for r in csv.DictReader(f)}


def assert_same_losses(a, b, epochs):
    """Per-epoch train and val losses equal up to float summation order; the LR schedule exactly."""
    for n in epochs:
        for col in ("train_loss", "val_loss"):
            assert float(a[n][col]) == pytest.approx(float(b[n][col]), rel=1e-5, abs=0), (n, col, a[n], b[n])
        assert a[n]["lr"] == b[n]["lr"]


def ddp_listing(out_dir):
    return sorted(os.path.relpath(os.path.join(d, f), out_dir) for d, _, fs in os.walk(out_dir) for f in fs)


# ----------------------------------------------------------------------------------------------
# helpers in data.py, in one process

def test_ddp_cleanup_waits_for_every_rank_only_when_all_got_there(monkeypatch):
    """Leaving the process group after a normal end (or an error every rank raised) waits at a barrier first,
    so no rank tears its connections down while rank 0 still writes (the CI abort at exit); after an error on
    one rank only it must not wait (the others never come), and without a group it does nothing."""
    calls = []
    monkeypatch.setattr(data.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(data.dist, "destroy_process_group", lambda: calls.append("destroy"))
    data.ddp_cleanup(True)
    assert calls == []  # no process group
    monkeypatch.setattr(data, "_distributed", lambda: True)
    data.ddp_cleanup(True)
    assert calls == ["barrier", "destroy"]
    data.ddp_cleanup(False)
    assert calls == ["barrier", "destroy", "destroy"]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slices_partition_a_batch_and_weights_give_its_mean(world, monkeypatch):
    """The slices of all ranks cover a global batch once, in order, sizes differing by at most one (empty
    ones where n < world); the loss weights turn DDP's plain average of per-rank means into the batch mean."""
    for n in (1, 2, 3, 5, 29, 64):
        per_sample = torch.rand(n, dtype=torch.float64)
        slices, averaged = [], 0.0
        for rank in range(world):
            monkeypatch.setattr(data, "rank_world", lambda: (rank, world))
            mine = data.rank_slice(n)
            slices.append(mine)
            part = per_sample[mine]
            # an empty slice's loss is 0
            mean = part.mean() if len(part) else torch.zeros((), dtype=torch.float64)
            # what DDP's average of the weighted losses gives
            averaged += data.rank_loss_weight(n) * mean / world
        assert [i for s in slices for i in range(n)[s]] == list(range(n))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert averaged.item() == pytest.approx(per_sample.mean().item(), rel=1e-12)
    monkeypatch.undo()
    assert (data.rank_world() == (0, 1) and data.rank_slice(7) == slice(0, 7)
            and data.rank_loss_weight(7) == 1.0)


def test_device_per_process_refuses_fewer_gpus_than_processes(monkeypatch):
    cpu = torch.device("cpu")
    assert data.ddp_device(cpu) is cpu  # no process group: unchanged
    monkeypatch.setattr(data, "_distributed", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert data.ddp_device(cpu) is cpu
    with pytest.raises(data.DataError, match=r"cuda: 2 processes on this node but 1 GPU.*--nproc_per_node 1"):
        data.ddp_device(torch.device("cuda"))
    with pytest.raises(data.DataError, match="--device mps"):
        data.ddp_device(torch.device("mps"))


def test_lock_names_host_and_pid_under_torchrun(tmp_path, monkeypatch):
    """Every lock says "pid host" (one process too: on a shared filesystem a live run on another node must not
    be taken over), and a lock naming another host is refused (its process cannot be seen from here)."""
    data.claim_out_dir(tmp_path / "single")
    assert (tmp_path / "single/.lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
    monkeypatch.setattr(data, "_distributed", lambda: True)
    out = tmp_path / "ddp"
    data.claim_out_dir(out)
    assert (out / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
    data.check_out_dir(out)  # our own lock: fine
    (out / ".lock").write_text(f"{os.getpid()} some-other-node")
    with pytest.raises(data.DataError, match=f"in use by process {os.getpid()} on host some-other-node"):
        data.check_out_dir(out)
    (out / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}")
    data.check_out_dir(out)


# ----------------------------------------------------------------------------------------------
# several processes

GRADIENT_WORKER = textwrap.dedent("""
    import sys, torch, data, mae
    torch.set_num_threads(1)
    data.ddp_setup()
    torch.manual_seed(0)
    model = mae.MAE(**mae.MODEL_SIZES["tiny"])
    ddp_model = data.ddp_wrap(model, torch.device("cpu"))
    cfg = dict(mask_ratio=0.75, norm_pix_loss=False)
    grads = {}
    for n, weighted in ((5, True), (1, True), (5, False)):  # 5 = 3 + 2 profiles; 1 = 1 + an empty slice
        x = torch.randn(n, 1, 440, generator=torch.Generator().manual_seed(n))  # (n, C, W) the global batch
        noise = mae.mask_noise(model, x, cfg, torch.Generator().manual_seed(n + 1))
        mine = data.rank_slice(n)
        loss = mae.loss_fn(ddp_model, x[mine], cfg, noise[mine], None)
        model.zero_grad()
        (loss * (data.rank_loss_weight(n) if weighted else 1.0)).backward()
        grads[n, weighted] = {name: p.grad.clone() for name, p in model.named_parameters()}
    if data.is_rank0():
        torch.save(grads, sys.argv[1])
    data.ddp_cleanup(True)
""")


def test_two_process_gradient_of_uneven_slices_equals_the_full_batch_gradient(tmp_path):
    """A global batch of 5 split 3/2, and one of 1 split 1/0 (a rank with an empty slice still joins the
    all-reduce): the DDP gradient equals one process's full-batch gradient. Without the weights (DDP's plain
    average of the two slices' means) the 3/2 split gives another gradient, so the test can fail."""
    results = launch(2, lambda rank: ["-c", GRADIENT_WORKER, tmp_path / "grads.pth"], tmp_path)
    assert [r[0] for r in results] == [0, 0], results
    ddp_grads = torch.load(tmp_path / "grads.pth")
    torch.manual_seed(0)
    model = mae.MAE(**mae.MODEL_SIZES["tiny"])
    cfg = dict(mask_ratio=0.75, norm_pix_loss=False)
    for n in (5, 1):
        x = torch.randn(n, 1, 440, generator=torch.Generator().manual_seed(n))
        model.zero_grad()
        noise = mae.mask_noise(model, x, cfg, torch.Generator().manual_seed(n + 1))
        mae.loss_fn(model, x, cfg, noise, None).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(ddp_grads[n, True][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        if n == 5:
            assert any(not torch.allclose(ddp_grads[5, False][name], p.grad, rtol=1e-3, atol=1e-6)
                       for name, p in model.named_parameters())


@pytest.fixture(scope="module")
def ddp_runs(ddp_clouds, tmp_path_factory):
    """The same 2-epoch tiny run with 1 process and with 2 (torchrun);
    -> dict(one=out_dir, two=out_dir, stdout2=)."""
    base = tmp_path_factory.mktemp("ddp_runs")
    flags = ["--data_path", ddp_clouds, "--epochs", "2", "--save_every", "1", *DDP_MAE_TINY]
    rc, out, err = one_process(*flags, "--out_dir", base / "one")
    assert rc == 0, err
    assert "320 train / 40 val" in out
    rc, out2, err = torchrun(2, *flags, "--out_dir", base / "two")
    assert rc == 0, err
    return dict(one=str(base / "one"), two=str(base / "two"), stdout2=out2, flags=flags)


def test_two_processes_reproduce_the_one_process_run(ddp_runs):
    """Same per-epoch losses (1e-5 relative: only the order of float sums differs), same files written once
    by rank 0, each console line once, and the checkpoint of a 2-process run is a plain 1-process one."""
    one, two = ddp_read_log(ddp_runs["one"]), ddp_read_log(ddp_runs["two"])
    assert sorted(one) == sorted(two) == [1, 2]
    assert_same_losses(one, two, [1, 2])
    assert float(two[2]["train_loss"]) < float(two[1]["train_loss"])
    # no .lock left, no temp files, nothing per rank
    assert ddp_listing(ddp_runs["one"]) == ddp_listing(ddp_runs["two"])
    assert ddp_runs["stdout2"].count("epoch   1/2 |") == 1 and ddp_runs["stdout2"].count("best val loss") == 1
    assert "2 processes share each batch of 29" in ddp_runs["stdout2"]
    ck1, ck2 = (data.load_checkpoint(os.path.join(ddp_runs[k], "checkpoints/latest.pth"))
                for k in ("one", "two"))
    assert ck1["model"].keys() == ck2["model"].keys()  # no DDP "module." prefix
    for k, w1 in ck1["model"].items():
        w2 = ck2["model"][k]
        if k.endswith("qkv.bias"):  # the key bias cannot change attention (softmax is shift-invariant): its
            D = len(w1) // 3       # gradient is rounding noise, which AdamW scales up to lr-sized steps
            w1, w2 = torch.cat([w1[:D], w1[2 * D:]]), torch.cat([w2[:D], w2[2 * D:]])
        torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-5, msg=k)
    enc, _ = mae.load_encoder(os.path.join(ddp_runs["two"], "mae_encoder_pretrained.pth"))
    assert enc.num_patches == 22


def test_resume_across_process_counts(ddp_runs, tmp_path):
    """A 1-process checkpoint resumed with 2 processes, and a 2-process one with 1, finish like the
    uninterrupted runs."""
    flags = ddp_runs["flags"]
    results = launch(2, lambda rank: ["mae.py", *flags, "--out_dir", tmp_path / "one_then_two",
                                      "--resume", os.path.join(ddp_runs["one"], "checkpoints/epoch_001.pth")],
                     tmp_path)
    assert [r[0] for r in results] == [0, 0], results
    assert "resumed from" in results[0][1] and results[1][1] == ""  # only rank 0 prints
    assert_same_losses(ddp_read_log(tmp_path / "one_then_two"), ddp_read_log(ddp_runs["one"]), [2])
    rc, out, err = one_process(*flags, "--out_dir", tmp_path / "two_then_one",
                               "--resume", os.path.join(ddp_runs["two"], "checkpoints/epoch_001.pth"))
    assert rc == 0, err
    assert_same_losses(ddp_read_log(tmp_path / "two_then_one"), ddp_read_log(ddp_runs["two"]), [2])


def assert_one_line_on_rank0_and_exit_everywhere(results, code, *words):
    assert [r[0] for r in results] == [code] * len(results), results
    lines = results[0][2].strip().splitlines()
    assert (len(lines) == 1 and lines[0].startswith("error:")
            and all(w in lines[0] for w in words)), results[0][2]
    assert all(r[2].strip() == "" for r in results[1:]), results  # the other ranks say nothing


@pytest.mark.parametrize("script", ["mae.py", "emberformer.py"])
def test_bad_combinations_and_one_rank_failing_stop_every_rank_with_one_line(script, request, tmp_path):
    """A global batch smaller than the number of processes: one line from rank 0, exit 2 on every rank,
    nothing written. A problem seen by one rank only (here its data file) stops the others too, with that
    rank's message, without a hang."""
    path, flags = ((request.getfixturevalue("ddp_clouds"), DDP_MAE_TINY) if script == "mae.py" else
                   (request.getfixturevalue("fire_file"), EMBER_DDP))
    out = tmp_path / "out"
    results = launch(2, lambda rank: [script, "--data_path", path, "--out_dir", out, *flags,
                                      "--batch_size", "1"], tmp_path)
    assert_one_line_on_rank0_and_exit_everywhere(results, 2, "--batch_size 1 is the global batch",
                                                 "at least 2")
    assert not out.exists()
    results = launch(2, lambda rank: [script, "--data_path", path if rank == 0 else tmp_path / "missing.h5",
                                      "--out_dir", out, *flags], tmp_path)
    assert_one_line_on_rank0_and_exit_everywhere(results, 2, "missing.h5")
    assert not out.exists()


NAN_ON_RANK1 = textwrap.dedent("""
    import sys, data, mae
    real, steps = mae.loss_fn, []
    def nan_on_rank1_last_step(model, x, cfg, masks, dtype):  # rank 1's loss at the 11th (last) """
    """step of epoch 2
        loss = real(model, x, cfg, masks, dtype)
        steps.append(model.training)
        nan = data.rank_world()[0] == 1 and sum(steps) == 22 and model.training
        return loss * float("nan") if nan else loss
    mae.loss_fn = nan_on_rank1_last_step
    mae.main(sys.argv[1:])
""")


def test_nonfinite_loss_on_one_rank_stops_every_rank_with_exit_3(ddp_clouds, tmp_path):
    """A NaN loss on rank 1 alone, at the last step of epoch 2 (rank 0's own losses stay finite): every rank
    stops with exit 3 after the all-reduced check, rank 0 says so once, and epoch 1's checkpoint stays."""
    out = tmp_path / "out"
    results = launch(2, lambda rank: ["-c", NAN_ON_RANK1, "--data_path", ddp_clouds, "--out_dir", out,
                                      "--epochs", "3", *DDP_MAE_TINY], tmp_path)
    assert_one_line_on_rank0_and_exit_everywhere(results, 3, "non-finite loss", "epoch 2")
    assert data.load_checkpoint(out / "checkpoints/latest.pth")["epoch"] == 1
    assert list(ddp_read_log(out)) == [1]


# ==============================================================================================
# emberformer.py as a forecasting tool (--eval_only --model, --rollout): tiny fire files (16x16) and, except
# in the one real training run, a tiny Arch, so each test takes seconds.
# the checkpoint stores its Arch, so --model rebuilds these sizes
EVAL_ARCH = em.Arch(dim=16, heads=2, layers=2, ffn=32, mit_dims=(8, 16, 16, 16), mit_heads=(1, 1, 1, 1),
                    decode_dim=16, refine_dim=8)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fire_files(tmp_path_factory):
    """train.h5 (the checkpoint's training file), other.h5 (another seed, other T),
    three.h5 (3 static channels)."""
    d = tmp_path_factory.mktemp("fires")
    data.write_fire(d / "train.h5", **data.generate_fires(n_seq=4, size=16, n_frames=6, seed=1))
    data.write_fire(d / "other.h5", **data.generate_fires(n_seq=3, size=16, n_frames=7, seed=2))
    three = data.generate_fires(n_seq=2, size=16, n_frames=4, seed=3)
    data.write_fire(d / "three.h5", three["fire"], three["static"][:, :3], three["channels"][:3],
                    three["wind"])
    return {k: d / f"{k}.h5" for k in ("train", "other", "three")}


def tiny_model(target="new", seed=0):
    torch.manual_seed(seed)
    return em.EmberFormer(4, 4, 10.0, target, EVAL_ARCH).eval()


def write_checkpoint(path, train_file, **settings):
    """A checkpoint as train() writes it (what --model reads), of an untrained tiny model with history 3."""
    net = tiny_model(settings.get("target", "new"))
    st = torch.from_numpy(data.load_fire(str(train_file))["static"]).double()
    net.static_mean.copy_(st.mean((0, 2, 3)).float())
    net.static_std.copy_(st.std((0, 2, 3)).float())
    cfg = dict(em.parse_config(["--data_path", str(train_file), "--history", "3"]), **settings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model=net.state_dict(), config=cfg, channels=list(data.FIRE_CHANNELS), epoch=1,
                    arch=dataclasses.asdict(EVAL_ARCH), data_file=os.path.abspath(train_file),
                    train_fire_hashes=em.fire_hashes(data.load_fire(str(train_file))["fire"])), path)
    return net


def main_exit(argv, capsys):
    """em.main in-process -> (exit code, stdout, stderr); 0 when it returns."""
    try:
        em.main([*map(str, argv), "--num_threads", "1"])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def dir_tree(path):
    """{relative path: (size, mtime)} of every file under path."""
    return {os.path.relpath(os.path.join(r, f), path): (os.path.getsize(os.path.join(r, f)),
                                                         os.path.getmtime(os.path.join(r, f)))
            for r, _, names in os.walk(path) for f in names}


def one_step_direct(net, path, K):
    """The model's one-step scores over EVERY pair of the file in one batch, computed here without
    em's loops."""
    d = data.load_fire(str(path))
    fire, wind, static = (torch.from_numpy(d[k]) for k in ("fire", "wind", "static"))
    s, t = data.fire_sample_index(np.arange(fire.shape[0]), fire.shape[1])
    hist, w, lengths, nxt = data.fire_batch(fire, wind, s, t, K)
    with torch.no_grad():
        logits = net(hist, w, lengths, static[s])
    cur = hist[torch.arange(len(s)), lengths - 1] > 0.5
    return em.scores(em.batch_counts(torch.sigmoid(logits) > 0.5, nxt, cur),
                     losses.pr_histogram(logits, nxt, ~cur))


# ----------------------------------------------------------------------------------------------
# --eval_only

@pytest.mark.parametrize("trained_in", ["fp32", "bf16"])
def test_eval_only_scores_in_the_precision_the_model_trained_in(fire_files, tmp_path, capsys,
                                                                monkeypatch, trained_in):
    ckpt = tmp_path / "best.pth"
    write_checkpoint(ckpt, fire_files["train"])
    torch.save(dict(torch.load(ckpt, weights_only=False), cpu_autocast=trained_in), ckpt)
    seen, real = set(), em.model_logits
    monkeypatch.setattr(em, "model_logits", lambda model, *a: seen.add(a[-1]) or real(model, *a))
    code, _, err = main_exit(["--eval_only", "--model", ckpt, "--data_path", fire_files["other"], "--out_dir",
                              tmp_path / "out", "--batch_size", "64"], capsys)
    assert code == 0, err
    assert seen == {torch.bfloat16 if trained_in == "bf16" else None}


def test_eval_only_scores_every_pair_of_another_file(fire_files, tmp_path, capsys):
    run = tmp_path / "run"
    net = write_checkpoint(run / "checkpoints" / "best.pth", fire_files["train"])
    (run / "log.csv").write_text("epoch\n1\n")
    before = dir_tree(run)
    code, out, err = main_exit(["--eval_only", "--model", run / "checkpoints" / "best.pth",
                                "--data_path", fire_files["other"], "--out_dir", run, "--batch_size", "64",
                                "--rollout", "2"], capsys)
    assert code == 0, err
    assert "warning" not in err  # other.h5 holds no training fire
    after = dir_tree(run)
    # run untouched
    assert {k: v for k, v in after.items() if not k.startswith("eval_other" + os.sep)} == before
    written = sorted(k for k in after if k not in before and not k.endswith(".lock"))  # the lock goes at exit
    assert written == [os.path.join("eval_other", f)
                       for f in ("calibration.json", "eval.csv", "input.txt", "preview.png",
                                 "reliability.png", "rollout.csv", "rollout.png", "rollout_strip.png")]
    rows = {r["method"]: r for r in read_csv(run / "eval_other" / "eval.csv")}
    assert set(rows) == {"model", "dilation", "persistence"}
    # every t -> t+1 pair
    assert all(int(r["pairs"]) == 3 * 6 and int(r["fires"]) == 3 for r in rows.values())
    # history 3 (the checkpoint's, not the default 8) over all 18 pairs: the same numbers as computed directly
    want = one_step_direct(net, fire_files["other"], K=3)
    for k in ("new_f1", "new_iou", "new_ap", "f1", "precision"):
        assert float(rows["model"][k]) == pytest.approx(want[k], abs=1e-12), k
    assert float(rows["persistence"]["new_f1"]) == 0.0 and rows["persistence"]["loss"] == ""
    rollout = read_csv(run / "eval_other" / "rollout.csv")
    assert [(r["method"], int(r["lead"]), int(r["starts"])) for r in rollout] == [
        (m, lead, 3 * 5) for m in em.ROLLOUT_METHODS for lead in (1, 2)]  # 3 fires x t0 = 0..4 (7 frames)
    assert "new_iou" in out and "lead 2:" in out


def test_eval_only_refuses_mismatched_static_channels_in_one_line(fire_files, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "best.pth"
    write_checkpoint(ckpt, fire_files["train"])
    before = dir_tree(tmp_path)
    code, _, err = main_exit(["--eval_only", "--model", ckpt, "--data_path", fire_files["three"],
                              "--out_dir", tmp_path / "run", "--rollout", "2"], capsys)
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), str(fire_files["three"]),
                          "'static'", "['elevation_m', 'slope_deg', 'fuel_type']",
                          str(list(data.FIRE_CHANNELS)))
    assert dir_tree(tmp_path) == before  # nothing written: no eval_three/, no lock


@pytest.mark.parametrize("flags,words", [
    (["--history", "5"], ["--history 3", "asked 5"]),  # a model setting comes from the checkpoint
    (["--rollout", "7"], ["T=7", "--rollout 7"]),  # other.h5 has 7 frames: 6 steps at most
    (["--rollout", "-1"], ["--rollout -1"]),
    (["--resume", "x.pth"], ["--resume"]),
])
def test_eval_only_bad_flags_one_line(fire_files, tmp_path, capsys, flags, words):
    ckpt = tmp_path / "best.pth"
    write_checkpoint(ckpt, fire_files["train"])
    code, _, err = main_exit(["--eval_only", "--model", ckpt, "--data_path", fire_files["other"],
                              "--out_dir", tmp_path / "out", *flags], capsys)
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), *words)
    assert not (tmp_path / "out").exists()


def test_model_and_rollout_need_eval_only(fire_files, tmp_path, capsys):
    for flags, word in ((["--model", "m.pth"], "--model"), (["--rollout", "3"], "--rollout"),
                        (["--eval_only"], "--eval_only needs --model")):
        code, _, err = main_exit([*flags, "--data_path", fire_files["other"], "--out_dir", tmp_path / "out"],
                                 capsys)
        assert_one_line_error(subprocess.CompletedProcess([], code, "", err), word)
    assert not (tmp_path / "out").exists()


def test_a_trained_checkpoint_evaluates_warns_on_training_fires_and_leaves_the_run_alone(fire_files, tmp_path,
                                                                                         capsys):
    """The real path: train() writes the checkpoint (default Arch, 1 epoch),
    --eval_only --rollout reads it."""
    run = tmp_path / "run"
    code, _, err = main_exit(["--data_path", fire_files["train"], "--out_dir", run, "--epochs", "1",
                              "--history", "3", "--batch_size", "8", "--val_frac", "0.25",
                              "--test_frac", "0"], capsys)
    assert code == 0, err
    before = dir_tree(run)
    best = run / "checkpoints" / "best.pth"
    copy = tmp_path / "copy.h5"  # the same fires under another name: recognised by their hashes
    shutil.copy(fire_files["train"], copy)
    for path, warning in ((fire_files["train"], "is the file --model"), (copy, "holds 3 of 4 fires")):
        code, out, err = main_exit(["--eval_only", "--model", best, "--data_path", path, "--out_dir", run],
                                   capsys)
        assert code == 0, err
        assert err.startswith("warning: ") and warning in err and "seen in training" in err, err
        assert "history 3" in out  # the checkpoint's, not the default 8
    after = dir_tree(run)
    # logs and checkpoints untouched
    assert {k: v for k, v in after.items() if not k.startswith("eval_")} == before


# ----------------------------------------------------------------------------------------------
# --rollout

def fire_dict(path):
    return em.fire_tensors(data.load_fire(str(path)), CPU, str(path))


def median_new_prob(net, D, s, t, history):
    """The median probability the model gives the cells not burning at t, over these samples."""
    hist, w, lengths, _ = data.fire_batch(D["fire"], D["wind"], s, t, history)
    with torch.no_grad():
        prob = torch.sigmoid(net(hist, w, lengths, D["static"][s]))
    return prob[hist[torch.arange(len(s)), lengths - 1] < 0.5].median().item()


@pytest.mark.parametrize("target", ["new", "full"])
def test_rollout_shapes_and_lead_one_is_the_one_step_score(fire_files, target):
    cfg = em.parse_config(["--history", "3", "--batch_size", "4", "--target", target])  # several batches
    D, net, N = fire_dict(fire_files["other"]), tiny_model(target), 3
    S, T, H, W = D["fire"].shape
    s, t0 = em.rollout_starts(S, T, N)
    cfg["pred_thresh"] = median_new_prob(net, D, s, t0, 3)  # an untrained model: ~half new burn
    assert len(s) == S * (T - N) and int(t0.max()) == T - 1 - N  # every start with N true frames after it
    assert em.model_rollout(cfg, net, D, s[:5], t0[:5], N, None).shape == (5, N, H, W)
    assert em.dilation_rollout(cfg, D, s[:5], t0[:5], N).shape == (5, N, H, W)
    by_method, n_starts = em.rollout_scores(cfg, net, D, N, None)
    assert n_starts == len(s) and list(by_method) == list(em.ROLLOUT_METHODS)
    assert all([r["lead"] for r in rows] == [1, 2, 3] for rows in by_method.values())
    D["starts"] = (s, t0)
    one = em.evaluate(cfg, net, D, None, "starts")  # the one-step scores over the same start frames
    base = em.baselines(cfg, D, s, t0)
    for k in ("new_f1", "new_iou", "new_precision", "new_recall"):
        assert by_method["model"][0][k] == one[k], k
        assert by_method["dilation"][0][k] == base["dilation"][k], k
        assert by_method["persistence"][0][k] == base["persistence"][k], k
    assert 0 < one["new_f1"] < 1  # not a degenerate equality (all or nothing predicted)


def test_rollout_feeds_the_model_its_own_forecasts_not_the_truth(fire_files):
    """Changing the true frames after t0 changes nothing in a rollout from t0; changing frame t0 does."""
    cfg = em.parse_config(["--history", "3"])
    D, net = fire_dict(fire_files["other"]), tiny_model()
    s, t0 = torch.tensor([1]), torch.tensor([2])
    base = em.model_rollout(cfg, net, D, s, t0, 3, None)
    later = D["fire"].clone()
    later[1, 3:] = 1  # everything burns after t0
    assert torch.equal(em.model_rollout(cfg, net, dict(D, fire=later), s, t0, 3, None), base)
    earlier = D["fire"].clone()
    earlier[1, 2:, :, :8] = 1  # frame t0 itself changes
    assert not torch.equal(em.model_rollout(cfg, net, dict(D, fire=earlier), s, t0, 3, None), base)


@pytest.mark.parametrize("target", ["new", "full"])
def test_a_rollout_never_unburns_a_cell(fire_files, target):
    cfg = em.parse_config(["--history", "3", "--target", target])
    D, net = fire_dict(fire_files["other"]), tiny_model(target, seed=1)
    s, t0 = em.rollout_starts(*D["fire"].shape[:2], 4)
    start = D["fire"][s, t0] > 0
    for forecast in (em.model_rollout(cfg, net, D, s, t0, 4, None), em.dilation_rollout(cfg, D, s, t0, 4)):
        assert (forecast[:, 0] >= start).all() and (forecast[:, 1:] >= forecast[:, :-1]).all()
    if target == "full":  # the guard has teeth: this untrained model's own mask drops burning cells
        hist, w, lengths, _ = data.fire_batch(D["fire"], D["wind"], s, t0, 3)
        with torch.no_grad():
            raw = torch.sigmoid(net(hist, w, lengths, D["static"][s])) > cfg["pred_thresh"]
        assert (start & ~raw).any()


# ==============================================================================================
# emberformer.py under torchrun (gloo on the CPU). EmberFormer cannot repeat a 1-process run exactly with
# several processes: its dropout masks and, on the CPU, its BatchNorm batch statistics are per process. The
# runs here check what must hold anyway: every sample is counted once (the logged val metrics and the test
# report equal a 1-process evaluation of the saved checkpoint), rank 0 alone writes one set of files, and
# --resume works across process counts. The gradient test runs the model in eval mode (no dropout,
# BatchNorm's running statistics), where 2 processes must give the 1-process gradient of the global batch.
# Tiny data (16x16 fires), 1 thread per process.
# 8 fires x 5 samples: 2 val fires (10 samples), 1 test fire (5), 22 of the 25 training samples. A global
# batch of 7 splits 4/3 over 2 processes; the last of each epoch (22 = 3 * 7 + 1) holds one sample, so
# rank 1's slice is empty
EMBER_DDP = ["--epochs", "2", "--batch_size", "7", "--max_samples", "22", "--num_threads", "1",
             "--cpu_bf16", "off", "--log_every", "1"]
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def fire_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ember_ddp") / "fires.h5"
    data.write_fire(path, **data.generate_fires(n_seq=8, size=16, n_frames=6, seed=1))
    return str(path)


def ember_torchrun(n, *args, timeout=DDP_TIMEOUT):
    return torchrun(n, *args, timeout=timeout, script="emberformer.py")


def ember_one_process(*args, timeout=DDP_TIMEOUT):
    return one_process(*args, timeout=timeout, script="emberformer.py")


def evaluate_checkpoint(path, split):
    """A saved checkpoint scored on a split in this one process (no process group) -> metrics dict; the
    test split with the threshold chosen on val (as the test report), others with the training threshold
    (as the log)."""
    ckpt = data.load_checkpoint(path)
    cfg = dict(ckpt["config"],
               **({"pred_thresh": ckpt["calibration"]["pred_thresh"]} if split == "test" else {}))
    D = em.load_data(cfg, torch.device("cpu"))
    model = em.EmberFormer(len(D["channels"]), cfg["patch_size"], cfg["wind_scale"], cfg["target"],
                           em.Arch(**ckpt["arch"]))
    model.load_state_dict(ckpt["model"])
    return em.evaluate(cfg, model, D, None, split)


def assert_same_metrics(logged, scores, prefix=""):
    for k in em.METRICS:
        assert float(logged[prefix + k]) == pytest.approx(scores[k], rel=1e-5, abs=1e-6), k


@pytest.fixture(scope="module")
def first_epochs(fire_file, tmp_path_factory):
    """Epoch 1 of the same run with 1 process and with 2 (real torchrun), each paused with --stop_after 1."""
    base = tmp_path_factory.mktemp("ember_ddp_runs")
    # --stop_after may change on --resume: the resumed runs finish
    flags = ["--data_path", fire_file, *EMBER_DDP]
    rc, out1, err = ember_one_process(*flags, "--stop_after", "1", "--out_dir", base / "one")
    assert rc == 0, err
    rc, out2, err = ember_torchrun(2, *flags, "--stop_after", "1", "--out_dir", base / "two")
    assert rc == 0, err
    return dict(one=base / "one", two=base / "two", stdout1=out1, stdout2=out2, flags=flags)


def test_two_processes_train_write_once_and_count_every_sample_once(first_epochs):
    one, two = first_epochs["one"], first_epochs["two"]
    # the same files, written once: no lock left, nothing per rank
    assert ddp_listing(one) == ddp_listing(two)
    out = first_epochs["stdout2"]
    assert "train 22 / val 10 / test 5 samples" in out and "2 processes share each batch of 7" in out
    assert out.count("[Epoch 1/2]") == 1 and out.count("stopping after 1 epoch") == 1
    (row1,), (row2,) = read_csv(one / "log.csv"), read_csv(two / "log.csv")
    assert row1["step"] == row2["step"] == str(STEPS_PER_EPOCH)
    assert (row1["lr_temporal"], row1["lr_spatial"]) == (row2["lr_temporal"], row2["lr_spatial"])
    # the same start and batches; only dropout masks and per-process BatchNorm statistics differ. A sample
    # counted twice, or only rank 0's, would put the train loss near 2x or 0.5x
    assert float(row2["train_loss"]) == pytest.approx(float(row1["train_loss"]), rel=0.05)
    steps1, steps2 = read_csv(one / "log_steps.csv"), read_csv(two / "log_steps.csv")
    assert [r["step"] for r in steps1] == [r["step"] for r in steps2] == ["1", "2", "3", "4"]
    assert float(steps2[0]["loss"]) == pytest.approx(float(steps1[0]["loss"]), rel=0.05)
    # the val metrics of the 2-process run (each process scored its slices, the sums were added) are the saved
    # model's, scored here by one process: every val sample counted once, with rank 0's BatchNorm statistics
    for run, row in ((two, row2), (one, row1)):
        assert_same_metrics(row, evaluate_checkpoint(run / "checkpoints/latest.pth", "val"), "val_")
    ck1, ck2 = (data.load_checkpoint(run / "checkpoints/latest.pth") for run in (one, two))
    assert ck1["model"].keys() == ck2["model"].keys()  # a plain checkpoint: no DDP "module." prefix
    assert torch.equal(ck1["rng"]["gen"], ck2["rng"]["gen"])  # the shuffling generator drew the same batches


def test_ember_resume_across_process_counts(first_epochs, tmp_path):
    """Epoch 1 of 1 process resumed with 2, and epoch 1 of 2 processes resumed with 1: each finishes
    the run (the optimizer, schedule and shuffling continue) and reports the test split once, over every
    test sample."""
    for src, dst in (("one", "one_then_two"), ("two", "two_then_one")):
        shutil.copytree(first_epochs[src], tmp_path / dst)
    resume = ["--resume", tmp_path / "one_then_two/checkpoints/latest.pth",
              "--out_dir", tmp_path / "one_then_two"]
    results = launch(2, lambda rank: ["emberformer.py", *first_epochs["flags"], *resume], tmp_path)
    assert [r[0] for r in results] == [0, 0], results
    assert "test (5 samples" in results[0][1] and results[1][1] == ""  # only rank 0 prints
    rc, out, err = ember_one_process(*first_epochs["flags"],
                                     "--resume", tmp_path / "two_then_one/checkpoints/latest.pth",
                                     "--out_dir", tmp_path / "two_then_one")
    assert rc == 0, err
    ckpts = {}
    for src, dst in (("one", "one_then_two"), ("two", "two_then_one")):
        rows = read_csv(tmp_path / dst / "log.csv")
        assert ([r["epoch"] for r in rows] == ["1", "2"]
                and rows[0] == read_csv(first_epochs[src] / "log.csv")[0])
        assert len(read_csv(tmp_path / dst / "log_steps.csv")) == 2 * STEPS_PER_EPOCH
        ckpts[dst] = ckpt = data.load_checkpoint(tmp_path / dst / "checkpoints/latest.pth")
        assert ckpt["epoch"] == 2 and ckpt["optimizer"]["state"][0]["step"] == 2 * STEPS_PER_EPOCH
        report = json.loads((tmp_path / dst / "test_metrics.json").read_text())
        assert report["test_samples"] == 5 and report["best_epoch"] == data.load_checkpoint(
            tmp_path / dst / "checkpoints/best.pth")["epoch"]
        assert_same_metrics(report["model"],
                            evaluate_checkpoint(tmp_path / dst / "checkpoints/best.pth", "test"))
        assert not (tmp_path / dst / ".lock").exists()
    a, b = ckpts.values()
    assert torch.equal(a["rng"]["gen"], b["rng"]["gen"])
    rows_a, rows_b = (read_csv(tmp_path / dst / "log.csv") for dst in ckpts)
    assert [(r["step"], r["lr_temporal"], r["lr_spatial"]) for r in rows_a] == \
           [(r["step"], r["lr_temporal"], r["lr_spatial"]) for r in rows_b]


# A tiny model in eval mode (no dropout; BatchNorm uses its running statistics), so the split is the only
# difference between 1 and 2 processes. The global batches: 5 samples split 3/2 and 1 sample split 1/0 (rank 1
# runs an empty slice and still joins the all-reduce). Each of its samples has another number of cells burning
# at t, so the pixel weighting of the BCE matters: weighting each process by its share of the SAMPLES
# (data.rank_loss_weight, right for a mean over samples) gives another gradient, and so does DDP's plain
# average of the slices' mean losses.
EMBER_GRADIENT_WORKER = textwrap.dedent("""
    import sys, torch, data, losses, emberformer as em
    torch.set_num_threads(1)
    data.ddp_setup()
    cfg = em.parse_config(["--history", "4", "--target", "new"])
    fires = data.generate_fires(n_seq=3, size=16, n_frames=6, seed=1)
    D = {k: torch.from_numpy(fires[k]) for k in ("fire", "wind", "static")}
    S, T = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([4, 1, 3, 0, 2])
    torch.manual_seed(0)
    arch = em.Arch(dim=16, heads=2, layers=2, ffn=32, mit_dims=(8, 16, 16, 16), mit_heads=(1, 1, 1, 1), """
    """decode_dim=16,
                   refine_dim=8)  # test_all.EVAL_ARCH
    model = em.EmberFormer(4, 4, target="new", arch=arch).eval()
    ddp_model = data.ddp_wrap(model, torch.device("cpu"))
    world = data.rank_world()[1]

    def slice_mean_loss(s, t):  # this process's slice alone, as one process would score it
        mine = data.rank_slice(len(s))
        hist, wind, lengths, nxt = data.fire_batch(D["fire"], D["wind"], s[mine], t[mine], cfg["history"])
        logits = ddp_model(hist, wind, lengths, D["static"][s[mine]])
        current = hist[torch.arange(len(lengths)), lengths - 1] > 0.5
        return losses.bce_dice_loss(logits, nxt, mask=~current)[0]
    grads = {}
    for n, weighting in ((5, "share"), (1, "share"), (5, "samples"), (5, "none")):
        s, t = S[:n], T[:n]
        if weighting == "share":
            loss = em.forward_batch(cfg, ddp_model, D, s, t, None)[0] * world
        else:
            loss = slice_mean_loss(s, t) * (data.rank_loss_weight(n) if weighting == "samples" else 1.0)
        model.zero_grad()
        loss.backward()
        grads[n, weighting] = {name: p.grad.clone() for name, p in model.named_parameters()}
    if data.is_rank0():
        torch.save(grads, sys.argv[1])
    data.ddp_cleanup(True)
""")


def tiny_model_and_batch():
    """The gradient worker's model (the same initial weights), data and global batch of 5, in this process."""
    fires = data.generate_fires(n_seq=3, size=16, n_frames=6, seed=1)
    D = {k: torch.from_numpy(fires[k]) for k in ("fire", "wind", "static")}
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4, target="new", arch=EVAL_ARCH).eval()
    return model, D, torch.tensor([0, 1, 2, 0, 2]), torch.tensor([4, 1, 3, 0, 2])


def test_ember_two_process_gradient_of_uneven_slices_equals_the_full_batch_gradient(tmp_path):
    results = launch(2, lambda rank: ["-c", EMBER_GRADIENT_WORKER, tmp_path / "grads.pth"], tmp_path)
    assert [r[0] for r in results] == [0, 0], results
    ddp_grads = torch.load(tmp_path / "grads.pth")
    model, D, S, T = tiny_model_and_batch()
    for n in (5, 1):  # the reference: the loss's own definition over the whole batch, in one process
        hist, wind, lengths, nxt = data.fire_batch(D["fire"], D["wind"], S[:n], T[:n], 4)
        current = hist[torch.arange(n), lengths - 1] > 0.5
        assert n == 1 or len(set((~current).flatten(1).sum(1).tolist())) == n  # kept pixels differ per sample
        model.zero_grad()
        losses.bce_dice_loss(model(hist, wind, lengths, D["static"][S[:n]]), nxt, mask=~current)[0].backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(ddp_grads[n, "share"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        if n == 5:
            for wrong in ("samples", "none"):
                assert any(not torch.allclose(ddp_grads[5, wrong][name], p.grad, rtol=1e-3, atol=1e-6)
                           for name, p in model.named_parameters()), wrong


def test_one_process_loss_is_bce_dice_loss_exactly():
    """Without a process group forward_batch's loss is losses.bce_dice_loss itself, bit for bit
    (the shares are 1.0)."""
    model, D, S, T = tiny_model_and_batch()
    for target, pos_weight in (("new", 0.0), ("full", 3.0)):
        cfg = em.parse_config(["--history", "4", "--target", target, "--pos_weight", str(pos_weight)])
        model.target = target
        loss, s3, *_ = em.forward_batch(cfg, model, D, S, T, None)
        hist, wind, lengths, nxt = data.fire_batch(D["fire"], D["wind"], S, T, 4)
        current = hist[torch.arange(5), lengths - 1] > 0.5
        want = losses.bce_dice_loss(model(hist, wind, lengths, D["static"][S]), nxt, 0.5, 0.5,
                                    pos_weight or None, mask=~current if target == "new" else None)
        assert torch.equal(loss, want[0]) and torch.equal(s3, torch.stack(want) * 5)


def test_flags_refused_under_torchrun():
    cfg = em.parse_config(["--batch_size", "1"])
    em.check_config(cfg)  # one process: fine
    with pytest.raises(data.DataError,
                       match="--batch_size 1 is the global batch, split over the 2 processes"):
        em.check_config(cfg, world=2)
    cfg = em.parse_config(["--eval_only", "--model", "best.pth"])
    em.check_config(cfg)
    with pytest.raises(data.DataError,
                       match="--eval_only runs in one process: start it with python, not torchrun"):
        em.check_config(cfg, world=2)


# rank 1's loss turns NaN at the last step of epoch 1, where its slice is empty: rank 0's own losses and
# weights stay finite, so only the all-reduced check can stop it. Rank 0 also copies the out_dir lock
# while it trains.
EMBER_NAN_ON_RANK1 = textwrap.dedent("""
    import os, shutil, sys, data, emberformer as em
    real, calls = em.forward_batch, [0]
    def nan_on_rank1_last_step(cfg, model, D, s, t, amp, unroll=1):
        out = real(cfg, model, D, s, t, amp, unroll)
        if model.training:
            calls[0] += 1
            if calls[0] == 1 and data.is_rank0():
                shutil.copy(os.path.join(cfg["out_dir"], ".lock"), """
    """os.path.join(cfg["out_dir"], "..", "lock_seen"))
            if calls[0] == %d and not data.is_rank0():
                return (out[0] * float("nan"), out[1] * float("nan"), *out[2:])
        return out
    em.forward_batch = nan_on_rank1_last_step
    em.main(sys.argv[1:])
""" % STEPS_PER_EPOCH)


def test_ember_nonfinite_loss_on_one_rank_stops_every_rank_with_exit_3(fire_file, tmp_path):
    out = tmp_path / "out"
    results = launch(2, lambda rank: ["-c", EMBER_NAN_ON_RANK1, "--data_path", fire_file, "--out_dir", out,
                                      *EMBER_DDP], tmp_path)
    assert_one_line_on_rank0_and_exit_everywhere(results, 3, "non-finite loss", "epoch 1")
    assert not (out / "checkpoints").exists() and not (out / "log.csv").exists()  # nothing of epoch 1 saved
    pid, host = (tmp_path / "lock_seen").read_text().split()  # rank 0 took the lock: "pid host"
    assert pid.isdigit() and host == socket.gethostname()
    assert not (out / ".lock").exists()  # released at exit


# ==============================================================================================
# bench_gpu.sh: the prepared GPU measurement script must parse and skip cleanly without a GPU

def test_bench_gpu_script_skips_cuda_parts_cleanly_on_a_cpu_machine(tmp_path):
    """bench_gpu.sh with CUDA hidden: exit 0, one `skip: <step> (no CUDA device)` line for every step
    function, and nothing under OUT that claims a result (no ok/result/capped/FAIL line, no CSV,
    checkpoint or data file)."""
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    r = subprocess.run(["bash", "bench_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(REPO, "bench_gpu.sh")) as f:
        steps = set(re.findall(r"^step_(\w+)\(\)", f.read(), re.M)) - {"info"}
    assert {"mae_tiny", "mae_resume", "cbh_tiny", "cbh_predict", "ember_tiny", "ember_eval",
            "bench_ember_400", "mae_full", "cbh_default"} <= steps  # the parse found the steps
    skipped = set(re.findall(r"^skip: (\w+) \(no CUDA device\)$", r.stdout, re.M))
    assert skipped == steps, r.stdout
    claims = re.compile(r"^(ok|result|capped|FAIL):", re.M)
    assert not claims.search(r.stdout), r.stdout
    files = [os.path.relpath(os.path.join(d, n), tmp_path) for d, _, names in os.walk(tmp_path)
             for n in names]
    assert files == ["summary.log"], files  # no work folder, steps.log, CSV, checkpoint or data file
    with open(tmp_path / "summary.log") as f:
        summary = f.read()
    assert not claims.search(summary) and summary.strip() == r.stdout.strip(), summary


# ==============================================================================================
# reliability: run folders, output names, full disks, messages (each test failed before its fix)

def test_a_run_folder_holds_one_run(tiny_clouds, tmp_path):
    """A fresh run refuses a finished run's folder instead of deleting its log; --resume refuses another run's
    folder (the two logs would merge), but continues its own folder and branches into a folder without
    a run."""
    flags = ["--data_path", tiny_clouds[0], "--epochs", "1", *MAE_TINY]
    assert run_script("mae.py", *flags, "--out_dir", tmp_path / "a").returncode == 0
    log_a = (tmp_path / "a" / "log.csv").read_text()
    assert_one_line_error(run_script("mae.py", *flags, "--out_dir", tmp_path / "a"), "holds a previous run",
                          "--resume")
    assert (tmp_path / "a" / "log.csv").read_text() == log_a
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpt_a = tmp_path / "a" / "checkpoints" / "latest.pth"
    with pytest.raises(data.DataError, match="holds another run"):
        data.check_run_folder(str(tmp_path / "b"), str(ckpt_a))
    data.check_run_folder(str(tmp_path / "a"), str(ckpt_a))  # its own folder
    data.check_run_folder(str(tmp_path / "new"), str(ckpt_a))  # a branch into a folder without a run
    (tmp_path / "killed").mkdir()  # killed between its first log row and its first checkpoint
    (tmp_path / "killed" / "log.csv").write_text("epoch,train_loss\n1,0.5\n")
    with pytest.raises(data.DataError, match="no checkpoints/latest.pth .*delete that folder"):
        data.check_run_folder(str(tmp_path / "killed"), "")
    for script, extra in (("emberformer.py", []), ("finetune_cbh.py", ["--pretrained", "none"])):
        r = run_script(script, "--out_dir", tmp_path / "b", "--resume", ckpt_a, *extra)
        assert_one_line_error(r, "holds another run")
    assert (tmp_path / "b" / "log.csv").read_text() == log_a


def test_outputs_named_after_an_input_belong_to_that_input(ft_tiny, tmp_path):
    """--predict a/day1.h5 then b/day1.h5 into one out_dir: the second is refused in one line, the first's
    predictions stay; predicting a/day1.h5 again is fine."""
    out = tmp_path / "model"
    assert run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--final", "physics",
                      "--out_dir", out, "--pretrained", "none").returncode == 0
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        shutil.copy(ft_tiny["lab"], tmp_path / sub / "day1.h5")
    predict = lambda sub: run_script("finetune_cbh.py", "--predict", tmp_path / sub / "day1.h5", "--model",
                                     out / "cbh_model.pth", "--out_dir", out)
    assert predict("a").returncode == 0
    first = (out / "cbh_pred_day1.h5").read_bytes()
    assert_one_line_error(predict("b"), "day1.h5", "same file name", "--out_dir")
    assert (out / "cbh_pred_day1.h5").read_bytes() == first
    assert predict("a").returncode == 0


def test_eval_only_of_two_files_with_one_name_is_refused(fire_files, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "best.pth"
    write_checkpoint(ckpt, fire_files["train"])
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        shutil.copy(fire_files["other"], tmp_path / sub / "f.h5")
    run = lambda sub: main_exit(["--eval_only", "--model", ckpt, "--data_path", tmp_path / sub / "f.h5",
                                 "--out_dir", tmp_path / "run", "--batch_size", "64"], capsys)
    assert run("a")[0] == 0
    before = dir_tree(tmp_path / "run" / "eval_f")
    code, _, err = run("b")
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), "same file name", "--out_dir")
    assert dir_tree(tmp_path / "run" / "eval_f") == before


def test_a_full_disk_is_one_line_and_keeps_the_last_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    data.atomic_torch_save(dict(epoch=1), path)

    def full(obj, f):  # what torch's zip writer says when the disk fills mid-write
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                           "writing file data/0: unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(data.DataError, match="no space left") as e:
        data.atomic_torch_save(dict(epoch=2), path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert data.load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["latest.pth"]  # no temp left

    def enospc(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(csv.DictWriter, "writerows", enospc)
    with pytest.raises(data.DataError, match="no space left"):
        data.append_csv(str(tmp_path / "log.csv"), [dict(epoch=1)])


def test_fire_file_without_static_channels_trains_and_plots(tmp_path):
    g = data.generate_fires(n_seq=6, size=16, n_frames=5, seed=0)
    path = tmp_path / "nostatic.h5"
    data.write_fire(path, g["fire"], g["static"][:, :0], [], g["wind"])
    r = run_script("emberformer.py", "--data_path", path, "--out_dir", tmp_path / "out", "--epochs", "1",
                   "--patch_size", "4", "--history", "3", "--batch_size", "8", "--num_threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ((tmp_path / "out" / "checkpoints" / "latest.pth").exists()
            and list((tmp_path / "out").glob("plots/*.png")))


def test_messages_say_what_is_wrong(mae_run4, tmp_path, capsys):
    g = _good_clouds(5)
    meta = g["metadata"][0].copy()
    meta[:, 0], meta[:, 1] = 0, [0, 1, 2, 2, 3]  # frame 2 of flight 0 twice
    _write_h5(tmp_path / "dup.h5", images=g["images"], metadata=(meta, g["metadata"][1]))
    with pytest.raises(data.DataError, match="more than once, e.g. flight 0 frame 2"):
        data.load_clouds(str(tmp_path / "dup.h5"))
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=3, size=8, n_frames=3, seed=0))
    code, _, err = main_exit(["--data_path", path,
                              "--resume", os.path.join(mae_run4, "checkpoints/latest.pth"),
                              "--out_dir", tmp_path / "o"], capsys)
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), "a mae.py checkpoint")


# ==============================================================================================
# emberformer.py forecasts: calibrated probabilities, a val-chosen threshold, the strip's legend,
# a non-64 grid

def test_calibration_scores_by_hand():
    prob = torch.tensor([0.05, 0.05, 0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    c = losses.calibration(prob, y, n_bins=10)
    assert sum(b[0] for b in c["bins"]) == c["n_cells"] == 8  # every cell in exactly one bin
    assert [b[0] for b in c["bins"]] == [2, 0, 0, 0, 0, 4, 0, 0, 0, 2]
    assert c["brier"] == pytest.approx((4 * 0.05 ** 2 + 2 * 0.45 ** 2 + 2 * 0.55 ** 2) / 8)
    assert c["brier_clim"] == pytest.approx(0.25) and c["brier_skill"] == pytest.approx(1 - c["brier"] / 0.25)
    assert c["ece"] == pytest.approx((2 * 0.05 + 4 * 0.05 + 2 * 0.05) / 8)  # |0.05-0|, |0.55-0.5|, |0.95-1|
    # p = 1 in the top bin
    assert losses.calibration(torch.tensor([1.0]), torch.tensor([1.0]))["bins"][-1][0] == 1


def test_reliability_map_calibrates_and_threshold_is_recovered():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, generator=gen) * 4
    true = torch.sigmoid(z / 2.5 - 1.0)  # overstated in every bin: one temperature cannot fix that
    y = (torch.rand(200_000, generator=gen) < true).float()
    m = losses.fit_reliability(z, y)
    assert all(a < b for a, b in zip(m["logit"], m["logit"][1:]))
    assert all(a < b for a, b in zip(m["prob"], m["prob"][1:]))  # monotone: the ranking is kept
    p = losses.apply_reliability(z, m)
    assert losses.calibration(p, y)["ece"] < 0.01 < 0.1 < losses.calibration(torch.sigmoid(z), y)["ece"]
    assert (p - true).abs().mean() < 0.02
    # by hand: bins (0, 0) (1, 1) (2, 0) (3, 1); the middle two violate the order and are pooled
    m = losses.fit_reliability(torch.tensor([0.0, 1, 2, 3]), torch.tensor([0.0, 1, 0, 1]), n_bins=4)
    assert m == dict(logit=[0.0, 1.5, 3.0], prob=[0.0, 0.5, 1.0])
    assert losses.apply_reliability(torch.tensor([-5.0, 0.75, 2.25, 9.0]), m).tolist() == [0, 0.25, 0.75, 1]
    # positives above logit 1, negatives below: the best cut lies between them, F1 1
    logits = torch.tensor([-3.0, -2.0, 0.5, 1.5, 2.0, 3.0])
    hist = losses.pr_histogram(logits, (logits > 1).float(), torch.ones(6, dtype=torch.bool))
    cut, f1 = losses.best_f1_threshold(hist)
    assert f1 == 1.0 and 0.5 < cut < 1.5


def test_eval_only_takes_the_threshold_chosen_on_val_unless_given(fire_files):
    ckpt = dict(config=em.parse_config(["--pred_thresh", "0.5"]),
                calibration=dict(pred_thresh=0.3, reliability=dict(logit=[0.0], prob=[0.2])))
    cfg = em.eval_config(em.parse_config([]), ckpt, set())
    assert cfg["pred_thresh"] == 0.3 and cfg["reliability"] == dict(logit=[0.0], prob=[0.2])
    given = em.eval_config(em.parse_config(["--pred_thresh", "0.6"]), ckpt, {"pred_thresh"})
    assert given["pred_thresh"] == 0.6
    ckpt["calibration"] = dict(pred_thresh=0.3, temperature=1.7)  # an older run's: raw probabilities
    assert em.eval_config(em.parse_config([]), ckpt, set())["reliability"] is None
    del ckpt["calibration"]  # a checkpoint from before calibration: its training threshold
    assert em.eval_config(em.parse_config([]), ckpt, set())["pred_thresh"] == 0.5


def test_rollout_strip_has_a_legend_of_its_colours(fire_files, monkeypatch):
    figs = []
    monkeypatch.setattr(data, "atomic_savefig", lambda fig, path, **kw: figs.append(fig))
    cfg = em.parse_config(["--history", "3"])
    em.plot_rollout_strip(cfg, tiny_model(), fire_dict(fire_files["other"]), 2, None, "strip.png")
    labels = [t.get_text() for leg in figs[0].legends for t in leg.get_texts()]
    assert labels == ["truth: burned since t0", "hit", "false alarm", "miss", "burning at t0"]


def test_a_non_square_non_64_grid_trains_and_evaluates_end_to_end(tmp_path):
    """48 x 80 cells, patch 8 (the seed's grids are 400 x 400 with 16-px patches): training, the test
    report with its calibration (reliability map and threshold from val, stored in best.pth) and
    --eval_only --rollout."""
    g = data.generate_fires(n_seq=8, size=80, n_frames=6, seed=0)
    path = tmp_path / "f.h5"
    data.write_fire(path, g["fire"][:, :, 16:64], g["static"][:, :, 16:64], g["channels"], g["wind"])
    out = tmp_path / "run"
    flags = ["--patch_size", "8", "--history", "3", "--batch_size", "8", "--num_threads", "1"]
    r = run_script("emberformer.py", "--data_path", path, "--out_dir", out, "--epochs", "1", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    cal = data.load_checkpoint(out / "checkpoints" / "best.pth")["calibration"]
    assert 0 < cal["pred_thresh"] < 1 and cal["reliability"]["prob"] == sorted(cal["reliability"]["prob"])
    report = json.loads((out / "test_metrics.json").read_text())["calibration"]
    assert report["pred_thresh"] == cal["pred_thresh"]
    test = report["test"]["raw"]
    assert (sum(b[0] for b in test["bins"]) == test["n_cells"] > 0
            and (out / "plots" / "reliability.png").exists())
    r = run_script("emberformer.py", "--eval_only", "--model", out / "checkpoints" / "best.pth",
                   "--data_path", path, "--out_dir", out, "--rollout", "2", "--num_threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"pred_thresh {cal['pred_thresh']:.3f}" in r.stdout and "calibration (f.h5" in r.stdout
    ev = json.loads((out / "eval_f" / "calibration.json").read_text())
    assert ev["mapped"] and ev["calibrated"]["n_cells"] == ev["raw"]["n_cells"] > 0
    assert {"reliability.png", "rollout_strip.png", "eval.csv"} <= set(os.listdir(out / "eval_f"))


def test_unrolled_training_feeds_the_models_own_forecasts(fire_files, monkeypatch):
    """--unroll 3: steps 2 and 3 see the model's soft forecasts in place of frames t+1, t+2; a sure and right
    model's forecasts are the truth, so each step's input is exactly the true history of t+k (growing and
    full histories alike); samples without frame t+k+1 drop out; one process only."""
    D, net = fire_dict(fire_files["other"]), tiny_model()
    T = D["fire"].shape[1]
    cfg = em.parse_config(["--history", "3", "--unroll", "3"])
    s, t = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 2, T - 4, T - 3])  # the last: one more frame only
    calls = []

    def oracle(model, hist, wind, lengths, static, amp):  # sure (+-30) and right about frame t+k+1
        k, alive = len(calls), t + len(calls) + 1 < T
        calls.append((hist.detach().clone(), wind.clone(), lengths.clone(), alive))
        return (D["fire"][s[alive], t[alive] + k + 1].float() * 2 - 1) * 30.0
    monkeypatch.setattr(em, "model_logits", oracle)
    em.forward_batch(cfg, net, D, s, t, None)  # evaluate()'s call: one step, whatever --unroll says
    assert len(calls) == 1
    calls.clear()
    loss = em.forward_batch(cfg, net, D, s, t, None, cfg["unroll"])[0]
    assert len(calls) == 3 and math.isfinite(float(loss))
    for k, (hist, wind, lengths, alive) in enumerate(calls):
        want = data.fire_batch(D["fire"], D["wind"], s[alive], t[alive] + k, 3)
        assert len(hist) == (4 if k < 2 else 3)
        torch.testing.assert_close(hist, want[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(wind, want[1])
        assert torch.equal(lengths, want[2])
    monkeypatch.undo()
    # the later steps' loss reaches the first step's logits: training learns from its own forecasts
    hist, wind, lengths, _ = data.fire_batch(D["fire"], D["wind"], s[:3], t[:3], 3)
    logits = torch.full((3, *hist.shape[-2:]), -2.0, requires_grad=True)  # p 0.12: not yet burning
    loss, steps = em.unrolled_loss(cfg, net, D, s[:3], t[:3], hist, wind, lengths, logits, None, 3)
    loss.backward()
    assert steps == 2
    assert logits.grad.abs().sum() > 0
    with pytest.raises(data.DataError, match="--unroll"):
        em.check_config(cfg, world=2)


def test_ensemble_members_are_seeded_and_reduce_to_the_deterministic_rollout(fire_files, monkeypatch):
    """Every member is reproducible; members differ where probabilities are in between; with probabilities of
    0 or 1 (the model's own mask, as logits +-30) sampling is thresholding, so any number of members gives
    the deterministic rollout, and sigma 0 leaves the wind alone."""
    cfg = em.parse_config(["--history", "3", "--members", "3", "--rollout", "3", "--eval_only",
                           "--model", "m"])
    D, net = fire_dict(fire_files["other"]), tiny_model(seed=2)
    s, t0 = em.rollout_starts(*D["fire"].shape[:2], 3)
    s, t0 = s[:4], t0[:4]
    cfg["pred_thresh"] = median_new_prob(net, D, s, t0, 3)  # an untrained model: ~half new burn
    a, b = (em.ensemble_rollout(cfg, net, D, s, t0, 3, None) for _ in range(2))
    assert torch.equal(a, b)  # seeded
    one = em.ensemble_rollout(dict(cfg, members=1), net, D, s, t0, 3, None)
    assert not torch.equal(one[:, 1:], a[:, 1:])  # after lead 1 the members' draws differ: 3 are not member 0
    noisy = em.ensemble_rollout(dict(cfg, wind_sigma=2.0), net, D, s, t0, 3, None)
    assert not torch.equal(noisy, a)  # the wind noise reaches the members
    real = em.model_logits
    hard = lambda model, *args: (real(model, *args)
                                 > math.log(cfg["pred_thresh"] / (1 - cfg["pred_thresh"]))) * 60.0 - 30
    monkeypatch.setattr(em, "model_logits", hard)
    monkeypatch.setattr(em, "NEAR_CELLS", 100)  # members may burn anywhere, as the deterministic rollout
    want = em.model_rollout(cfg, net, D, s, t0, 3, None).float()
    for m in (1, 3):  # sigmoid(-30) ~ 1e-13: a probability, not exactly 0
        torch.testing.assert_close(em.ensemble_rollout(dict(cfg, members=m), net, D, s, t0, 3, None), want,
                                   atol=1e-9, rtol=0)


def test_ensemble_probability_is_the_members_expectation_not_their_draws(fire_files):
    """At lead 1 every member starts from the true frame, so the burn probability is the calibrated one-step
    forecast near the fire (1 where burning) for any number of members: no sampling noise of the draw."""
    cfg = em.parse_config(["--history", "3", "--members", "1", "--rollout", "2", "--eval_only",
                           "--model", "m"])
    D, net = fire_dict(fire_files["other"]), tiny_model(seed=2)
    s, t0 = em.rollout_starts(*D["fire"].shape[:2], 2)
    s, t0 = s[:4], t0[:4]
    one = em.ensemble_rollout(cfg, net, D, s, t0, 2, None)  # (B, 2, H, W)
    three = em.ensemble_rollout(dict(cfg, members=3), net, D, s, t0, 2, None)
    hist, w, lengths, _ = data.fire_batch(D["fire"][s], D["wind"][s], torch.arange(4), t0, 3)
    logits = em.model_logits(net, hist, w, lengths, D["static"][s], None)  # (B, H, W)
    burning = D["fire"][s, t0] > 0
    near = torch.nn.functional.max_pool2d(burning[:, None].float(), 2 * em.NEAR_CELLS + 1, 1,
                                          em.NEAR_CELLS)[:, 0] > 0.5
    want = torch.where(burning, 1.0, near * torch.sigmoid(logits))
    torch.testing.assert_close(one[:, 0], want)
    torch.testing.assert_close(three[:, 0], want)
    assert ((want > 0.05) & (want < 0.95)).any()  # in between somewhere: a draw would have made it 0 or 1
    assert ((one[:, 1] > 0) & (one[:, 1] < 1)).any() and not torch.equal(one[:, 1], three[:, 1])


def test_members_burn_only_near_their_fire(fire_files, monkeypatch):
    """A model sure that every cell burns: the deterministic rollout burns the whole grid at once, a member
    only the cells within NEAR_CELLS of its fire, so a low draw never lights the far field."""
    cfg = em.parse_config(["--history", "3", "--members", "1", "--rollout", "2", "--eval_only",
                           "--model", "m"])
    D, net = fire_dict(fire_files["other"]), tiny_model()
    s, t0 = em.rollout_starts(*D["fire"].shape[:2], 2)
    s, t0 = s[:4], t0[:4]
    sure = lambda model, hist, *rest: torch.full((len(hist), *hist.shape[-2:]), 30.0)  # (B, H, W)
    monkeypatch.setattr(em, "model_logits", sure)
    assert em.model_rollout(cfg, net, D, s, t0, 2, None).all()
    member = em.ensemble_rollout(cfg, net, D, s, t0, 2, None) > 0  # (B, 2, H, W)
    ring = lambda m: torch.nn.functional.max_pool2d(m[:, None].float(), 2 * em.NEAR_CELLS + 1, 1,
                                                    em.NEAR_CELLS)[:, 0] > 0.5
    start = D["fire"][s, t0] > 0
    assert start.any() and not member[:, 1].all()
    assert torch.equal(member[:, 0], ring(start)) and torch.equal(member[:, 1], ring(member[:, 0]))


def test_rollout_reports_whole_area_jaccard_and_brier_per_lead(fire_files):
    cfg = em.parse_config(["--history", "3", "--members", "2", "--rollout", "2", "--eval_only",
                           "--model", "m"])
    D, net = fire_dict(fire_files["other"]), tiny_model()
    by_method, n = em.rollout_scores(cfg, net, D, 2, None)
    assert list(by_method) == [*em.ROLLOUT_METHODS, "ensemble"]
    for m, rows in by_method.items():
        for r in rows:  # forecast and truth both hold the start's area: Jaccard from the new-burn counts
            assert 0 <= r["area_jaccard"] <= 1 and 0 <= r["brier"] <= 1 and r["spread"] >= 0
    per = by_method["persistence"]
    assert all(r["spread"] == 0 for r in by_method["model"])  # a hard forecast has no spread
    assert per[0]["area_jaccard"] > per[1]["area_jaccard"]  # the fire grows away from persistence
    # by hand for persistence (forecast = the start, inside the truth): whole-area Jaccard = start area / true
    # area; Brier = the burned fraction of the unburned cells within 2 + lead cells of the start
    s, t0 = em.rollout_starts(*D["fire"].shape[:2], 2)
    start = D["fire"][s, t0] > 0
    for k in (1, 2):
        truth = D["fire"][s, t0 + k] > 0
        assert per[k - 1]["area_jaccard"] == pytest.approx(start.sum().item() / truth.sum().item())
        near = torch.nn.functional.max_pool2d(start[:, None].float(), 2 * (2 + k) + 1, 1, 2 + k)[:, 0] > 0.5
        cells = near & ~start
        assert per[k - 1]["brier"] == pytest.approx(truth[cells].float().mean().item())
    for flags in (["--members", "2"], ["--rollout", "2", "--wind_sigma", "1"]):
        with pytest.raises(data.DataError, match="--members|--wind_sigma"):
            em.check_mode(em.parse_config(["--eval_only", "--model", "m", *flags]))
