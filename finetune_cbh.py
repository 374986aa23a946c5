"""
Cloud base height (km) from 1D IR profiles: the pre-trained MAE encoder, fine-tuned, vs honest baselines.

Fine-tunes the masked-autoencoder encoder from mae.py and compares it, on identical folds, with
  finetune  pre-trained encoder + MLP head; stage 1 trains the head with the encoder frozen, stage 2
            trains everything at a lower LR (layer-wise LR decay, stochastic depth)
  scratch   the same network and schedule from a random init (what pre-training buys)
  probe     a linear head on the frozen pre-trained encoder (how much the features already know)
  trees     gradient-boosted regression trees (numpy) on hand-crafted profile features
  physics   a straight line on one physical feature: surface minus coldest pixel (surface-to-cloud-top contrast),
            the surface being the flight's clear-sky level (--surface_ref), on profiles flat-fielded by the
            camera's cross-track response (--flat_field)
With --prior physics (default) the networks learn a correction to that line, starting exactly at it, and keep
a correction only if the error on held-out training flights drops.
Splits: lofo (leave one flight out, default: the question a user asks is "does it work on a new flight"),
blocked (contiguous time blocks within flights, with a gap), random (the seed's protocol; neighbouring
frames are strongly correlated, so it leaks and flatters every method; comparison only).
Early stopping always uses the training side of a fold, never its test frames: under lofo every training flight
held out in turn (--val_mode cv: one member network per held-out flight, all stopped together where their pooled
out-of-fold error is lowest), one held-out training flight per seed (flight), or a
tail block of each training flight after a gap (tail); trees and physics, which need no stopping, fit on all
training flights. With --prior physics a unit predicts the physics row's line plus the mean of its members'
corrections. Networks run --seeds times;
results.csv gives mean +- std over seeds and paired differences (of the seed-mean predictions) with
block-bootstrap intervals.

  python finetune_cbh.py                      # full default comparison (needs `python mae.py` first)
  python finetune_cbh.py --pretrained none    # no pre-trained encoder: scratch, trees and physics only
  python finetune_cbh.py --final finetune     # one model to use: out_dir/cbh_model.pth
  python finetune_cbh.py --predict flights.h5 --model outputs/finetune_cbh/cbh_model.pth   # CBH per frame
Outputs in out_dir: results.csv, predictions.csv, log.csv, plots/pred_vs_true.png, plots/per_flight_error.png,
checkpoints/latest.pth. Resume granularity: latest.pth is rewritten after every epoch and after every
finished (method, fold, seed) unit; `--resume out_dir/checkpoints/latest.pth` (same settings) skips the
finished units and continues the interrupted one from its last completed epoch, reproducing the
uninterrupted run's losses on CPU.
"""
import argparse
import csv
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import mae

# --- config ---
data_path = ''  # labelled HDF5 (images, metadata, cbh_km); '' = the embedded synthetic labelled file
out_dir = 'outputs/finetune_cbh'  # results.csv, predictions.csv, log.csv, plots/, checkpoints/
pretrained = 'outputs/mae_pretrain/mae_encoder_pretrained.pth'  # encoder exported by mae.py, or 'none'
input = 'raw'  # raw | contrast | both: the networks' input (data.profile_channels); must match the encoder's
methods = 'finetune,scratch,probe,trees,physics'  # comma list of the methods to compare on identical folds
final = ''  # train ONE model of this method (e.g. finetune) on the labelled flights and write out_dir/cbh_model.pth
predict = ''  # HDF5 cloud file (labelled or not): write out_dir/cbh_pred_<stem>.h5 and per-flight plots (with --model)
model = ''  # a cbh_model.pth written by --final, for --predict
split = 'lofo'  # lofo (leave one flight out) | blocked (time blocks with a gap) | random (leaky, comparison only)
n_blocks = 5  # blocked: time blocks per flight (one fold each); random: number of folds
val_mode = 'cv'  # lofo: stop on all training flights held out in turn (cv), one per seed (flight), or time tails (tail)
gap = 'auto'  # blocked: drop training frames within this many frames of a test block; auto = from the labels' ACF
val_frac = 0.15  # tail validation: the last val_frac of each training flight's labelled frames
val_gap = 'auto'  # tail validation: drop training frames within this many frames before it; auto = from the ACF
acf_threshold = 0.2  # auto gaps: the lag where the training labels' autocorrelation first falls below this
seeds = 3  # repeats of every network (method, fold) with other init/shuffle seeds; trees/physics: one run
use_angles = False  # concat scaled sza/saa to the pooled embedding; off: angles track time of day, a shortcut
prior = 'physics'  # networks learn a correction to the physics line (unit_predict), or none: from scratch
flat_field = True  # physics feature on profiles divided by the camera's cross-track response (camera_response)
surface_ref = 'flight'  # physics feature's warm end: flight (its flight's clear-sky level) | profile (own warmest px)
correction_domain = False  # prior physics: a member's correction applies only inside its fit frames' physics range
within_flight = True  # prior physics: train the correction on labels minus their flight's mean offset from the line
select = 'nested'  # cv: keep a correction only if it beats the lines: nested | one_se (judge_correction) | min (always)
pool = 'cls'  # what the head reads: cls (the CLS token) or mean (the mean of the patch tokens, as in MAE's fine-tuning)
drop_path = 0.1  # stage 2 stochastic depth: the last encoder block's drop rate, rising linearly from 0
model_size = 'small'  # encoder size for --pretrained none (a key of mae.MODEL_SIZES)
head_hidden = 128  # hidden units of the MLP head (finetune, scratch); the probe's head is linear
head_dropout = 0.1  # dropout in the MLP head
head_epochs = 10  # stage 1 epochs: head only, encoder frozen (the probe gets head_epochs + epochs of this)
epochs = 40  # stage 2 epochs: all trained (finetune, scratch)
batch_size = 32  # ~600-800 training labels: small batches give enough optimizer steps
lr = 1e-3  # stage 1 peak LR (head only)
ft_lr = 2e-4  # stage 2 peak LR, lower so the pre-trained features are adjusted, not overwritten
layer_decay = 0.75  # stage 2: LR scale = layer_decay^(depth + 1 - layer) as MAE (head 1, last block 0.75); 1.0 = off
weight_decay = 0.05  # AdamW weight decay (not on biases, norms, embeddings)
warmup_epochs = 1  # linear warmup at the start of each stage
min_lr_frac = 0.01  # cosine decays to this fraction of the peak LR
grad_clip = 1.0  # max global grad norm (0 = off)
patience = 8  # early stopping: epochs without a val-loss improvement, counted per stage
flip = True  # random left-right flips of training profiles; no crop/jitter: brightness carries height
tree_angles = True  # trees see sza/saa as the seed's baseline did; False matches a network without angles
n_trees = 100  # boosting rounds (scikit-learn GradientBoostingRegressor default)
tree_depth = 5  # depth of every tree
tree_lr = 0.1  # shrinkage per tree
tree_min_leaf = 1  # minimum samples per leaf (scikit-learn's default)
tree_bins = 255  # split candidates per feature: exact midpoints when a feature has fewer unique values
device = 'auto'  # auto (cuda > mps > cpu) | cpu | cuda | mps
cpu_bf16 = 'auto'  # CPU precision: on = bf16 autocast, off = fp32, auto = time a few steps of both, take the faster
seed = 1337  # every (method, fold) unit is seeded from this, so units do not depend on run order
resume = ''  # path to checkpoints/latest.pth of an interrupted run with the same settings
max_samples = 0  # use only the first N labelled samples (0 = all)
num_threads = 0  # torch CPU threads (0 = torch default)
# --- end config ---
METHODS = ("finetune", "scratch", "probe", "trees", "physics")
PROTOCOL = 5  # checkpoints: 5 = every epoch's held-out MSE kept; 4 = units on the fold's line; 3 = members; 2 = one net
NETWORKS = ("finetune", "scratch", "probe")  # trained with seeds; trees and physics are deterministic
UNTIL_ADDED = dict(flat_field=False, correction_domain=False, surface_ref="profile")  # what runs before a flag did
SURFACE_Q = 90  # surface_level: percentile of a flight's warmest pixels (robust to a few hot pixels; needs 10% clear)


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def parse_config(argv=None):
    """argparse built from the constants block above, so `-h` lists every constant with its comment."""
    src = open(os.path.abspath(__file__)).read()
    block = src.split("# --- config ---\n")[1].split("# --- end config ---")[0]
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, _, comment in re.findall(r"^(\w+) = (.+?)\s+# (.*)$", block, re.M):
        default = globals()[name]
        help_ = comment.replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, help=help_)
        else:
            typ = str if default is None else type(default)
            p.add_argument(f"--{name}", type=typ, default=default, help=help_)
    return vars(p.parse_args(argv))


# ----------------------------------------------------------------------------------------------
# model: encoder from mae.py + regression head on the CLS embedding

class CBHNet(nn.Module):
    def __init__(self, encoder, n_angles, hidden, dropout, pool="cls"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        d = encoder.embed_dim + n_angles
        self.head = (nn.Linear(d, 1) if hidden == 0 else
                     nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)))

    def forward(self, x, ang, prior=None):
        # x (B, C, W) normalised profiles, ang (B, n_angles), prior (B,) or None -> (B,) standardised CBH
        h = self.encoder.features(x, self.pool).float()  # (B, D)
        if ang.shape[1]:
            h = torch.cat([h, ang], 1)  # (B, D + n_angles)
        with torch.autocast(x.device.type, enabled=False):  # tiny head in fp32: a bf16 output is only ~3 digits
            out = self.head(h).squeeze(1)  # (B,)
        return out if prior is None else prior + out  # with a prior the head learns only the correction


def param_groups(model, wd, decay):
    """AdamW groups. Layer-wise LR decay as MAE's param_groups_lrd: patch/CLS/position embeddings are layer
    0, block i is layer i + 1, the final norm and the head are layer depth + 1; scale = decay^(depth + 1 -
    layer), so the head trains at the full LR and the last block at decay x it. No weight decay on biases,
    norms (1-D tensors) and the CLS/position embeddings. Frozen parameters are left out."""
    top = len(model.encoder.blocks) + 1  # the layer id of the final norm and the head
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = re.match(r"encoder\.blocks\.(\d+)\.", name)
        if m:
            layer = int(m.group(1)) + 1
        elif name.startswith("encoder.") and not name.startswith("encoder.norm"):
            layer = 0
        else:
            layer = top
        no_wd = p.ndim < 2 or "pos" in name or "cls" in name
        scale = decay ** (top - layer)
        g = groups.setdefault((layer, no_wd), dict(params=[], lr_scale=scale, weight_decay=0.0 if no_wd else wd))
        g["params"].append(p)
    return list(groups.values())


