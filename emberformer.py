"""
emberformer.py: next-step wildfire spread. Given the fire masks of the last 1..K frames, the static
landscape channels and the wind so far, predict the burned-area mask of the next frame at full resolution.

Model (hand-written, plain PyTorch):
  1. tokens: the grid is cut into P x P patches; the token of a patch at frame t embeds the patch's fire
     pixels, its static pixels and that frame's wind, plus a sinusoidal encoding of the frame's AGE
     (0 = the current frame), so right-padding the history never moves a real frame's encoding.
  2. temporal transformer over each patch's own history with a key-padding mask; the output at the
     LAST REAL frame (lengths - 1, not position K - 1) is the patch feature -> a (B, 96, H/P, W/P) grid.
  3. SegFormer-B1-style spatial stage on that grid (Xie et al. 2021): 4 Mix-Transformer stages,
     overlapping patch merging, efficient (spatially reduced) attention, Mix-FFN; All-MLP decode head.
  4. bilinear upsampling to full resolution + a light conv refinement that also sees the last fire frame,
     the static channels and the wind at full resolution, so fronts stay sharp.
Run `python emberformer.py -h` for every constant; outputs go to outputs/emberformer/.
"""
import argparse
import ast
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

# --- config ---
data_path = ''  # HDF5 fire file (fire/static/wind); '' = the embedded synthetic dataset (generated on first use)
out_dir = 'outputs/emberformer'  # logs, checkpoints/ and plots/ go here
epochs = 50  # maximum number of epochs (the cosine schedule spans all of them)
batch_size = 16  # as the seed guide's GPU setup (400x400, patch 16); ~345 steps per epoch on the default data
lr = 0.0  # shared flag: if > 0 it sets BOTH group LRs (overrides lr_temporal and lr_spatial)
lr_temporal = 1e-3  # peak LR of the temporal part (token embedder + temporal transformer)
lr_spatial = 1e-4  # peak LR of the spatial part (SegFormer encoder, decode head, refinement)
weight_decay = 1e-4  # AdamW weight decay (both groups)
warmup_frac = 0.05  # fraction of all steps spent in linear LR warmup
min_lr_frac = 0.01  # the cosine decays to this fraction of the peak LR
grad_clip = 1.0  # max global gradient norm (0 = off)
device = 'auto'  # auto (cuda > mps > cpu) | cpu | cuda | mps
seed = 0  # seeds torch, numpy, python and the shuffling generator
resume = ''  # path to a checkpoint (latest.pth) to continue exactly where that run stopped
max_samples = 0  # use only the first N training samples (whole fires first, in order); 0 = all; val is kept whole
num_threads = 0  # torch CPU threads; 0 = torch default
history = 8  # K: the model sees up to K frames (1..K; early frames of a fire have fewer)
patch_size = 4  # P: patch side in pixels; the spatial stage runs on the stride-P grid
val_frac = 0.2  # fraction of SEQUENCES held out for validation (whole fires, never frames of one fire in both)
wind_scale = 10.0  # m/s; wind enters the model divided by this
monitor = 'val/f1'  # early stopping and best.pth: val/f1, val/iou, val/new_f1 (maximised) or val/loss (minimised)
early_stop = True  # stop when the monitored metric has not improved for `patience` epochs
patience = 10  # epochs without improvement before early stopping
min_delta = 0.001  # an improvement must exceed this to reset the patience counter
pred_thresh = 0.5  # probability threshold that turns the prediction into a mask for the metrics
bce_weight = 0.5  # loss = bce_weight * BCE + dice_weight * Dice
dice_weight = 0.5  # weight of the soft-Dice term
pos_weight = 0.0  # BCE weight of burning pixels (0 = unweighted)
dil_wind = 6.0  # m/s; dilation baseline: calm spreads to all 8 neighbours, dil_wind m/s only within 90 deg of downwind
log_every = 20  # write a row to log_steps.csv every this many optimizer steps
stop_after = 0  # stop after this many epochs of this run (0 = never), schedule still set by --epochs; then --resume
# --- end config ---

# architecture fixed by the spec (tuples cannot be CLI flags): temporal transformer, SegFormer-B1 (MiT-b1) stage
TEMPORAL = dict(dim=96, heads=8, layers=4, ffn=384, dropout=0.1)
MIT_DIMS, MIT_DEPTHS, MIT_HEADS, MIT_SR = (64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), (8, 4, 2, 1)
MLP_RATIO, DECODE_DIM, REFINE_DIM = 4, 256, 32
METRICS = ("loss", "bce", "dice", "precision", "recall", "f1", "iou", "accuracy", "new_precision", "new_recall",
           "new_f1")
