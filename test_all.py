"""The test suite: `python -m pytest -q test_all.py`. Tiny configs only; no timings."""
import csv
import os
import re
import shutil
import subprocess
import sys

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
    np.testing.assert_array_equal(d["fire"], data.generate_fires(n_seq=60, size=48, n_frames=16, seed=5)["fire"])
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
    monkeypatch.setattr(data, "generate_clouds", lambda: real(n_flights=2, frames_per_flight=300, n_labelled=40))
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
    assert c.shape == ramp.shape and (span > 0.79).all() and (span <= 1.0 + 1e-6).all() and (span < 0.99).any()
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
    assert hist[0].sum((1, 2)).tolist() == [0, 0, 0] and (wh[0, 1:] == 0).all() and wh[0, 0].tolist() == [0, 1]
    assert hist[1].sum((1, 2)).tolist() == [2, 3, 0]  # frames 2, 3, 4 oldest first
    assert wh[1, :, 0].tolist() == [4, 6, 8]
    assert torch.equal(target[1], fire[0, 5].float())
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
    assert bce2.item() == pytest.approx((3 * np.log(2) + np.log(2)) / 2) and loss2.item() == pytest.approx(bce2.item())
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
    assert m["f1"] == pytest.approx(2 / 3) and m["iou"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.6)
    # mask restricts the counted pixels
    assert losses.confusion_counts(p, t, mask=torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)).tolist() == [1, 1, 0, 0]
    # empty: nothing to find and nothing found is perfect
    z = torch.zeros(4, dtype=torch.bool)
    assert losses.seg_metrics(losses.confusion_counts(z, z)) == dict(precision=1.0, recall=1.0, f1=1.0, iou=1.0,
                                                                     accuracy=1.0)
    # all wrong
    o = torch.ones(4, dtype=torch.bool)
    assert losses.seg_metrics(losses.confusion_counts(o, z)) == dict(precision=0.0, recall=0.0, f1=0.0, iou=0.0,
                                                                     accuracy=0.0)
    assert losses.seg_metrics(losses.confusion_counts(z, o))["precision"] == 0.0
    # summing counts over batches equals counting the whole epoch at once
    g = torch.Generator().manual_seed(0)
    P, T = torch.rand(6, 8, 8, generator=g) > 0.5, torch.rand(6, 8, 8, generator=g) > 0.7
    total = sum(losses.confusion_counts(P[i:i + 2], T[i:i + 2]) for i in range(0, 6, 2))
    assert torch.equal(total, losses.confusion_counts(P, T))


# ==============================================================================================
# mae.py: masked-autoencoder pre-training

MAE_TINY = ["--model_size", "tiny", "--batch_size", "32", "--lr", "2e-3", "--warmup_epochs", "1",
        "--num_threads", "1", "--n_plot", "2"]


@pytest.fixture(scope="module")
def mae_run4(tiny_clouds, tmp_path_factory):
    """An uninterrupted 4-epoch tiny run, shared by the tests below."""
    out = str(tmp_path_factory.mktemp("mae_run4"))
    r = run_script("mae.py", "--data_path", tiny_clouds[0], "--out_dir", out, "--epochs", "4", "--save_every", "2",
                   *MAE_TINY)
    assert r.returncode == 0, r.stderr
    return out