def get_lr(step, total, warmup, peak, min_frac):
    """Linear warmup then half-cosine to min_frac * peak; a pure function of the step within a stage."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------
# classical baseline: hand-crafted features + gradient-boosted regression trees in numpy

def profile_features(images, sza, saa, angles):
    """Per-frame features (N, F) of one profile each: intensity mean, std, min, max, percentiles, range,
    skewness; cross-track gradients; 4 segment means; optionally solar angles. A frame's features depend
    on that frame only, so a trained model sees the same features in any file (labelled or dense)."""
    x = np.asarray(images, np.float64)  # (N, W)
    pct = np.percentile(x, [5, 10, 25, 50, 75, 90, 95], axis=1).T  # (N, 7)
    mean, std = x.mean(1), x.std(1) + 1e-9
    skew = (((x - mean[:, None]) / std[:, None]) ** 3).mean(1)
    g = np.diff(x, axis=1)  # (N, W-1) cross-track gradient
    g2 = np.diff(x, 2, axis=1)
    seg = np.stack([s.mean(1) for s in np.array_split(x, 4, axis=1)], 1)  # (N, 4) cross-track shape
    cols = [mean, std, x.min(1), x.max(1), *pct.T, pct[:, 6] - pct[:, 0], skew,
            np.abs(g).mean(1), g.std(1), np.abs(g).max(1), np.abs(g2).mean(1), *seg.T]
    return np.stack(cols + ([sza, saa] if angles else []), 1).astype(np.float64)


def fit_bins(X, max_bins):
    """Bin edges per feature. With at most max_bins + 1 unique values: the midpoints between them, so
    every partition scikit-learn's exact splitter can make is a candidate. Else midpoints between
    max_bins + 1 quantiles: fewer candidate partitions than scikit-learn (see gbrt_fit)."""
    edges = []
    for col in X.T:
        u = np.unique(col)
        if len(u) > max_bins + 1:
            u = np.unique(np.quantile(col, np.linspace(0, 1, max_bins + 1)))
        edges.append((u[:-1] + u[1:]) / 2)
    return edges


def apply_bins(X, edges):
    # bin b of a feature holds edges[b-1] <= x < edges[b], so "bin <= b" means "x < edges[b]"
    return np.stack([np.searchsorted(e, col, side="right") for e, col in zip(edges, X.T)], 1)  # (N, F)


def gbrt_fit(X, y, n_trees=100, depth=5, lr=0.1, min_leaf=1, max_bins=255):
    """Gradient boosting, squared loss, histogram splits, grown level by level for all nodes at once.
    Trees are complete heaps of `depth` levels: a node that cannot split sends all its samples left
    (its child cannot split either: same samples), so every leaf sits on the last level and prediction
    is `depth` vectorised steps per tree.
    Splits follow scikit-learn's GradientBoostingRegressor (its exact splitter):
    - the gain is the drop in squared error: its 'squared_error' (all that scikit-learn >= 1.9 uses;
      `criterion` is deprecated there) and, for unit weights, also its older default 'friedman_mse',
      whose improvement n_l n_r / n * (mean_l - mean_r)^2 is the same number;
    - bins that are empty in a node give tied gains; the threshold is stored as a value, the midpoint
      between the node's largest value going left and its smallest value going right, and a sample
      goes right when x > threshold, at fit and predict time alike;
    - X is rounded to float32 as scikit-learn's trees do, so a value lying exactly on a threshold goes
      the same way in both.
    With at most max_bins + 1 unique values per feature, held-out predictions then equal scikit-learn's
    to float error (test_all.py pins it), except where two features split a node's samples identically:
    scikit-learn breaks that tie by a random feature order (its own predictions change with
    random_state), we by the lower feature index; such ties are common in nodes of a few samples and
    rare once min_leaf is ~10. With more unique values the quantile bins offer fewer thresholds, so
    trees differ; held-out R2 on test_all.py's continuous toy problem, n=2000, 70/30 split, min_leaf 1,
    data seeds 0/1/2: ours 0.968/0.968/0.969, scikit-learn 0.966/0.961/0.966 (no measurable loss)."""
    X, y = np.asarray(X, np.float32).astype(np.float64), np.asarray(y, np.float64)
    edges = fit_bins(X, max_bins)
    xb = apply_bins(X, edges)  # (N, F)
    n, nf = xb.shape
    nb = max(len(e) for e in edges) + 1  # bins per feature (fewer than max_bins + 1 on small data)
    flat = xb + np.arange(nf) * nb  # (N, F) positions in one node's (F, nb) histogram
    rows = np.arange(n)
    lo, hi = np.full((nf, nb), np.inf), np.full((nf, nb), -np.inf)  # (F, nb) smallest, largest value per bin
    np.minimum.at(lo, (np.arange(nf), xb), X)
    np.maximum.at(hi, (np.arange(nf), xb), X)
    feat = np.full((n_trees, 2 ** depth - 1), -1)  # per internal node; -1 = no split (go left)
    thr = np.zeros((n_trees, 2 ** depth - 1))  # split value: x > thr goes right
    leaf = np.zeros((n_trees, 2 ** depth))
    base = y.mean()
    pred = np.full(n, base)
    for t in range(n_trees):
        r = y - pred  # negative gradient of the squared loss
        node = np.zeros(n, np.int64)  # heap index of each sample's node
        for d in range(depth):
            first, k = 2 ** d - 1, 2 ** d
            local = node - first  # (N,) node within this level
            idx = (local[:, None] * (nf * nb) + flat).ravel()
            g = np.bincount(idx, np.repeat(r, nf), k * nf * nb).reshape(k, nf, nb)  # residual sums
            c = np.bincount(idx, None, k * nf * nb).reshape(k, nf, nb)  # counts
            gl, cl = g.cumsum(2)[:, :, :-1], c.cumsum(2)[:, :, :-1]  # left of "bin <= b"
            gt, ct = g[:, :1].sum(2, keepdims=True), c[:, :1].sum(2, keepdims=True)  # (k, 1, 1) node totals
            gr, cr = gt - gl, ct - cl
            ok = (cl >= min_leaf) & (cr >= min_leaf)
            gain = np.where(ok, gl ** 2 / np.maximum(cl, 1) + gr ** 2 / np.maximum(cr, 1), -np.inf)
            gain = (gain - gt ** 2 / np.maximum(ct, 1)).reshape(k, -1)  # drop in squared error
            best = gain.argmax(1)
            bf, bb = np.divmod(best, nb - 1)
            can = gain[np.arange(k), best] > 1e-12
            # bins bb+1 .. nxt-1 are empty in the node (they tie): cut midway between bins bb and nxt
            nxt = ((np.arange(nb) > bb[:, None]) & (c[np.arange(k), bf] > 0)).argmax(1)  # (k,)
            feat[t, first:first + k] = np.where(can, bf, -1)
            thr[t, first:first + k] = np.where(can, hi[bf, bb] / 2 + lo[bf, nxt] / 2, 0.0)
            node = 2 * node + 1 + (can[local] & (xb[rows, bf[local]] > bb[local]))
        local = node - (2 ** depth - 1)
        leaf[t] = np.bincount(local, r, 2 ** depth) / np.maximum(np.bincount(local, None, 2 ** depth), 1)
        pred += lr * leaf[t, local]
    return dict(base=base, lr=lr, feat=feat, thr=thr, leaf=leaf)


def gbrt_predict(m, X):
    X = np.asarray(X, np.float32).astype(np.float64)  # float32 as at fit time
    rows = np.arange(len(X))
    depth = m["feat"].shape[1].bit_length()
    out = np.full(len(X), m["base"])
    for feat, thr, leaf in zip(m["feat"], m["thr"], m["leaf"]):
        node = np.zeros(len(X), np.int64)
        for _ in range(depth):
            f = feat[node]
            node = 2 * node + 1 + ((f >= 0) & (X[rows, np.maximum(f, 0)] > thr[node]))
        out += m["lr"] * leaf[node - (2 ** depth - 1)]
    return out


# ----------------------------------------------------------------------------------------------
# folds: identical for every method

def split_val(train, flight, frame, frac, gap_):
    """Early-stopping validation from the training side only: per training flight, the last `frac` of
    its labelled frames in time (a contiguous tail block, not random frames, so the validation loss
    measures generalisation in time rather than interpolation between neighbours); training frames
    within `gap_` frames before that block are dropped."""
    fit, val = [], []
    for fl in np.unique(flight[train]):
        idx = train[flight[train] == fl]
        idx = idx[np.argsort(frame[idx], kind="stable")]
        n_val = int(round(frac * len(idx)))
        if n_val == 0 or n_val == len(idx):
            fit.append(idx)
            continue
        val.append(idx[-n_val:])
        rest = idx[:-n_val]
        fit.append(rest[frame[rest] < frame[idx[-n_val]] - gap_])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return cat(fit), cat(val)


def decorrelation_lag(y, flight, frame, threshold):
    """Lag in frames after which labels y along a flight are no longer correlated: the autocorrelation,
    estimated on the irregular (sparse) label series from every pair of labelled frames of the same flight
    (values centred on their flight's mean, lags binned by the median label spacing), first falls below
    `threshold`. Returns the upper edge of that lag bin (the largest lag seen if it never falls)."""
    prods, lags = [], []
    for fl in np.unique(flight):
        sel = flight == fl
        yc, fr = y[sel] - y[sel].mean(), frame[sel]
        i, j = np.triu_indices(len(yc), 1)  # every pair once
        prods.append(yc[i] * yc[j])
        lags.append(np.abs(fr[i] - fr[j]))
    prods, lags = np.concatenate(prods), np.concatenate(lags)
    var = np.mean(np.concatenate([y[flight == fl] - y[flight == fl].mean() for fl in np.unique(flight)]) ** 2)
    if len(lags) == 0 or var == 0:
        return 0
    spacing = max(1, int(np.median(np.concatenate([np.diff(np.sort(frame[flight == fl]))
                                                   for fl in np.unique(flight)] + [[1]]))))
    b = lags // spacing  # lag bin of every pair
    acf = np.bincount(b, prods) / np.maximum(np.bincount(b), 1) / var  # (n_bins,)
    below = np.flatnonzero((acf < threshold) & (np.bincount(b) > 0))
    return int((below[0] + 1) * spacing) if len(below) else int(lags.max())


def gap_for(setting, train, d, cfg):
    """A gap in frames: the number given, or 'auto' = the decorrelation lag of the training labels."""
    if setting != "auto":
        return int(setting)
    return decorrelation_lag(d["cbh_km"][train], d["flight"][train], d["frame"][train], cfg["acf_threshold"])


def flight_val(train, test, flight, turn=0):
    """Validation by flight: the `turn`-th training flight after the test flight in flight order (cyclic) is
    held out whole for early stopping, so stopping rewards what transfers to an unseen flight. Turn 0 gives
    every flight the validation role once over the folds; seed s of a network takes turn s (see
    seed_fold), so its seeds are stopped by different flights. No choice depends on labels."""
    train_fl = np.unique(flight[train])
    test_fl = int(flight[test][0])
    val_fl = train_fl[(np.searchsorted(train_fl, test_fl) + turn) % len(train_fl)]
    return train[flight[train] != val_fl], train[flight[train] == val_fl]


def seed_fold(fold, seed):
    """The fold as seed `seed` of a network sees it. val_mode cv: fold["members"] = every turn, one member
    network each, stopped together (see train_network). val_mode flight: its own held-out training flight
    (turn seed % number of training flights). Else (tail) the fold itself. Why not one flight: one
    validation flight can accept a correction to the physics line that only it likes (measured: flight 2 let
    through corrections that cost flight 1 its R2 0.88 -> -0.6); cv asks every training flight at once."""
    turns = fold.get("turns")
    if turns is None:
        return fold
    if fold["cv"]:
        return dict(fold, members=turns)
    fit, val = turns[seed % len(turns)]
    return dict(fold, fit=fit, val=val)


def raw_folds(d, cfg):
    """[(name, train, test)] for the chosen split; blocked leaves an (auto) gap around each test block."""
    flight, frame = d["flight"], d["frame"]
    if cfg["split"] == "lofo":
        if len(np.unique(flight)) < 2:
            raise data.DataError("--split lofo needs at least 2 flights in the labelled file")
        return [(f"flight {fl}", tr, te) for fl, tr, te in data.split_lofo(flight)]
    if cfg["split"] == "blocked":
        out = []
        for k in range(cfg["n_blocks"]):
            gap = gap_for(cfg["gap"], data.split_blocked(flight, frame, cfg["n_blocks"], k, 0)[0], d, cfg)
            out.append((f"block {k} (gap {gap})", *data.split_blocked(flight, frame, cfg["n_blocks"], k, gap)))
        return out
    if cfg["split"] == "random":
        print("warning: --split random puts neighbouring, strongly correlated frames in train and test; "
              "its scores are optimistic (kept only to compare with the seed's protocol)")
        return [(f"fold {k}", tr, te) for k, (tr, te) in
                enumerate(data.split_random(len(flight), cfg["n_blocks"], cfg["seed"]))]
    raise data.DataError(f"--split {cfg['split']!r}: expected lofo, blocked or random")


def uses_cv(cfg):
    """Members stopped together (val_mode cv) exist only where whole flights can be held out: split lofo."""
    return cfg["split"] == "lofo" and cfg["val_mode"] == "cv"


def make_folds(d, cfg):
    """[dict(name, train, fit, val, test, how, turns, cv)] index arrays into the labelled set; every method
    sees the same. train = every training-side frame: trees and physics, which need no stopping, fit on all of
    it. Validation (early stopping, best epoch) always comes from the training side: whole held-out training
    flights (lofo, val_mode cv or flight; turns = [(fit, val)] with each training flight held out in turn:
    all of them at once under cv, one per seed under flight, see seed_fold; fit/val are turn 0) or a time
    tail of every training flight after a gap."""
    folds = []
    for name, train, test in raw_folds(d, cfg):
        turns, by_flight = None, cfg["split"] == "lofo" and cfg["val_mode"] in ("cv", "flight")
        if by_flight:  # whole training flights: every one of them in turn
            n_train_fl = len(np.unique(d["flight"][train]))
            if n_train_fl < 2:
                raise data.DataError(f"--val_mode {cfg['val_mode']} needs at least 3 flights; use --val_mode tail")
            turns = [flight_val(train, test, d["flight"], k) for k in range(n_train_fl)]
            fit, val = turns[0]
            val_fl = [int(d["flight"][v[0]]) for _, v in turns]
            if uses_cv(cfg):
                how = "cv over val flights " + "/".join(map(str, val_fl))
            else:
                how = "val flight " + "/".join(str(val_fl[s % n_train_fl]) for s in range(cfg["seeds"]))
                how += " (by seed)" if cfg["seeds"] > 1 else ""
        else:
            val_gap = gap_for(cfg["val_gap"], train, d, cfg)
            fit, val = split_val(train, d["flight"], d["frame"], cfg["val_frac"], val_gap)
            how = f"val tail, gap {val_gap}"
        if min(len(fit), len(val), len(test)) == 0:
            raise data.DataError(f"{name}: too few labelled frames for train/validation/test "
                                 f"({len(fit)}/{len(val)}/{len(test)}); use more data or another --split")
        folds.append(dict(name=name, train=train, fit=fit, val=val, test=test, how=how, turns=turns, cv=uses_cv(cfg)))
    return folds


# ----------------------------------------------------------------------------------------------
# training one network on one fold

def amp_policy(dev, cfg, folds, t, enc, stored=None):
    """(autocast dtype or None, use GradScaler). CUDA: bf16 where supported, else fp16 + GradScaler. CPU:
    `stored` ('bf16'/'fp32', what a resumed run chose), else mae.choose_cpu_dtype(cpu_bf16), which under
    auto times a few full training steps of the network (all of it trainable, as in stage 2) both ways."""
    if dev.type == "cuda":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    if dev.type != "cpu":
        return None, False
    if stored:
        return (torch.bfloat16 if stored == "bf16" else None), False
    if cfg["cpu_bf16"] != "auto":  # nothing to time
        return mae.choose_cpu_dtype(cfg["cpu_bf16"], None)[0], False
    x, y, _, _ = fold_inputs(folds[0], t, enc, dev)
    net = build_network("scratch", enc, cfg, 0).to(dev)
    opt = torch.optim.AdamW(net.parameters())
    idx = torch.as_tensor(folds[0]["fit"][:cfg["batch_size"]], device=dev)

    def step(dtype):
        with torch.autocast(dev.type, dtype or torch.float32, enabled=dtype is not None):
            loss = F.mse_loss(net(x[idx], t["ang"][idx][:, :0]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dtype, msg = mae.choose_cpu_dtype(cfg["cpu_bf16"], step)  # random draws here do not matter: units reseed
    print(msg)
    return dtype, False


def rng_state(gens):
    """The global RNGs and every member's shuffling generator, for an exact resume."""
    s = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
             gens=[g.get_state() for g in gens])
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s, gens):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    for g, state in zip(gens, s["gens"]):
        g.set_state(state)
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def network_tensors(d, input_mode, dev, phys):
    """What every network unit shares, resident on dev: x (N, C, W) raw input channels (each fold
    normalises), ang (N, 2) scaled solar angles (~[-2, 2]), phys (N,) the physics feature (a comparison
    replaces it per fold, see run_unit), y (N,) CBH in km, flight (N,) flight index."""
    return dict(x=torch.as_tensor(data.profile_channels(d["images"], input_mode), device=dev),
                flight=torch.as_tensor(d["flight"], device=dev),
                ang=torch.as_tensor(np.stack([d["sza"] / 90.0, d["saa"] / 180.0], 1), device=dev),
                phys=torch.as_tensor(phys, dtype=torch.float32, device=dev),
                y=torch.as_tensor(d["cbh_km"], device=dev))