# flags that may change on --resume (they only change where and how the run reports, or when it ends);
# every other flag must match the checkpoint's, else the resumed run would not continue the same run
FREE_ON_RESUME = ("resume", "device", "num_threads", "out_dir", "stop_after", "patience", "early_stop", "log_every")

# AMP policy. CUDA: bf16 autocast where supported, else fp16 + GradScaler. CPU: plain fp32, because bf16
# autocast measured slower on the 2-core dev box (Xeon with AMX/avx512_bf16, torch 2.13, 2 threads, 32x32 grid,
# patch 4, K=8, batch 4, median of 9): train step 1.64 s fp32 vs 2.10 s bf16, eval 0.78 s vs 0.80 s.


def amp_dtype_for(dev):
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------------------------
# model: tokens + temporal transformer

def age_encoding(age, dim):
    """Sinusoidal encoding of the frame age (B, K) -> (B, K, dim). Age counts back from the last real
    frame, so a sample's real frames get the same encodings whatever padding follows them."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=age.device) / dim)  # (dim/2,)
    ang = age.float()[..., None] * freq
    return torch.cat([ang.sin(), ang.cos()], -1)


def to_patches(x, P):
    """(B, ..., H, W) with H, W multiples of P -> (B, H/P * W/P, ..., P*P): one row per patch, raster order."""
    *lead, H, W = x.shape
    x = x.reshape(*lead, H // P, P, W // P, P)
    n = len(lead)
    x = x.permute(0, n, n + 2, *range(1, n), n + 1, n + 3)  # (B, Hp, Wp, ..., P, P)
    return x.reshape(lead[0], (H // P) * (W // P), *lead[1:], P * P)


class Embedder(nn.Module):
    """Token = W_f fire_pixels + W_s static_pixels + W_w wind + age encoding. One linear map of the
    concatenated inputs, split in three so the static part (same for every frame) is embedded once."""

    def __init__(self, P, C, D):
        super().__init__()
        self.P = P
        self.fire = nn.Linear(P * P, D)
        self.static = nn.Linear(C * P * P, D, bias=False)
        self.wind = nn.Linear(2, D, bias=False)

    def forward(self, hist, wind, lengths, static):  # hist (B,K,H,W), wind (B,K,2), static (B,C,H,W)
        P, K = self.P, hist.shape[1]
        f = self.fire(to_patches(hist, P))  # (B, N, K, D)
        s = self.static(to_patches(static, P).flatten(2))  # (B, N, D): C*P*P static pixels per patch
        age = (lengths[:, None] - 1 - torch.arange(K, device=hist.device)).clamp(min=0)  # (B, K), 0 = frame t
        tw = self.wind(wind) + age_encoding(age, f.shape[-1])  # (B, K, D)
        return f + s[:, :, None] + tw[:, None]  # (B, N, K, D)


class TemporalBlock(nn.Module):
    """Pre-norm transformer block; attention restricted to real frames by a key-padding mask."""

    def __init__(self, D, heads, ffn, dropout):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ffn = nn.Sequential(nn.Linear(D, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, D))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, keep):  # x (M, K, D); keep (M, 1, 1, K) bool, True = real frame
        M, K, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(M, K, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(M, K, D)))
        return x + self.drop(self.ffn(self.ln2(x)))


class TemporalTransformer(nn.Module):
    def __init__(self, dim, heads, layers, ffn, dropout):
        super().__init__()
        self.blocks = nn.ModuleList(TemporalBlock(dim, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, lengths):  # x (B, N, K, D) -> (B, N, D) at each sample's last real frame
        B, N, K, D = x.shape
        keep = torch.arange(K, device=x.device)[None] < lengths[:, None]  # (B, K)
        keep = keep.repeat_interleave(N, 0)[:, None, None, :]  # (B*N, 1, 1, K): one history per patch
        x = x.reshape(B * N, K, D)
        for blk in self.blocks:
            x = blk(x, keep)
        x = x.view(B, N, K, D)[torch.arange(B, device=x.device), :, lengths - 1]  # (B, N, D): position L-1
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# model: SegFormer-B1-style spatial stage on the stride-P grid

class OverlapEmbed(nn.Module):
    """Overlapping patch merging: 3x3 conv (stride 1 for stage 1, 2 after) + LayerNorm.
    Padding 1 gives ceil(H/2) x ceil(W/2), so odd grid sides (e.g. 5) simply round up."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, stride, 1), nn.LayerNorm(cout)

    def forward(self, x):  # (B, Cin, H, W) -> (B, H'*W', Cout), H', W'
        x = self.conv(x)
        return self.norm(x.flatten(2).transpose(1, 2)), x.shape[2], x.shape[3]


