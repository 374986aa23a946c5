"""
Cloud base height (km) from 1D IR profiles, few labels: does pre-training on many unlabelled profiles help?

Compares on identical folds at several label budgets (a contiguous stretch of each training flight's labels):
  finetune  mae.py's MAE encoder + an MLP head: stage 1 trains the head (encoder frozen), stage 2 everything
  scratch   the same network and schedule from a random init (what pre-training buys)
  probe     a linear head on the frozen pre-trained encoder (what the features already know)
  trees     gradient-boosted regression trees (numpy) on per-profile features
  physics   a straight line on the surface-to-cloud-top contrast (the reference)
All share one label-free preprocessing (data.relative_profiles). Networks correct the physics line and stop
on a held-out TRAINING flight; test flights are scored in full. Protocol and choices: docs/cbh.md.

  python finetune_cbh.py                      # label-efficiency study (needs `python mae.py` first)
  python finetune_cbh.py --budgets 1          # the full-label comparison only
  python finetune_cbh.py --final finetune     # one model to use: out_dir/cbh_model.pth
  python finetune_cbh.py --predict flights.h5 --model outputs/finetune_cbh/cbh_model.pth   # CBH per frame
Outputs (out_dir): label_efficiency.csv, results.csv, predictions.csv, log.csv, plots/, checkpoints/latest.pth
"""
import math
import os
import re
import time

import matplotlib
matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import mae

# --- config ---
data_path = ''  # labelled HDF5 (images, metadata, cbh_km); '' = the embedded synthetic labelled file
out_dir = 'outputs/finetune_cbh'  # label_efficiency, results, predictions and log .csv, plots/, checkpoints/
pretrained = 'outputs/mae_pretrain/mae_encoder_pretrained.pth'  # encoder exported by mae.py, or 'none'
methods = 'finetune,scratch,probe,trees,physics'  # comma list of the methods to compare on identical folds
budgets = '0.05,0.1,0.25,1'  # label budgets: fractions of each training flight's labelled frames (comma list)
split = 'lofo'  # lofo (leave one flight out) | blocked (time blocks, gap) | random (leaky; seed's protocol)
n_folds = 5  # blocked: time blocks per flight (one fold each); random: number of folds
seeds = 3  # repeats of every network (method, budget, fold); seed s stops on another training flight
final = ''  # train ONE model of this method on every labelled flight and write out_dir/cbh_model.pth
predict = ''  # HDF5 cloud file (unlabelled OK): out_dir/cbh_pred_<stem>.h5 + per-flight plots (with --model)
model = ''  # a cbh_model.pth written by --final, for --predict
head_hidden = 128  # hidden units of the MLP head (finetune, scratch); the probe's head is linear
head_epochs = 10  # stage 1 epochs: head only, encoder frozen (the probe gets head_epochs + epochs of this)
epochs = 15  # stage 2 epochs: everything trains (finetune, scratch)
batch_size = 32  # profiles per step (an epoch is one pass over the labels, at least 256 profiles)
lr = 1e-3  # stage 1 peak LR (head only)
ft_lr = 2e-4  # stage 2 peak LR, lower so pre-trained features are adjusted, not overwritten
layer_decay = 0.75  # stage 2: LR scale = layer_decay^(depth + 1 - layer) as in MAE; 1.0 = off
weight_decay = 0.05  # AdamW weight decay (not on biases, norms, embeddings)
drop_path = 0.1  # stage 2 stochastic depth: the last encoder block's rate, rising linearly from 0
grad_clip = 1.0  # max global grad norm (0 = off)
patience = 5  # early stopping: epochs without a lower held-out error, counted per stage
n_trees = 100  # trees: boosting rounds (scikit-learn's default)
tree_depth = 5  # trees: depth of every tree
tree_lr = 0.1  # trees: shrinkage per tree
device = 'auto'  # auto (cuda > mps > cpu) | cpu | cuda | mps
cpu_bf16 = 'auto'  # CPU precision: on = bf16 autocast, off = fp32, auto = time both briefly, take the faster
seed = 1337  # every unit (method, budget, fold, seed) is seeded from this alone: order-independent
resume = ''  # out_dir/checkpoints/latest.pth of an interrupted comparison with the same settings
num_threads = 0  # torch CPU threads (0 = torch default)
# --- end config ---
METHODS = ("finetune", "scratch", "probe", "trees", "physics")
NETWORKS = ("finetune", "scratch", "probe")  # trained once per seed; trees and physics are deterministic
PAIRS = (("finetune", "scratch"), ("probe", "scratch"), ("finetune", "trees"), ("finetune", "physics"),
         ("probe", "trees"), ("probe", "physics"), ("scratch", "physics"))  # paired differences reported
FREE_ON_RESUME = ("resume", "device", "num_threads", "out_dir", "cpu_bf16")  # do not change a unit's result
MIN_EPOCH_SAMPLES = 256  # an epoch repeats shuffled passes to >= this many profiles: small budgets still step
WARMUP_EPOCHS = 1  # linear warmup at the start of each stage
MIN_LR_FRAC = 0.01  # the cosine decays to this fraction of the peak LR
HEAD_DROPOUT = 0.1  # dropout in the MLP head
SCRATCH_SIZE = "small"  # --pretrained none: the encoder size scratch builds (a key of mae.MODEL_SIZES)
TIE_RTOL = 1e-4  # per-flight MSEs closer than this (relative) are a tie, not a win: float32 rounding is ~1e-7
RESIDUAL = True  # correct the physics line (False: CBH directly); chosen by inner validation (docs/cbh.md)
ACF_THRESHOLD = 0.2  # blocked split: gap = the lag where the labels' autocorrelation first falls below this


def parse_config(argv=None):
    """argparse built from the constants block above, so `-h` lists every constant with its comment."""
    return data.parse_constants(os.path.abspath(__file__), __doc__.strip().split("\n")[0], globals(), argv)


# --- model: encoder from mae.py + a head that corrects the physics line ---