def fold_inputs(fold, t, enc, dev, prior="none", domain=False):
    """Normalised inputs (N, C, W), standardised targets (N,) and the standardised prior (N,) (zeros for
    prior none) for one fold, plus dict(y_mean, y_std, norm_mean, norm_std, prior_line, phys_range) to go back
    to km and to treat new profiles alike. The target statistics, the physics line and (domain) the range of the
    physics feature come from the fold's fit frames only; the input statistics are the encoder's (computed by
    mae.py on unlabelled profiles) or, without one, the fit frames' own."""
    fit = torch.as_tensor(fold["fit"], device=dev)
    mean, std = enc["norm_mean"], enc["norm_std"]
    if mean is None:  # --pretrained none
        mean, std = data.norm_stats(t["x"][fit].cpu().numpy())
    line = physics_line(t["phys"][fit].cpu().numpy(), t["y"][fit].cpu().numpy()) if prior == "physics" else None
    phys_range = [float(t["phys"][fit].min()), float(t["phys"][fit].max())] if domain and line is not None else None
    stats = dict(norm_mean=list(mean), norm_std=list(std), y_mean=float(t["y"][fit].mean()),
                 y_std=float(t["y"][fit].std()) + 1e-6, prior_line=line, phys_range=phys_range)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=dev)[:, None] for v in (mean, std))  # (C, 1)
    return (t["x"] - mean) / std, (t["y"] - stats["y_mean"]) / stats["y_std"], prior_std(t["phys"], stats), stats


def prior_std(phys, stats):
    """The physics line's CBH for features phys (N,), in standardised target units; zeros without a line."""
    if stats.get("prior_line") is None:
        return torch.zeros_like(phys)
    a, b = stats["prior_line"]
    return (a * phys + b - stats["y_mean"]) / stats["y_std"]


def in_domain(phys, stats):
    """(N,) 1.0 where the physics feature phys (N,) lies within the member's fit range (stats["phys_range"]),
    else 0.0; all ones without a range (--correction_domain false, prior none, older model files). A member's
    output is prior + correction * in_domain. Why: the correction was learned from profiles whose contrast lies
    in that range, and outside it the network extrapolates in ways nothing checked, while the line extrapolates
    as a line (README: a test flight with higher clouds than any training flight)."""
    if stats.get("phys_range") is None:
        return torch.ones_like(phys)
    lo, hi = stats["phys_range"]
    return ((phys >= lo) & (phys <= hi)).float()


def within_flight_targets(y, prior, flight, fit):
    """Training targets (N,) for a correction that may only model within-flight structure: on the fit frames,
    y minus its flight's mean residual from the prior line (other frames unchanged). Why: with 3 fit flights,
    how a flight's CBH regime sits against the line is 3 numbers, and a network that learns them from
    brightness (which mostly encodes the flight) shifts a new flight by an offset that does not transfer;
    without them the best correction leaves every fit flight's mean on the line."""
    out = y.clone()
    for fl in torch.unique(flight[fit]):
        rows = fit[flight[fit] == fl]
        out[rows] -= (y[rows] - prior[rows]).mean()
    return out


def training_targets(y, prior, flight, fit, cfg):
    """What the fit frames train on (N,): within_flight_targets under --within_flight with the physics prior
    (any split: under blocked/random the test flight's own offset then also reaches the model only through
    the line), else y itself."""
    return within_flight_targets(y, prior, flight, fit) if cfg["within_flight"] and cfg["prior"] == "physics" else y