def test_mae_shapes_and_param_counts():
    x = torch.randn(5, 440)
    for size, n_params, n_enc, n_patch, patch, dim in [("tiny", 662_036, 600_832, 22, 20, 128),
                                                      ("small", 2_035_408, 1_788_672, 27, 16, 192)]:
        m = mae.MAE(**mae.model_config(dict(model_size=size), 440))
        assert sum(p.numel() for p in m.parameters()) == n_params
        assert sum(p.numel() for p in m.encoder.parameters()) == n_enc
        n_keep = int(n_patch * 0.25)
        latent, mask, ids_restore = m.encoder(x, 0.75, torch.Generator().manual_seed(0))
        assert latent.shape == (5, 1 + n_keep, dim) and mask.shape == ids_restore.shape == (5, n_patch)
        assert (mask.sum(1) == n_patch - n_keep).all()
        pred, mask = m(x, 0.75)
        assert pred.shape == (5, n_patch, patch)
        assert m.encoder.features(x).shape == (5, dim)
        assert m.encoder.patchify(x).shape == (5, n_patch, patch)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_mae_masked_content_cannot_influence_prediction(size):
    torch.manual_seed(0)
    m = mae.MAE(**mae.MODEL_SIZES[size]).eval()
    x = torch.randn(4, 440)
    latent, mask, _ = m.encoder(x, 0.75, torch.Generator().manual_seed(7))
    pred, _ = m(x, 0.75, torch.Generator().manual_seed(7))
    enc = m.encoder
    x2 = x.clone()
    hidden = enc.patchify(x2)  # a view into x2's pixels
    hidden[mask.bool()] = 100 * torch.randn_like(hidden[mask.bool()])  # scramble every masked patch
    x2[:, :enc.crop] = 55.0  # and the pixels cropped away (small: 4 on each side)
    x2[:, enc.crop + enc.num_patches * enc.patch_size:] = -55.0
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
    x = torch.randn(4, 440)
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
    x = torch.randn(16, 440)  # 16 samples: every patch position is visible in some of them
    pred, mask = m(x, 0.75, torch.Generator().manual_seed(0))
    losses.masked_mse(pred, m.encoder.patchify(x), mask).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mae_optimizer_groups_exclude_norms_biases_embeddings():
    m = mae.MAE(**mae.MODEL_SIZES["tiny"])
    cfg = dict(mae.parse_args([]))
    opt = mae.make_optimizer(m, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token", "dec_pos_embed"} <= plain
    assert all(n.endswith("weight") and "ln" not in n and "norm" not in n for n in decayed)
    assert len(decayed) + len(plain) == len(names)


def test_mae_lr_schedule():
    cfg = dict(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    lrs = [mae.get_lr(s, cfg, 5) for s in range(50)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 1e-5


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
    r = run_script("mae.py", *flags, "--epochs", "6", "--resume", os.path.join(mae_run4, "checkpoints/epoch_002.pth"))
    assert_one_line_error(r, "different settings", "--epochs 4")


def test_mae_export_and_reload_encoder(mae_run4, tmp_path):
    enc, meta = mae.load_encoder(os.path.join(mae_run4, "mae_encoder_pretrained.pth"))
    ck = data.load_checkpoint(os.path.join(mae_run4, "checkpoints/best.pth"))
    m = mae.MAE(**ck["model_config"])
    m.load_state_dict(ck["model"])
    x = torch.randn(3, 440)
    assert torch.equal(enc.eval().features(x), m.encoder.eval().features(x))
    assert meta["config"] == mae.encoder_config(ck["model_config"]) and meta["config"]["width"] == 440
    assert meta["norm_mean"] == ck["norm_mean"] and meta["norm_std"] == ck["norm_std"] > 0
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
        r = run_script("mae.py", "--out_dir", str(out), "--epochs", "1", *MAE_TINY, *flags)  # flags last: they win
        assert_one_line_error(r, words)
        assert not out.exists()  # nothing written on bad input


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
# finetune_cbh.py: cloud base height, fine-tuned encoder vs baselines

FT_TINY = ["--head_epochs", "1", "--epochs", "1", "--num_threads", "1", "--n_trees", "20", "--batch_size", "16",
           "--val_gap", "10"]


@pytest.fixture(scope="module")
def ft_tiny(tmp_path_factory):
    """Tiny labelled file (3 flights x 40 labels) and a tiny random encoder exported in mae.py's format."""
    root = tmp_path_factory.mktemp("cbh")
    unlab, lab = data.generate_clouds(n_flights=3, frames_per_flight=400, n_labelled=120)
    data.write_clouds(root / "lab.h5", **lab)
    torch.manual_seed(0)
    enc_cfg = mae.encoder_config(dict(mae.MODEL_SIZES["tiny"], width=440))
    mean, std = data.norm_stats(unlab["images"])
    data.atomic_torch_save(dict(encoder=mae.build_encoder(enc_cfg).state_dict(), config=enc_cfg,
                                norm_mean=mean, norm_std=std), root / "enc.pth")
    return dict(root=root, lab=str(root / "lab.h5"), enc=str(root / "enc.pth"),
                d=data.load_clouds(str(root / "lab.h5"), labelled=True))


def ft_cfg(**kw):
    cfg = ft.parse_config([])
    cfg.update(kw)
    return cfg


def test_ft_lofo_no_flight_in_train_and_test_and_val_inside_train(ft_tiny):
    d = ft_tiny["d"]
    folds = ft.make_folds(d, ft_cfg(split="lofo", val_gap=30))
    assert len(folds) == 3
    for f in folds:
        train = np.concatenate([f["fit"], f["val"]])
        assert not set(d["flight"][train]) & set(d["flight"][f["test"]])
        assert len(f["val"]) > 0 and not set(f["val"]) & set(f["fit"]) and not set(f["val"]) & set(f["test"])
        for fl in np.unique(d["flight"][f["val"]]):  # val is a tail block in time, after a gap
            v = d["frame"][f["val"]][d["flight"][f["val"]] == fl]
            t = d["frame"][f["fit"]][d["flight"][f["fit"]] == fl]
            assert t.max() < v.min() - 30


@pytest.mark.parametrize("gap", [0, 30])
def test_ft_blocked_leaves_the_gap(ft_tiny, gap):
    d = ft_tiny["d"]
    folds = ft.make_folds(d, ft_cfg(split="blocked", n_blocks=4, gap=gap, val_gap=5))
    assert len(folds) == 4
    checked = 0
    for f in folds:
        train = np.concatenate([f["fit"], f["val"]])
        assert not set(train) & set(f["test"])
        for fl in np.unique(d["flight"]):
            tr = d["frame"][train][d["flight"][train] == fl]
            te = d["frame"][f["test"]][d["flight"][f["test"]] == fl]
            assert np.abs(tr[:, None] - te[None, :]).min(initial=10 ** 9) > gap
            checked += len(tr) * len(te)
    assert checked > 0


def test_ft_random_split_warns_about_leakage(ft_tiny, capsys):
    folds = ft.make_folds(ft_tiny["d"], ft_cfg(split="random", n_blocks=3, val_gap=5))
    assert "warning" in capsys.readouterr().out and len(folds) == 3
    assert sorted(np.concatenate([f["test"] for f in folds])) == list(range(len(ft_tiny["d"]["cbh_km"])))


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
    sk = sklearn.GradientBoostingRegressor(n_estimators=100, max_depth=5, random_state=0).fit(X[:700], y[:700])
    p = sk.predict(X[700:])
    r2_sk = 1 - ((p - y[700:]) ** 2).sum() / ((y[700:] - y[700:].mean()) ** 2).sum()
    assert abs(r2 - r2_sk) < 0.03, (r2, r2_sk)


def test_ft_features_use_previous_and_next_labelled_frame_of_the_same_flight():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 40))
    flight, frame = np.array([1, 0, 0, 1, 0]), np.array([7, 30, 10, 3, 20])
    f = ft.profile_features(images, flight, frame, np.zeros(5), np.zeros(5), angles=False)
    n_own = f.shape[1] - 10  # 2 x (3 summary differences, mean |change|, frame gap)
    prev_gap, next_gap = f[:, n_own + 4], f[:, n_own + 9]
    np.testing.assert_array_equal(prev_gap, [4, 10, 0, 0, 10])  # frame 10 is flight 0's first: no neighbour
    np.testing.assert_array_equal(next_gap, [0, 0, 10, 4, 10])
    np.testing.assert_allclose(f[4, n_own], images[4].mean() - images[2].mean())  # mean vs previous (frame 10)


def one_fold_setup(ft_tiny):
    d = ft_tiny["d"]
    fold = ft.make_folds(d, ft_cfg(split="lofo", val_gap=0))[0]
    t = dict(x=torch.as_tensor(d["images"]), ang=torch.zeros(len(d["images"]), 2), y=torch.as_tensor(d["cbh_km"]))
    encoder, meta = mae.load_encoder(ft_tiny["enc"])
    enc = dict(config=meta["config"], state=encoder.state_dict(), norm_mean=meta["norm_mean"],
               norm_std=meta["norm_std"])
    return fold, t, enc


def test_ft_stage1_trains_only_the_head_and_stage2_changes_the_encoder(ft_tiny):
    fold, t, enc = one_fold_setup(ft_tiny)
    cfg = ft_cfg(head_epochs=2, epochs=2, batch_size=16, patience=100)
    states = []
    save = lambda st: states.append({k: v.clone() for k, v in st["model"].items()} | {"_opt": st["optimizer"]})
    ft.train_network("finetune", fold, t, enc, cfg, torch.device("cpu"), 0, lambda row: None, save)
    enc0 = {"encoder." + k: v for k, v in enc["state"].items()}
    head_keys = [k for k in states[0] if k.startswith("head.")]
    n_head = sum(1 for k in head_keys)
    for st in states[:2]:  # stage 1: encoder bit-identical, head moved, optimizer holds only the head
        assert all(torch.equal(st[k], v) for k, v in enc0.items())
        assert sum(len(g["params"]) for g in st["_opt"]["param_groups"]) == n_head
    assert not all(torch.equal(states[1][k], states[0][k]) for k in head_keys)
    for st in states[2:]:  # stage 2: the encoder trains
        assert not all(torch.equal(st[k], v) for k, v in enc0.items())
        assert sum(len(g["params"]) for g in st["_opt"]["param_groups"]) > n_head


def test_ft_layer_decay_groups():
    enc = mae.build_encoder(mae.encoder_config(dict(mae.MODEL_SIZES["tiny"], width=440)))
    model = ft.CBHNet(enc, 2, 8, 0.0)
    groups = ft.param_groups(model, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    depth = len(enc.blocks)
    assert scale[id(enc.patch_embed.weight)] == 0.5 ** depth  # embeddings get the smallest LR
    assert scale[id(enc.pos_embed)] == 0.5 ** depth and wd[id(enc.pos_embed)] == 0.0
    assert scale[id(enc.blocks[0].qkv.weight)] == 0.5 ** (depth - 1)
    assert scale[id(enc.blocks[-1].qkv.weight)] == 1.0 and scale[id(model.head[0].weight)] == 1.0
    assert wd[id(model.head[0].weight)] == 0.05 and wd[id(model.head[0].bias)] == 0.0
    assert len(scale) == sum(1 for _ in model.parameters())


def test_ft_end_to_end_tiny(ft_tiny, tmp_path):
    out = tmp_path / "out"
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], "--out_dir", out,
                   *FT_TINY)
    assert r.returncode == 0, r.stderr
    rows = read_csv(out / "results.csv")
    for m in ft.METHODS:
        folds = [x["fold"] for x in rows if x["method"] == m]
        assert folds == ["flight 0", "flight 1", "flight 2", "mean", "std", "pooled"], (m, folds)
        assert all(np.isfinite(float(x["mae_km"])) for x in rows if x["method"] == m)
    preds = read_csv(out / "predictions.csv")
    assert len(preds) == 4 * len(ft_tiny["d"]["cbh_km"])  # every frame tested once per method under lofo
    for p in ("pred_vs_true.png", "per_flight_error.png"):
        assert (out / "plots" / p).stat().st_size > 1000
    log = read_csv(out / "log.csv")
    assert {x["method"] for x in log} == {"finetune", "scratch", "probe"}