class CBHNet(nn.Module):
    def __init__(self, encoder, hidden):
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        self.head = nn.Linear(d, 1) if hidden == 0 else nn.Sequential(
            nn.Linear(d, hidden), nn.GELU(), nn.Dropout(HEAD_DROPOUT), nn.Linear(hidden, 1))
        for p in (self.head if hidden == 0 else self.head[-1]).parameters():
            nn.init.zeros_(p)  # a zero output layer: the untrained network predicts its physics line

    def forward(self, x, line):  # x (B, 1, W) normalised profiles, line (B,) standardised physics line
        return self.from_features(self.encoder.features(x), line)  # (B,)

    def from_features(self, h, line):  # h (B, D) encoder features -> (B,) standardised CBH
        with torch.autocast(h.device.type, enabled=False):  # tiny head in fp32: a bf16 output has ~3 digits
            return line + self.head(h.float()).squeeze(1)


def param_groups(model, wd, decay):
    """AdamW groups with MAE's layer-wise LR decay: embeddings are layer 0, block i layer i + 1, norm and head
    layer depth + 1; scale = decay^(depth + 1 - layer). No weight decay on 1-D, CLS, position parameters."""
    top = len(model.encoder.blocks) + 1  # the layer id of the final norm and the head
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block = re.match(r"encoder\.blocks\.(\d+)\.", name)
        embedding = name.startswith("encoder.") and not name.startswith("encoder.norm")
        layer = int(block.group(1)) + 1 if block else 0 if embedding else top
        no_wd = p.ndim < 2 or "pos" in name or "cls" in name
        g = groups.setdefault((layer, no_wd), dict(params=[], lr_scale=decay ** (top - layer),
                                                   weight_decay=0.0 if no_wd else wd))
        g["params"].append(p)
    return list(groups.values())


def get_lr(step, total, warmup, peak, min_lr):
    """Stage LR at `step` of `total`: linear warmup to peak over `warmup` steps, half-cosine to min_lr."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def build_network(method, enc, cfg):
    """CBHNet on the pre-trained encoder (finetune, probe) or on a random one of the same size (scratch)."""
    encoder = mae.build_encoder(enc["config"], drop_path=cfg["drop_path"])
    if method != "scratch":
        encoder.load_state_dict(enc["state"])
    return CBHNet(encoder, 0 if method == "probe" else cfg["head_hidden"])


# --- the shared label-free preprocessing, the physics line and the trees ---

def physics_feature(rel):
    """Surface-to-cloud-top contrast (N,) of relative profiles (N, W): cloud-top height via the lapse rate."""
    return np.maximum(rel.max(1), 0.0) - rel.min(1)  # clear-sky level (0) or warmer pixel, minus coldest


def physics_line(feature, y):
    """[a, b] of the least-squares line CBH = a * feature + b: the physics row, and the networks' start."""
    return np.polyfit(np.asarray(feature, np.float64), np.asarray(y, np.float64), 1).tolist()


def profile_features(rel):
    """Tree features (N, F) of relative profiles (N, W): level statistics, cross-track gradients, 4 segment
    means. No solar angles: they track the time of day and so identify a flight."""
    x = np.asarray(rel, np.float64)  # (N, W)
    pct = np.percentile(x, [5, 10, 25, 50, 75, 90, 95], axis=1).T  # (N, 7)
    mean, std = x.mean(1), x.std(1) + 1e-9
    skew = (((x - mean[:, None]) / std[:, None]) ** 3).mean(1)
    g, g2 = np.diff(x, axis=1), np.diff(x, 2, axis=1)  # (N, W-1), (N, W-2) cross-track gradients
    seg = [s.mean(1) for s in np.array_split(x, 4, axis=1)]  # 4 x (N,) cross-track shape
    return np.stack([mean, std, x.min(1), x.max(1), *pct.T, pct[:, 6] - pct[:, 0], skew,
                     np.abs(g).mean(1), g.std(1), np.abs(g).max(1), np.abs(g2).mean(1), *seg], 1)


def gbrt_fit(X, y, n_trees=100, depth=5, lr=0.1, min_leaf=1, max_bins=255):
    """Squared-loss gradient boosting, histogram splits, complete heaps of `depth` levels grown a level at a
    time (a node that cannot split sends all left). With <= max_bins + 1 unique values per feature it equals
    scikit-learn's GradientBoostingRegressor to float error (test_all.py; ties: lower feature index wins)."""
    X, y = np.asarray(X, np.float32).astype(np.float64), np.asarray(y, np.float64)
    edges = []  # per feature: midpoints between its unique values, or between max_bins + 1 quantiles
    for col in X.T:
        u = np.unique(col)
        u = np.unique(np.quantile(col, np.linspace(0, 1, max_bins + 1))) if len(u) > max_bins + 1 else u
        edges.append((u[:-1] + u[1:]) / 2)
    # bin b of a feature holds edges[b-1] <= x < edges[b], so "bin <= b" means "x < edges[b]"
    xb = np.stack([np.searchsorted(e, col, side="right") for e, col in zip(edges, X.T)], 1)  # (N, F)
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


# --- folds and label budgets: identical for every method ---

def make_folds(d, cfg):
    """[dict(name, train, test)] index arrays into the labelled set for the chosen split."""
    flight, frame, n_flights = d["flight"], d["frame"], len(np.unique(d["flight"]))
    need = 3 if cfg["split"] == "lofo" else 2  # a stopping flight and one to train on, beside any test flight
    if n_flights < need:
        raise data.DataError(f"{n_flights} flight(s) in the labelled file: --split {cfg['split']} needs at "
                             f"least {need} (networks stop on a held-out training flight)")
    if cfg["split"] == "lofo":
        return [dict(name=f"flight {fl}", train=tr, test=te) for fl, tr, te in data.split_lofo(flight)]
    if cfg["split"] == "blocked":
        folds = []
        for k in range(cfg["n_folds"]):
            tr = data.split_blocked(flight, frame, cfg["n_folds"], k, 0)[0]
            gap = data.decorrelation_lag(d["cbh_km"][tr], flight[tr], frame[tr], ACF_THRESHOLD)
            tr, te = data.split_blocked(flight, frame, cfg["n_folds"], k, gap)
            folds.append(dict(train=tr, test=te, name=f"block {k} (gap {gap})"))
        return folds
    print("warning: --split random puts neighbouring, strongly correlated frames in train and test; its "
          "scores are optimistic (kept only to compare with the seed's protocol)")
    return [dict(name=f"fold {k}", train=tr, test=te)
            for k, (tr, te) in enumerate(data.split_random(len(flight), cfg["n_folds"], cfg["seed"]))]