def build_network(method, enc, cfg, n_angles):
    """CBHNet on the pre-trained encoder (finetune, probe) or on a random one of the same size (scratch)."""
    encoder = mae.build_encoder(enc["config"], drop_path=cfg["drop_path"])
    if method != "scratch":
        encoder.load_state_dict(enc["state"])
    hidden = 0 if method == "probe" else cfg["head_hidden"]
    net = CBHNet(encoder, n_angles, hidden, cfg["head_dropout"], cfg["pool"])
    if cfg["prior"] == "physics":  # the head's output layer starts at zero: the untrained net IS its physics line
        zero_correction(net)
    return net


def train_epoch(model, opt, scaler, inputs, fit, cfg, gen, amp_dtype, lr_at, where):
    """One pass over the fit frames. inputs = (x (N, C, W), ang (N, A), prior (N,), y (N,)); lr_at(i) is the LR of
    step i of this epoch; where = 'method fold seed stage epoch' for messages. A non-finite loss stops the
    run before its step is taken (with a GradScaler, fp16, only 20 in a row: the scaler skips single
    overflowing steps by design). Returns (mean training loss, last LR)."""
    x, ang, prior, y = inputs
    dev = x.device
    total, count, bad_run = 0.0, 0, 0
    batches = data.batch_indices(len(fit), cfg["batch_size"], True, gen)
    progress = data.Progress(len(batches), where)  # epochs here take seconds: it rarely has to speak
    for i, b in enumerate(batches):
        lr_now = lr_at(i)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        idx = fit[b.to(dev)]
        xb = x[idx]  # (B, C, W)
        if cfg["flip"]:
            xb = torch.where(torch.rand(len(b), 1, 1, generator=gen).to(dev) < 0.5, xb.flip(-1), xb)
        with torch.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None):
            loss = F.mse_loss(model(xb, ang[idx], prior[idx]).float(), y[idx])
        value = loss.item()  # the running mean needs it anyway: checking it costs no extra sync
        bad_run = 0 if math.isfinite(value) else bad_run + 1
        if bad_run > (20 if scaler.is_enabled() else 0):
            raise data.NonFiniteLoss(data.nonfinite_message(f"finetune_cbh.py, {where}", i - bad_run + 2, i + 1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        if math.isfinite(value):
            total, count = total + value * len(b), count + len(b)
        progress.update(i + 1, (i + 1) * cfg["batch_size"], lambda: total / max(count, 1))
    progress.close()
    return total / max(count, 1), lr_now


def stages(method, cfg):
    """[(epochs, peak LR, train the encoder)]. scratch runs the same two stages as finetune (stage 1 then
    fits a head on random features), so initial weights are the only difference between the two."""
    if method == "probe":
        return [(cfg["head_epochs"] + cfg["epochs"], cfg["lr"], False)]
    return [(cfg["head_epochs"], cfg["lr"], False), (cfg["epochs"], cfg["ft_lr"], True)]


def make_member(method, fold, fit, val, t, enc, cfg, dev, gen_seed, use_scaler):
    """One network of a unit and everything it sees: it trains on the `fit` frames and is scored on the `val`
    frames (index arrays), with its own fold statistics (input normalisation, target scaling and physics line
    from its fit frames), GradScaler and shuffling generator."""
    x, y, prior, stats = fold_inputs(dict(fold, fit=fit), t, enc, dev, cfg["prior"],
                                     cfg["correction_domain"])
    fit = torch.as_tensor(fit, device=dev)
    ang = t["ang"] if cfg["use_angles"] else t["ang"][:, :0]  # (N, 2) or (N, 0)
    return dict(model=build_network(method, enc, cfg, ang.shape[1]).to(dev), x=x, y=y, ang=ang, prior=prior,
                inside=in_domain(t["phys"], stats), y_train=training_targets(y, prior, t["flight"], fit, cfg),
                stats=stats, fit=fit, val=torch.as_tensor(val, device=dev), gen=torch.Generator().manual_seed(gen_seed),
                scaler=torch.amp.GradScaler("cuda", enabled=use_scaler))


def member_predict(mb, idx, amp_dtype):
    """A member's predictions (len(idx),) for frames idx, in standardised target units: its line plus its
    correction where the frame is in its domain (in_domain), its line alone elsewhere."""
    mb["model"].eval()
    with torch.no_grad(), torch.autocast(idx.device.type, amp_dtype, enabled=amp_dtype is not None):
        out = mb["model"](mb["x"][idx], mb["ang"][idx], mb["prior"][idx]).float()
    return mb["prior"][idx] + (out - mb["prior"][idx]) * mb["inside"][idx]


def member_mse(members, amp_dtype):
    """(n_members,) each member's validation MSE in km^2, against the TRUE labels (a flight's offset counts)."""
    return np.array([float((((member_predict(mb, mb["val"], amp_dtype) - mb["y"][mb["val"]]) * mb["stats"]["y_std"])
                            ** 2).mean()) for mb in members])


def criterion(members, mse):
    """What stops training and picks the best epoch, from member_mse: the members' validation MSE pooled over
    all their validation frames, divided by the mean of their target variances. One member: its validation
    MSE in standardised units. val_mode cv: the out-of-fold MSE over every training flight, each predicted by
    the member that never trained on it."""
    n = np.array([len(mb["val"]) for mb in members])
    return float((mse * n).sum() / n.sum() / np.mean([mb["stats"]["y_std"] ** 2 for mb in members]))


def beats_lines(line_mse, best_mse):
    """The one-standard-error rule (Breiman et al. 1984; Hastie et al., ESL 7.10) between the physics lines and
    the best epoch's correction: keep the correction only if its gain per held-out flight (line MSE minus
    corrected MSE), averaged over the flights, exceeds one standard error of that average. Why: a gain that
    some held-out flights see and others do not is the flight-specific kind that did not transfer (measured:
    cv kept corrections worth 7-10 % of the pooled error that cost the test flight its R2 0.88 -> -0.8).
    With 2 flights: both must gain."""
    gain = np.asarray(line_mse) - np.asarray(best_mse)  # (n_members,)
    return bool(gain.mean() > gain.std(ddof=1) / np.sqrt(len(gain)))


def nested_mse(mse_path, n_val):
    """(n_members,) each held-out flight's MSE at the candidate (the lines, then every epoch) with the lowest pooled
    error over the OTHER held-out flights. mse_path (candidates, n_members) in km^2; n_val (n_members,) frames.
    Why: the best epoch is the minimum of ~30 noisy pooled scores, and judging it on the same flights that chose it
    counts the luck of that choice as gain (README: most of the gain, measured); here every flight's gain is what
    a choice made without it earned, as nested cross-validation does (Varma & Simon 2006; Cawley & Talbot 2010)."""
    path, n = np.asarray(mse_path, np.float64), np.asarray(n_val, np.float64)
    weighted = path * n  # (candidates, n_members): each flight's share of the pooled error
    without = weighted.sum(1, keepdims=True) - weighted  # (candidates, n_members): pooled error without flight j
    chosen = without.argmin(0)  # (n_members,) first minimum: ties go to the earlier candidate, the lines first
    return path[chosen, np.arange(path.shape[1])]


def zero_correction(model):
    """Zero the head's output layer: the network's prediction is then exactly its physics line (the prior)."""
    last = model.head if isinstance(model.head, nn.Linear) else model.head[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def member_epoch(mb, opt, cfg, amp_dtype, stage, epoch, where):
    """One epoch of one member in stage = (epochs, peak LR, train the encoder); returns (mean loss, last LR)."""
    n_ep, peak, train_enc = stage
    steps = math.ceil(len(mb["fit"]) / cfg["batch_size"])
    lr_at = lambda i: get_lr(epoch * steps + i, n_ep * steps, cfg["warmup_epochs"] * steps, peak, cfg["min_lr_frac"])
    mb["model"].train()
    mb["model"].encoder.train(train_enc)  # a frozen encoder stays in eval mode (no dropout, no drop path)
    inputs = (mb["x"], mb["ang"], mb["prior"], mb["y_train"])  # training targets; val and test score against y
    return train_epoch(mb["model"], opt, mb["scaler"], inputs, mb["fit"], cfg, mb["gen"], amp_dtype, lr_at, where)


def stage_optimizers(members, train_enc, peak, cfg):
    """Stage 1 freezes the encoder (it then gets no optimizer state); stage 2 trains it with layer-wise LR decay."""
    opts = []
    for mb in members:
        mb["model"].encoder.requires_grad_(train_enc)
        groups = param_groups(mb["model"], cfg["weight_decay"], cfg["layer_decay"] if train_enc else 1.0)
        opts.append(torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999)))
    return opts


def resume_stage(ck, opts, members):
    """Put the interrupted stage's optimizers, scalers and generators back -> (next epoch, epochs without gain)."""
    for opt, mb, o_state, s_state in zip(opts, members, ck["optimizer"], ck["scaler"]):
        opt.load_state_dict(o_state)
        if s_state:  # empty when the run had no GradScaler (CPU, bf16)
            mb["scaler"].load_state_dict(s_state)
    set_rng_state(ck["rng"], [mb["gen"] for mb in members])
    return ck["epoch"] + 1, ck["bad_epochs"]


def train_network(method, fold, t, enc, cfg, dev, amp, unit_seed, log, save, ck=None):
    """Two-stage training of one unit on one fold; returns (test predictions in km, the members with their best
    weights). A unit is one network, stopped on fold["val"], or with fold["members"] = [(fit, val)] (val_mode
    cv) one network per pair, trained in lockstep and stopped together at the epoch with the lowest pooled
    out-of-fold error (criterion); the unit then predicts through unit_predict.
    t: network_tensors on dev; enc: dict(config, state (None: no pre-trained encoder), norm_mean, norm_std);
    amp = (autocast dtype or None, use a GradScaler); save(state) writes the checkpoint after every epoch; ck =
    that state when resuming this unit. With prior physics the untrained members (each its physics line) are the
    first candidate for the best model: a correction is kept only if held-out flights want it, and with several
    members and --select nested/one_se only if it beats the lines by more than a standard error (judge_correction)."""
    amp_dtype, use_scaler = amp  # from amp_policy
    pairs = fold.get("members") or [(fold["fit"], fold["val"])]
    members = [make_member(method, fold, fit, val, t, enc, cfg, dev, unit_seed + 1_000_000 * j, use_scaler)
               for j, (fit, val) in enumerate(pairs)]
    snapshot = lambda: [{k: v.detach().clone() for k, v in mb["model"].state_dict().items()} for mb in members]
    book = dict(best_val=float("inf"), best_state=None, best_mse=None, line_mse=None, mse_path=[])  # checkpointed
    start_stage = 0
    if ck is not None:
        for mb, state in zip(members, ck["model"]):
            mb["model"].load_state_dict(state)
        book, start_stage = {k: ck[k] for k in book}, ck["stage"]
    elif cfg["prior"] == "physics":
        mse = member_mse(members, amp_dtype)
        book.update(best_val=criterion(members, mse), best_state=snapshot(), best_mse=mse, line_mse=mse,
                    mse_path=[mse])
    for si, stage in enumerate(stages(method, cfg)[start_stage:], start_stage):
        opts = stage_optimizers(members, stage[2], stage[1], cfg)
        start_epoch, bad = resume_stage(ck, opts, members) if ck is not None and si == start_stage else (0, 0)
        for epoch in range(start_epoch, stage[0]):
            if bad >= cfg["patience"]:
                break
            t0 = time.time()
            where = f"{method} {fold['name']} seed {unit_seed} stage {si + 1} epoch {epoch + 1}"
            tag = lambda j: f" member {j} (val flight {int(t['flight'][members[j]['val'][0]])})" * (len(members) > 1)
            losses_lrs = [member_epoch(mb, opt, cfg, amp_dtype, stage, epoch, where + tag(j))
                          for j, (mb, opt) in enumerate(zip(members, opts))]
            mse = member_mse(members, amp_dtype)
            val_loss = criterion(members, mse)
            book["mse_path"] = book["mse_path"] + [mse]  # a new list: the saved state never aliases a later one
            improved = val_loss < book["best_val"]
            bad = 0 if improved else bad + 1
            if improved:
                book.update(best_val=val_loss, best_state=snapshot(), best_mse=mse)
            log(dict(method=method, fold=fold["name"], seed=unit_seed, stage=si + 1, epoch=epoch + 1,
                     train_loss=float(np.mean([l for l, _ in losses_lrs])), val_loss=val_loss, lr=losses_lrs[0][1],
                     seconds=time.time() - t0, val_mse_km2="/".join(f"{v:.5f}" for v in mse)))
            save(dict(model=[mb["model"].state_dict() for mb in members], optimizer=[o.state_dict() for o in opts],
                      scaler=[mb["scaler"].state_dict() for mb in members], stage=si, epoch=epoch, bad_epochs=bad,
                      rng=rng_state([mb["gen"] for mb in members]), **book))
        if book["best_state"] is not None:  # the next stage (and the test) starts from the best models so far
            for mb, state in zip(members, book["best_state"]):
                mb["model"].load_state_dict(state)
    if cfg["select"] != "min" and book["line_mse"] is not None and len(members) > 1:
        judge_correction(members, book, f"{method} {fold['name']} seed {unit_seed}", cfg["select"])
    line = fold_line(fold, t) if cfg["prior"] == "physics" else None
    return unit_predict(members, torch.as_tensor(fold["test"], device=dev), t["phys"], line, amp_dtype), members


def judge_correction(members, book, where, select):
    """--select nested / one_se: keep the members' best correction only if beats_lines, each held-out flight judged
    at the epoch chosen without it (nested_mse) or at the best epoch itself (one_se); else zero it, so the unit
    predicts the physics row's line. Either way a kept unit uses the best epoch's weights. Prints the decision
    with both per-flight MSE vectors (log.csv's val_mse_km2 has the epochs, the lines' MSE is only here)."""
    n_val = [len(mb["val"]) for mb in members]
    judged = nested_mse(book["mse_path"], n_val) if select == "nested" else book["best_mse"]
    keep = beats_lines(book["line_mse"], judged)
    label = "at epochs chosen without each flight" if select == "nested" else "with the best correction"
    print(f"  {where}: held-out MSE per flight {np.round(book['line_mse'], 4).tolist()} km^2 with the lines, "
          f"{np.round(judged, 4).tolist()} {label}: "
          + ("kept it" if keep else "its gain is within one standard error of 0: no correction"))
    if not keep:
        for mb in members:
            zero_correction(mb["model"])


def fold_line(fold, t):
    """[a, b] of the physics row's line for this fold: fitted on EVERY training flight (fold["train"])."""
    return physics_line(t["phys"][fold["train"]].cpu().numpy(), t["y"][fold["train"]].cpu().numpy())


def unit_predict(members, idx, phys, line, amp_dtype):
    """A unit's CBH (N,) in km (numpy) for frames idx (a tensor on the device). With a physics prior: `line`
    (fold_line, the physics row's line) plus the mean of the members' corrections; with every correction
    rejected the unit is the physics row (to float32 precision). Why not each member's own line: it was
    fitted without the member's validation flight, and with 3-4 training flights one flight moves a 2-number
    line a lot, so the networks would differ from the physics row by that alone. Without a prior (line None):
    the mean of the members' predictions."""
    outs = [member_predict(mb, idx, amp_dtype) for mb in members]  # (N,) each, standardised
    return members_km(outs, [mb["prior"][idx] for mb in members], [mb["stats"] for mb in members], line,
                      phys[idx]).cpu().numpy()


def members_km(outs, priors, stats, line, phys):
    """CBH (N,) in km from the members' standardised outputs outs and priors (N,) each, with their target
    scaling stats (y_mean, y_std): line(phys) plus the mean of the corrections (out - prior) * y_std, or
    without a line (None) the mean of the members' own predictions. Shared by unit_predict and predict_km."""
    if line is None:
        return torch.stack([o * s["y_std"] + s["y_mean"] for o, s in zip(outs, stats)]).mean(0)
    corrections = torch.stack([(o - p) * s["y_std"] for o, p, s in zip(outs, priors, stats)])  # (members, N) km
    return corrections.mean(0) + line[0] * phys + line[1]


def camera_response(images):
    """The camera's relative cross-track response (W,) from profiles (N, W): their mean profile over its own
    mean. Why: an IR camera's optics lose a few percent of the signal towards the swath edges (vignetting), so
    the same surface reads colder at the edge than at nadir, and warmest minus coldest pixel then depends on
    WHERE the warm and cold pixels sit as well as on how high the cloud is. Averaged over many frames a scene
    is the same at every cross-track position, so what is left in the mean profile is the response. Caveat:
    labelled frames are those where the lidar saw a base, i.e. cloud at nadir, so their mean is a little
    colder at nadir than a random scene's; the estimate is still far closer to flat than the raw profiles."""
    mean_profile = np.asarray(images, np.float64).mean(0)  # (W,)
    return mean_profile / mean_profile.mean()


def physics_feature(images, gain=None, flight=None):
    """Surface minus coldest pixel of the centre 400 px of each raw profile (N,): the surface-to-cloud-top
    contrast, which the lapse rate turns into cloud-top height (and, with the thickness, base height).
    gain (W,) from camera_response: the profiles are divided by it first; None = as they are.
    flight (N,) flight of each profile: the surface is the profile's flight's clear-sky level (surface_level),
    or the profile's own warmest pixel where that is warmer; None: the profile's own warmest pixel."""
    W = images.shape[1]
    lo = max(0, (W - 400) // 2)
    profiles = np.asarray(images, np.float64)
    if gain is not None:
        profiles = profiles / np.asarray(gain, np.float64)
    centre = profiles[:, lo:lo + 400]
    warmest = centre.max(1)  # (N,)
    if flight is not None:
        warmest = np.maximum(warmest, surface_level(warmest, flight))
    return warmest - centre.min(1)


def surface_level(warmest, flight):
    """(N,) the clear-sky surface level of each profile's flight: the SURFACE_Q-th percentile of the warmest
    pixel over that flight's profiles. Why: in an overcast profile no pixel sees the sea, its warmest pixel is
    cloud, and warmest minus coldest underestimates the contrast (the line then predicts too low a base). The
    sea-surface temperature changes little along a flight, and the flight's other profiles, where some pixels
    are clear, show it. It uses profiles only, never labels, so a test flight's own profiles set its level,
    as a new flight's do in --predict (give a long flight over a surface-temperature gradient several
    flight_idx values). Assumes at least ~10% of a flight's profiles see some clear sea."""
    level = np.empty_like(warmest)
    for f in np.unique(flight):
        level[flight == f] = np.percentile(warmest[flight == f], SURFACE_Q)
    return level


def profile_physics(d, gain, surface_ref):
    """The physics feature (N,) of the profiles of d, flat-fielded with gain, its warm end per surface_ref."""
    return physics_feature(d["images"], gain, d["flight"] if surface_ref == "flight" else None)


def fold_gain(images, train, cfg):
    """--flat_field: the flat field of the fold's training profiles (never the test frames'); else None."""
    return camera_response(images[train]) if cfg["flat_field"] else None


def physics_line(feature, y):
    """[a, b] of the least-squares line CBH = a * feature + b: the physics row, and the networks' prior."""
    return np.polyfit(np.asarray(feature, np.float64), np.asarray(y, np.float64), 1).tolist()


def fit_physics(feature, y, train, test):
    """The `physics` row: the line fitted on the fold's training frames (all of them: a line needs no stopping
    flight), applied to the test frames."""
    a, b = physics_line(feature[train], y[train])
    return a * feature[test] + b


# ----------------------------------------------------------------------------------------------
# outputs: csv files, table, plots

def write_csv(path, rows, mode="w"):
    """mode 'w': whole file atomically (data.atomic_write_csv); 'a': append rows, header only for a new file."""
    if mode == "w":
        return data.atomic_write_csv(path, rows)
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def pooled(done, folds, m, seed=None):
    """All test indices of method m over the folds and its predictions there: one seed's, or (seed=None)
    the mean over its seeds (each test frame once per fold)."""
    tests, preds = [], []
    for k, f in enumerate(folds):
        p = [u["pred"] for u in done if u["method"] == m and u["fold"] == k and seed in (None, u["seed"])]
        if p:
            tests.append(f["test"])
            preds.append(np.mean(p, axis=0))
    return np.concatenate(tests), np.concatenate(preds)


def score_row(method, seed, fold, pred, true):
    s = losses.regression_metrics(pred, true)
    return dict(method=method, seed=seed, fold=fold, n_test=len(true), r2=s["r2"], mae_km=s["mae"],
                rmse_km=s["rmse"], r2_lo="", r2_hi="", flights_better="", flights_worse="")


def results_table(done, folds, d, names):
    """Rows of results.csv. Per method: every (seed, fold); every seed's pooled score (all test frames at
    once); the mean and std over seeds of the pooled scores; the pooled score of the seed-averaged
    predictions (seed 'committee': what the paired rows compare); the mean and std over folds of the per-fold
    scores (seed-averaged predictions). Then paired differences of pooled R2 (see paired_rows)."""
    y, rows = d["cbh_km"], []
    for m in names:
        seeds = sorted({u["seed"] for u in done if u["method"] == m})
        rows += [score_row(m, u["seed"], folds[u["fold"]]["name"], u["pred"], y[folds[u["fold"]]["test"]])
                 for u in done if u["method"] == m]
        per_seed = [score_row(m, s, "pooled", p, y[test]) for s in seeds for test, p in [pooled(done, folds, m, s)]]
        rows += per_seed
        test, committee = pooled(done, folds, m)
        rows.append(score_row(m, "committee", "pooled", committee, y[test]))
        per_fold = [losses.regression_metrics(np.mean([u["pred"] for u in done if (u["method"], u["fold"]) == (m, k)],
                                                      axis=0), y[f["test"]]) for k, f in enumerate(folds)]
        spread = lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
        for stat, fn in (("mean", np.mean), ("std", spread)):
            rows.append(dict(method=m, seed=stat, fold="pooled", n_test=per_seed[0]["n_test"],
                             **{c: float(fn([r[c] for r in per_seed])) for c in ("r2", "mae_km", "rmse_km")},
                             r2_lo="", r2_hi="", flights_better="", flights_worse=""))
            rows.append(dict(method=m, seed="mean", fold=f"fold {stat}", n_test="",
                             **{c: float(fn([s[k] for s in per_fold])) for c, k in
                                (("r2", "r2"), ("mae_km", "mae"), ("rmse_km", "rmse"))},
                             r2_lo="", r2_hi="", flights_better="", flights_worse=""))
    return rows + paired_rows(done, folds, d, names)


def paired_rows(done, folds, d, names):
    """finetune vs scratch and finetune vs trees (and physics): the difference of pooled R2 on identical
    test frames, each method's predictions averaged over its seeds, with 95% bootstrap intervals that
    resample the test frames in contiguous blocks along each flight (neighbouring frames are correlated,
    so frame-by-frame resampling would make the interval too narrow). Two rows per pair: fold 'pooled'
    keeps every test flight in every resample (how sure we are about these flights); fold 'flights
    resampled' also draws the flights with replacement (how sure we are for a new flight); its n_test is the
    number of test flights. flights_better / flights_worse: on how many test flights method a has the lower /
    the higher MSE (the rest are ties: predictions equal up to rounding)."""
    rows = []
    for a, b in (("finetune", "scratch"), ("finetune", "trees"), ("finetune", "physics")):
        if a not in names or b not in names:
            continue
        test, pa = pooled(done, folds, a)
        _, pb = pooled(done, folds, b)
        y, flight, frame = d["cbh_km"][test], d["flight"][test], d["frame"][test]
        flights = np.unique(flight)
        mse_a, mse_b = (np.array([np.mean((p - y)[flight == f] ** 2) for f in flights]) for p in (pa, pb))
        tie = np.isclose(mse_a, mse_b, rtol=1e-9, atol=0)  # e.g. a unit that IS the physics line, up to rounding
        counts = dict(flights_better=int(np.sum((mse_a < mse_b) & ~tie)),
                      flights_worse=int(np.sum((mse_a > mse_b) & ~tie)))
        for fold, by_flight in (("pooled", False), ("flights resampled", True)):
            diff, lo, hi = losses.block_bootstrap_diff(y, pa, pb, flight, frame, resample_groups=by_flight)
            rows.append(dict(method=f"{a} - {b}", seed="mean", fold=fold,
                             n_test=len(flights) if by_flight else len(test), r2=diff, mae_km="", rmse_km="",
                             r2_lo=lo, r2_hi=hi, **counts))
    return rows


def print_table(rows):
    """The summary: pooled scores (mean +- std over seeds), per-fold R2 (mean +- std over folds), the pooled R2
    of the seed-averaged predictions (committee), paired differences with their intervals."""
    get = lambda m, seed, fold: next((r for r in rows if (r["method"], r["seed"], r["fold"]) == (m, seed, fold)),
                                     None)
    print(f"{'method':<9} {'pooled R2':>16} {'MAE km':>16} {'RMSE km':>16} {'per-flight R2':>16} {'committee R2':>16}")
    for m in dict.fromkeys(r["method"] for r in rows if " - " not in r["method"]):
        mu, sd = get(m, "mean", "pooled"), get(m, "std", "pooled")
        fm, fs = get(m, "mean", "fold mean"), get(m, "mean", "fold std")
        cells = [f"{mu[c]:.3f} +- {sd[c]:.3f}" for c in ("r2", "mae_km", "rmse_km")]
        cells += [f"{fm['r2']:.3f} +- {fs['r2']:.3f}", f"{get(m, 'committee', 'pooled')['r2']:.3f}"]
        print(f"{m:<9} " + " ".join(f"{c:>16}" for c in cells))
    for r in rows:
        if " - " in r["method"] and r["fold"] == "pooled":
            f = get(r["method"], "mean", "flights resampled")
            print(f"{r['method']}: pooled R2 difference {r['r2']:+.3f} (95% block bootstrap {r['r2_lo']:+.3f} .. "
                  f"{r['r2_hi']:+.3f}; flights resampled too {f['r2_lo']:+.3f} .. {f['r2_hi']:+.3f}); "
                  f"better on {r['flights_better']}, worse on {r['flights_worse']} of {f['n_test']} test flights (MSE)")


def plot_results(done, folds, d, names, plot_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(plot_dir, exist_ok=True)
    y, flight = d["cbh_km"], d["flight"]
    # predicted vs true, one panel per method, all test frames, coloured by flight
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    lim = (0, float(y.max()) * 1.1)
    for ax, m in zip(axes[0], names):
        test, pred = pooled(done, folds, m)
        s = losses.regression_metrics(pred, y[test])
        ax.scatter(y[test], pred, c=flight[test], s=6, cmap="tab10")
        ax.plot(lim, lim, "k--", lw=1)
        ax.set(xlim=lim, ylim=lim, xlabel="true CBH (km)", ylabel="predicted CBH (km)",
               title=f"{m}: R2 {s['r2']:.2f}, MAE {s['mae']:.3f} km (colour: flight)")
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, "pred_vs_true.png"), dpi=110)
    plt.close(fig)
    # per-flight mean absolute error (whiskers: std of the absolute error) per method
    fls = np.unique(flight)
    fig, ax = plt.subplots(figsize=(1.2 * len(fls) * len(names) / 2 + 3, 4))
    w = 0.8 / len(names)
    for j, m in enumerate(names):
        test, pred = pooled(done, folds, m)
        err = np.abs(pred - y[test])
        mae_, sd = zip(*[(err[flight[test] == fl].mean(), err[flight[test] == fl].std())
                         if (flight[test] == fl).any() else (np.nan, 0.0) for fl in fls])
        ax.bar(np.arange(len(fls)) + (j - (len(names) - 1) / 2) * w, mae_, w, yerr=sd, capsize=2, label=m)
    ax.set(xticks=np.arange(len(fls)), xticklabels=[str(f) for f in fls], xlabel="flight",
           ylabel="MAE (km)", title="test error per flight (whiskers: std of |error|)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, "per_flight_error.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main

def load_encoder_source(cfg, names, width):
    """Where the networks' encoder comes from. Returns (methods to run, dict(config, state, norm_mean,
    norm_std)). The encoder's input mode must be this run's --input. --pretrained none: finetune and probe
    are skipped (nothing to fine-tune or probe) and scratch builds the encoder from model_size, normalised
    with each fold's own training statistics."""
    if not any(m in NETWORKS for m in names):
        return names, None
    if cfg["pretrained"] != "none":
        encoder, meta = mae.load_encoder(cfg["pretrained"])
        if meta["config"].get("width", width) != width:
            raise data.DataError(f"{cfg['pretrained']}: encoder expects profiles of width "
                                 f"{meta['config']['width']}, the labelled file has {width}")
        if meta["input"] != cfg["input"]:
            raise data.DataError(f"{cfg['pretrained']}: encoder was pre-trained on --input {meta['input']}, this run "
                                 f"uses --input {cfg['input']}; pass --input {meta['input']} or pre-train again")
        return names, dict(config=meta["config"], state=encoder.state_dict(),
                           norm_mean=meta["norm_mean"], norm_std=meta["norm_std"])
    skipped = [m for m in names if m in ("finetune", "probe")]
    if skipped:
        print(f"note: --pretrained none: skipping {', '.join(skipped)} (they need a pre-trained encoder)")
    if cfg["model_size"] not in mae.MODEL_SIZES:
        raise data.DataError(f"--model_size {cfg['model_size']!r}: expected one of {', '.join(mae.MODEL_SIZES)}")
    in_chans = 2 if cfg["input"] == "both" else 1
    enc_cfg = mae.encoder_config(dict(mae.MODEL_SIZES[cfg["model_size"]], width=width, in_chans=in_chans))
    return [m for m in names if m not in skipped], dict(config=enc_cfg, state=None, norm_mean=None, norm_std=None)


def check_config(cfg):
    """Flags a user can get wrong, refused before anything is read or written."""
    gap_ok = lambda v: v == "auto" or v.isdigit()
    problems = [(min(cfg["batch_size"], cfg["patience"], cfg["n_trees"], cfg["tree_depth"], cfg["tree_bins"],
                     cfg["seeds"]) < 1,
                 "--batch_size, --patience, --n_trees, --tree_depth, --tree_bins and --seeds must be >= 1"),
                (min(cfg["epochs"], cfg["head_epochs"], cfg["warmup_epochs"]) < 0,
                 "--epochs, --head_epochs and --warmup_epochs must be >= 0"),
                (not (gap_ok(str(cfg["gap"])) and gap_ok(str(cfg["val_gap"]))),
                 "--gap and --val_gap must be auto or a whole number of frames >= 0"),
                (cfg["epochs"] + cfg["head_epochs"] < 1, "--epochs plus --head_epochs must be >= 1"),
                (cfg["n_blocks"] < 2, f"--n_blocks {cfg['n_blocks']}: must be >= 2"),
                (not 0 < cfg["val_frac"] < 1, f"--val_frac {cfg['val_frac']}: must be between 0 and 1"),
                (cfg["lr"] <= 0 or cfg["ft_lr"] <= 0 or cfg["grad_clip"] < 0,
                 "--lr and --ft_lr must be > 0, --grad_clip >= 0"),
                (cfg["val_mode"] not in ("cv", "flight", "tail"),
                 f"--val_mode {cfg['val_mode']!r}: use cv, flight or tail"),
                (cfg["pool"] not in ("cls", "mean"), f"--pool {cfg['pool']!r}: use cls or mean"),
                (cfg["select"] not in ("nested", "one_se", "min"),
                 f"--select {cfg['select']!r}: use nested, one_se or min"),
                (cfg["prior"] not in ("physics", "none"), f"--prior {cfg['prior']!r}: use physics or none"),
                (cfg["surface_ref"] not in ("flight", "profile"),
                 f"--surface_ref {cfg['surface_ref']!r}: use flight or profile"),
                (cfg["input"] not in data.INPUT_MODES, f"--input {cfg['input']!r}: use {', '.join(data.INPUT_MODES)}"),
                (cfg["cpu_bf16"] not in ("auto", "on", "off"), f"--cpu_bf16 {cfg['cpu_bf16']!r}: use auto, on or off"),
                (not 0 <= cfg["drop_path"] < 1, f"--drop_path {cfg['drop_path']}: must be in [0, 1)")]
    for bad, msg in problems:
        if bad:
            raise data.DataError(msg)


def count_rows(path):
    """Data rows in a CSV log (0 if it does not exist yet)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return max(0, sum(1 for _ in f) - 1)


def trim_rows(path, n):
    """Keep the header and the first n rows: the rows the checkpoint accounts for, so a resumed run never
    logs an epoch twice."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()[:n + 1]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def load_inputs(cfg, dev):
    """Labelled data, folds, the methods to run and the encoder source; the tensors every unit shares:
    see network_tensors."""
    names = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    if not names or any(m not in METHODS for m in names):
        raise data.DataError(f"--methods {cfg['methods']!r}: expected a comma list of {', '.join(METHODS)}")
    path = cfg["data_path"] or data.default_cloud_paths()[1]
    d = data.load_clouds(path, labelled=True, max_samples=cfg["max_samples"])
    folds = make_folds(d, cfg)
    names, enc = load_encoder_source(cfg, names, d["images"].shape[1])
    if not names:
        raise data.DataError("nothing to run: every requested method needs a pre-trained encoder")
    print(f"{len(d['cbh_km'])} labelled profiles from {path}, {len(np.unique(d['flight']))} flights, "
          f"split {cfg['split']} ({len(folds)} folds: " + "; ".join(f"{f['name']} {f['how']}" for f in folds) +
          f"), methods {', '.join(names)}, input {cfg['input']}, device {dev}")
    return d, folds, names, enc, network_tensors(d, cfg["input"], dev, np.zeros(len(d["cbh_km"])))  # phys: set per fold


def maybe_resume(cfg, log_path):
    """(checkpoint or None, finished units). A fresh run starts a fresh log; --resume trims the log back to
    the rows its checkpoint accounts for and skips the units it finished. A checkpoint of an older PROTOCOL is
    refused: its finished units were run another way, and results.csv would silently mix the two."""
    same = lambda c: {k: v for k, v in (UNTIL_ADDED | c).items() if k not in ("resume", "device", "num_threads",
                                                                             "out_dir")}
    if not cfg["resume"]:
        if os.path.isfile(log_path):
            os.remove(log_path)
        return None, []
    ck = data.load_checkpoint(cfg["resume"])
    if "done" in ck and ck.get("protocol") != PROTOCOL:
        raise data.DataError(f"{cfg['resume']}: written by an older finetune_cbh.py (checkpoint protocol "
                             f"{ck.get('protocol', 1)}, this one reads {PROTOCOL}); its units were run or stored "
                             "another way and cannot be mixed with new ones: start a new run")
    if "done" not in ck or same(ck.get("config", {})) != same(cfg):
        raise data.DataError(f"{cfg['resume']}: not a finetune_cbh checkpoint of a run with these settings")
    trim_rows(log_path, ck.get("log_rows", 0))
    return ck, ck["done"]


def units(names, folds, cfg):
    """Every (method, fold index, seed) to run: networks once per seed, trees and physics once."""
    return [(m, k, s) for m in names for s in range(cfg["seeds"] if m in NETWORKS else 1) for k in range(len(folds))]


def run_unit(unit, folds, d, t, enc, cfg, dev, amp, log, save, ck):
    """Test predictions (km) of one (method, fold, seed). Each unit is seeded on its own, so units do not
    depend on the order they run in, and seed 0 of a network keeps the seeding of single-seed runs."""
    m, k, s = unit
    fold = seed_fold(folds[k], s)
    unit_seed = cfg["seed"] + 100 * k + METHODS.index(m) + 10_000 * s
    torch.manual_seed(unit_seed)
    np.random.seed(unit_seed)
    random.seed(unit_seed)
    if m == "trees":
        feats = profile_features(d["images"], d["sza"], d["saa"], cfg["tree_angles"])
        tree = gbrt_fit(feats[fold["train"]], d["cbh_km"][fold["train"]], cfg["n_trees"], cfg["tree_depth"],
                        cfg["tree_lr"], cfg["tree_min_leaf"], cfg["tree_bins"])
        return gbrt_predict(tree, feats[fold["test"]])
    gain = fold_gain(d["images"], fold["train"], cfg)
    phys = profile_physics(d, gain, cfg["surface_ref"])  # (N,)
    if m == "physics":
        return fit_physics(phys, d["cbh_km"], fold["train"], fold["test"])
    t = dict(t, phys=torch.as_tensor(phys, dtype=torch.float32, device=dev))
    unit_ck = ck if ck is not None and tuple(ck.get("unit") or ()) == unit else None
    return train_network(m, fold, t, enc, cfg, dev, amp, unit_seed, log, save, unit_ck)[0]


def log_epoch(log_path, row):
    write_csv(log_path, [row], mode="a")
    print(f"  {row['method']} {row['fold']} seed {row['seed']} stage {row['stage']} epoch {row['epoch']} "
          f"train {row['train_loss']:.4f} val {row['val_loss']:.4f} lr {row['lr']:.2e} {row['seconds']:.1f}s")


def report(done, folds, d, names, out_dir):
    """results.csv (see results_table), predictions.csv (one row per method and test frame: the mean over
    seeds and its spread), plots/."""
    rows = results_table(done, folds, d, names)
    print_table(rows)
    write_csv(os.path.join(out_dir, "results.csv"), rows)
    preds = []
    for m in names:
        for k, f in enumerate(folds):
            p = np.array([u["pred"] for u in done if (u["method"], u["fold"]) == (m, k)])  # (seeds, n_test)
            preds += [dict(method=m, fold=f["name"], flight=int(d["flight"][i]), frame=int(d["frame"][i]),
                           cbh_km=float(d["cbh_km"][i]), pred_km=float(p[:, j].mean()),
                           pred_seed_std_km=float(p[:, j].std()), n_seeds=len(p)) for j, i in enumerate(f["test"])]
    write_csv(os.path.join(out_dir, "predictions.csv"), preds)
    plot_results(done, folds, d, names, os.path.join(out_dir, "plots"))


def compare(cfg, dev):
    t_start = time.time()
    d, folds, names, enc, t = load_inputs(cfg, dev)
    ckpt_path = os.path.join(cfg["out_dir"], "checkpoints", "latest.pth")
    log_path = os.path.join(cfg["out_dir"], "log.csv")
    ck, done = maybe_resume(cfg, log_path)
    data.claim_out_dir(cfg["out_dir"])
    amp = amp_policy(dev, cfg, folds, t, enc, ck.get("cpu_autocast") if ck else None) if enc else (None, False)
    cpu_autocast = ("bf16" if amp[0] else "fp32") if dev.type == "cpu" else None
    for unit in units(names, folds, cfg):
        if any((u["method"], u["fold"], u["seed"]) == unit for u in done):
            continue  # finished before the interruption
        t0 = time.time()
        save = lambda st: data.atomic_torch_save(dict(config=cfg, protocol=PROTOCOL, done=done, unit=unit,
                                                      cpu_autocast=cpu_autocast, log_rows=count_rows(log_path), **st),
                                                 ckpt_path)
        pred = run_unit(unit, folds, d, t, enc, cfg, dev, amp, lambda row: log_epoch(log_path, row), save, ck)
        m, k, s = unit
        done.append(dict(method=m, fold=k, seed=s, pred=np.asarray(pred, np.float64)))
        data.atomic_torch_save(dict(config=cfg, protocol=PROTOCOL, done=done, unit=None, cpu_autocast=cpu_autocast,
                                    log_rows=count_rows(log_path)), ckpt_path)
        sc = losses.regression_metrics(pred, d["cbh_km"][folds[k]["test"]])
        print(f"{m} {folds[k]['name']} seed {s}: R2 {sc['r2']:.3f} MAE {sc['mae']:.4f} km "
              f"RMSE {sc['rmse']:.4f} km ({time.time() - t0:.1f}s)")
    report(done, folds, d, names, cfg["out_dir"])
    print(f"wrote {cfg['out_dir']}/results.csv, predictions.csv, log.csv, plots/ in {time.time() - t_start:.0f}s")


# ----------------------------------------------------------------------------------------------
# the final model (--final) and CBH for new files (--predict)

def final_fold(d, cfg):
    """--final: trees and physics, which need no stopping, train on all flights. Networks: under val_mode cv
    one member per labelled flight, each trained on all the others and held out on it, stopped together as
    in the comparison; else one network on every flight but the last in
    flight order, which sets the stopping epoch (as a flight flown after the others would)."""
    last, everything = int(d["flight"].max()), np.arange(len(d["flight"]))
    if cfg["final"] not in NETWORKS:
        return dict(name="final (all flights)", fit=everything, val=everything[:1], test=everything[:1], how="")
    flights = np.unique(d["flight"])
    if len(flights) < 2:
        raise data.DataError(f"--final {cfg['final']} needs at least 2 flights (one sets the stopping epoch)")
    if uses_cv(cfg):
        members = [(np.flatnonzero(d["flight"] != fl), np.flatnonzero(d["flight"] == fl)) for fl in flights]
        return dict(name=f"final ({len(flights)} members, each held out on one flight)", fit=everything,
                    train=everything, test=everything[:1], members=members)
    val = np.flatnonzero(d["flight"] == last)
    return dict(name=f"final (stopping flight {last})", fit=np.flatnonzero(d["flight"] != last), val=val,
                train=everything, test=val, how=f"val flight {last}")


def setting(cfg, key):
    """A config value to compare between runs; paths as absolute paths ('' data_path = the embedded file)."""
    if key == "data_path":
        return os.path.abspath(cfg.get(key) or data.default_cloud_paths()[1])
    if key == "pretrained" and cfg.get(key, "none") != "none":
        return os.path.abspath(cfg[key])
    return cfg.get(key, UNTIL_ADDED.get(key))


def cross_validated(cfg, method):
    """The method's pooled LOFO scores from a comparison run in the same out_dir, if that run used the same
    data, split, input settings and epochs; else 'not cross-validated'."""
    ckpt_path, res_path = (os.path.join(cfg["out_dir"], p) for p in ("checkpoints/latest.pth", "results.csv"))
    if not (os.path.isfile(ckpt_path) and os.path.isfile(res_path)):
        return "not cross-validated"
    ckpt = data.load_checkpoint(ckpt_path)
    if ckpt.get("protocol") != PROTOCOL:
        return "not cross-validated"
    run = ckpt.get("config", {})
    keys = ("data_path", "max_samples", "pretrained", "input", "split", "val_mode", "gap", "val_gap", "use_angles",
            "tree_angles", "prior", "flat_field", "surface_ref", "correction_domain", "within_flight", "select", "pool",
            "drop_path", "head_epochs", "epochs", "lr", "ft_lr", "layer_decay")
    with open(res_path) as f:
        row = next((r for r in csv.DictReader(f) if (r["method"], r["seed"], r["fold"]) == (method, "mean", "pooled")),
                   None)
    if row is None or any(setting(run, k) != setting(cfg, k) for k in keys):
        return "not cross-validated"
    return dict(split=run["split"], r2=float(row["r2"]), mae_km=float(row["mae_km"]), rmse_km=float(row["rmse_km"]))


def train_final(cfg, dev):
    """Train one model (one seed) of method --final and write out_dir/cbh_model.pth: everything --predict
    needs (weights or trees or line, encoder config, input mode and normalisation, target standardisation,
    precision) and its cross-validated scores. The comparison's own files are never touched."""
    method = cfg["final"]
    if method not in METHODS:
        raise data.DataError(f"--final {method!r}: expected one of {', '.join(METHODS)}")
    path = cfg["data_path"] or data.default_cloud_paths()[1]
    d = data.load_clouds(path, labelled=True, max_samples=cfg["max_samples"])
    fold = final_fold(d, cfg)
    _, enc = load_encoder_source(cfg, [method], d["images"].shape[1])
    if method in ("finetune", "probe") and enc["state"] is None:
        raise data.DataError(f"--final {method} needs a pre-trained encoder (--pretrained)")
    gain = fold_gain(d["images"], np.arange(len(d["images"])), cfg)  # the flat field of every labelled profile
    saved = dict(kind="cbh_model", method=method, input=cfg["input"], width=d["images"].shape[1],
                 flat_field=None if gain is None else gain.tolist(), surface_ref=cfg["surface_ref"],
                 use_angles=cfg["use_angles"], tree_angles=cfg["tree_angles"], cv=cross_validated(cfg, method),
                 data_path=path, fold=fold["name"],
                 flights=sorted(int(f) for f in np.unique(d["flight"][fold.get("train", fold["fit"])])))
    if method == "trees":
        feats = profile_features(d["images"], d["sza"], d["saa"], cfg["tree_angles"])
        saved["trees"] = gbrt_fit(feats, d["cbh_km"], cfg["n_trees"], cfg["tree_depth"], cfg["tree_lr"],
                                  cfg["tree_min_leaf"], cfg["tree_bins"])
    elif method == "physics":
        saved["line"] = physics_line(profile_physics(d, gain, cfg["surface_ref"]), d["cbh_km"])
    else:
        t = network_tensors(d, cfg["input"], dev, profile_physics(d, gain, cfg["surface_ref"]))
        amp = amp_policy(dev, cfg, [fold], t, enc)
        torch.manual_seed(cfg["seed"])
        _, members = train_network(method, fold, t, enc, cfg, dev, amp, cfg["seed"],
                                   lambda row: print(f"  {method} {fold['name']} stage {row['stage']} epoch "
                                                     f"{row['epoch']} val {row['val_loss']:.4f}"), lambda st: None)
        if cfg["prior"] == "physics":
            saved["line"] = fold_line(fold, t)  # the corrections sit on the physics line of every labelled flight
        saved.update(members=[dict(state=mb["model"].state_dict(), **mb["stats"]) for mb in members],
                     encoder_config=enc["config"], pool=cfg["pool"], head_hidden=0 if method == "probe" else
                     cfg["head_hidden"], head_dropout=cfg["head_dropout"],
                     cpu_autocast="bf16" if amp[0] is torch.bfloat16 else "fp32")
    out = os.path.join(cfg["out_dir"], "cbh_model.pth")
    data.claim_out_dir(cfg["out_dir"])
    data.atomic_torch_save(saved, out)
    print(f"wrote {out}: {method} on flights {saved['flights']} ({fold['name']}); cross-validated: {saved['cv']}")


def load_cbh_model(path):
    m = data.load_checkpoint(path)
    if m.get("kind") != "cbh_model":
        raise data.DataError(f"{path}: not a CBH model (write one with `python finetune_cbh.py --final METHOD`)")
    return m


def stored_physics(m, d):
    """The physics feature of d's profiles as model m was trained on it: its flat field (files from before
    --flat_field have none: raw profiles) and surface reference (files from before --surface_ref: profile)."""
    return profile_physics(d, m.get("flat_field"), m.get("surface_ref", UNTIL_ADDED["surface_ref"]))


def predict_km(m, d, dev):
    """CBH (km) of every frame of d with the saved model m, clipped to the schema's 0..20 km. A network model
    predicts as unit_predict: the stored line of all labelled flights plus the mean of its members' corrections
    (one member, or one per flight under val_mode cv), each member with its own normalisation, target scaling
    and line; they run in batches of 4096 resident frames under the precision the model was trained with."""
    if m["method"] == "trees":
        pred = gbrt_predict(m["trees"], profile_features(d["images"], d["sza"], d["saa"], m["tree_angles"]))
    elif m["method"] == "physics":
        pred = np.polyval(m["line"], stored_physics(m, d))
    else:
        channels = torch.as_tensor(data.profile_channels(d["images"], m["input"]), device=dev)  # (N, C, W)
        ang = torch.as_tensor(np.stack([d["sza"] / 90.0, d["saa"] / 180.0], 1), device=dev)  # (N, 2)
        ang = ang if m["use_angles"] else ang[:, :0]
        phys = torch.as_tensor(stored_physics(m, d), dtype=torch.float32, device=dev)  # (N,)
        bf16 = dev.type == "cuda" or m.get("cpu_autocast") == "bf16"
        members, outs, priors = m.get("members") or [m], [], []  # an older file holds one network's keys itself
        for mb in members:
            net = CBHNet(mae.build_encoder(m["encoder_config"]), ang.shape[1], m["head_hidden"], m["head_dropout"],
                         m["pool"]).to(dev).eval()
            net.load_state_dict(mb["state"])
            mean, std = (torch.tensor(v, dtype=torch.float32, device=dev)[:, None] for v in (mb["norm_mean"],
                                                                                             mb["norm_std"]))
            x, prior = (channels - mean) / std, prior_std(phys, mb)  # (N, C, W), (N,)
            with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16 and dev.type != "mps"):
                out = torch.cat([net(x[i:i + 4096], ang[i:i + 4096], prior[i:i + 4096]).float()
                                 for i in range(0, len(x), 4096)])
            outs.append(prior + (out - prior) * in_domain(phys, mb))  # as member_predict
            priors.append(prior)
        # m["line"]: the physics line of all labelled flights; older files and prior none have none
        pred = members_km(outs, priors, members, m.get("line"), phys).cpu().numpy()
    return np.clip(pred, 0.0, data.MAX_CBH_KM).astype(np.float32)


def predict_file(cfg, dev):
    """--predict FILE --model cbh_model.pth: out_dir/cbh_pred_<stem>.h5 (cbh_pred_km (N,) and a copy of
    metadata, one row per frame of FILE) and one plot per flight. FILE is only read."""
    if not cfg["model"]:
        raise data.DataError("--predict needs --model PATH (a cbh_model.pth written by --final)")
    m = load_cbh_model(cfg["model"])
    path = cfg["predict"]
    d = data.load_clouds(path, labelled=data.has_dataset(path, "cbh_km"))
    if d["images"].shape[1] != m["width"]:
        raise data.DataError(f"{path}: profiles are {d['images'].shape[1]} px wide, the model {cfg['model']} "
                             f"was trained on {m['width']} px")
    warn_few_profiles(m, d, path)
    t0 = time.time()
    pred = predict_km(m, d, dev)
    secs = time.time() - t0
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cfg["out_dir"], f"cbh_pred_{stem}.h5")
    if os.path.abspath(out) == os.path.abspath(path):
        raise data.DataError(f"{path}: the output would overwrite the input; pass another --out_dir")
    data.claim_out_dir(cfg["out_dir"])
    data.write_cbh_predictions(out, pred, d["metadata"])
    plot_flights(d, pred, m, stem, os.path.join(cfg["out_dir"], "plots"))
    print(f"wrote {out}: {len(pred)} frames in {secs:.2f}s ({m['method']} model {cfg['model']}), plots in "
          f"{cfg['out_dir']}/plots/cbh_{stem}_flight_*.png")