class EfficientAttention(nn.Module):
    """Multi-head attention with K/V from a sr x sr strided conv (+ LayerNorm) of the map. The map is
    zero-padded (bottom/right) to a multiple of sr first: K/V keep ceil(H/sr) x ceil(W/sr) >= 1 tokens,
    so a grid smaller than sr is reduced to one token (the ratio is clamped to the grid) and no border
    row is dropped when a side is not divisible by sr (floor division would do both)."""

    def __init__(self, C, heads, sr):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q, self.kv, self.proj = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)
        if sr > 1:
            self.sr, self.norm = nn.Conv2d(C, C, sr, sr), nn.LayerNorm(C)

    def forward(self, x, H, W):  # x (B, H*W, C)
        B, N, C = x.shape
        h = self.heads
        q = self.q(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, C/h)
        y = x
        if self.sr_ratio > 1:
            r = self.sr_ratio
            y = F.pad(x.transpose(1, 2).reshape(B, C, H, W), (0, -W % r, 0, -H % r))
            y = self.norm(self.sr(y).flatten(2).transpose(1, 2))  # (B, ceil(H/r)*ceil(W/r), C)
        k, v = self.kv(y).view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, N, C))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (gives position information, SegFormer has no position encoding)
    -> GELU -> Linear."""

    def __init__(self, C, ratio):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, ratio * C), nn.Linear(ratio * C, C)
        self.dw = nn.Conv2d(ratio * C, ratio * C, 3, 1, 1, groups=ratio * C)

    def forward(self, x, H, W):
        y = self.fc1(x)  # (B, N, 4C)
        B, N, Ch = y.shape
        y = self.dw(y.transpose(1, 2).reshape(B, Ch, H, W)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(y))


class MiTBlock(nn.Module):
    def __init__(self, C, heads, sr):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn, self.ffn = EfficientAttention(C, heads, sr), MixFFN(C, MLP_RATIO)

    def forward(self, x, H, W):
        x = x + self.attn(self.ln1(x), H, W)
        return x + self.ffn(self.ln2(x), H, W)


class MiTEncoder(nn.Module):
    """Four Mix-Transformer stages; returns the four feature maps (strides 1, 2, 4, 8 on the patch grid)."""

    def __init__(self, cin):
        super().__init__()
        self.embeds, self.stages, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, (C, depth, heads, sr) in enumerate(zip(MIT_DIMS, MIT_DEPTHS, MIT_HEADS, MIT_SR)):
            self.embeds.append(OverlapEmbed(cin if i == 0 else MIT_DIMS[i - 1], C, 1 if i == 0 else 2))
            self.stages.append(nn.ModuleList(MiTBlock(C, heads, sr) for _ in range(depth)))
            self.norms.append(nn.LayerNorm(C))

    def forward(self, x):  # (B, 96, Hp, Wp)
        feats = []
        for embed, blocks, norm in zip(self.embeds, self.stages, self.norms):
            x, H, W = embed(x)
            for blk in blocks:
                x = blk(x, H, W)
            x = norm(x).transpose(1, 2).reshape(x.shape[0], -1, H, W)  # (B, C_i, H_i, W_i)
            feats.append(x)
        return feats


class DecodeHead(nn.Module):
    """All-MLP head: each stage -> 256 channels, bilinear to the stage-1 grid, concat, 1x1 fuse, classify."""

    def __init__(self):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(C, DECODE_DIM, 1) for C in MIT_DIMS)  # per-pixel linear layers
        self.fuse = nn.Sequential(nn.Conv2d(4 * DECODE_DIM, DECODE_DIM, 1, bias=False), nn.BatchNorm2d(DECODE_DIM),
                                  nn.ReLU(inplace=True), nn.Dropout2d(0.1))
        self.cls = nn.Conv2d(DECODE_DIM, 1, 1)

    def forward(self, feats):
        size = feats[0].shape[-2:]
        ups = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) for p, f in zip(self.proj, feats)]
        return self.cls(self.fuse(torch.cat(ups[::-1], 1)))  # (B, 1, Hp, Wp) coarse logits


class Refine(nn.Module):
    """Light full-resolution refinement: adds a correction to the upsampled coarse logits from
    [coarse logits, last fire frame, static channels, wind] through two 3x3 conv layers."""

    def __init__(self, cin):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(cin, REFINE_DIM, 3, 1, 1, bias=False), nn.BatchNorm2d(REFINE_DIM),
                                 nn.ReLU(inplace=True),
                                 nn.Conv2d(REFINE_DIM, REFINE_DIM, 3, 1, 1, bias=False), nn.BatchNorm2d(REFINE_DIM),
                                 nn.ReLU(inplace=True), nn.Conv2d(REFINE_DIM, 1, 1))

    def forward(self, coarse, last, static, wind):  # coarse/last (B,1,H,W), static (B,C,H,W), wind (B,2)
        w = wind[:, :, None, None].expand(-1, -1, *last.shape[-2:])
        return coarse + self.net(torch.cat([coarse, last, static, w], 1))


class EmberFormer(nn.Module):
    def __init__(self, n_static, patch, wind_scale=10.0):
        super().__init__()
        D = TEMPORAL["dim"]
        self.patch = patch
        self.embed = Embedder(patch, n_static, D)
        self.temporal = TemporalTransformer(**TEMPORAL)
        self.encoder = MiTEncoder(D)
        self.decode = DecodeHead()
        self.refine = Refine(2 + n_static + 2)
        # input scaling: train-split per-channel static statistics and the wind scale (m/s) are buffers,
        # so they travel in every checkpoint
        self.register_buffer("wind_scale", torch.tensor(float(wind_scale)))
        self.register_buffer("static_mean", torch.zeros(n_static))
        self.register_buffer("static_std", torch.ones(n_static))
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):  # as SegFormer / ViT
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, hist, wind, lengths, static):
        """hist (B,K,H,W) 0/1 right-padded, wind (B,K,2) m/s, lengths (B,), static (B,C,H,W) raw -> logits (B,H,W)."""
        B, K, H, W = hist.shape
        P = self.patch
        static = (static - self.static_mean[:, None, None]) / self.static_std[:, None, None]
        wind = wind / self.wind_scale
        pad = (0, -W % P, 0, -H % P)  # zero-pad bottom/right to whole patches; cropped off at the end
        tok = self.embed(F.pad(hist, pad), wind, lengths, F.pad(static, pad))  # (B, N, K, 96)
        feat = self.temporal(tok, lengths)  # (B, N, 96)
        Hp, Wp = (H + pad[3]) // P, (W + pad[1]) // P
        feat = feat.transpose(1, 2).reshape(B, -1, Hp, Wp)  # (B, 96, Hp, Wp)
        coarse = self.decode(self.encoder(feat))  # (B, 1, Hp, Wp)
        coarse = F.interpolate(coarse, size=(Hp * P, Wp * P), mode="bilinear", align_corners=False)[..., :H, :W]
        idx = torch.arange(B, device=hist.device)
        last = hist[idx, lengths - 1][:, None]  # (B, 1, H, W): the current frame t
        return self.refine(coarse, last, static, wind[idx, lengths - 1])[:, 0]  # (B, H, W)


def part_params(model):
    parts = dict(embedder=model.embed, temporal=model.temporal, spatial_encoder=model.encoder,
                 decode_head=model.decode, refinement=model.refine)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


# ----------------------------------------------------------------------------------------------
# optimizer and schedule

def check_groups(model, groups):
    """Every trainable parameter must sit in exactly one group (a public implementation silently left
    its whole refinement decoder untrained)."""
    ids = [id(p) for g in groups for p in g["params"]]
    want = {id(p) for p in model.parameters() if p.requires_grad}
    if len(ids) != len(set(ids)) or set(ids) != want:
        raise RuntimeError(f"optimizer groups hold {len(set(ids) & want)} of {len(want)} trainable parameters, "
                           f"{len(ids) - len(set(ids))} twice and {len(set(ids) - want)} foreign ones")


def make_optimizer(model):
    lt, ls = (lr, lr) if lr > 0 else (lr_temporal, lr_spatial)
    groups = [dict(params=[*model.embed.parameters(), *model.temporal.parameters()], lr=lt, base_lr=lt),
              dict(params=[*model.encoder.parameters(), *model.decode.parameters(), *model.refine.parameters()],
                   lr=ls, base_lr=ls)]
    check_groups(model, groups)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def get_lr(step, total_steps):
    """LR multiplier at a global step: linear warmup, then cosine down to min_lr_frac."""
    warm = max(1, int(warmup_frac * total_steps))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# metrics and baselines

def batch_counts(pred, target, current):
    """(2, 4) [tp, fp, fn, tn]: row 0 over all pixels, row 1 over the pixels not burning at t (new burn)."""
    tgt = target > 0.5
    return torch.stack([losses.confusion_counts(pred, tgt), losses.confusion_counts(pred, tgt, ~current)])


def scores(counts):
    """counts (2, 4) summed over batches -> precision, recall, f1, iou, accuracy + new-burn precision/recall/f1."""
    out, new = losses.seg_metrics(counts[0]), losses.seg_metrics(counts[1])
    out.update(new_precision=new["precision"], new_recall=new["recall"], new_f1=new["f1"])
    return out


def summarize(sums, counts, n):
    """sums: tensor [loss, bce, dice] summed over n samples -> dict of every metric in METRICS."""
    return dict(zip(("loss", "bce", "dice"), (sums / max(n, 1)).tolist()), **scores(counts))


NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]  # (drow, dcol)


def wind_dilation(current, wind):
    """Baseline: the fire front advances one cell per frame step into the neighbours that lie within an
    angle of the downwind direction that narrows with wind speed: cos(angle) >= speed / dil_wind - 1
    (clamped to [-1, 0.7]): calm -> all 8 neighbours, dil_wind m/s -> the downwind half, strong wind ->
    about 45 degrees either side of downwind. current (B,H,W) bool, wind (B,2) m/s (u east, v north)."""
    B, H, W = current.shape
    speed = wind.norm(dim=1)  # (B,)
    cos_min = (speed / dil_wind - 1).clamp(-1, 0.7)
    padded = F.pad(current.float(), (1, 1, 1, 1)) > 0.5
    out = current.clone()
    for dr, dc in NEIGHBOURS:  # spread from cell (i-dr, j-dc) to (i, j): east by dc, north by -dr
        cos = (wind[:, 0] * dc - wind[:, 1] * dr) / (speed * math.hypot(dr, dc) + 1e-9)  # calm: 0 >= -1
        ok = (cos >= cos_min)[:, None, None]
        out |= padded[:, 1 - dr:1 - dr + H, 1 - dc:1 - dc + W] & ok
    return out


@torch.no_grad()
def baselines(D, s, t):
    """Persistence (next = current) and wind dilation on the given samples -> {name: metrics}."""
    counts = {"persistence": 0, "dilation": 0}
    for idx in data.batch_indices(len(s), 64, shuffle=False):
        hist, wind, lengths, target = data.fire_batch(D["fire"], D["wind"], s[idx], t[idx], history)
        ar = torch.arange(len(lengths), device=hist.device)
        cur = hist[ar, lengths - 1] > 0.5
        counts["persistence"] = counts["persistence"] + batch_counts(cur, target, cur)
        counts["dilation"] = counts["dilation"] + batch_counts(wind_dilation(cur, wind[ar, lengths - 1]), target, cur)
    return {k: scores(c) for k, c in counts.items()}


# ----------------------------------------------------------------------------------------------
# data flow: whole dataset on the device, batches by indexing

def load_data(dev):
    path = data_path or data.default_fire_path()
    d = data.load_fire(path)
    S, T = d["fire"].shape[:2]
    if S < 2:
        raise data.DataError(f"{path}: {S} sequence(s); need at least 2 to split train/val by sequence")
    train_seq, val_seq = data.split_sequences(S, val_frac, seed)
    train_s, train_t = data.fire_sample_index(train_seq, T)
    if max_samples > 0:
        train_s, train_t = train_s[:max_samples], train_t[:max_samples]
    val_s, val_t = data.fire_sample_index(val_seq, T)
    st = torch.from_numpy(d["static"][train_seq]).double()  # per-channel statistics from the TRAIN split only
    mean, std = st.mean((0, 2, 3)).float(), st.std((0, 2, 3)).float().clamp(min=1e-6)
    return dict(fire=torch.from_numpy(d["fire"]).to(dev), static=torch.from_numpy(d["static"]).to(dev),
                wind=torch.from_numpy(d["wind"]).to(dev), channels=d["channels"], path=path,
                train=(train_s, train_t), val=(val_s, val_t), mean=mean, std=std)


def forward_batch(model, D, s, t, amp):
    hist, wind, lengths, target = data.fire_batch(D["fire"], D["wind"], s, t, history)
    with torch.autocast(D["fire"].device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(hist, wind, lengths, D["static"][s.to(hist.device)])
    loss, bce, dice = losses.bce_dice_loss(logits.float(), target, bce_weight, dice_weight,
                                           pos_weight if pos_weight > 0 else None)
    pred = torch.sigmoid(logits.float()) > pred_thresh
    current = hist[torch.arange(len(lengths), device=hist.device), lengths - 1] > 0.5
    return loss, torch.stack([loss, bce, dice]).detach() * len(s), batch_counts(pred, target, current), logits


def train_epoch(model, opt, scaler, D, gen, step, total_steps, amp, step_rows, epoch):
    model.train()
    s_all, t_all = D["train"]
    sums, counts = 0, 0
    for idx in data.batch_indices(len(s_all), batch_size, shuffle=True, generator=gen):
        mult = get_lr(step, total_steps)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        loss, s3, c, _ = forward_batch(model, D, s_all[idx], t_all[idx], amp)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        sums, counts = sums + s3, counts + c
        if step % log_every == 0:
            s3 = (s3 / len(idx)).tolist()
            step_rows.append(dict(step=step, epoch=epoch, lr_temporal=opt.param_groups[0]["lr"],
                                  lr_spatial=opt.param_groups[1]["lr"], loss=s3[0], bce=s3[1], dice=s3[2]))
    return summarize(sums, counts, len(s_all)), step


@torch.no_grad()
def evaluate(model, D, amp):
    model.eval()
    s_all, t_all = D["val"]
    sums, counts = 0, 0
    for idx in data.batch_indices(len(s_all), batch_size, shuffle=False):
        _, s3, c, _ = forward_batch(model, D, s_all[idx], t_all[idx], amp)
        sums, counts = sums + s3, counts + c
    return summarize(sums, counts, len(s_all))


# ----------------------------------------------------------------------------------------------
# outputs: csv logs, plots, checkpoints

def trim_csv(path, last_epoch):
    """Keep the rows up to last_epoch, so a log never lists an epoch twice."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= last_epoch]
    if not rows:
        os.remove(path)
        return
    with open(path + ".tmp", "w", newline="") as f:  # temp + rename: a crash never loses the log
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def append_csv(path, rows):
    if not rows:
        return
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def preview_samples(D):
    """Two fixed val samples with the most newly burned pixels, from different fires."""
    s, t = D["val"]
    fire, sd, td = D["fire"], s.to(D["fire"].device), t.to(D["fire"].device)
    new = (fire[sd, td + 1] > fire[sd, td]).flatten(1).sum(1)
    order = new.argsort(descending=True).cpu()
    first = order[0]
    other = [i for i in order.tolist() if s[i] != s[first]]
    pick = torch.tensor([first.item(), other[0] if other else order[min(1, len(order) - 1)].item()])
    return s[pick], t[pick]