def budget_frames(train, flight, frame, budget):
    """Frames kept at a label budget: per training flight, ONE contiguous centred stretch of its n frames in
    time, max(1, round(budget * n)) long; budgets nest (real labels come as a stretch of lidar track)."""
    keep = []
    for fl in np.unique(flight[train]):
        idx = train[flight[train] == fl]
        idx, k = idx[np.argsort(frame[idx], kind="stable")], max(1, int(round(budget * len(idx))))
        keep.append(idx[(len(idx) - k) // 2:][:k])
    return np.sort(np.concatenate(keep))


def stopping_split(labelled, flight, fold_index, seed):
    """(fit, val): val is training flight (k + s) mod n (fold k, seed s), so stopping rewards transfer."""
    flights = np.unique(flight[labelled])
    val_fl = flights[(fold_index + seed) % len(flights)]
    return labelled[flight[labelled] != val_fl], labelled[flight[labelled] == val_fl]


# --- training one network ---

def target_stats(t, labelled):
    """Target mean/std and physics line of the labelled frames (fit + stopping flights: the physics row's)."""
    y, phys = t["y"][labelled].cpu().numpy(), t["phys"][labelled].cpu().numpy()
    line = physics_line(phys, y) if RESIDUAL and np.ptp(phys) > 0 else [0.0, float(y.mean())]  # direct
    return dict(y_mean=float(y.mean()), y_std=float(y.std()) + 1e-6, line=line)


def line_std(phys, stats):
    """The physics line's CBH for features phys (N,), in standardised target units."""
    a, b = stats["line"]
    return (a * phys + b - stats["y_mean"]) / stats["y_std"]


def epoch_batches(n, cfg, gen):
    """One epoch's shuffled index batches: enough passes over the n fit frames to reach MIN_EPOCH_SAMPLES."""
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(MIN_EPOCH_SAMPLES / n))])
    return order.split(cfg["batch_size"])


def frozen_features(encoder, x, rows, amp_dtype):
    """(2, N, D): frozen-encoder features of profiles x[rows] (x: (N, 1, W)) and of their mirror images (flip
    augment); other rows stay 0. Computed once per stage: the head then trains at a linear model's cost."""
    encoder.eval()
    out = torch.zeros(2, len(x), encoder.embed_dim, device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, amp_dtype, enabled=amp_dtype is not None):
        for i in range(0, len(rows), 4096):
            r = rows[i:i + 4096]
            out[0, r], out[1, r] = encoder.features(x[r]).float(), encoder.features(x[r].flip(-1)).float()
    return out


def predict_std(net, x, line, idx, amp_dtype, feats=None):
    """(len(idx),) standardised predictions for frames idx; from cached features when given."""
    net.eval()
    with torch.no_grad(), torch.autocast(x.device.type, amp_dtype, enabled=amp_dtype is not None):
        if feats is not None:
            return net.from_features(feats[0][idx], line[idx]).float()
        return torch.cat([net(x[idx[i:i + 4096]], line[idx[i:i + 4096]])
                          for i in range(0, len(idx), 4096)]).float()