def warn_few_profiles(m, d, path, enough=20):
    """With --surface_ref flight a frame's physics feature depends on its flight's other profiles in the file
    (surface_level): a flight with few of them gives a poor clear-sky level. Say so; predict all the same."""
    if m.get("surface_ref") != "flight":
        return
    flights, counts = np.unique(d["flight"], return_counts=True)
    few = [f"{int(f)} ({n})" for f, n in zip(flights, counts) if n < enough]
    if few:
        print(f"warning: {path}: flights with fewer than {enough} profiles: {', '.join(few)}; their clear-sky "
              f"level (surface_level) comes from those few profiles alone; predict whole flights where you can")


def plot_flights(d, pred, m, stem, plot_dir):
    """Predicted CBH along each flight (frame index), lidar CBH where the file has it, and the model's
    cross-validated MAE as a band, so nobody reads the final model as better than its LOFO score."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(plot_dir, exist_ok=True)
    cv = m["cv"]
    band = cv["mae_km"] if isinstance(cv, dict) else None
    for fl in np.unique(d["flight"]):
        sel = np.flatnonzero(d["flight"] == fl)
        sel = sel[np.argsort(d["frame"][sel], kind="stable")]
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.plot(d["frame"][sel], pred[sel], lw=0.8, color="tab:blue", label=f"predicted ({m['method']})")
        if band is not None:
            ax.fill_between(d["frame"][sel], pred[sel] - band, pred[sel] + band, color="tab:blue", alpha=0.2,
                            lw=0, label=f"+- cross-validated MAE {band:.3f} km")
        if "cbh_km" in d:
            ax.plot(d["frame"][sel], d["cbh_km"][sel], ".", ms=3, color="k", label="lidar CBH")
        score = (f"{cv['split']} cross-validated R2 {cv['r2']:.2f}, MAE {cv['mae_km']:.3f} km" if band is not None
                 else "not cross-validated")
        ax.set(xlabel="frame", ylabel="cloud base height (km)", title=f"{stem}, flight {fl}: {score}")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, f"cbh_{stem}_flight_{fl}.png"), dpi=100)
        plt.close(fig)


def main(argv=None):
    cfg = parse_config(argv)
    try:
        check_config(cfg)
        data.check_out_dir(cfg["out_dir"])  # unwritable, or held by a live run: refused before any work
        dev = mae.pick_device(cfg["device"])
        if cfg["num_threads"] > 0:
            torch.set_num_threads(cfg["num_threads"])
        if cfg["predict"]:
            predict_file(cfg, dev)
        elif cfg["final"]:
            train_final(cfg, dev)
        else:
            compare(cfg, dev)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except data.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