def test_ft_pretrained_none_skips_finetune_and_probe(ft_tiny, tmp_path):
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", "none",
                   "--methods", "finetune,probe,trees",
            "--out_dir", tmp_path, *FT_TINY)
    assert r.returncode == 0, r.stderr
    assert "skipping finetune, probe" in r.stdout
    assert {x["method"] for x in read_csv(tmp_path / "results.csv")} == {"trees"}


@pytest.mark.parametrize("problem,cbh,words", [
    ("nan", np.nan, ["cbh_km", "NaN"]),
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


def test_ft_missing_pretrained_one_line_error(ft_tiny, tmp_path):
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", tmp_path / "nope.pth",
                   "--out_dir", tmp_path / "out", "--val_gap", 10)
    assert_one_line_error(r, "nope.pth", "python mae.py", "--pretrained none")
    assert not (tmp_path / "out").exists()


def test_ft_help_lists_every_constant():
    r = run_script("finetune_cbh.py", "-h")
    assert r.returncode == 0
    src = open(os.path.join(REPO, "finetune_cbh.py")).read().split("# --- config ---")[1].split("# --- end")[0]
    names = [line.split(" = ")[0] for line in src.strip().splitlines()]
    assert len(names) > 20 and all(f"--{n}" in r.stdout for n in names)


def test_ft_resume_reproduces_the_uninterrupted_run(ft_tiny, tmp_path, monkeypatch):
    """Stop after stage-2 epoch 1 of the first fold (a copy of that checkpoint), resume into a fresh
    out_dir: every later epoch's losses and the final table equal the uninterrupted run's."""
    args = ["--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"], "--methods", "finetune,trees",
            "--head_epochs", "1", "--epochs", "2", "--num_threads", "1", "--n_trees", "10", "--batch_size", "16",
            "--val_gap", "10"]
    saves = []
    orig = data.atomic_torch_save

    def counting_save(obj, path):
        orig(obj, path)
        saves.append(1)
        if len(saves) == 2:  # stage 1 epoch 1, then stage 2 epoch 1 of fold 0
            shutil.copy(path, tmp_path / "stopped.pth")
    monkeypatch.setattr(data, "atomic_torch_save", counting_save)
    ft.main(args + ["--out_dir", str(tmp_path / "a")])
    monkeypatch.setattr(data, "atomic_torch_save", orig)
    ft.main(args + ["--out_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "stopped.pth")])
    log_a, log_b = read_csv(tmp_path / "a" / "log.csv"), read_csv(tmp_path / "b" / "log.csv")
    assert len(log_b) == len(log_a) - 2 and log_b[0]["stage"] == "2" and log_b[0]["epoch"] == "2"
    for ra, rb in zip(log_a[2:], log_b):
        assert (ra["fold"], ra["stage"], ra["epoch"]) == (rb["fold"], rb["stage"], rb["epoch"])
        assert float(ra["train_loss"]) == float(rb["train_loss"]) and float(ra["val_loss"]) == float(rb["val_loss"])
    assert read_csv(tmp_path / "a" / "results.csv") == read_csv(tmp_path / "b" / "results.csv")


def test_ft_resume_with_other_settings_is_refused(ft_tiny, tmp_path):
    out = tmp_path / "out"
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"],
                   "--methods", "trees", "--out_dir", out, "--n_trees", "5", "--val_gap", "10")
    assert r.returncode == 0, r.stderr
    r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"],
                   "--methods", "trees", "--out_dir", out, "--n_trees", "6", "--val_gap", "10",
                   "--resume", out / "checkpoints" / "latest.pth")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "settings" in r.stderr


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


