"""
Cloud base height (km) from 1D IR profiles: the pre-trained MAE encoder, fine-tuned, vs honest baselines.

Fine-tunes the masked-autoencoder encoder from mae.py and compares it, on identical folds, with
  finetune  pre-trained encoder + MLP head; stage 1 trains the head with the encoder frozen, stage 2
            trains everything at a lower LR (optional layer-wise LR decay)
  scratch   the same network and schedule from a random init (what pre-training buys)
  probe     a linear head on the frozen pre-trained encoder (how much the features already know)
  trees     gradient-boosted regression trees (numpy) on hand-crafted profile features
Splits: lofo (leave one flight out, default: the question a user asks is "does it work on a new flight"),
blocked (contiguous time blocks within flights, with a gap), random (the seed's protocol; neighbouring
frames are strongly correlated, so it leaks and flatters every method; comparison only).
Early-stopping validation always comes from the training side of a fold (a tail block of each training
flight), never from the test frames.

  python finetune_cbh.py                      # full default comparison (needs `python mae.py` first)
  python finetune_cbh.py --pretrained none    # no pre-trained encoder: scratch and trees only
  python finetune_cbh.py --split blocked --methods finetune,trees
Outputs in out_dir: results.csv (per fold, mean, std, pooled), predictions.csv, log.csv,
plots/pred_vs_true.png, plots/per_flight_error.png, checkpoints/latest.pth.
Resume granularity: latest.pth is rewritten after every epoch and after every finished (method, fold)
unit; `--resume out_dir/checkpoints/latest.pth` (same settings) skips the finished units and continues the
interrupted one from its last completed epoch, reproducing the uninterrupted run's losses on CPU.
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
methods = 'finetune,scratch,probe,trees'  # comma list of finetune, scratch, probe, trees (run on identical folds)
split = 'lofo'  # lofo (leave one flight out) | blocked (time blocks with a gap) | random (leaky, comparison only)
n_blocks = 5  # blocked: time blocks per flight (one fold each); random: number of folds
gap = 100  # blocked: training frames within this many frames (frame_idx) of a test block are dropped
val_frac = 0.15  # early-stopping validation = the last val_frac of each training flight's labelled frames
val_gap = 100  # training frames within this many frames before the validation tail are dropped
use_angles = False  # concat scaled sza/saa to the CLS embedding; off: angles track time of day, a shortcut
model_size = 'small'  # encoder size for --pretrained none (a key of mae.MODEL_SIZES)
head_hidden = 128  # hidden units of the MLP head (finetune, scratch); the probe's head is linear
head_dropout = 0.1  # dropout in the MLP head
head_epochs = 10  # stage 1 epochs: head only, encoder frozen (the probe gets head_epochs + epochs of this)
epochs = 40  # stage 2 epochs: all trained (finetune, scratch); full default comparison took 4m46s on 2 cores (README)
batch_size = 32  # ~600-800 training labels: small batches give enough optimizer steps
lr = 1e-3  # stage 1 peak LR (head only)
ft_lr = 2e-4  # stage 2 peak LR, lower so the pre-trained features are adjusted, not overwritten
layer_decay = 0.75  # stage 2: LR scale = layer_decay^(depth - layer), embeddings smallest; 1.0 = off
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
cpu_bf16 = True  # bf16 autocast on CPUs with AMX-bf16 units (~1.6x faster here, see amp_policy); others: fp32
seed = 1337  # every (method, fold) unit is seeded from this, so units do not depend on run order
resume = ''  # path to checkpoints/latest.pth of an interrupted run with the same settings
max_samples = 0  # use only the first N labelled samples (0 = all)
num_threads = 0  # torch CPU threads (0 = torch default)
# --- end config ---
METHODS = ("finetune", "scratch", "probe", "trees")


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
    def __init__(self, encoder, n_angles, hidden, dropout):
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim + n_angles
        self.head = (nn.Linear(d, 1) if hidden == 0 else
                     nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)))

    def forward(self, x, ang):  # x (B, W) normalised profiles, ang (B, n_angles) -> (B,) standardised CBH
        h = self.encoder.features(x).float()  # (B, D)
        if ang.shape[1]:
            h = torch.cat([h, ang], 1)  # (B, D + n_angles)
        with torch.autocast(x.device.type, enabled=False):  # tiny head in fp32: a bf16 output is only ~3 digits
            return self.head(h).squeeze(1)


def param_groups(model, wd, decay):
    """AdamW groups. Layer-wise LR decay: patch/CLS/position embeddings are layer 0, block i is layer
    i + 1, the final norm and the head are layer depth (scale 1). No weight decay on biases, norms
    (1-D tensors) and the CLS/position embeddings. Frozen parameters are left out."""
    depth = len(model.encoder.blocks)
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
            layer = depth
        no_wd = p.ndim < 2 or "pos" in name or "cls" in name
        scale = decay ** (depth - layer)
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

def profile_features(images, flight, frame, sza, saa, angles):
    """Per-frame features (N, F). Intensity: mean, std, min, max, percentiles, range, skewness; cross-track
    gradients; 4 segment means; temporal differences to the neighbouring frames, where neighbour = the
    previous / next frame of the same flight IN THE LABELLED FILE (by frame_idx; labels are sparse, so
    these can be many frames apart: the frame gap is a feature too), all zero when there is none;
    optionally solar angles. Neighbour features use only images, never labels."""
    x = np.asarray(images, np.float64)  # (N, W)
    pct = np.percentile(x, [5, 10, 25, 50, 75, 90, 95], axis=1).T  # (N, 7)
    mean, std = x.mean(1), x.std(1) + 1e-9
    skew = (((x - mean[:, None]) / std[:, None]) ** 3).mean(1)
    g = np.diff(x, axis=1)  # (N, W-1) cross-track gradient
    g2 = np.diff(x, 2, axis=1)
    seg = np.stack([s.mean(1) for s in np.array_split(x, 4, axis=1)], 1)  # (N, 4) cross-track shape
    own = [mean, std, x.min(1), x.max(1), *pct.T, pct[:, 6] - pct[:, 0], skew,
           np.abs(g).mean(1), g.std(1), np.abs(g).max(1), np.abs(g2).mean(1), *seg.T]
    summary = np.stack([mean, pct[:, 1], std], 1)  # what we difference against the neighbours
    order = np.lexsort((frame, flight))  # time order within each flight
    temporal = []
    for shift in (1, -1):  # previous, next
        nb = np.full(len(x), -1)
        pos = np.arange(len(order))
        j = pos - shift
        ok = (j >= 0) & (j < len(order))
        ok[ok] &= flight[order[j[ok]]] == flight[order[ok]]
        nb[order[ok]] = order[j[ok]]
        has = nb >= 0
        d = np.where(has[:, None], summary - summary[nb], 0.0)  # (N, 3)
        pix = np.where(has, np.abs(x - x[nb]).mean(1), 0.0)  # mean absolute profile change
        dt = np.where(has, np.abs(frame - frame[nb]), 0)
        temporal += [*d.T, pix, dt]
    cols = own + temporal + ([sza, saa] if angles else [])
    return np.stack(cols, 1).astype(np.float64)


def fit_bins(X, max_bins):
    """Split candidates per feature: midpoints between sorted unique values (exact, as scikit-learn)
    when there are at most max_bins of them, else midpoints between max_bins + 1 quantiles."""
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
    is `depth` vectorised steps per tree."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    edges = fit_bins(X, max_bins)
    xb = apply_bins(X, edges)  # (N, F)
    n, nf = xb.shape
    nb = max(len(e) for e in edges) + 1  # bins per feature (fewer than max_bins + 1 on small data)
    flat = xb + np.arange(nf) * nb  # (N, F) positions in one node's (F, nb) histogram
    rows = np.arange(n)
    feat = np.full((n_trees, 2 ** depth - 1), -1)  # per internal node; -1 = no split (go left)
    thr = np.zeros((n_trees, 2 ** depth - 1), np.int64)
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
            feat[t, first:first + k] = np.where(can, bf, -1)
            thr[t, first:first + k] = bb
            node = 2 * node + 1 + (can[local] & (xb[rows, bf[local]] > bb[local]))
        local = node - (2 ** depth - 1)
        leaf[t] = np.bincount(local, r, 2 ** depth) / np.maximum(np.bincount(local, None, 2 ** depth), 1)
        pred += lr * leaf[t, local]
    return dict(edges=edges, base=base, lr=lr, feat=feat, thr=thr, leaf=leaf)


def gbrt_predict(m, X):
    xb = apply_bins(np.asarray(X, np.float64), m["edges"])
    rows = np.arange(len(xb))
    depth = m["feat"].shape[1].bit_length()
    out = np.full(len(xb), m["base"])
    for feat, thr, leaf in zip(m["feat"], m["thr"], m["leaf"]):
        node = np.zeros(len(xb), np.int64)
        for _ in range(depth):
            f = feat[node]
            node = 2 * node + 1 + ((f >= 0) & (xb[rows, np.maximum(f, 0)] > thr[node]))
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


def make_folds(d, cfg):
    """[dict(name, fit, val, test)] index arrays into the labelled set; every method sees the same."""
    flight, frame = d["flight"], d["frame"]
    if cfg["split"] == "lofo":
        if len(np.unique(flight)) < 2:
            raise data.DataError("--split lofo needs at least 2 flights in the labelled file")
        raw = [(f"flight {fl}", tr, te) for fl, tr, te in data.split_lofo(flight)]
    elif cfg["split"] == "blocked":
        raw = [(f"block {k}", *data.split_blocked(flight, frame, cfg["n_blocks"], k, cfg["gap"]))
               for k in range(cfg["n_blocks"])]
    elif cfg["split"] == "random":
        print("warning: --split random puts neighbouring, strongly correlated frames in train and test; "
              "its scores are optimistic (kept only to compare with the seed's protocol)")
        raw = [(f"fold {k}", tr, te) for k, (tr, te) in
               enumerate(data.split_random(len(flight), cfg["n_blocks"], cfg["seed"]))]
    else:
        raise data.DataError(f"--split {cfg['split']!r}: expected lofo, blocked or random")
    folds = []
    for name, train, test in raw:
        fit, val = split_val(train, flight, frame, cfg["val_frac"], cfg["val_gap"])
        if min(len(fit), len(val), len(test)) == 0:
            raise data.DataError(f"{name}: too few labelled frames for train/validation/test "
                                 f"({len(fit)}/{len(val)}/{len(test)}); use more data or another --split")
        folds.append(dict(name=name, fit=fit, val=val, test=test))
    return folds


# ----------------------------------------------------------------------------------------------
# training one network on one fold

def amp_policy(dev, cpu_bf16):
    """(autocast dtype or None, use GradScaler). CUDA: bf16 where supported, else fp16 + GradScaler.
    CPU: bf16 autocast only with cpu_bf16 on a CPU with AMX-bf16 units. Measured (small encoder, 640
    profiles, batch 32, torch 2.13, 2-core Xeon with AMX, 1 thread: the shared box made 2-thread timings
    noise): stage-2 epoch fp32 2.3-2.6 s CPU time, bf16 1.5-1.6 s; stage-1 epoch 0.8 s vs 0.5 s.
    CPUs without AMX emulate bf16 and get slower, so they stay fp32."""
    if dev.type == "cuda":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    return (torch.bfloat16, False) if dev.type == "cpu" and cpu_bf16 and mae.cpu_has_amx_bf16() else (None, False)


def rng_state(gen):
    s = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
             gen=gen.get_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s, gen):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    gen.set_state(s["gen"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def train_network(method, fold, t, enc, cfg, dev, unit_seed, log, save, ck=None):
    """Two-stage training of one network on one fold; returns test predictions in km.
    t: tensors on dev (x raw profiles (N, W), ang (N, 2), y km (N,)); enc: dict(config, state (None without
    a pre-trained encoder), norm_mean, norm_std (None: statistics of this fold's training frames)).
    save(state) writes the checkpoint after every epoch; ck = that state when resuming this unit."""
    fit, val, test = (torch.as_tensor(fold[k], device=dev) for k in ("fit", "val", "test"))
    mean, std = enc["norm_mean"], enc["norm_std"]
    if mean is None:  # --pretrained none: normalise with this fold's training frames
        mean, std = data.norm_stats(t["x"][fit].cpu().numpy())
    x = (t["x"] - mean) / std  # (N, W)
    ang = t["ang"] if cfg["use_angles"] else t["ang"][:, :0]  # (N, 2) or (N, 0)
    y_mean, y_std = t["y"][fit].mean(), t["y"][fit].std() + 1e-6
    y = (t["y"] - y_mean) / y_std  # standardised targets; metrics go back to km

    encoder = mae.build_encoder(enc["config"])
    if method != "scratch":
        encoder.load_state_dict(enc["state"])
    model = CBHNet(encoder, ang.shape[1], 0 if method == "probe" else cfg["head_hidden"],
                   cfg["head_dropout"]).to(dev)
    # (epochs, peak LR, train the encoder). scratch runs the same two stages as finetune (stage 1 then fits
    # a head on random features), so initial weights are the only difference between the two.
    stages = ([(cfg["head_epochs"] + cfg["epochs"], cfg["lr"], False)] if method == "probe" else
              [(cfg["head_epochs"], cfg["lr"], False), (cfg["epochs"], cfg["ft_lr"], True)])
    amp_dtype, use_scaler = amp_policy(dev, cfg["cpu_bf16"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    gen = torch.Generator().manual_seed(unit_seed)  # shuffling and flips
    best_val, best_state = float("inf"), None
    spe = math.ceil(len(fit) / cfg["batch_size"])  # steps per epoch

    def evaluate(idx):
        model.eval()
        with torch.no_grad(), torch.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None):
            return model(x[idx], ang[idx]).float()

    start_stage = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        best_val, best_state, start_stage = ck["best_val"], ck["best_state"], ck["stage"]
    for si, (n_ep, peak, train_enc) in enumerate(stages):
        if si < start_stage:
            continue
        encoder.requires_grad_(train_enc)  # stage 1: the encoder is frozen (and gets no optimizer state)
        opt = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["layer_decay"] if train_enc else 1.0),
                                lr=peak, betas=(0.9, 0.999))
        start_epoch, bad = 0, 0
        if ck is not None and si == start_stage:
            opt.load_state_dict(ck["optimizer"])
            if ck["scaler"]:  # empty when the run had no GradScaler (CPU, bf16)
                scaler.load_state_dict(ck["scaler"])
            start_epoch, bad = ck["epoch"] + 1, ck["bad_epochs"]
            set_rng_state(ck["rng"], gen)
        for epoch in range(start_epoch, n_ep):
            if bad >= cfg["patience"]:
                break
            t0 = time.time()
            model.train()
            encoder.train(train_enc)  # frozen encoder in eval mode (no dropout / norm statistics updates)
            total, count = 0.0, 0
            for i, b in enumerate(data.batch_indices(len(fit), cfg["batch_size"], True, gen)):
                lr_now = get_lr(epoch * spe + i, n_ep * spe, cfg["warmup_epochs"] * spe, peak, cfg["min_lr_frac"])
                for g in opt.param_groups:
                    g["lr"] = lr_now * g["lr_scale"]
                idx = fit[b.to(dev)]
                xb = x[idx]  # (B, W)
                if cfg["flip"]:
                    xb = torch.where(torch.rand(len(b), 1, generator=gen).to(dev) < 0.5, xb.flip(1), xb)
                with torch.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None):
                    loss = F.mse_loss(model(xb, ang[idx]).float(), y[idx])
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg["grad_clip"] > 0:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg["grad_clip"])
                scaler.step(opt)
                scaler.update()
                total, count = total + loss.item() * len(b), count + len(b)
            val_loss = F.mse_loss(evaluate(val), y[val]).item()
            improved = val_loss < best_val
            if improved:
                best_val, bad = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            secs = time.time() - t0
            log(dict(method=method, fold=fold["name"], stage=si + 1, epoch=epoch + 1, train_loss=total / count,
                     val_loss=val_loss, lr=lr_now, seconds=secs))
            print(f"  {method} {fold['name']} stage {si + 1} epoch {epoch + 1}/{n_ep} train {total / count:.4f} "
                  f"val {val_loss:.4f} lr {lr_now:.2e} {secs:.1f}s{' best' if improved else ''}")
            save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                      stage=si, epoch=epoch, best_val=best_val, best_state=best_state, bad_epochs=bad,
                      rng=rng_state(gen)))
        if best_state is not None:  # the next stage (and the test) starts from the best model so far
            model.load_state_dict(best_state)
    return (evaluate(test) * y_std + y_mean).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# outputs: csv files, table, plots

def write_csv(path, rows, mode="w"):
    """mode 'w': whole file atomically (temp + rename); 'a': append rows, header only for a new file."""
    new = mode == "w" or not os.path.isfile(path)
    target = path + ".tmp" if mode == "w" else path
    with open(target, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    if mode == "w":
        os.replace(target, path)


def results_table(done, folds, y, names):
    """Per-fold rows, then mean and std over folds and the pooled score (all test frames at once) per method."""
    rows = []
    for m in names:
        per = []
        for u in (u for u in done if u["method"] == m):
            f = folds[u["fold"]]
            s = losses.regression_metrics(u["pred"], y[f["test"]])
            per.append(s)
            rows.append(dict(method=m, fold=f["name"], n_fit=len(f["fit"]), n_val=len(f["val"]),
                             n_test=len(f["test"]), r2=s["r2"], mae_km=s["mae"], rmse_km=s["rmse"]))
        if not per:
            continue
        for stat, fn in (("mean", np.nanmean), ("std", lambda a: np.nanstd(a, ddof=1) if len(a) > 1 else 0.0)):
            rows.append(dict(method=m, fold=stat, n_fit="", n_val="", n_test="",
                             **{c: float(fn([s[k] for s in per])) for c, k in
                                (("r2", "r2"), ("mae_km", "mae"), ("rmse_km", "rmse"))}))
        test, pred = pooled(done, folds, m)
        s = losses.regression_metrics(pred, y[test])
        rows.append(dict(method=m, fold="pooled", n_fit="", n_val="", n_test=len(test),
                         r2=s["r2"], mae_km=s["mae"], rmse_km=s["rmse"]))
    return rows


def pooled(done, folds, m):
    """All test indices and predictions of method m over the folds (each test frame once per fold)."""
    units = [u for u in done if u["method"] == m]
    return (np.concatenate([folds[u["fold"]]["test"] for u in units]),
            np.concatenate([u["pred"] for u in units]))


def print_table(rows):
    print(f"{'method':<9} {'fold':<10} {'R2':>7} {'MAE km':>8} {'RMSE km':>8}")
    summary = {}
    for r in rows:
        if r["fold"] == "std":
            summary[r["method"]] = r
            continue
        print(f"{r['method']:<9} {r['fold']:<10} {r['r2']:>7.3f} {r['mae_km']:>8.4f} {r['rmse_km']:>8.4f}")
    print("mean +- std over folds:")
    for r in rows:
        if r["fold"] == "mean":
            s = summary[r["method"]]
            print(f"{r['method']:<9} R2 {r['r2']:.3f} +- {s['r2']:.3f}   MAE {r['mae_km']:.4f} +- {s['mae_km']:.4f} km"
                  f"   RMSE {r['rmse_km']:.4f} +- {s['rmse_km']:.4f} km")


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
    norm_std)). --pretrained none: finetune and probe are skipped (nothing to fine-tune or probe) and
    scratch builds the encoder from model_size, normalised with each fold's own training statistics."""
    if not any(m != "trees" for m in names):
        return names, None
    if cfg["pretrained"] != "none":
        encoder, meta = mae.load_encoder(cfg["pretrained"])
        if meta["config"].get("width", width) != width:
            raise data.DataError(f"{cfg['pretrained']}: encoder expects profiles of width "
                                 f"{meta['config']['width']}, the labelled file has {width}")
        return names, dict(config=meta["config"], state=encoder.state_dict(),
                           norm_mean=meta["norm_mean"], norm_std=meta["norm_std"])
    skipped = [m for m in names if m in ("finetune", "probe")]
    if skipped:
        print(f"note: --pretrained none: skipping {', '.join(skipped)} (they need a pre-trained encoder)")
    if cfg["model_size"] not in mae.MODEL_SIZES:
        raise data.DataError(f"--model_size {cfg['model_size']!r}: expected one of {', '.join(mae.MODEL_SIZES)}")
    enc_cfg = mae.encoder_config(dict(mae.MODEL_SIZES[cfg["model_size"]], width=width))
    return [m for m in names if m not in skipped], dict(config=enc_cfg, state=None, norm_mean=None, norm_std=None)


def check_config(cfg):
    """Flags a user can get wrong, refused before anything is read or written."""
    problems = [(min(cfg["batch_size"], cfg["patience"], cfg["n_trees"], cfg["tree_depth"], cfg["tree_bins"]) < 1,
                 "--batch_size, --patience, --n_trees, --tree_depth and --tree_bins must be >= 1"),
                (min(cfg["epochs"], cfg["head_epochs"], cfg["gap"], cfg["val_gap"], cfg["warmup_epochs"]) < 0,
                 "--epochs, --head_epochs, --gap, --val_gap and --warmup_epochs must be >= 0"),
                (cfg["epochs"] + cfg["head_epochs"] < 1, "--epochs plus --head_epochs must be >= 1"),
                (cfg["n_blocks"] < 2, f"--n_blocks {cfg['n_blocks']}: must be >= 2"),
                (not 0 < cfg["val_frac"] < 1, f"--val_frac {cfg['val_frac']}: must be between 0 and 1"),
                (cfg["lr"] <= 0 or cfg["ft_lr"] <= 0 or cfg["grad_clip"] < 0,
                 "--lr and --ft_lr must be > 0, --grad_clip >= 0")]
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


def compare(cfg):
    t_start = time.time()
    check_config(cfg)
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    dev = mae.pick_device(cfg["device"])
    names = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise data.DataError(f"--methods {cfg['methods']!r}: expected a comma list of {', '.join(METHODS)}")
    path = cfg["data_path"] or data.default_cloud_paths()[1]
    d = data.load_clouds(path, labelled=True, max_samples=cfg["max_samples"])
    folds = make_folds(d, cfg)
    names, enc = load_encoder_source(cfg, names, d["images"].shape[1])
    if not names:
        raise data.DataError("nothing to run: every requested method needs a pre-trained encoder")
    print(f"{len(d['cbh_km'])} labelled profiles from {path}, {len(np.unique(d['flight']))} flights, "
          f"split {cfg['split']} ({len(folds)} folds), methods {', '.join(names)}, device {dev}")

    ckpt_path = os.path.join(cfg["out_dir"], "checkpoints", "latest.pth")
    log_path = os.path.join(cfg["out_dir"], "log.csv")
    same = lambda c: {k: v for k, v in c.items() if k not in ("resume", "device", "num_threads", "out_dir")}
    ck, done = None, []
    if cfg["resume"]:
        ck = data.load_checkpoint(cfg["resume"])
        if "done" not in ck or same(ck.get("config", {})) != same(cfg):
            raise data.DataError(f"{cfg['resume']}: not a finetune_cbh checkpoint of a run with these settings")
        done = ck["done"]
        trim_rows(log_path, ck.get("log_rows", 0))
    elif os.path.isfile(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log; --resume appends
    os.makedirs(cfg["out_dir"], exist_ok=True)
    log = lambda row: write_csv(log_path, [row], mode="a")

    t = dict(x=torch.as_tensor(d["images"], device=dev),  # (N, W) raw; each unit normalises
             ang=torch.as_tensor(np.stack([d["sza"] / 90.0, d["saa"] / 180.0], 1), device=dev),  # (N, 2) ~[-2, 2]
             y=torch.as_tensor(d["cbh_km"], device=dev))  # (N,) km
    feats = (profile_features(d["images"], d["flight"], d["frame"], d["sza"], d["saa"], cfg["tree_angles"])
             if "trees" in names else None)
    for m in names:
        for k, fold in enumerate(folds):
            if any(u["method"] == m and u["fold"] == k for u in done):
                continue  # finished before the interruption
            unit_seed = cfg["seed"] + 100 * k + METHODS.index(m)
            torch.manual_seed(unit_seed)
            np.random.seed(unit_seed)
            random.seed(unit_seed)
            t0 = time.time()
            save = lambda st: data.atomic_torch_save(dict(config=cfg, done=done, unit=(m, k),
                                                          log_rows=count_rows(log_path), **st), ckpt_path)
            if m == "trees":
                tree = gbrt_fit(feats[fold["fit"]], d["cbh_km"][fold["fit"]], cfg["n_trees"], cfg["tree_depth"],
                                cfg["tree_lr"], cfg["tree_min_leaf"], cfg["tree_bins"])
                pred = gbrt_predict(tree, feats[fold["test"]])
            else:
                unit_ck = ck if ck is not None and tuple(ck.get("unit") or ()) == (m, k) else None
                pred = train_network(m, fold, t, enc, cfg, dev, unit_seed, log, save, unit_ck)
            done.append(dict(method=m, fold=k, pred=np.asarray(pred, np.float64)))
            data.atomic_torch_save(dict(config=cfg, done=done, unit=None, log_rows=count_rows(log_path)), ckpt_path)
            s = losses.regression_metrics(pred, d["cbh_km"][fold["test"]])
            print(f"{m} {fold['name']}: R2 {s['r2']:.3f} MAE {s['mae']:.4f} km RMSE {s['rmse']:.4f} km "
                  f"({time.time() - t0:.1f}s)")

    rows = results_table(done, folds, d["cbh_km"], names)
    print_table(rows)
    write_csv(os.path.join(cfg["out_dir"], "results.csv"), rows)
    preds = [dict(method=u["method"], fold=folds[u["fold"]]["name"], flight=int(d["flight"][i]),
                  frame=int(d["frame"][i]), cbh_km=float(d["cbh_km"][i]), pred_km=float(p))
             for u in done for i, p in zip(folds[u["fold"]]["test"], u["pred"])]
    write_csv(os.path.join(cfg["out_dir"], "predictions.csv"), preds)
    plot_results(done, folds, d, names, os.path.join(cfg["out_dir"], "plots"))
    print(f"wrote {cfg['out_dir']}/results.csv, predictions.csv, log.csv, plots/ in {time.time() - t_start:.0f}s")


def main(argv=None):
    cfg = parse_config(argv)
    try:
        compare(cfg)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