@torch.no_grad()
def plot_preview(model, D, sample, amp, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model.eval()
    s, t = sample
    _, _, _, logits = forward_batch(model, D, s, t, amp)
    hist, wind, lengths, target = data.fire_batch(D["fire"], D["wind"], s, t, history)
    prob = torch.sigmoid(logits.float()).cpu()
    fig, axes = plt.subplots(2, 5, figsize=(16, 6.6), gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=0.95,
                                                                        wspace=0.05, hspace=0.12))
    ch = D["channels"].index("fuel_type") if "fuel_type" in D["channels"] else 0
    for r in range(2):
        L = lengths[r].item()
        h = hist[r, :L].cpu()
        age = torch.where(h.sum(0) > 0, h.sum(0) - 1, torch.tensor(float("nan")))  # frames since first burn
        cur, tgt, pred = h[-1] > 0.5, target[r].cpu() > 0.5, prob[r] > pred_thresh
        err = torch.zeros(*tgt.shape, 3)
        err[pred & tgt] = torch.tensor([1.0, 1.0, 1.0])  # hit: white
        err[pred & ~tgt] = torch.tensor([1.0, 0.2, 0.2])  # false alarm: red
        err[~pred & tgt] = torch.tensor([0.2, 0.5, 1.0])  # miss: blue
        err[cur & tgt & pred] = torch.tensor([0.5, 0.5, 0.5])  # already burning at t, kept: grey
        u, v = wind[r, L - 1].tolist()
        panels = [(age, f"burn age over {L} frames (yellow = new), wind {math.hypot(u, v):.1f} m/s", "viridis_r"),
                  (D["static"][s[r], ch].cpu(), f"static: {D['channels'][ch]}", "terrain"),
                  (tgt.float(), f"target t+1 (seq {s[r].item()}, t={t[r].item()})", "gray"),
                  (prob[r], "predicted probability", "magma"), (err, "error: white hit, red FP, blue FN", None)]
        for ax, (img, title, cmap) in zip(axes[r], panels):
            ax.imshow(img, cmap=cmap, vmin=0 if cmap in ("gray", "magma") else None,
                      vmax=1 if cmap in ("gray", "magma") else None, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        H, W = tgt.shape
        n = max(math.hypot(u, v), 1e-6)
        axes[r, 0].arrow(W / 2, H / 2, u / n * W / 5, -v / n * H / 5, color="red", width=0.4)  # downwind; row 0 = N
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(log_path, base, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    ep = [int(r["epoch"]) for r in rows]
    col = lambda k: [float(r[k]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, col("train_loss"), label="train")
    a.plot(ep, col("val_loss"), label="val")
    a.set(xlabel="epoch", ylabel="BCE+Dice loss")
    a.legend()
    for k in ("val_f1", "val_iou", "val_new_f1", "train_f1"):
        b.plot(ep, col(k), label=k)
    b.axhline(base["dilation"]["new_f1"], ls="--", c="gray", label="wind dilation new_f1")
    b.axhline(base["dilation"]["f1"], ls=":", c="gray", label="wind dilation f1")
    b.set(xlabel="epoch", ylabel="score")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rng_state(gen):
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                gen=gen.get_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(st, gen):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    gen.set_state(st["gen"])
    if st["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------
# main

def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def get_config(argv=None):
    """argparse built from the config block above: one --flag per constant, help = its comment."""
    src = open(os.path.abspath(__file__)).read()
    block = src.split("# --- config ---")[1].split("# --- end config ---")[0]
    fmt = type("Fmt", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    for name, value, comment in re.findall(r"^(\w+) = (.+?)\s+# (.*)$", block, re.M):
        default = ast.literal_eval(value)  # the file's value, not the global: train() overwrites those
        if isinstance(default, bool):
            p.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, help=comment)
        else:
            p.add_argument(f"--{name}", type=str if default is None else type(default), default=default, help=comment)
    return vars(p.parse_args(argv))


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    ok = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if not ok.get(name, False):
        raise data.DataError(f"--device {name}: not available here (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def check_config(cfg):
    if cfg["monitor"] not in ("val/f1", "val/iou", "val/new_f1", "val/loss"):
        raise data.DataError(f"--monitor {cfg['monitor']}: choose val/f1, val/iou, val/new_f1 or val/loss")
    for k in ("epochs", "batch_size", "history", "patch_size", "log_every"):
        if cfg[k] < 1:
            raise data.DataError(f"--{k} {cfg[k]}: must be >= 1")
    for k in ("val_frac", "pred_thresh"):
        if not 0 < cfg[k] < 1:
            raise data.DataError(f"--{k} {cfg[k]}: must be between 0 and 1")
    if cfg["wind_scale"] <= 0 or cfg["grad_clip"] < 0:
        raise data.DataError("--wind_scale must be > 0 and --grad_clip >= 0")


def train(cfg):
    globals().update(cfg)  # the constants above now hold this run's values
    check_config(cfg)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)  # owns the shuffling order; saved in checkpoints
    dev = pick_device(device)
    amp = amp_dtype_for(dev)
    D = load_data(dev)
    model = EmberFormer(len(D["channels"]), patch_size, wind_scale).to(dev)
    model.static_mean.copy_(D["mean"])
    model.static_std.copy_(D["std"])
    opt = make_optimizer(model)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)
    steps_per_epoch = math.ceil(len(D["train"][0]) / batch_size)
    total_steps = epochs * steps_per_epoch
    mode_max = monitor != "val/loss"
    start, best, best_epoch, bad = 0, -math.inf if mode_max else math.inf, 0, 0
    ckpt_dir, plot_dir = os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "plots")
    if resume:
        ck = data.load_checkpoint(resume)  # on CPU: RNG states must stay CPU tensors
        if not {"model", "optimizer", "epoch", "config", "rng"} <= set(ck):
            raise data.DataError(f"{resume}: not an emberformer checkpoint (keys {sorted(ck)[:6]})")
        diff = [k for k in cfg if k not in FREE_ON_RESUME and ck["config"].get(k) != cfg[k]]
        if diff:
            raise data.DataError(f"{resume}: checkpoint was made with different " + ", ".join(
                f"--{k} ({ck['config'].get(k)!r}, now {cfg[k]!r})" for k in diff))
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise data.DataError(f"{resume}: model weights do not fit ({str(e).splitlines()[0]})") from None
        opt.load_state_dict(ck["optimizer"])
        if ck["scaler"]:  # empty when the run had no GradScaler (CPU, bf16)
            scaler.load_state_dict(ck["scaler"])
        start, best, best_epoch, bad = ck["epoch"], ck["best"], ck["best_epoch"], ck["bad_epochs"]
        set_rng_state(ck["rng"], gen)
    os.makedirs(plot_dir, exist_ok=True)
    for name in ("log.csv", "log_steps.csv"):  # a fresh run starts fresh logs; a resumed one continues them
        path = os.path.join(out_dir, name)
        if resume:
            trim_csv(path, start)  # resuming an older checkpoint re-runs the later epochs
        elif os.path.isfile(path):
            os.remove(path)
    n_train, n_val = len(D["train"][0]), len(D["val"][0])
    print(f"data: {D['path']}  fire {tuple(D['fire'].shape)}  static {D['channels']}  "
          f"train {n_train} / val {n_val} samples  device {dev}  amp {amp}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in part_params(model).items()))
    base = baselines(D, *D["val"])
    for k, m in base.items():
        print(f"baseline {k:<11} val: f1={m['f1']:.3f} prec={m['precision']:.3f} iou={m['iou']:.3f} "
              f"new_f1={m['new_f1']:.3f}")
    sample = preview_samples(D)
    step = start * steps_per_epoch
    for epoch in range(start + 1, epochs + 1):
        t0, step_rows = time.time(), []
        tr, step = train_epoch(model, opt, scaler, D, gen, step, total_steps, amp, step_rows, epoch)
        t1 = time.time()
        print(f"  train: {n_train} samples in {t1 - t0:.1f}s ({n_train / (t1 - t0):.1f} samples/s)")
        va = evaluate(model, D, amp)
        t2 = time.time()
        print(f"  val:   {n_val} samples in {t2 - t1:.1f}s ({n_val / (t2 - t1):.1f} samples/s)")
        print(f"[Epoch {epoch}/{epochs}] BCE+Dice | train: loss={tr['loss']:.4f} f1={tr['f1']:.3f} "
              f"prec={tr['precision']:.3f} | val: loss={va['loss']:.4f} f1={va['f1']:.3f} prec={va['precision']:.3f} "
              f"iou={va['iou']:.3f} new_f1={va['new_f1']:.3f} (dilation {base['dilation']['new_f1']:.3f})")
        value = va[monitor.split("/")[1]]
        improved = value > best + min_delta if mode_max else value < best - min_delta
        if improved:
            best, best_epoch, bad = value, epoch, 0
        else:
            bad += 1
        row = dict(epoch=epoch, step=step, lr_temporal=opt.param_groups[0]["lr"], lr_spatial=opt.param_groups[1]["lr"])
        row.update({f"train_{k}": tr[k] for k in METRICS})
        row.update({f"val_{k}": va[k] for k in METRICS})
        row["time_s"] = round(t2 - t0, 2)
        append_csv(os.path.join(out_dir, "log.csv"), [row])
        append_csv(os.path.join(out_dir, "log_steps.csv"), step_rows)
        plot_preview(model, D, sample, amp, os.path.join(plot_dir, f"preview_epoch_{epoch:03d}.png"))
        plot_curves(os.path.join(out_dir, "log.csv"), base, os.path.join(out_dir, "curves.png"))
        # checkpoints last: latest.pth then marks an epoch whose logs and plots are complete
        ck = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                  best=best, best_epoch=best_epoch, bad_epochs=bad, rng=rng_state(gen), config=cfg,
                  channels=D["channels"], baselines=base, val_metrics=va)
        if improved:
            data.atomic_torch_save(ck, os.path.join(ckpt_dir, "best.pth"))
        data.atomic_torch_save(ck, os.path.join(ckpt_dir, "latest.pth"))
        if early_stop and bad >= patience:
            print(f"early stopping at epoch {epoch}: best {monitor}={best:.4f} at epoch {best_epoch}")
            break
        if stop_after and epoch - start >= stop_after:
            print(f"stopping after {stop_after} epoch(s) as asked; continue with --resume {ckpt_dir}/latest.pth")
            break
    print(f"best {monitor}={best:.4f} at epoch {best_epoch} | baselines new_f1: persistence "
          f"{base['persistence']['new_f1']:.3f}, wind dilation {base['dilation']['new_f1']:.3f}")


def main(argv=None):
    cfg = get_config(argv)
    try:
        train(cfg)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