def test_ember_padding_invariance(ember_fires):
    """A short history gives the same logits alone (unpadded) and beside a longer one (padded to K).
    Gathering position K-1 instead of lengths-1 would read a padded slot and break the equality."""
    torch.manual_seed(0)
    model = em.EmberFormer(4, 4).eval()
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
    opt = em.make_optimizer(model)
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


def test_ember_lr_schedule_warmup_then_cosine():
    total = 1000
    lrs = [em.get_lr(s, total) for s in range(total)]
    warm = int(em.warmup_frac * total)
    assert lrs[0] < lrs[warm - 1] <= 1.0
    assert abs(max(lrs) - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert abs(lrs[-1] - em.min_lr_frac) < 0.01


def test_ember_wind_dilation_goes_downwind():
    cur = torch.zeros(2, 5, 5, dtype=torch.bool)
    cur[:, 2, 2] = True
    out = em.wind_dilation(cur, torch.tensor([[12.0, 0.0], [0.0, 0.0]]))  # strong east wind; calm
    assert out[0, 2, 3] and not out[0, 2, 1] and not out[0, 1, 2]  # east neighbour only (col grows east)
    assert out[1, 1:4, 1:4].all() and out[1].sum() == 9  # calm: all 8 neighbours
    north = em.wind_dilation(cur[:1], torch.tensor([[0.0, 12.0]]))
    assert north[0, 1, 2] and not north[0, 3, 2]  # v north -> row 0 side


EMBER_TINY = ["--epochs", "10", "--patch_size", "8", "--history", "4", "--lr", "2e-3", "--batch_size", "16"]


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
    flags = ["--data_path", path, "--epochs", "4", "--batch_size", "8", "--lr", "1e-3"]
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "b", "--stop_after", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_csv(tmp_path / "b" / "log.csv")) == 2
    r = run_script("emberformer.py", *flags, "--out_dir", tmp_path / "b",
                   "--resume", tmp_path / "b" / "checkpoints" / "latest.pth")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_csv(tmp_path / "a" / "log.csv"), read_csv(tmp_path / "b" / "log.csv")
    assert len(a) == len(b) == 4
    keys = [k for k in a[0] if k.endswith(("loss", "bce", "dice", "f1"))] + ["lr_temporal"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[1]["train_loss"] != a[2]["train_loss"]


def write_bad_fire(path, fire, static=None, wind=None):
    S, T, H, W = fire.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("fire", data=fire)
        d = f.create_dataset("static", data=np.zeros((S, 4, H, W), np.float32) if static is None else static)
        d.attrs["channels"] = np.array(list(data.FIRE_CHANNELS), dtype=h5py.string_dtype())
        f.create_dataset("wind", data=np.zeros((S, T, 2), np.float32) if wind is None else wind)


def bad_nan_wind():
    wind = np.zeros((3, 5, 2), np.float32)
    wind[1, 2, 0] = np.nan
    return dict(fire=np.zeros((3, 5, 8, 8), np.uint8), wind=wind)


EMBER_BAD = {"dtype": lambda: dict(fire=np.zeros((3, 5, 8, 8), np.float32)),
       "nonbinary": lambda: dict(fire=np.full((3, 5, 8, 8), 2, np.uint8)),
       "one_frame": lambda: dict(fire=np.zeros((3, 1, 8, 8), np.uint8)),
       "static_shape": lambda: dict(fire=np.zeros((3, 5, 8, 8), np.uint8), static=np.zeros((3, 4, 8, 6), np.float32)),
       "nan_wind": bad_nan_wind}


@pytest.fixture
def restore_globals():
    """main() writes the parsed config into the module globals; put the defaults back afterwards."""
    saved = {k: getattr(em, k) for k in em.get_config([])}
    yield
    for k, v in saved.items():
        setattr(em, k, v)


@pytest.mark.parametrize("kind", sorted(EMBER_BAD))
def test_ember_bad_fire_file_one_line_error(kind, tmp_path, capsys, restore_globals):
    path = tmp_path / f"{kind}.h5"
    write_bad_fire(path, **EMBER_BAD[kind]())
    with pytest.raises(SystemExit) as e:
        em.main(["--data_path", str(path), "--out_dir", str(tmp_path / "out"), "--epochs", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ember_bad_flag_and_checkpoint(tmp_path, capsys, restore_globals):
    with pytest.raises(SystemExit) as e:
        em.main(["--monitor", "val/acc", "--out_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --monitor")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    path = tmp_path / "f.h5"
    data.write_fire(path, **data.generate_fires(n_seq=3, size=8, n_frames=3, seed=0))
    with pytest.raises(SystemExit) as e:
        em.main(["--data_path", str(path), "--resume", str(junk), "--out_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_ember_help_lists_constants():
    r = subprocess.run([sys.executable, "emberformer.py", "-h"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    for name in em.get_config([]):
        assert f"--{name}" in r.stdout, name
    assert "(default: 10)" in r.stdout and "patience" in r.stdout


def test_ember_resume_trims_logs_and_bad_flags_write_nothing(tmp_path, capsys, restore_globals):
    log = tmp_path / "log.csv"
    em.append_csv(str(log), [dict(epoch=e, loss=1.0 / e) for e in (1, 2, 3, 4)])
    em.trim_csv(str(log), 2)  # resuming the epoch-2 checkpoint: epochs 3 and 4 are re-run, not repeated
    assert [int(r["epoch"]) for r in read_csv(log)] == [1, 2]
    em.trim_csv(str(log), 0)
    assert not log.exists()
    for flags in (["--val_frac", "1.0"], ["--pred_thresh", "0"], ["--wind_scale", "0"]):
        with pytest.raises(SystemExit) as e:
            em.main([*flags, "--out_dir", str(tmp_path / "out")])
        assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {flags[0]}")
    assert not (tmp_path / "out").exists()


def test_ft_bad_flags_and_log_trim(ft_tiny, tmp_path):
    for flags, words in ((["--batch_size", "0"], "--batch_size"), (["--n_blocks", "1"], "--n_blocks"),
                         (["--val_frac", "1"], "--val_frac")):
        r = run_script("finetune_cbh.py", "--data_path", ft_tiny["lab"], "--pretrained", ft_tiny["enc"],
                       "--out_dir", tmp_path / "out", *flags)
        assert_one_line_error(r, words)
    assert not (tmp_path / "out").exists()
    log = tmp_path / "log.csv"
    log.write_text("method,epoch\nscratch,1\nscratch,2\nscratch,3\n")
    ft.trim_rows(str(log), 2)  # a checkpoint that accounts for two rows
    assert log.read_text() == "method,epoch\nscratch,1\nscratch,2\n"
    assert ft.count_rows(str(log)) == 2 and ft.count_rows(str(tmp_path / "none.csv")) == 0