def train_epoch(net, opt, scaler, batch, fit, cfg, gen, amp_dtype, lr_at, where):
    """One epoch over fit (index tensor) -> mean training loss; batch(idx, flip) -> (predictions, targets). A
    non-finite loss stops the run before its step (fp16 GradScaler: 20 in a row; it skips lone overflows)."""
    total, bad_run, batches = 0.0, 0, epoch_batches(len(fit), cfg, gen)
    for i, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(i) * g["lr_scale"]
        flip = torch.rand(len(b), generator=gen).to(fit.device) < 0.5  # (B,) mirror these profiles
        with torch.autocast(fit.device.type, amp_dtype, enabled=amp_dtype is not None):
            out, target = batch(fit[b.to(fit.device)], flip)
            loss = F.mse_loss(out.float(), target)
        value = loss.item()  # the running mean needs it anyway: checking it costs no extra sync
        bad_run = 0 if math.isfinite(value) else bad_run + 1
        if bad_run > (20 if scaler.is_enabled() else 0):
            raise data.NonFiniteLoss(data.nonfinite_message(f"finetune_cbh.py, {where}",
                                                            i - bad_run + 2, i + 1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        total += value if math.isfinite(value) else 0.0
    return total / len(batches)


def train_network(method, fit, val, t, enc, cfg, amp, unit_seed, log):
    """Two-stage training on fit; each stage ends at its lowest-MSE epoch on val (a held-out training flight);
    the next starts there. amp: (autocast dtype or None, use GradScaler) -> (net, target stats, that MSE)."""
    torch.manual_seed(unit_seed)
    gen = torch.Generator().manual_seed(unit_seed)
    fit, val = (torch.as_tensor(i, device=t["x"].device) for i in (fit, val))
    stats = target_stats(t, torch.cat([fit, val]))  # the physics row's line: a 2-number fit wants all flights
    target, line = (t["y"] - stats["y_mean"]) / stats["y_std"], line_std(t["phys"], stats)  # (N,) each
    net = build_network(method, enc, cfg).to(t["x"].device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp[1])
    best = dict(mse=math.inf, state=None)
    n_steps = len(epoch_batches(len(fit), cfg, torch.Generator()))  # per epoch
    stages = ([(cfg["head_epochs"] + cfg["epochs"], cfg["lr"], False)] if method == "probe" else  # head only
              [(cfg["head_epochs"], cfg["lr"], False), (cfg["epochs"], cfg["ft_lr"], True)])  # scratch too
    for si, (n_epochs, peak, train_enc) in enumerate(stages):  # (epochs, peak LR, train the encoder)
        net.encoder.requires_grad_(train_enc)
        opt = torch.optim.AdamW(param_groups(net, cfg["weight_decay"],
                                             cfg["layer_decay"] if train_enc else 1.0), lr=peak)
        feats = None if train_enc else frozen_features(net.encoder, t["x"], torch.cat([fit, val]), amp[0])

        def batch(idx, flip):
            lb, yb = line[idx], target[idx]  # (B,) each: the batch's physics line and target
            if feats is None:
                return net(torch.where(flip[:, None, None], t["x"][idx].flip(-1), t["x"][idx]), lb), yb
            return net.from_features(torch.where(flip[:, None], feats[1][idx], feats[0][idx]), lb), yb
        bad_epochs = 0
        for epoch in range(n_epochs):
            if bad_epochs >= cfg["patience"]:
                break
            t0, where = time.time(), f"{method} seed {unit_seed} stage {si + 1} epoch {epoch + 1}"
            lr_at = lambda i: get_lr(epoch * n_steps + i, n_epochs * n_steps, WARMUP_EPOCHS * n_steps, peak,
                                      MIN_LR_FRAC * peak)
            net.train()
            net.encoder.train(train_enc)  # a frozen encoder stays in eval mode (no dropout, no drop path)
            train_loss = train_epoch(net, opt, scaler, batch, fit, cfg, gen, amp[0], lr_at, where)
            err = predict_std(net, t["x"], line, val, amp[0], feats) - target[val]
            mse = float((err ** 2).mean()) * stats["y_std"] ** 2  # km^2
            if not math.isfinite(mse):
                raise data.NonFiniteLoss(f"finetune_cbh.py, {where}: the held-out error is not finite; "
                                         "lower --lr or --ft_lr, or keep --grad_clip on")
            bad_epochs = 0 if mse < best["mse"] else bad_epochs + 1
            if mse < best["mse"]:
                best = dict(mse=mse, state={k: v.detach().clone() for k, v in net.state_dict().items()})
            log(dict(stage=si + 1, epoch=epoch + 1, train_loss=train_loss, val_mse_km2=mse,
                     lr=lr_at(n_steps - 1), seconds=round(time.time() - t0, 3)))
        if best["state"] is not None:
            net.load_state_dict(best["state"])
    return net, stats, best["mse"]


def network_km(net, stats, t, idx, amp_dtype):
    """CBH (len(idx),) in km, numpy, of frames idx."""
    idx = torch.as_tensor(idx, device=t["x"].device)
    out = predict_std(net, t["x"], line_std(t["phys"], stats), idx, amp_dtype)
    return (out * stats["y_std"] + stats["y_mean"]).cpu().numpy().astype(np.float64)


def amp_policy(dev, cfg, t, enc, stored=None):
    """(autocast dtype or None, use GradScaler): CUDA's policy; on the CPU `stored` (bf16/fp32: what a resumed
    run or a saved model chose) or data.choose_cpu_dtype timing training steps of the network."""
    if dev.type != "cpu":
        return data.cuda_autocast(dev)
    if stored:
        return (torch.bfloat16 if stored == "bf16" else None), False
    net = build_network("scratch", enc, cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters())
    idx = torch.arange(min(cfg["batch_size"], len(t["y"])), device=dev)

    def step(dtype):
        with torch.autocast(dev.type, dtype or torch.float32, enabled=dtype is not None):
            loss = F.mse_loss(net(t["x"][idx], t["phys"][idx] * 0).float(), t["y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dtype, msg = data.choose_cpu_dtype(cfg["cpu_bf16"], step)  # random draws here do not matter: units reseed
    print(msg)
    return dtype, False


# --- data flow: inputs, units ---

def parse_list(cfg):
    """(methods, budgets) from the comma lists; one line naming the flag when they are wrong."""
    names = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    if not names or any(m not in METHODS for m in names):
        raise data.DataError(f"--methods {cfg['methods']!r}: expected a comma list of {', '.join(METHODS)}")
    try:
        budgets = sorted({float(b) for b in cfg["budgets"].split(",") if b.strip()})
    except ValueError:
        budgets = []
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise data.DataError(f"--budgets {cfg['budgets']!r}: expected a comma list of fractions in (0, 1]")
    return names, budgets


def load_encoder_source(cfg, width):
    """dict(config, state, norm (mean, std), flat_field) of the encoder the networks start from; state None =
    --pretrained none (scratch builds SCRATCH_SIZE, normalised with the labelled file's own statistics)."""
    if cfg["pretrained"] == "none":
        enc_cfg = mae.encoder_config(dict(mae.MODEL_SIZES[SCRATCH_SIZE], width=width, in_chans=1))
        return dict(config=enc_cfg, state=None, norm=None, flat_field=None)
    encoder, meta = mae.load_encoder(cfg["pretrained"])
    if meta["config"].get("width", width) != width:
        raise data.DataError(f"{cfg['pretrained']}: encoder expects profiles of width "
                             f"{meta['config']['width']}, the labelled file has {width}")
    if meta["input"] != "relative":
        raise data.DataError(f"{cfg['pretrained']}: encoder was pre-trained on --input {meta['input']}; "
                             "CBH needs --input relative (mae.py's default): pre-train again")
    norm = tuple(float(np.ravel(meta[k])[0]) for k in ("norm_mean", "norm_std"))
    return dict(meta, state=encoder.state_dict(), norm=norm)


def preprocess(d, gain, where):
    """Shared label-free preprocessing: rel (N, W), phys (N,), features (N, F), flat-field gain (W,) used."""
    gain = data.flat_field(d["images"], where) if gain is None else np.asarray(gain, np.float64)
    rel = data.relative_profiles(d["images"], d["flight"], gain, where)
    return dict(rel=rel, phys=physics_feature(rel), features=profile_features(rel), gain=gain)


def network_tensors(prep, norm, dev, y=None):
    """What every network shares, on dev: x (N, 1, W) relative profiles normalised with norm = (mean, std)
    (the encoder's, from unlabelled profiles; None: these profiles' own), phys (N,) and y (N,) CBH in km."""
    x = prep["rel"][:, None]  # (N, 1, W)
    norm = norm or tuple(float(np.ravel(v)[0]) for v in data.norm_stats(x))
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=dev)
    return dict(x=as_tensor((x - norm[0]) / norm[1]), norm=norm, phys=as_tensor(prep["phys"]),
                y=None if y is None else as_tensor(y))


def load_inputs(cfg, dev):
    """Labelled data, its preprocessing, folds, methods, budgets, the encoder source and network tensors."""
    names, budgets = parse_list(cfg)
    path = cfg["data_path"] or data.default_cloud_paths()[1]
    d = data.load_clouds(path, labelled=True, drop_unlabelled=True)
    folds = make_folds(d, cfg)
    enc = load_encoder_source(cfg, d["images"].shape[1])
    if enc["state"] is None and {"finetune", "probe"} & set(names):
        print("note: --pretrained none: skipping finetune and probe (they need a pre-trained encoder)")
        names = [m for m in names if m not in ("finetune", "probe")]
    prep = preprocess(d, enc["flat_field"], path)  # the encoder's flat field (unlabelled profiles) if any
    t = network_tensors(prep, enc["norm"], dev, d["cbh_km"]) if set(names) & set(NETWORKS) else None
    print(f"{len(d['cbh_km'])} labelled profiles from {path}, {len(np.unique(d['flight']))} flights; split "
          f"{cfg['split']} ({len(folds)} folds); budgets {', '.join(f'{b:g}' for b in budgets)}; methods "
          f"{', '.join(names)}; device {dev}")
    return d, prep, folds, names, budgets, enc, t


def units(names, budgets, folds, cfg):
    """Every (method, budget index, fold index, seed): networks once per seed, trees and physics once."""
    return [(m, b, k, s) for b in range(len(budgets)) for m in names
            for s in range(cfg["seeds"] if m in NETWORKS else 1) for k in range(len(folds))]


def run_unit(unit, folds, budgets, d, prep, t, enc, cfg, amp, log):
    """One (method, budget, fold, seed) -> dict(method, budget, fold, seed, pred (n_test,) km, inner_mse (the
    stopping flight's MSE in km^2, networks only), n_labels). Seeded on its own: order does not matter."""
    m, b, k, s = unit
    fold, y, X = folds[k], d["cbh_km"], prep["features"]
    labelled = budget_frames(fold["train"], d["flight"], d["frame"], budgets[b])
    inner = float("nan")
    if m == "trees":
        tree = gbrt_fit(X[labelled], y[labelled], cfg["n_trees"], cfg["tree_depth"], cfg["tree_lr"])
        pred = gbrt_predict(tree, X[fold["test"]])
    elif m == "physics":
        pred = np.polyval(physics_line(prep["phys"][labelled], y[labelled]), prep["phys"][fold["test"]])
    else:
        fit, val = stopping_split(labelled, d["flight"], k, s)
        unit_seed = cfg["seed"] + 100 * k + 10 * METHODS.index(m) + 10_000 * s
        where = lambda row: log(dict(method=m, budget=budgets[b], fold=fold["name"], seed=s, **row))
        net, stats, inner = train_network(m, fit, val, t, enc, cfg, amp, unit_seed, where)
        pred = network_km(net, stats, t, fold["test"], amp[0])
    return dict(method=m, budget=b, fold=k, seed=s, pred=np.asarray(pred, np.float64), inner_mse=inner,
                n_labels=len(labelled))


def load_resume(cfg, log_path, data_hash):
    """Checkpoint of an interrupted comparison with these settings and data_hash, or None (fresh run)."""
    if not cfg["resume"]:
        return None
    ck, data_name = data.load_checkpoint(cfg["resume"]), cfg["data_path"] or "the embedded labelled file"
    same = lambda c: {k: v for k, v in c.items() if k not in FREE_ON_RESUME}
    if ck.get("kind") != "cbh_comparison" or same(ck["config"]) != same(cfg):
        raise data.DataError(f"{cfg['resume']}: not a checkpoint of a finetune_cbh.py comparison with these "
                             "settings (older comparisons: check out the commit that made them)")
    if ck.get("data_hash", data_hash) != data_hash:
        raise data.DataError(f"{cfg['resume']}: {data_name} does not hold the frames this comparison ran on "
                             "(their fingerprint differs); resume with its data")
    data.keep_first_rows(log_path, ck["log_rows"])  # back to the checkpoint's rows: no epoch logged twice
    return ck


# --- outputs: tables, csv files, plots ---

def pooled(done, folds, m, b, seed=None):
    """(test indices, predictions) of method m at budget index b over folds: one seed's or the seed mean."""
    tests, preds = [], []
    for k, f in enumerate(folds):
        p = [u["pred"] for u in done
             if (u["method"], u["budget"], u["fold"]) == (m, b, k) and seed in (None, u["seed"])]
        if p:
            tests.append(f["test"])
            preds.append(np.mean(p, axis=0))
    return np.concatenate(tests), np.concatenate(preds)


def method_row(done, folds, d, m, b):
    """Pooled scores of method m at budget b: mean and std over seeds, the seed-mean predictions' R2
    (committee) and the mean inner-validation MSE (what stopped the networks: not a test score)."""
    y, done_mb = d["cbh_km"], [u for u in done if (u["method"], u["budget"]) == (m, b)]
    seeds = sorted({u["seed"] for u in done_mb})
    per_seed = [losses.regression_metrics(p, y[test])
                for s in seeds for test, p in [pooled(done, folds, m, b, s)]]
    test, committee = pooled(done, folds, m, b)
    inner = [u["inner_mse"] for u in done_mb if math.isfinite(u["inner_mse"])]
    row = dict(method=m)
    for c, k in (("r2", "r2"), ("mae_km", "mae"), ("rmse_km", "rmse")):
        v = [s[k] for s in per_seed]
        row.update({c: float(np.mean(v)), c + "_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0})
    return dict(row, committee_r2=losses.regression_metrics(committee, y[test])["r2"],
                inner_val_mse_km2=float(np.mean(inner)) if inner else "")


def pair_row(done, folds, d, a, c, b):
    """a - c at budget b: pooled R2 difference of seed-mean predictions, 95% block-bootstrap intervals keeping
    the test flights (r2_lo/hi) or resampling them (_flights), flights where a has lower / higher MSE."""
    test, pa = pooled(done, folds, a, b)
    _, pc = pooled(done, folds, c, b)
    y, flight, frame = d["cbh_km"][test], d["flight"][test], d["frame"][test]
    mse_a, mse_c = (np.array([np.mean((p - y)[flight == f] ** 2) for f in np.unique(flight)])
                    for p in (pa, pc))
    tie = np.isclose(mse_a, mse_c, rtol=TIE_RTOL, atol=0)
    diff, lo, hi = losses.block_bootstrap_diff(y, pa, pc, flight, frame)
    _, flo, fhi = losses.block_bootstrap_diff(y, pa, pc, flight, frame, resample_groups=True)
    return dict(method=f"{a} - {c}", r2=diff, r2_lo=lo, r2_hi=hi, r2_lo_flights=flo, r2_hi_flights=fhi,
                flights_better=int(np.sum((mse_a < mse_c) & ~tie)),
                flights_worse=int(np.sum((mse_a > mse_c) & ~tie)))


def efficiency_rows(done, folds, budgets, d, names):
    """label_efficiency.csv: per budget, one row per method (method_row) and one per pair (pair_row)."""
    rows, pairs = [], [(a, c) for a, c in PAIRS if a in names and c in names]
    for b, budget in enumerate(budgets):
        n_labels = np.mean([u["n_labels"] for u in done if u["budget"] == b])
        head = dict(budget=budget, labelled_frames=int(round(n_labels)))
        rows += [dict(head, **method_row(done, folds, d, m, b)) for m in names]
        rows += [dict(head, **pair_row(done, folds, d, a, c, b)) for a, c in pairs]
    return rows


def print_table(rows):
    for r in rows:
        if " - " not in r["method"]:
            print(f"budget {r['budget']:g} ({r['labelled_frames']} labels) {r['method']:<9} pooled R2 "
                  f"{r['r2']:.3f} +- {r['r2_std']:.3f}  MAE {r['mae_km']:.3f} +- {r['mae_km_std']:.3f} km")
        else:
            print(f"  {r['method']:<19} {r['r2']:+.3f} (95%, flights resampled {r['r2_lo_flights']:+.3f} .. "
                  f"{r['r2_hi_flights']:+.3f}); better on {r['flights_better']}, worse on "
                  f"{r['flights_worse']} flights")


def unit_rows(done, folds, budgets, d):
    """results.csv: the score of every unit (method, budget, fold, seed) on its test flight."""
    rows = []
    for u in done:
        s = losses.regression_metrics(u["pred"], d["cbh_km"][folds[u["fold"]]["test"]])
        rows.append(dict(method=u["method"], budget=budgets[u["budget"]], fold=folds[u["fold"]]["name"],
                         seed=u["seed"], labelled_frames=u["n_labels"], n_test=len(u["pred"]), r2=s["r2"],
                         mae_km=s["mae"], rmse_km=s["rmse"], inner_val_mse_km2=u["inner_mse"]))
    return rows


def prediction_rows(done, folds, budgets, d, names):
    """predictions.csv: per method, budget and test frame, the mean over seeds and its spread."""
    rows = []
    for b, budget in enumerate(budgets):
        for m in names:
            for k, f in enumerate(folds):
                p = np.array([u["pred"] for u in done if (u["method"], u["budget"], u["fold"]) == (m, b, k)])
                rows += [dict(method=m, budget=budget, fold=f["name"], flight=int(d["flight"][i]),
                              frame=int(d["frame"][i]), cbh_km=float(d["cbh_km"][i]),
                              pred_km=float(p[:, j].mean()), pred_seed_std_km=float(p[:, j].std()))
                         for j, i in enumerate(f["test"])]
    return rows


def plot_efficiency(rows, names, path):
    """Left: pooled R2 vs labelled frames (log axis), a line per method, networks' band +- 1 std over seeds,
    physics dashed. Right: finetune - scratch and probe - scratch with the flights-resampled 95% interval."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    col = lambda r, c: np.array([x[c] for x in r], float)
    for m in [*names, "finetune - scratch", "probe - scratch"]:
        r, pair = [x for x in rows if x["method"] == m], int(" - " in m)  # pairs go right
        if r:
            n, mu = col(r, "labelled_frames"), col(r, "r2")
            axes[pair].plot(n, mu, "k--" if m == "physics" else "o-", label=m)
            lo, hi = ((col(r, "r2_lo_flights"), col(r, "r2_hi_flights")) if pair else
                      (mu - col(r, "r2_std"), mu + col(r, "r2_std")))
            if pair or m in NETWORKS:
                axes[pair].fill_between(n, lo, hi, alpha=0.2)
    axes[1].axhline(0, color="k", lw=0.8)
    ticks = sorted({x["labelled_frames"] for x in rows})  # the budgets: log-axis minor labels collide
    for ax, ylabel, title in zip(axes, ("pooled R2 on unseen flights", "R2 difference"),
                                 ("label efficiency (band: +- 1 std over seeds)",
                                  "pre-trained minus scratch (band: 95%, flights resampled)")):
        ax.set(xscale="log", xlabel="labelled training frames per fold", ylabel=ylabel, title=title)
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.minorticks_off()
        if ax.get_legend_handles_labels()[0]:  # no pair without scratch
            ax.legend(fontsize=8)
    fig.tight_layout()
    data.atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_pred_vs_true(done, folds, d, names, b, path):
    """Predicted vs lidar CBH per method at budget b, coloured by test flight (the flights' errors differ)."""
    y, flight = d["cbh_km"], d["flight"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    lim = (0, float(y.max()) * 1.1)
    for ax, m in zip(axes[0], names):
        test, pred = pooled(done, folds, m, b)
        ax.scatter(y[test], pred, c=flight[test], s=5, cmap="tab10")
        ax.plot(lim, lim, "k--", lw=1)
        ax.set(xlim=lim, ylim=lim, xlabel="lidar CBH (km)", ylabel="predicted CBH (km)",
               title=f"{m}: R2 {losses.regression_metrics(pred, y[test])['r2']:.2f}")
    fig.tight_layout()
    data.atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def report(done, folds, budgets, d, names, out_dir):
    """Write label_efficiency.csv, results.csv, predictions.csv and plots/; returns the efficiency rows."""
    rows = efficiency_rows(done, folds, budgets, d, names)
    print_table(rows)
    data.atomic_write_csv(os.path.join(out_dir, "label_efficiency.csv"), rows)
    data.atomic_write_csv(os.path.join(out_dir, "results.csv"), unit_rows(done, folds, budgets, d))
    data.atomic_write_csv(os.path.join(out_dir, "predictions.csv"),
                          prediction_rows(done, folds, budgets, d, names))
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plot_efficiency(rows, names, os.path.join(plot_dir, "label_efficiency.png"))
    plot_pred_vs_true(done, folds, d, names, len(budgets) - 1, os.path.join(plot_dir, "pred_vs_true.png"))
    return rows


def compare(cfg, dev):
    t_start = time.time()
    d, prep, folds, names, budgets, enc, t = load_inputs(cfg, dev)
    ckpt_path = os.path.join(cfg["out_dir"], "checkpoints", "latest.pth")
    log_path = os.path.join(cfg["out_dir"], "log.csv")
    data_hash = data.fingerprint(d["images"], d["metadata"], d["cbh_km"])
    ck = load_resume(cfg, log_path, data_hash)
    data.claim_out_dir(cfg["out_dir"])
    amp = amp_policy(dev, cfg, t, enc, ck and ck["cpu_autocast"]) if t is not None else (None, False)
    cpu_autocast = ("bf16" if amp[0] else "fp32") if dev.type == "cpu" else None
    done, log_rows = (ck["done"], ck["log_rows"]) if ck else ([], 0)
    save = lambda **extra: data.atomic_torch_save(
        dict(kind="cbh_comparison", config=cfg, done=done, log_rows=log_rows, cpu_autocast=cpu_autocast,
             data_hash=data_hash, complete=False) | extra, ckpt_path)
    for unit in units(names, budgets, folds, cfg):
        if any((u["method"], u["budget"], u["fold"], u["seed"]) == unit for u in done):
            continue  # finished before the interruption
        t0, rows = time.time(), []
        u = run_unit(unit, folds, budgets, d, prep, t, enc, cfg, amp, rows.append)
        log_rows = data.append_csv(log_path, rows)  # log first: a kill before save() reruns the unit, trimmed
        done.append(u)
        save()
        s = losses.regression_metrics(u["pred"], d["cbh_km"][folds[u["fold"]]["test"]])
        print(f"{u['method']} budget {budgets[u['budget']]:g} {folds[u['fold']]['name']} "
              f"seed {u['seed']}: R2 {s['r2']:.3f} MAE {s['mae']:.4f} km ({time.time() - t0:.1f}s)")
    rows = report(done, folds, budgets, d, names, cfg["out_dir"])
    full = {r["method"]: dict(r2=r["r2"], mae_km=r["mae_km"], rmse_km=r["rmse_km"]) for r in rows
            if r["budget"] == 1.0 and " - " not in r["method"]}
    save(complete=True, full_label_scores=full)
    print(f"wrote {cfg['out_dir']}/label_efficiency.csv, results.csv, predictions.csv, log.csv, plots/ in "
          f"{time.time() - t_start:.0f}s")


# --- the final model (--final) and CBH for new files (--predict) ---

FINAL_FREE = (*FREE_ON_RESUME, "methods", "budgets", "seeds", "final", "predict", "model")  # not the model's


def cross_validated(cfg, method, data_hash):
    """The method's full-label pooled scores from the COMPLETED comparison in out_dir with these settings
    (paths as given) and data (by content), else 'not cross-validated'; an incomplete one is refused."""
    path = os.path.join(cfg["out_dir"], "checkpoints", "latest.pth")
    ck = data.load_checkpoint(path) if os.path.isfile(path) else {}
    if ck.get("kind") != "cbh_comparison":
        return "not cross-validated"
    if not ck["complete"]:
        raise data.DataError(f"{path}: the comparison in {cfg['out_dir']} is incomplete; finish it with "
                             f"--resume {path} (or pass another --out_dir) before --final")
    score, same = ck["full_label_scores"].get(method), lambda c: {k: c[k] for k in c if k not in FINAL_FREE}
    if score is None or same(ck["config"]) != same(cfg) or ck["data_hash"] != data_hash:
        return "not cross-validated"
    return dict(split=ck["config"]["split"], **score)


def train_final(cfg, dev):
    """Train one model (one seed) of method --final on all labelled flights (networks stop on the last one)
    and write out_dir/cbh_model.pth: all --predict needs, with the comparison's cross-validated scores."""
    method = cfg["final"]
    path = cfg["data_path"] or data.default_cloud_paths()[1]
    d = data.load_clouds(path, labelled=True, drop_unlabelled=True)
    enc = load_encoder_source(cfg, d["images"].shape[1])
    if method in ("finetune", "probe") and enc["state"] is None:
        raise data.DataError(f"--final {method} needs a pre-trained encoder (--pretrained)")
    cv = cross_validated(cfg, method, data.fingerprint(d["images"], d["metadata"], d["cbh_km"]))
    prep, y = preprocess(d, enc["flat_field"], path), d["cbh_km"]
    saved = dict(kind="cbh_model", method=method, width=d["images"].shape[1],
                 flat_field=prep["gain"].tolist(), cv=cv, data_path=path,
                 flights=sorted(int(f) for f in np.unique(d["flight"])))
    if method == "trees":
        saved["trees"] = gbrt_fit(prep["features"], y, cfg["n_trees"], cfg["tree_depth"], cfg["tree_lr"])
    elif method == "physics":
        saved["line"] = physics_line(prep["phys"], y)
    else:
        if len(np.unique(d["flight"])) < 2:
            raise data.DataError(f"--final {method} needs 2 flights or more (the last stops training)")
        last = d["flight"] == d["flight"].max()
        t = network_tensors(prep, enc["norm"], dev, y)
        amp = amp_policy(dev, cfg, t, enc)
        log = lambda r: print(f"  {method} stage {r['stage']} epoch {r['epoch']} MSE {r['val_mse_km2']:.4f}")
        net, stats, _ = train_network(method, np.flatnonzero(~last), np.flatnonzero(last), t, enc, cfg, amp,
                                      cfg["seed"], log)
        saved.update(state=net.state_dict(), stats=stats, encoder_config=enc["config"], norm=t["norm"],
                     head_hidden=0 if method == "probe" else cfg["head_hidden"],
                     cpu_autocast="bf16" if dev.type == "cpu" and amp[0] is torch.bfloat16 else "fp32")
    out = os.path.join(cfg["out_dir"], "cbh_model.pth")
    data.claim_out_dir(cfg["out_dir"])
    data.atomic_torch_save(saved, out)
    print(f"wrote {out}: {method} on flights {saved['flights']}; cross-validated: {cv}")


def load_cbh_model(path):
    m = data.load_checkpoint(path)
    if (m.get("kind") != "cbh_model" or "flat_field" not in m
            or "norm" not in m and m.get("method") in NETWORKS):
        raise data.DataError(f"{path}: not a CBH model of this finetune_cbh.py (write one with --final; "
                             "older models: check out the commit that made them)")
    return m


def predict_km(m, d, dev, where):
    """CBH (km, clipped to 0..MAX_CBH_KM) of every frame of d by the saved model m, after the training's
    preprocessing (its stored flat field; each flight's level from the file's own profiles)."""
    prep = preprocess(d, m["flat_field"], where)
    if m["method"] == "trees":
        pred = gbrt_predict(m["trees"], prep["features"])
    elif m["method"] == "physics":
        pred = np.polyval(m["line"], prep["phys"])
    else:
        net = CBHNet(mae.build_encoder(m["encoder_config"]), m["head_hidden"]).to(dev)
        net.load_state_dict(m["state"])
        t = network_tensors(prep, m["norm"], dev)
        amp = amp_policy(dev, None, None, None, stored=m["cpu_autocast"])[0]  # as trained (CUDA: bf16/fp16)
        pred = network_km(net, m["stats"], t, np.arange(len(prep["phys"])), amp)
    return np.clip(pred, 0.0, data.MAX_CBH_KM).astype(np.float32)


def predict_file(cfg, dev):
    """--predict FILE --model cbh_model.pth: out_dir/cbh_pred_<stem>.h5 (cbh_pred_km (N,), a copy of metadata)
    and one plot per flight. FILE needs no labels (lidar CBH is drawn where valid) and is only read."""
    if not cfg["model"]:
        raise data.DataError("--predict needs --model PATH (a cbh_model.pth written by --final)")
    m = load_cbh_model(cfg["model"])
    path = cfg["predict"]
    d = data.load_clouds(path)
    if d["images"].shape[1] != m["width"]:
        raise data.DataError(f"{path}: profiles are {d['images'].shape[1]} px wide, the model {cfg['model']} "
                             f"was trained on {m['width']} px")
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cfg["out_dir"], f"cbh_pred_{stem}.h5")
    if os.path.abspath(out) == os.path.abspath(path):
        raise data.DataError(f"{path}: the output would overwrite the input; pass another --out_dir")
    data.claim_output_of(cfg["out_dir"], os.path.join(cfg["out_dir"], f"cbh_pred_{stem}.input.txt"), path)
    t0 = time.time()
    pred = predict_km(m, d, dev, path)
    secs = time.time() - t0
    data.write_cbh_predictions(out, pred, d["metadata"])
    try:  # labels are optional here: draw them when the file has valid ones
        d["cbh_km"] = data.load_clouds(path, labelled=True)["cbh_km"]
    except data.DataError:
        pass
    plot_flights(d, pred, m, stem, os.path.join(cfg["out_dir"], "plots"))
    print(f"wrote {out}: {len(pred)} frames in {secs:.2f}s ({m['method']} model {cfg['model']}), plots in "
          f"{cfg['out_dir']}/plots/cbh_{stem}_flight_*.png")


def plot_flights(d, pred, m, stem, plot_dir):
    """Predicted CBH along each flight (frame index), lidar CBH where the file has it, and the model's
    cross-validated MAE as a band, so nobody reads the final model as better than its LOFO score."""
    os.makedirs(plot_dir, exist_ok=True)
    cv = m["cv"] if isinstance(m["cv"], dict) else None  # else the text "not cross-validated"
    score = f"{cv['split']} cross-validated R2 {cv['r2']:.2f}, MAE {cv['mae_km']:.3f} km" if cv else m["cv"]
    for fl in np.unique(d["flight"]):
        sel = np.flatnonzero(d["flight"] == fl)
        sel = sel[np.argsort(d["frame"][sel], kind="stable")]
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.plot(d["frame"][sel], pred[sel], lw=0.8, color="tab:blue", label=f"predicted ({m['method']})")
        if cv:
            ax.fill_between(d["frame"][sel], pred[sel] - cv["mae_km"], pred[sel] + cv["mae_km"], alpha=0.2,
                            color="tab:blue", lw=0, label=f"+- cross-validated MAE {cv['mae_km']:.3f} km")
        if "cbh_km" in d:
            ax.plot(d["frame"][sel], d["cbh_km"][sel], ".", ms=3, color="k", label="lidar CBH")
        ax.set(xlabel="frame", ylabel="cloud base height (km)", title=f"{stem}, flight {fl}: {score}")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        data.atomic_savefig(fig, os.path.join(plot_dir, f"cbh_{stem}_flight_{fl}.png"), dpi=100)
        plt.close(fig)


# --- main ---

def check_config(cfg):
    """Flags a user can get wrong, refused in one line before anything is read or written."""
    data.check_choice(cfg, "split", ("lofo", "blocked", "random"))
    data.check_choice(cfg, "cpu_bf16", ("auto", "on", "off"))
    if cfg["final"]:
        data.check_choice(cfg, "final", METHODS)
    data.check_range(cfg, "batch_size patience seeds n_trees tree_depth", 1)
    data.check_range(cfg, "epochs head_epochs head_hidden weight_decay grad_clip", 0)
    data.check_range(cfg, "n_folds", 2)
    data.check_range(cfg, "lr ft_lr", 0, lo_open=True)
    data.check_range(cfg, "layer_decay tree_lr", 0, 1, lo_open=True)
    data.check_range(cfg, "drop_path", 0, 1, hi_open=True)
    if cfg["epochs"] + cfg["head_epochs"] < 1:
        raise data.DataError("--epochs plus --head_epochs must be >= 1")
    parse_list(cfg)


def run(cfg):
    check_config(cfg)
    data.check_out_dir(cfg["out_dir"])  # unwritable, or held by a live run: refused before any work
    dev = data.pick_device(cfg["device"])
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    if cfg["predict"]:
        predict_file(cfg, dev)
    elif cfg["final"]:
        train_final(cfg, dev)
    else:
        data.check_run_folder(cfg["out_dir"], cfg["resume"])  # one run per folder: never merged or deleted
        compare(cfg, dev)


def main(argv=None):
    cfg = parse_config(argv)
    data.run_stage(lambda: run(cfg))  # bad input: one line, exit 2; a non-finite loss: exit 3


if __name__ == "__main__":
    main()
