"""
emberformer.py: next-step wildfire spread. Given the fire masks of the last 1..K frames, the static
landscape channels and the wind so far, predict the burned-area mask of the next frame at full resolution.

Model (hand-written, plain PyTorch):
  1. tokens: the grid is cut into P x P patches; the token of a patch at frame t embeds the patch's fire
     pixels and that frame's wind, plus a sinusoidal encoding of the frame's AGE (0 = the current frame),
     so right-padding the history never moves a real frame's encoding.
  2. temporal transformer over each patch's own history with a key-padding mask; the output at the
     LAST REAL frame (lengths - 1, not position K - 1), plus the embedding of the patch's static pixels,
     is the patch feature -> a (B, 96, H/P, W/P) grid. Patches that never burned share one computation.
  3. SegFormer-B1-style spatial stage on that grid (Xie et al. 2021): 4 Mix-Transformer stages,
     overlapping patch merging, efficient (spatially reduced) attention, Mix-FFN, stochastic depth;
     All-MLP decode head.
  4. bilinear upsampling to full resolution + a light conv refinement on the fire's front that also sees
     the last fire frame, the static channels and the wind at full resolution, so fronts stay sharp.
Target (--target): 'new' keeps cells burning at t burning (the masks are cumulative) and learns only where
the fire goes next (BCE + Dice over the cells not yet burning); 'full' predicts the whole next mask.
--unroll N also trains through N - 1 more steps on its own soft forecasts (for models to roll forward).
Splits are whole fires: train, val (early stopping, best.pth) and test (reported once, at the end).
Forecasting (--eval_only --model best.pth --data_path other.h5): a trained model is scored on every t -> t+1
pair of another file, beside the baselines; with --rollout N it is also fed its own thresholded forecasts for
N steps (observed wind) and scored per lead time; --members M adds an ensemble whose burn probability is the
mean of its sampled members' probabilities. Outputs go to out_dir/eval_<file stem>/.
Run `python emberformer.py -h` for every constant; outputs go to outputs/emberformer/.
Data parallel: `torchrun --standalone --nproc_per_node N emberformer.py ...` (CPU: gloo; CUDA: nccl,
one GPU per process, SyncBatchNorm). --batch_size stays the global batch; each process trains on its
slice of every batch.
"""
import copy
import csv
import dataclasses
import hashlib
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import losses

# --- config ---
data_path = ''  # HDF5 fire file (fire/static/wind); '' = the embedded synthetic dataset
out_dir = 'outputs/emberformer'  # logs, checkpoints/ and plots/ go here
epochs = 50  # maximum number of epochs (the cosine schedule spans all of them)
batch_size = 16  # the GLOBAL batch, split over torchrun's processes (as the seed's GPU setup)
lr = 0.0  # shared flag: if > 0 it sets BOTH group LRs (overrides lr_temporal and lr_spatial)
lr_temporal = 1e-3  # peak LR of the temporal part (token embedder + temporal transformer)
lr_spatial = 1e-4  # peak LR of the spatial part (SegFormer encoder, decode head, refinement)
weight_decay = 1e-4  # AdamW weight decay of the weight matrices and conv kernels (norms and biases get none)
warmup_frac = 0.05  # fraction of all steps spent in linear LR warmup
min_lr_frac = 0.01  # the cosine decays to this fraction of the peak LR
grad_clip = 1.0  # max global gradient norm (0 = off)
device = 'auto'  # auto (cuda > mps > cpu) | cpu | cuda | mps
seed = 0  # seeds torch, numpy, python and the shuffling generator
resume = ''  # path to a checkpoint (latest.pth) to continue exactly where that run stopped
max_samples = 0  # use only the first N training samples (whole fires, in order; 0 = all); val stays whole
num_threads = 0  # torch CPU threads; 0 = torch default
history = 8  # K: the model sees up to K frames (1..K; early frames of a fire have fewer)
patch_size = 4  # P: patch side in pixels; the spatial stage runs on the stride-P grid
val_frac = 0.2  # fraction of whole fires held out for validation (never frames of one fire in both)
test_frac = 0.1  # fraction of whole fires held out for test: chooses nothing; best.pth is scored on it
target = 'new'  # new: cells burning at t stay burning (no loss), the model predicts the rest; full: all
wind_scale = 10.0  # m/s; wind enters the model divided by this
monitor = 'val/new_f1'  # early stopping, best.pth: val/new_f1|new_ap|new_iou|f1|iou (max) or val/loss (min)
early_stop = True  # stop when the monitored metric has not improved for `patience` epochs
patience = 10  # epochs without improvement before early stopping
min_delta = 0.001  # an improvement must exceed this to reset the patience counter
pred_thresh = 0.5  # mask threshold in training; best.pth keeps the one chosen on val (--eval_only: overrides)
bce_weight = 0.5  # loss = bce_weight * BCE + dice_weight * Dice
dice_weight = 0.5  # weight of the soft-Dice term
pos_weight = 0.0  # BCE weight of burning pixels (0 = unweighted)
unroll = 1  # train through this many steps, the later ones on the model's own soft forecasts (1 = one-step)
dil_wind = 6.0  # m/s; dilation baseline: calm spreads to 8 neighbours, this wind only within 90 deg downwind
log_every = 20  # write a row to log_steps.csv every this many optimizer steps
cpu_bf16 = 'auto'  # CPU precision: auto = time fp32 and bf16 autocast steps, take the faster; on | off
stop_after = 0  # stop after this many epochs of this run (0 = never; the schedule spans --epochs)
model = ''  # a trained best.pth for --eval_only; its model and data settings are used, not these flags
eval_only = False  # score --model on every t -> t+1 pair of --data_path (no split) -> out_dir/eval_<stem>/
rollout = 0  # with --eval_only: feed the model its own forecasts this many steps, scored per lead (0 = off)
members = 0  # with --rollout: an ensemble of this many rollouts, each burning the cells above a random draw
wind_sigma = 0.0  # m/s; with --members: each member's wind gets N(0, wind_sigma^2) noise per frame, component
# --- end config ---

@dataclass(frozen=True)  # frozen: the default instance is shared by every model
class Arch:
    """Architecture sizes, fixed by the spec (tuples cannot be CLI flags). The model takes one of these, as
    nanoGPT's GPTConfig, so two models with different sizes can live in one process."""
    dim: int = 96  # temporal transformer width = channels of the patch feature grid
    heads: int = 8
    layers: int = 4
    ffn: int = 384
    dropout: float = 0.1  # temporal transformer: attention and residual dropout
    # SegFormer-B1 (MiT-b1) stage widths, depths, heads, reduction ratios
    mit_dims: tuple = (64, 128, 320, 512)
    mit_depths: tuple = (2, 2, 2, 2)
    mit_heads: tuple = (1, 2, 5, 8)
    mit_sr: tuple = (8, 4, 2, 1)
    mlp_ratio: int = 4
    # stochastic depth of the last MiT block; rises linearly from 0 over the blocks, as MiT-b1
    drop_path: float = 0.1
    decode_dim: int = 256
    refine_dim: int = 32
    # Refine runs on the tiles of this side that lie within refine_reach cells of both a burning and a
    # not-burning cell (front_tiles); docs/emberformer.md says how far from the fire new burns lie
    refine_tile: int = 16
    refine_reach: int = 4  # twice the radius of Refine's 5x5 view


METRICS = ("loss", "bce", "dice", "precision", "recall", "f1", "iou", "accuracy", "new_precision",
           "new_recall", "new_f1", "new_iou", "new_ap")
MONITORS = ("val/new_f1", "val/new_ap", "val/new_iou", "val/f1", "val/iou", "val/loss")
BURNING_LOGIT = 30.0  # --target new: logit of cells burning at t (sigmoid = 1.0 in float32)
# calibration is scored on the cells not burning at t within this many cells of the fire (the rest ~0)
NEAR_CELLS = 2
CHECK_EVERY = 50  # steps between looks at the on-device count of non-finite losses (a sync each time)
# flags that may change on --resume (they only change where and how the run reports, or when it ends);
# every other flag must match the checkpoint's, else the resumed run would not continue the same run
FREE_ON_RESUME = ("resume", "device", "num_threads", "out_dir", "stop_after", "patience",
                  "early_stop", "log_every",
                  "cpu_bf16",  # a resumed run keeps the precision its checkpoint stored, whatever this says
                  # --eval_only flags, off in training
                  "model", "eval_only", "rollout", "members", "wind_sigma")
# --model takes these from its checkpoint: the model was built and trained with them, so a different
# explicit flag is refused. EVAL_SETTINGS also come from the checkpoint, but an explicit flag may change
# how the forecast is scored
MODEL_SETTINGS = ("history", "patch_size", "target", "wind_scale", "bce_weight", "dice_weight", "pos_weight")
EVAL_SETTINGS = ("pred_thresh", "dil_wind")
ROLLOUT_METHODS = ("model", "dilation", "persistence")  # rollout.csv rows, in this order
EVAL_COLUMNS = ("loss", "f1", "iou", "precision", "recall", "accuracy", "new_precision", "new_recall",
                "new_f1", "new_iou", "new_ap")  # eval.csv's metric columns, after method, pairs and fires


def cpu_precision(cfg, model, D, stored):
    """bf16 or None on the CPU: what a resumed run chose (`stored`), else data.choose_cpu_dtype(cpu_bf16)
    timing real training steps (one warm-up, two rounds of one) of a throw-away copy of the model on a
    training batch (under torchrun: this process's slice of it, and rank 0's choice is then broadcast). The
    global RNG is put back, so timing never changes the run."""
    if stored:
        return torch.bfloat16 if stored == "bf16" else None
    trial = copy.deepcopy(model)
    opt = make_optimizer(cfg, trial)
    s, t = D["train"][0][:cfg["batch_size"]], D["train"][1][:cfg["batch_size"]]

    def step(dtype):
        opt.zero_grad(set_to_none=True)
        forward_batch(cfg, trial, D, s, t, dtype, cfg["unroll"])[0].backward()
        opt.step()
    rng = torch.get_rng_state()
    dtype, msg = data.choose_cpu_dtype(cfg["cpu_bf16"], step, warmup=1, timed=1, rounds=2)
    torch.set_rng_state(rng)
    print(msg)
    return dtype


# --- model: tokens + temporal transformer ---

def age_encoding(age, dim):
    """Sinusoidal encoding of the frame age (B, K) -> (B, K, dim). Age counts back from the last real
    frame, so a sample's real frames get the same encodings whatever padding follows them."""
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=age.device) / dim)  # (dim/2,)
    ang = age.float()[..., None] * freq
    return torch.cat([ang.sin(), ang.cos()], -1)


def to_patches(x, P):
    """(B, ..., H, W) with H, W multiples of P -> (B, H/P * W/P, ..., P*P): one row per
    patch, raster order."""
    *lead, H, W = x.shape
    x = x.reshape(*lead, H // P, P, W // P, P)
    n = len(lead)
    x = x.permute(0, n, n + 2, *range(1, n), n + 1, n + 3)  # (B, Hp, Wp, ..., P, P)
    return x.reshape(lead[0], (H // P) * (W // P), *lead[1:], P * P)


class Embedder(nn.Module):
    """Token of a patch at frame k = W_f fire_pixels + W_w wind_k + age encoding. The static pixels are NOT
    in the token: they are embedded once per patch (W_s) and added to the temporal transformer's output, so
    every patch that has never burned has the same history and shares one temporal computation."""

    def __init__(self, P, C, D):
        super().__init__()
        self.P = P
        self.fire = nn.Linear(P * P, D)
        self.static = nn.Linear(C * P * P, D, bias=False)
        self.wind = nn.Linear(2, D, bias=False)

    def frame_tokens(self, wind, lengths):  # wind (B, K, 2) -> (B, K, D): the part every patch shares
        K = wind.shape[1]
        age = (lengths[:, None] - 1 - torch.arange(K, device=wind.device)).clamp(min=0)  # (B, K), 0 = frame t
        return self.wind(wind) + age_encoding(age, self.fire.out_features)

    def static_tokens(self, static):  # (B, C, H, W) -> (B, N, D): C*P*P static pixels per patch
        return self.static(to_patches(static, self.P).flatten(2))


class TemporalBlock(nn.Module):
    """Pre-norm transformer block; attention restricted to real frames by a key-padding mask."""

    def __init__(self, D, heads, ffn, dropout):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ffn = nn.Sequential(nn.Linear(D, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, D))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, keep, last=None):
        # x (M, K, D); keep (M, 1, 1, K) bool, True = real frame; last (M,)
        M, K, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(M, K, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # only frame `last` is read after this block: its query alone gives the same output
        if last is not None:
            rows = torch.arange(M, device=x.device)
            x, q = x[rows, last][:, None], q[rows, :, last][:, :, None]  # (M, 1, D), (M, heads, 1, D/heads)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                           dropout_p=self.p if self.training else 0.0)
        # (M, 1 or K, D); not reshape(M, -1, D): M may be 0
        x = x + self.drop(self.proj(a.transpose(1, 2).flatten(2)))
        return x + self.drop(self.ffn(self.ln2(x)))


class TemporalTransformer(nn.Module):
    def __init__(self, dim, heads, layers, ffn, dropout):
        super().__init__()
        self.blocks = nn.ModuleList(TemporalBlock(dim, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)  # applied by EmberFormer after the static tokens are added

    def forward(self, x, lengths):
        # x (M, K, D) right-padded histories -> (M, D) at each one's last real frame
        # (M, 1, 1, K)
        keep = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None])[:, None, None]
        for blk in self.blocks[:-1]:
            x = blk(x, keep)
        return self.blocks[-1](x, keep, last=lengths - 1)[:, 0]  # position L-1, not K-1


# --- model: SegFormer-B1-style spatial stage on the stride-P grid ---

class OverlapEmbed(nn.Module):
    """Overlapping patch merging: 3x3 conv (stride 1 for stage 1, 2 after) + LayerNorm.
    Padding 1 gives ceil(H/2) x ceil(W/2), so odd grid sides (e.g. 5) simply round up."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, stride, 1), nn.LayerNorm(cout)

    def forward(self, x):  # (B, Cin, H, W) -> (B, H'*W', Cout), H', W'
        if x.device.type == "cpu" and self.conv.stride[0] > 1 and min(x.shape[-2:]) == 1:
            # torch 2.13's CPU bf16 conv backward returns garbage weight gradients (up to 1e20, a different
            # value each call) for a stride-2 conv on a map one cell wide; this tiny map costs nothing in fp32
            with torch.autocast("cpu", enabled=False):
                x = self.conv(x.float())
        else:
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
        # (B, h, N', C/h) each; B may be 0
        k, v = self.kv(y).unflatten(2, (2, h, C // h)).permute(2, 0, 3, 1, 4)
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


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, a residual branch is dropped for a random fraction p
    of the samples and scaled by 1/(1-p) for the others; identity in eval, so eval output is deterministic."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):  # (B, ...)
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *[1] * (x.ndim - 1)).bernoulli_(1 - self.p)  # (B, 1, ...)
        return x * keep / (1 - self.p)


class MiTBlock(nn.Module):
    def __init__(self, C, heads, sr, mlp_ratio, drop_path):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn, self.ffn = EfficientAttention(C, heads, sr), MixFFN(C, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.ln1(x), H, W))
        return x + self.drop_path(self.ffn(self.ln2(x), H, W))


class MiTEncoder(nn.Module):
    """Four Mix-Transformer stages; returns the four feature maps (strides 1, 2, 4, 8 on the patch grid)."""

    def __init__(self, cin, arch):
        super().__init__()
        rates = torch.linspace(0, arch.drop_path, sum(arch.mit_depths)).tolist()  # one per block, 0 first
        self.embeds, self.stages, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        dims = arch.mit_dims
        for i, (C, depth, heads, sr) in enumerate(zip(dims, arch.mit_depths, arch.mit_heads, arch.mit_sr)):
            self.embeds.append(OverlapEmbed(cin if i == 0 else dims[i - 1], C, 1 if i == 0 else 2))
            first = sum(arch.mit_depths[:i])
            self.stages.append(nn.ModuleList(MiTBlock(C, heads, sr, arch.mlp_ratio, rates[first + j])
                                             for j in range(depth)))
            self.norms.append(nn.LayerNorm(C))

    def forward(self, x):  # (B, 96, Hp, Wp)
        feats = []
        for embed, blocks, norm in zip(self.embeds, self.stages, self.norms):
            x, H, W = embed(x)
            for blk in blocks:
                x = blk(x, H, W)
            x = norm(x).transpose(1, 2).unflatten(2, (H, W))  # (B, C_i, H_i, W_i)
            feats.append(x)
        return feats


class DecodeHead(nn.Module):
    """All-MLP head: each stage -> 256 channels, bilinear to the stage-1 grid, concat, 1x1 fuse, classify."""

    def __init__(self, dims, D):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(C, D, 1) for C in dims)  # per-pixel linear layers
        self.fuse = nn.Sequential(nn.Conv2d(len(dims) * D, D, 1, bias=False), nn.BatchNorm2d(D),
                                  nn.ReLU(inplace=True), nn.Dropout2d(0.1))
        self.cls = nn.Conv2d(D, 1, 1)

    def forward(self, feats):
        size = feats[0].shape[-2:]
        ups = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
               for p, f in zip(self.proj, feats)]
        return self.cls(self.fuse(torch.cat(ups[::-1], 1)))  # (B, 1, Hp, Wp) coarse logits


def near_fire(burning, r=None):
    """(B, H, W) bool: the cells within r (default NEAR_CELLS) 8-neighbourhood steps of a burning cell."""
    r = NEAR_CELLS if r is None else r
    return F.max_pool2d(burning[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0.5


def front_tiles(last, T, R):
    """last (B, 1, H, W) frame t (soft in an unrolled step) -> (b, i, j), each (M,): the T-square tiles within
    R cells of both a burning and a not-burning cell, the fire's front from both sides: every cell not burning
    within R of the fire (what --target new predicts) and every burning cell within R of one not burning lies
    in one."""
    H, W = last.shape[-2:]
    pad = (R, R + (-W % T), R, R + (-H % T))  # off the grid is neither burning nor not burning
    fire = F.max_pool2d(F.pad((last > 0).float(), pad), T + 2 * R, T)  # (B, 1, nH, nW): the tile or R around
    unburnt = F.max_pool2d(F.pad((last <= 0.5).float(), pad), T + 2 * R, T)
    return (fire * unburnt)[:, 0].nonzero(as_tuple=True)


def tile_windows(x, b, i, j, T):
    """x (B, C, H, W) -> (M, C, T+4, T+4): the T-square tiles (b, i, j) with a 2-cell halo, zeros outside the
    grid (the halo two 3x3 convolutions need)."""
    H, W = x.shape[-2:]
    x = F.pad(x, (2, 2 + (-W % T), 2, 2 + (-H % T)))
    return x.unfold(2, T + 4, T).unfold(3, T + 4, T)[b, :, i, j]  # (B, C, nH, nW, T+4, T+4) indexed


class Refine(nn.Module):
    """Light full-resolution refinement: adds a correction to the upsampled coarse logits from
    [coarse logits, last fire frame, static channels, wind] through two 3x3 conv layers. It runs on the fire's
    front only (front_tiles; elsewhere the logits are the coarse ones): on a large grid the front is a small
    part of it, and run on every cell this head dominated a training step (docs/performance.md). A tile's
    correction is the dense head's in eval mode: its halo holds the real neighbours, zeros off the grid (in
    training, BatchNorm's batch statistics also count the halo)."""

    def __init__(self, cin, D, tile, reach):
        super().__init__()
        self.tile, self.reach = tile, reach
        self.net = nn.Sequential(  # unpadded convolutions: the tiles bring their halo
            nn.Conv2d(cin, D, 3, bias=False), nn.BatchNorm2d(D), nn.ReLU(inplace=True),
            nn.Conv2d(D, D, 3, bias=False), nn.BatchNorm2d(D), nn.ReLU(inplace=True),
            nn.Conv2d(D, 1, 1))

    def forward(self, coarse, last, static, wind):  # coarse/last (B,1,H,W), static (B,C,H,W), wind (B,2)
        B, _, H, W = last.shape
        T = self.tile
        b, i, j = front_tiles(last, T, self.reach)  # (M,) each
        grid = tile_windows(last.new_ones(1, 1, H, W), b * 0, i, j, T)  # (M, 1, T+4, T+4): 1 on the grid
        # (M, Cin, T+4, T+4); each input windowed alone: only coarse needs a gradient, and no full-size concat
        x = torch.cat([tile_windows(coarse, b, i, j, T), tile_windows(last, b, i, j, T),
                       tile_windows(static, b, i, j, T), wind[b, :, None, None] * grid], 1)
        hidden = self.net[:3](x) * grid[..., 1:-1, 1:-1]  # (M, D, T+2, T+2); 0 off the grid, as padding
        corr = self.net[3:](hidden)[:, 0]  # (M, T, T)
        nH, nW = -(-H // T), -(-W // T)
        full = corr.new_zeros(B, nH, nW, T, T).index_put((b, i, j), corr)  # 0 off the front
        full = full.permute(0, 1, 3, 2, 4).reshape(B, 1, nH * T, nW * T)  # tiles back in place
        return coarse + full[..., :H, :W]


def init_linear(m):
    if isinstance(m, nn.Linear):  # as SegFormer / ViT
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_conv_fan_out(m):
    if isinstance(m, nn.Conv2d):  # as SegFormer's MiT: normal with std sqrt(2 / fan_out)
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class EmberFormer(nn.Module):
    """target 'new': cells burning at frame t get BURNING_LOGIT (a constant: no gradient), the network only
    predicts ignition of the others; 'full': the network predicts the whole next mask."""

    def __init__(self, n_static, patch, wind_scale=10.0, target="full", arch=Arch()):
        super().__init__()
        self.patch, self.target, self.arch = patch, target, arch
        self.embed = Embedder(patch, n_static, arch.dim)
        self.temporal = TemporalTransformer(arch.dim, arch.heads, arch.layers, arch.ffn, arch.dropout)
        self.encoder = MiTEncoder(arch.dim, arch)
        self.decode = DecodeHead(arch.mit_dims, arch.decode_dim)
        self.refine = Refine(2 + n_static + 2, arch.refine_dim, arch.refine_tile, arch.refine_reach)
        # input scaling: train-split per-channel static statistics and the wind scale (m/s) are buffers,
        # so they travel in every checkpoint
        self.register_buffer("wind_scale", torch.tensor(float(wind_scale)))
        self.register_buffer("static_mean", torch.zeros(n_static))
        self.register_buffer("static_std", torch.ones(n_static))
        self.apply(init_linear)
        self.encoder.apply(init_conv_fan_out)  # decode head and refinement keep PyTorch's default conv init

    def temporal_features(self, hist, wind, lengths):
        """hist (B, K, H, W) right-padded, H, W multiples of P -> (B, N, D) temporal output at each patch's
        last real frame (before the static tokens and the norm). Only patches with fire somewhere in their
        history run the transformer, plus ONE all-zero history per sample standing for all its never-burned
        patches: their tokens are identical (no static in the token), so this is the same function at a
        fraction of the cost (most patches of a fire never burn; docs/performance.md measures it)."""
        B = hist.shape[0]
        patches = to_patches(hist, self.patch)  # (B, N, K, P*P)
        frame = self.embed.frame_tokens(wind, lengths)  # (B, K, D)
        b, n = patches.flatten(2).amax(2).nonzero(as_tuple=True)  # (M,), (M,): patches that ever burned
        quiet = self.embed.fire(patches.new_zeros(1, 1, patches.shape[-1])) + frame  # (B, K, D)
        burnt = self.embed.fire(patches[b, n]) + frame[b]  # (M, K, D)
        out = self.temporal(torch.cat([quiet, burnt]), torch.cat([lengths, lengths[b]]))  # (B + M, D)
        feat = out[:B, None].repeat(1, patches.shape[1], 1)  # (B, N, D): every patch as never burned...
        return feat.index_put((b, n), out[B:])  # ...then the ones that burned

    def forward(self, hist, wind, lengths, static):
        """hist (B,K,H,W) 0/1 right-padded, wind (B,K,2) m/s, lengths (B,), static (B,C,H,W)
        raw -> logits (B,H,W)."""
        B, K, H, W = hist.shape
        P = self.patch
        static = (static - self.static_mean[:, None, None]) / self.static_std[:, None, None]
        wind = wind / self.wind_scale
        pad = (0, -W % P, 0, -H % P)  # zero-pad bottom/right to whole patches; cropped off at the end
        feat = self.temporal_features(F.pad(hist, pad), wind, lengths)  # (B, N, D)
        feat = self.temporal.norm(feat + self.embed.static_tokens(F.pad(static, pad)))  # (B, N, D)
        Hp, Wp = (H + pad[3]) // P, (W + pad[1]) // P
        # (B, D, Hp, Wp); explicit sizes: an empty slice has B = 0
        feat = feat.transpose(1, 2).unflatten(2, (Hp, Wp))
        coarse = self.decode(self.encoder(feat))  # (B, 1, Hp, Wp)
        coarse = F.interpolate(coarse, size=(Hp * P, Wp * P), mode="bilinear",
                               align_corners=False)[..., :H, :W]
        idx = torch.arange(B, device=hist.device)
        last = hist[idx, lengths - 1][:, None]  # (B, 1, H, W): the current frame t
        logits = self.refine(coarse, last, static, wind[idx, lengths - 1])[:, 0]  # (B, H, W)
        # cumulative masks: burning at t is burning at t+1, whatever the network says
        if self.target == "new":
            logits = logits.masked_fill(last[:, 0] > 0.5, BURNING_LOGIT)
        return logits


def part_params(model):
    parts = dict(embedder=model.embed, temporal=model.temporal, spatial_encoder=model.encoder,
                 decode_head=model.decode, refinement=model.refine)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


# --- optimizer and schedule ---

def check_groups(model, groups):
    """Every trainable parameter must sit in exactly one group (a public implementation silently left
    its whole refinement decoder untrained)."""
    ids = [id(p) for g in groups for p in g["params"]]
    want = {id(p) for p in model.parameters() if p.requires_grad}
    if len(ids) != len(set(ids)) or set(ids) != want:
        raise RuntimeError(f"optimizer groups hold {len(set(ids) & want)} of {len(want)} trainable "
                           f"parameters, {len(ids) - len(set(ids))} twice and "
                           f"{len(set(ids) - want)} foreign ones")


def make_optimizer(cfg, model):
    """AdamW, four groups: the temporal part (learns from scratch, higher LR) and the spatial part, each split
    into weight matrices / kernels (decayed) and norms and biases (ndim <= 1, not decayed, as SegFormer and
    MAE). Every group carries a 'name': logs read LRs by name (group_lr), never by position. Fused: one kernel
    for all parameters, faster than the per-tensor loop on the CPU (docs/performance.md)."""
    lt, ls = (cfg["lr"], cfg["lr"]) if cfg["lr"] > 0 else (cfg["lr_temporal"], cfg["lr_spatial"])
    parts = dict(temporal=(lt, [model.embed, model.temporal]),
                 spatial=(ls, [model.encoder, model.decode, model.refine]))
    groups = []
    for name, (base, modules) in parts.items():
        params = [p for m in modules for p in m.parameters()]
        groups.append(dict(name=name, params=[p for p in params if p.ndim > 1], lr=base, base_lr=base,
                           weight_decay=cfg["weight_decay"]))
        groups.append(dict(name=name + "_no_decay", params=[p for p in params if p.ndim <= 1], lr=base,
                           base_lr=base, weight_decay=0.0))
    check_groups(model, groups)
    return torch.optim.AdamW(groups, fused=True)


def group_lr(opt, name):
    return next(g["lr"] for g in opt.param_groups if g["name"] == name)


def get_lr(step, total, warmup, peak, min_lr):
    """LR multiplier (peak 1) at global step `step` of `total`: linear warmup over `warmup` steps, then
    half-cosine down to min_lr (--min_lr_frac); each group's LR is its base LR times this."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


# --- metrics and baselines ---

def batch_counts(pred, target, current):
    """(2, 4) [tp, fp, fn, tn]: row 0 over all pixels, row 1 over the pixels not burning at t (new burn)."""
    tgt = target > 0.5
    return torch.stack([losses.confusion_counts(pred, tgt), losses.confusion_counts(pred, tgt, ~current)])


def scores(counts, pr=None):
    """counts (2, 4) summed over batches -> precision, recall, f1, iou, accuracy + the new-burn ones.
    new_ap: average precision on new-burn cells from the summed PR histogram `pr`; for a hard mask (pr None,
    the baselines) it is precision x recall at its single operating point."""
    out, new = losses.seg_metrics(counts[0]), losses.seg_metrics(counts[1])
    ap = new["precision"] * new["recall"] if pr is None else losses.average_precision(pr)
    out.update(new_precision=new["precision"], new_recall=new["recall"], new_f1=new["f1"], new_iou=new["iou"],
               new_ap=ap)
    return out


def summarize(sums, counts, pr, n):
    """sums: tensor [loss, bce, dice] summed over n samples -> dict of every metric in METRICS."""
    return dict(zip(("loss", "bce", "dice"), (sums / max(n, 1)).tolist()), **scores(counts, pr))


NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]  # (drow, dcol)


def wind_dilation(cfg, current, wind):
    """Baseline: the fire front advances one cell per frame step into the neighbours that lie within an
    angle of the downwind direction that narrows with wind speed: cos(angle) >= speed / dil_wind - 1
    (clamped to [-1, 0.7]): calm -> all 8 neighbours, dil_wind m/s -> the downwind half, strong wind ->
    about 45 degrees either side of downwind. current (B,H,W) bool, wind (B,2) m/s (u east, v north)."""
    B, H, W = current.shape
    speed = wind.norm(dim=1)  # (B,)
    cos_min = (speed / cfg["dil_wind"] - 1).clamp(-1, 0.7)
    padded = F.pad(current.float(), (1, 1, 1, 1)) > 0.5
    out = current.clone()
    for dr, dc in NEIGHBOURS:  # spread from cell (i-dr, j-dc) to (i, j): east by dc, north by -dr
        cos = (wind[:, 0] * dc - wind[:, 1] * dr) / (speed * math.hypot(dr, dc) + 1e-9)  # calm: 0 >= -1
        ok = (cos >= cos_min)[:, None, None]
        out |= padded[:, 1 - dr:1 - dr + H, 1 - dc:1 - dc + W] & ok
    return out


@torch.no_grad()
def baselines(cfg, D, s, t):
    """Persistence (next = current) and wind dilation on the given samples -> {name: metrics}."""
    counts = {"persistence": 0, "dilation": 0}
    for idx in data.batch_indices(len(s), 64, shuffle=False):
        hist, wind, lengths, target = data.fire_batch(D["fire"], D["wind"], s[idx], t[idx], cfg["history"])
        ar = torch.arange(len(lengths), device=hist.device)
        cur = hist[ar, lengths - 1] > 0.5
        counts["persistence"] = counts["persistence"] + batch_counts(cur, target, cur)
        dilated = wind_dilation(cfg, cur, wind[ar, lengths - 1])
        counts["dilation"] = counts["dilation"] + batch_counts(dilated, target, cur)
    return {k: scores(c) for k, c in counts.items()}


# --- data flow: whole dataset on the device, batches by indexing ---

def split_fires(cfg, n_seq, path):
    """Whole sequences -> (train, val, test) index arrays. Val comes first in the seeded permutation, so it
    holds the same fires whatever --test_frac is; test fires are never used for stopping or choosing."""
    perm = np.random.default_rng(cfg["seed"]).permutation(n_seq)
    n_val, n_test = max(1, int(round(cfg["val_frac"] * n_seq))), int(round(cfg["test_frac"] * n_seq))
    if n_val + n_test >= n_seq:
        raise data.DataError(f"{path}: {n_seq} sequence(s) leave no training fire after --val_frac "
                             f"{cfg['val_frac']} ({n_val}) and --test_frac {cfg['test_frac']} ({n_test})")
    return np.sort(perm[n_val + n_test:]), np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test])


def fire_tensors(d, dev, path):
    """A loaded fire file (numpy) -> the dict every step indexes: fire (S,T,H,W) uint8, static (S,C,H,W), wind
    (S,T,2) on the device, channel names and the path."""
    return dict(fire=torch.from_numpy(d["fire"]).to(dev), static=torch.from_numpy(d["static"]).to(dev),
                wind=torch.from_numpy(d["wind"]).to(dev), channels=d["channels"], path=path)


def fire_hashes(fire):
    """fire (S,T,H,W) uint8 -> one sha1 per sequence: lets --eval_only recognise training
    fires in any file."""
    return [hashlib.sha1(np.ascontiguousarray(seq).tobytes()).hexdigest() for seq in fire]


def load_data(cfg, dev):
    path = cfg["data_path"] or data.default_fire_path()
    d = data.load_fire(path)
    S, T = d["fire"].shape[:2]
    train_seq, val_seq, test_seq = split_fires(cfg, S, path)
    train_s, train_t = data.fire_sample_index(train_seq, T)
    if cfg["max_samples"] > 0:
        train_s, train_t = train_s[:cfg["max_samples"]], train_t[:cfg["max_samples"]]
    st = torch.from_numpy(d["static"][train_seq]).double()  # per-channel statistics from the TRAIN split only
    mean, std = st.mean((0, 2, 3)).float(), st.std((0, 2, 3)).float().clamp(min=1e-6)
    return dict(fire_tensors(d, dev, path), train=(train_s, train_t), val=data.fire_sample_index(val_seq, T),
                test=data.fire_sample_index(test_seq, T), mean=mean, std=std,
                # the fires it learns from
                train_fire_hashes=fire_hashes(d["fire"][np.unique(train_s.numpy())]),
                # --resume checks the file's content
                data_hash=data.fingerprint(d["fire"], d["static"], d["wind"]))


def model_logits(model, hist, wind, lengths, static, amp):
    """The model under the run's precision (amp: an autocast dtype or None) -> float32 logits (B, H, W)."""
    with torch.autocast(hist.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return model(hist, wind, lengths, static).float()


def load_eval_data(cfg, dev, ckpt):
    """--eval_only: every t -> t+1 pair of every sequence of --data_path (no split) as split 'eval'. The
    static channels must be the checkpoint's, in its order: the model reads them by position."""
    path = cfg["data_path"] or data.default_fire_path()
    d = data.load_fire(path)
    if d["channels"] != list(ckpt["channels"]):
        raise data.DataError(f"{path}: dataset 'static' has channels {d['channels']}, but --model "
                             f"{cfg['model']} was trained on {list(ckpt['channels'])}")
    S, T = d["fire"].shape[:2]
    if cfg["rollout"] > T - 1:
        raise data.DataError(f"{path}: dataset 'fire' has T={T} frames; --rollout {cfg['rollout']} needs "
                             f"at least {cfg['rollout'] + 1}")
    warning = seen_in_training(cfg, path, d["fire"], ckpt)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return dict(fire_tensors(d, dev, path), eval=data.fire_sample_index(np.arange(S), T))


def seen_in_training(cfg, path, fire, ckpt):
    """A warning if --data_path is the checkpoint's training file, or holds fires it trained on (the same
    masks, by hash), else ''."""
    seen = set(ckpt["train_fire_hashes"])
    n_seen = sum(h in seen for h in fire_hashes(fire))
    if os.path.realpath(path) == os.path.realpath(ckpt["data_file"]):
        what = (f"is the file --model {cfg['model']} was trained on: its training fires were seen in "
                "training and its val fires chose the checkpoint")
    elif n_seen:
        what = (f"holds {n_seen} of {len(fire)} fires --model {cfg['model']} was trained on: "
                "those were seen in training")
    else:
        return ""
    return (f"{path} {what}, so these scores do not measure new fires "
            "(that run's test split: its test_metrics.json)")


def kept_pixels(cfg, current):
    """Number of pixels the loss is taken over (a 0-d tensor), current (B, H, W) bool = burning at t:
    the cells not burning yet with --target new, all of them with 'full'."""
    return ((~current).sum() if cfg["target"] == "new"
            else torch.full((), current.numel(), device=current.device))


def forward_batch(cfg, model, D, s, t, amp, unroll=1):
    """s, t (B,): a global batch (unroll > 1: trained through that many steps, unrolled_loss; evaluation and
    the metrics are always one step), of which this process takes its data.rank_slice (all of it in one
    process) -> loss: this slice's share of the batch's --target objective (the shares of all processes
    add up to it; in one process it is the objective itself), [loss, bce, dice] shares * B, confusion
    counts (2, 4) and new-burn PR histogram (2, bins) of the slice, its logits (b, H, W). No collective:
    the batch's kept pixels are counted from the resident data, so every process gets them alone."""
    mine = data.rank_slice(len(s))
    hist, wind, lengths, nxt = data.fire_batch(D["fire"], D["wind"], s[mine], t[mine], cfg["history"])
    logits = model_logits(model, hist, wind, lengths, D["static"][s[mine].to(hist.device)], amp)
    # (b, H, W) burning at t
    current = hist[torch.arange(len(lengths), device=hist.device), lengths - 1] > 0.5
    # means over this slice
    _, bce, dice = losses.bce_dice_loss(logits, nxt, cfg["bce_weight"], cfg["dice_weight"],
                                        cfg["pos_weight"] if cfg["pos_weight"] > 0 else None,
                                        mask=~current if cfg["target"] == "new" else None)
    # BCE is a mean over the batch's kept pixels and Dice a mean over its samples: weighting each by
    # this slice's part of that count gives its share of the global batch's loss (x 1.0 in one process:
    # the numbers are unchanged)
    # (B, H, W) frame t of the global batch
    batch_current = D["fire"][s.to(hist.device), t.to(hist.device)] > 0
    bce = bce * (kept_pixels(cfg, current) / kept_pixels(cfg, batch_current).clamp(min=1))
    # an empty slice: its mean is 0/0
    dice = dice * (len(nxt) / len(s)) if len(nxt) else torch.zeros_like(bce)
    loss = cfg["bce_weight"] * bce + cfg["dice_weight"] * dice
    if unroll > 1:  # training, one process (check_config): the shares above are the whole batch. The loss
        # logged is then the mean over the steps taken; bce, dice and the metrics stay step 1's
        more, steps = unrolled_loss(cfg, model, D, s, t, hist, wind, lengths, logits, amp, unroll)
        loss = (loss + more) / (1 + steps)
    counts = batch_counts(torch.sigmoid(logits) > cfg["pred_thresh"], nxt, current)
    pr = losses.pr_histogram(logits, nxt, ~current)  # new-burn cells only
    return loss, torch.stack([loss, bce, dice]).detach() * len(s), counts, pr, logits


def unrolled_loss(cfg, model, D, s, t, hist, wind, lengths, logits, amp, unroll):
    """The --target loss summed over steps 2..unroll: step k + 1 sees the model's own SOFT forecast of frame
    t + k in place of the truth (burning cells 1, cells within NEAR_CELLS of them their probability, the rest
    0 as the sparse patches need; differentiable), so training learns to forecast from its forecasts, as a
    rollout must. Samples without frame t + k + 1 drop out -> (that loss, the number of steps taken)."""
    K, total, steps = cfg["history"], 0.0, 0
    s, t = s.to(hist.device), t.to(hist.device)
    for k in range(1, unroll):
        last = hist[torch.arange(len(s), device=hist.device), lengths - 1]  # (B, H, W) input frame t+k-1
        frame = last + (1 - last) * near_fire(last > 0.5) * torch.sigmoid(logits)  # forecast of t+k
        keep = t + k + 1 < D["fire"].shape[1]
        if not keep.any():
            break
        s, t, hist, wind, lengths, frame = (x[keep] for x in (s, t, hist, wind, lengths, frame))
        full = (lengths == K)[:, None, None, None]  # a full history drops its oldest frame
        slot = F.one_hot(torch.where(lengths == K, K - 1, lengths), K).bool()  # (B, K) where frame t+k goes
        hist = torch.where(slot[:, :, None, None], frame[:, None], torch.where(full, hist.roll(-1, 1), hist))
        wind = torch.where(slot[:, :, None], D["wind"][s, t + k].float()[:, None],
                           torch.where(full[:, :, 0], wind.roll(-1, 1), wind))
        lengths = torch.clamp(lengths + 1, max=K)
        logits = model_logits(model, hist, wind, lengths, D["static"][s], amp)
        total = total + losses.bce_dice_loss(logits, D["fire"][s, t + k + 1].float(), cfg["bce_weight"],
                                             cfg["dice_weight"], cfg["pos_weight"] or None,
                                             mask=frame < 0.5 if cfg["target"] == "new" else None)[0]
        steps += 1
    return total, steps


def train_epoch(cfg, model, opt, scaler, D, gen, step, total_steps, amp, step_rows, epoch):
    """One pass over the training samples. Under torchrun (model wrapped in DDP) every process draws the same
    global batches from its identically seeded `gen` and trains on its slice of each (forward_batch), so the
    batch order does not depend on the number of processes; the metrics are summed over processes at the
    end. Non-finite losses are recorded on the device and looked at (over all processes) every CHECK_EVERY
    steps and at the end (no sync per step): the run stops (data.NonFiniteLoss) before anything of this
    epoch is saved; with a GradScaler (fp16) only a window in which every step overflowed does."""
    model.train()
    world = data.rank_world()[1]
    s_all, t_all = D["train"]
    sums, counts, prs = 0, 0, 0
    # [k]: k-th step since the last check
    bad = torch.zeros(CHECK_EVERY, dtype=torch.bool, device=D["fire"].device)
    checked, seen, seen_mine = step, 0, 0  # seen: samples of the global batches; seen_mine: this process's
    batches = data.batch_indices(len(s_all), cfg["batch_size"], shuffle=True, generator=gen)
    progress = data.Progress(len(batches), f"epoch {epoch}")
    for i, idx in enumerate(batches):
        mult = get_lr(step, total_steps, max(1, int(cfg["warmup_frac"] * total_steps)), 1.0,
                      cfg["min_lr_frac"])
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        # this process's share
        loss, s3, c, pr, logits = forward_batch(cfg, model, D, s_all[idx], t_all[idx], amp, cfg["unroll"])
        opt.zero_grad(set_to_none=True)
        # DDP averages the gradients over the processes; the shares add up to the batch's loss,
        # so x world makes the result the global batch's gradient, whatever the slice sizes (an
        # empty slice still joins with 0)
        scaler.scale(loss * world).backward()
        scaler.unscale_(opt)
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        step, seen, seen_mine = step + 1, seen + len(idx), seen_mine + len(logits)
        finite = torch.isfinite(s3[0])
        bad[step - checked - 1] = ~finite
        sums, counts, prs = sums + torch.where(finite, s3, 0.0), counts + c, prs + pr
        if step % CHECK_EVERY == 0:
            data.check_finite(bad[:step - checked], scaler.is_enabled(), f"emberformer.py, epoch {epoch}",
                          checked + 1, step)
            bad.zero_()
            checked = step
        # live: this process's running loss (the shares of its slices), exact in one process;
        # the epoch line is global
        progress.update(i + 1, seen, lambda: (sums[0] / max(seen_mine, 1)).item())
        # the same steps on every process: the batch's loss, summed over the processes
        if step % cfg["log_every"] == 0:
            s3 = (data.all_reduce_sum(s3) / len(idx)).tolist()
            step_rows.append(dict(step=step, epoch=epoch, lr_temporal=group_lr(opt, "temporal"),
                                  lr_spatial=group_lr(opt, "spatial"), loss=s3[0], bce=s3[1], dice=s3[2]))
    progress.close()
    if step > checked:
        data.check_finite(bad[:step - checked], scaler.is_enabled(), f"emberformer.py, epoch {epoch}",
                          checked + 1, step)
    sums, counts, prs = (data.all_reduce_sum(x) for x in (sums, counts, prs))  # every sample counted once
    return summarize(sums, counts, prs, len(s_all)), step


@torch.no_grad()
def evaluate(cfg, model, D, amp, split="val"):
    """Every metric over the split. Under torchrun each process scores its slice of every batch and the sums
    are added over the processes, so every sample counts once (call it on every process)."""
    model.eval()
    s_all, t_all = D[split]
    sums, counts, prs = 0, 0, 0
    for idx in data.batch_indices(len(s_all), cfg["batch_size"], shuffle=False):
        _, s3, c, pr, _ = forward_batch(cfg, model, D, s_all[idx], t_all[idx], amp)
        sums, counts, prs = sums + s3, counts + c, prs + pr
    sums, counts, prs = (data.all_reduce_sum(x) for x in (sums, counts, prs))
    return summarize(sums, counts, prs, len(s_all))


@torch.no_grad()
def calibration_data(cfg, model, D, amp, split):
    """One process over every sample of the split -> (logits, outcomes) of the cells that can newly burn near
    the fire (not burning at t, within NEAR_CELLS cells of it: farther cells are ~0 and would flatter any
    score) and wind dilation's 0/1 forecast of those cells, and the new-burn PR histogram over all cells not
    burning at t (what the decision threshold is chosen on)."""
    model.eval()
    s_all, t_all = D[split]
    logits_near, y_near, dilated_near, hist = [], [], [], 0
    for idx in data.batch_indices(len(s_all), cfg["batch_size"], shuffle=False):
        s, t = s_all[idx], t_all[idx]
        past, wind, lengths, nxt = data.fire_batch(D["fire"], D["wind"], s, t, cfg["history"])
        logits = model_logits(model, past, wind, lengths, D["static"][s.to(past.device)], amp)  # (B, H, W)
        current = past[torch.arange(len(lengths), device=past.device), lengths - 1] > 0.5
        keep = near_fire(current) & ~current
        dilated = wind_dilation(cfg, current,
                                wind[torch.arange(len(lengths), device=past.device), lengths - 1])
        logits_near.append(logits[keep].float().cpu())
        y_near.append(nxt[keep].float().cpu())
        dilated_near.append(dilated[keep].float().cpu())
        hist = hist + losses.pr_histogram(logits, nxt, ~current)
    return torch.cat(logits_near), torch.cat(y_near), torch.cat(dilated_near), hist


def fit_calibration(cfg, model, D, amp):
    """After training, on the VALIDATION fires only: a monotone map from the model's logit to a calibrated
    probability near the fire (losses.fit_reliability; None without such cells) and the decision threshold
    with the highest new-burn F1 (a raw-model probability, what --pred_thresh means) -> dict for best.pth."""
    logits, y, _, hist = calibration_data(cfg, model, D, amp, "val")
    cut, f1 = losses.best_f1_threshold(hist)
    return dict(reliability=losses.fit_reliability(logits, y) if len(y) else None, val_new_f1=f1,
                pred_thresh=float(torch.sigmoid(torch.tensor(cut))), val_cells=len(y))


def calibrated(logits, reliability):
    """Probabilities of logits through the run's reliability map (raw sigmoid when it has none)."""
    return torch.sigmoid(logits) if reliability is None else losses.apply_reliability(logits, reliability)


def calibration_report(cfg, model, D, amp, split, reliability):
    """Brier score (with its climatological skill) and ECE on the split's cells near the fire, of the raw and
    the calibrated probabilities (the val map), and of wind dilation's 0/1 forecast on the same cells."""
    logits, y, dilated, _ = calibration_data(cfg, model, D, amp, split)
    return dict(raw=losses.calibration(torch.sigmoid(logits), y),
                calibrated=losses.calibration(calibrated(logits, reliability), y),
                dilation=losses.calibration(dilated, y), mapped=reliability is not None,
                near_cells=NEAR_CELLS)


# --- rollout: the model fed its own forecasts, as an operational forecast would be ---

def rollout_starts(n_seq, n_frames, n_steps):
    """Every (sequence, t0) with n_steps true frames after t0, in the order of the one-step
    pairs -> s, t0 (M,)."""
    return data.fire_sample_index(np.arange(n_seq), n_frames - n_steps + 1)  # t0 = 0 .. T-1-n_steps


@torch.no_grad()
def model_rollout(cfg, model, D, s, t0, n_steps, amp, gen=None, wind_sigma=0.0):
    """Forecast frames t0+1 .. t0+n_steps. Step k sees the true frames up to t0, then its own forecasts (the
    last `history` frames in all), the true static channels and the OBSERVED wind of each frame (a perfect
    wind forecast). A forecast is the probability thresholded at pred_thresh OR the previous frame, so no
    cell un-burns (a 'full' target model could). An ensemble member (gen, a seeded CPU generator)
    instead burns the cells within NEAR_CELLS of its fire whose calibrated probability exceeds one uniform
    draw per fire and step, and sees the wind plus N(0, wind_sigma^2) m/s noise per frame and component.
    s, t0 (B,) -> (B, n_steps, H, W): bool forecasts; a member's: float, the probability that each cell
    burns by that lead GIVEN its own previous frame (1 where burning), the expectation of its draw."""
    model.eval()
    dev = D["fire"].device
    s, t0 = s.to(dev), t0.to(dev)
    rows = torch.arange(len(s), device=dev)
    # (B, T, H, W), a copy: the true fire, its frames after t0 overwritten as forecasts come
    seq = D["fire"][s]
    wind, static = D["wind"][s], D["static"][s]  # (B, T, 2), (B, C, H, W)
    if wind_sigma > 0:
        wind = wind + (wind_sigma * torch.randn(wind.shape, generator=gen)).to(dev)
    probs = []  # a member's (B, H, W) per lead
    for k in range(n_steps):  # fire_batch reads frames <= t0 + k only: the truth to t0, forecasts after
        hist, w, lengths, _ = data.fire_batch(seq, wind, rows, t0 + k, cfg["history"])
        logits = model_logits(model, hist, w, lengths, static, amp)  # (B, H, W)
        burning = seq[rows, t0 + k] > 0  # (B, H, W)
        if gen is None:
            new = torch.sigmoid(logits) > cfg["pred_thresh"]
        else:
            # a member draws ONE uniform per fire and step and burns the cells whose calibrated probability
            # exceeds it: each cell burns with its probability, but the member stays one coherent front.
            # Only cells near its fire may burn, where the map was fitted: a low draw must not light the
            # far field, whose probabilities it never saw
            p = calibrated(logits, cfg.get("reliability"))  # (B, H, W)
            p = torch.where(burning, 1.0, near_fire(burning) * p)
            new = p > torch.rand(len(s), 1, 1, generator=gen).to(dev)
            probs.append(p)
        seq[rows, t0 + k + 1] = (new | burning).to(seq.dtype)
    if gen is not None:
        return torch.stack(probs, 1)
    return seq[rows[:, None], t0[:, None] + 1 + torch.arange(n_steps, device=dev)] > 0


def ensemble_rollout(cfg, model, D, s, t0, n_steps, amp):
    """--members M rollouts, member m seeded from (seed, m, the batch's first start) so every batch and member
    is reproducible -> (B, n_steps, H, W) float: the burn probability, the mean over members of each member's
    probability given its previous frame. Its expectation is the fraction of members that burn a cell, but
    the sampling noise of the last draw is gone: that fraction's Brier score carries an extra p(1-p) / M."""
    runs = [model_rollout(cfg, model, D, s, t0, n_steps, amp, wind_sigma=cfg["wind_sigma"],
                          gen=torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + 7919 * m
                                                            + int(s[0]) * 31 + int(t0[0])))
            for m in range(cfg["members"])]
    return torch.stack(runs).float().mean(0)


def dilation_rollout(cfg, D, s, t0, n_steps):
    """Wind dilation applied n_steps times from the true frame t0, each step with that frame's observed wind
    -> (B, n_steps, H, W) bool."""
    s, t0 = s.to(D["fire"].device), t0.to(D["fire"].device)
    cur, out = D["fire"][s, t0] > 0, []
    for k in range(n_steps):
        cur = wind_dilation(cfg, cur, D["wind"][s, t0 + k])
        out.append(cur)
    return torch.stack(out, 1)


def lead_counts(forecast, truth, start):
    """forecast, truth (B, N, H, W) bool, start (B, H, W) bool burning at t0 -> (N, 4) [tp, fp, fn, tn]
    per lead over the cells not burning at t0: the new burn since the forecast began, as the one-step
    new-burn scores."""
    return torch.stack([losses.confusion_counts(forecast[:, k], truth[:, k], ~start)
                        for k in range(truth.shape[1])])


def lead_scores(counts, area0, brier=None):
    """counts (N, 4) summed over all starts, area0 = cells burning at the starts -> one dict per lead:
    new-burn F1/IoU/precision/recall, the Jaccard index of the WHOLE burned area (the fire-emulator
    literature's score: forecast and truth both hold the start's area, so it is
    (area0 + tp) / (area0 + tp + fp + fn)), the burned-area bias (forecast / true area) and the same ratio
    for the new burn alone; brier (N, 3) [cells, sum of squared error, sum of p(1-p)] adds the
    Brier score and the ensemble spread."""
    rows = []
    for k, (tp, fp, fn, tn) in enumerate(counts.tolist()):
        m = losses.seg_metrics([tp, fp, fn, tn])
        rows.append(dict(lead=k + 1, new_f1=m["f1"], new_iou=m["iou"], new_precision=m["precision"],
                         new_recall=m["recall"], area_jaccard=(area0 + tp) / max(area0 + tp + fp + fn, 1),
                         area_bias=(area0 + tp + fp) / max(area0 + tp + fn, 1),
                         new_area_bias=(tp + fp) / (tp + fn) if tp + fn else float("nan"),
                         tp=tp, fp=fp, fn=fn))
        if brier is not None:
            n, sq, var = brier[k].tolist()
            rows[-1].update(brier=sq / max(n, 1), spread=var / max(n, 1))
    return rows


def lead_brier(prob, truth, start):
    """prob, truth (B, N, H, W), start (B, H, W) burning at t0 -> (N, 3) [cells, sum of squared error, sum of
    p(1-p)] over the cells not burning at t0 within NEAR_CELLS + lead cells of it (the cells a fire can
    reach by then; the rest are ~0 and would flatter every method alike). p(1-p), the spread, is the Brier
    score a probability forecast expects of itself: as large as the real one if it is well calibrated."""
    out = []
    for k in range(truth.shape[1]):
        cells = near_fire(start, NEAR_CELLS + k + 1) & ~start
        p, y = prob[:, k].float()[cells], truth[:, k].float()[cells]
        out.append(torch.stack([cells.sum().double(), ((p - y) ** 2).sum().double(),
                                (p * (1 - p)).sum().double()]))
    return torch.stack(out).cpu()


@torch.no_grad()
def rollout_scores(cfg, model, D, n_steps, amp):
    """Model, wind-dilation and persistence rollouts from every start with n_steps true frames after it;
    counts are summed over all starts, then scored -> {method: [one dict per lead]}, number of starts. The
    batches are those evaluate() makes over the same starts, so lead 1 is the one-step score exactly."""
    s_all, t_all = rollout_starts(*D["fire"].shape[:2], n_steps)
    methods = ROLLOUT_METHODS + (("ensemble",) if cfg["members"] else ())
    counts, briers, area0 = {m: 0 for m in methods}, {m: 0 for m in methods}, 0
    dev, leads = D["fire"].device, torch.arange(1, n_steps + 1)
    for idx in data.batch_indices(len(s_all), cfg["batch_size"], shuffle=False):
        s, t0 = s_all[idx], t_all[idx]
        start = D["fire"][s.to(dev), t0.to(dev)] > 0  # (B, H, W)
        truth = D["fire"][s[:, None].to(dev), (t0[:, None] + leads).to(dev)] > 0  # (B, N, H, W)
        probs = dict(model=model_rollout(cfg, model, D, s, t0, n_steps, amp).float(),
                     dilation=dilation_rollout(cfg, D, s, t0, n_steps).float(),
                     persistence=start[:, None].expand_as(truth).float())
        if cfg["members"]:
            # member mean (B, N, H, W)
            probs["ensemble"] = ensemble_rollout(cfg, model, D, s, t0, n_steps, amp)
        for m, p in probs.items():  # the ensemble's hard forecast: cells with a burn probability >= 0.5
            counts[m] = counts[m] + lead_counts(p >= 0.5, truth, start)
            briers[m] = briers[m] + lead_brier(p, truth, start)
        area0 += int(start.sum())
    return {m: lead_scores(counts[m], area0, briers[m]) for m in methods}, len(s_all)


# --- outputs: csv logs, plots, checkpoints ---

# error maps (black: neither); the strip's legend names them
ERROR_COLOURS = {"hit": (1.0, 1.0, 1.0), "false alarm": (1.0, 0.2, 0.2), "miss": (0.2, 0.5, 1.0),
                 "burning at t0": (0.5, 0.5, 0.5)}


def error_image(pred, truth, start):
    """pred, truth, start (H, W) bool CPU -> (H, W, 3) RGB in ERROR_COLOURS: hit, false alarm, miss,
    burning at the start frame (and kept); black neither."""
    err = torch.zeros(*truth.shape, 3)
    err[pred & truth] = torch.tensor(ERROR_COLOURS["hit"])
    err[pred & ~truth] = torch.tensor(ERROR_COLOURS["false alarm"])
    err[~pred & truth] = torch.tensor(ERROR_COLOURS["miss"])
    err[start & truth & pred] = torch.tensor(ERROR_COLOURS["burning at t0"])
    return err


def preview_samples(D, split="val"):
    """Two fixed samples of the split with the most newly burned pixels, from different fires."""
    s, t = D[split]
    fire, sd, td = D["fire"], s.to(D["fire"].device), t.to(D["fire"].device)
    new = (fire[sd, td + 1] > fire[sd, td]).flatten(1).sum(1)
    order = new.argsort(descending=True).cpu()
    first = order[0]
    other = [i for i in order.tolist() if s[i] != s[first]]
    pick = torch.tensor([first.item(), other[0] if other else order[min(1, len(order) - 1)].item()])
    return s[pick], t[pick]


@torch.no_grad()
def plot_preview(cfg, model, D, sample, amp, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model.eval()
    s, t = sample
    hist, wind, lengths, target = data.fire_batch(D["fire"], D["wind"], s, t, cfg["history"])
    # rank 0 alone: no slice
    logits = model_logits(model, hist, wind, lengths, D["static"][s.to(hist.device)], amp)
    prob = torch.sigmoid(logits.float()).cpu()
    fig, axes = plt.subplots(2, 5, figsize=(16, 6.6), gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01,
                                                                        top=0.95, wspace=0.05, hspace=0.12))
    ch = D["channels"].index("fuel_type") if "fuel_type" in D["channels"] else 0
    for r in range(2):
        L = lengths[r].item()
        h = hist[r, :L].cpu()
        age = torch.where(h.sum(0) > 0, h.sum(0) - 1, torch.tensor(float("nan")))  # frames since first burn
        cur, tgt, pred = h[-1] > 0.5, target[r].cpu() > 0.5, prob[r] > cfg["pred_thresh"]
        err = error_image(pred, tgt, cur)
        u, v = wind[r, L - 1].tolist()
        panels = [(age, f"burn age over {L} frames (yellow = new), wind {math.hypot(u, v):.1f} m/s",
                   "viridis_r"),
                  (D["static"][s[r], ch].cpu() if D["channels"] else torch.zeros(tgt.shape),  # C may be 0
                   f"static: {D['channels'][ch]}" if D["channels"] else "no static channels", "terrain"),
                  (tgt.float(), f"target t+1 (seq {s[r].item()}, t={t[r].item()})", "gray"),
                  (prob[r], "predicted probability", "magma"),
                  (err, "error: white hit, red FP, blue FN", None)]
        for ax, (img, title, cmap) in zip(axes[r], panels):
            ax.imshow(img.numpy(), cmap=cmap, vmin=0 if cmap in ("gray", "magma") else None,
                      vmax=1 if cmap in ("gray", "magma") else None, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        H, W = tgt.shape
        n = max(math.hypot(u, v), 1e-6)
        # downwind; row 0 = N
        axes[r, 0].arrow(W / 2, H / 2, u / n * W / 5, -v / n * H / 5, color="red", width=0.4)
    data.atomic_savefig(fig, path, dpi=80)
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
    for k in ("val_f1", "val_iou", "val_new_f1", "val_new_ap", "train_new_f1"):
        b.plot(ep, col(k), label=k)
    b.axhline(base["dilation"]["new_f1"], ls="--", c="gray", label="wind dilation new_f1")
    b.axhline(base["dilation"]["f1"], ls=":", c="gray", label="wind dilation f1")
    b.set(xlabel="epoch", ylabel="score")
    b.legend(fontsize=7)
    fig.tight_layout()
    data.atomic_savefig(fig, path, dpi=80)
    plt.close(fig)


def print_calibration(report, where):
    raw, cal, dil = report["raw"], report["calibrated"], report["dilation"]
    print(f"calibration ({where}; {raw['n_cells']} cells within {report['near_cells']} of the fire, "
          f"base rate {raw['base_rate']:.3f}): Brier {raw['brier']:.4f} -> {cal['brier']:.4f} "
          f"{'calibrated on val' if report['mapped'] else '(no map stored)'} (skill vs climatology "
          f"{raw['brier_skill']:.3f} -> "
          f"{cal['brier_skill']:.3f}; dilation's 0/1 forecast {dil['brier']:.4f}), "
          f"ECE {raw['ece']:.4f} -> {cal['ece']:.4f}")


def plot_reliability(report, path, title):
    """Predicted probability against observed frequency per bin, raw and calibrated on val, with each bin's
    cell count: a calibrated forecast lies on the diagonal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    n_bins = len(report["raw"]["bins"])
    for name, style in (("raw", "o-"), ("calibrated", "s-")):
        r = report[name]
        pts = [(p, o, c) for c, p, o in r["bins"] if c]
        label = (f"{name}{' (val map)' if name == 'calibrated' else ''}: ECE {r['ece']:.3f}, "
                 f"Brier {r['brier']:.4f}")
        ax.plot([p for p, _, _ in pts], [o for _, o, _ in pts], style, ms=4, label=label)
        ax2.bar(np.arange(n_bins) + (0.2 if name == "calibrated" else -0.2), [c for c, _, _ in r["bins"]],
                0.4, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency",
           title=f"reliability, {title}: cells within {report['near_cells']} of the fire")
    ax.legend(fontsize=7, loc="upper left")
    ax2.set(yscale="log", xticks=np.arange(n_bins), xticklabels=[f"{k / n_bins:.1f}" for k in range(n_bins)],
            xlabel="bin (lower edge)", ylabel="cells", title="cells per bin")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    data.atomic_savefig(fig, path, dpi=90)
    plt.close(fig)


def write_eval_csv(path, one_step, n_pairs, n_fires):
    """One row per method (model, dilation, persistence) on the identical pairs. Baselines have no loss,
    and their new_ap is precision x recall at their single operating point (a hard mask has no ranking):
    said in `note`."""
    rows = [dict(method=m, pairs=n_pairs, fires=n_fires, **{k: scores_.get(k, "") for k in EVAL_COLUMNS},
                 note="" if m == "model" else "new_ap = new_precision x new_recall (hard mask)")
            for m, scores_ in one_step.items()]
    data.atomic_write_csv(path, rows)


def print_one_step(path, one_step, n_pairs, n_fires):
    m, dil, per = one_step["model"], one_step["dilation"], one_step["persistence"]
    print(f"eval {path} ({n_pairs} pairs, {n_fires} fires): model new_f1 {m['new_f1']:.3f} "
          f"new_iou {m['new_iou']:.3f} new_ap {m['new_ap']:.3f} f1 {m['f1']:.3f} | wind dilation "
          f"new_f1 {dil['new_f1']:.3f} new_iou {dil['new_iou']:.3f} new_ap* {dil['new_ap']:.3f} | "
          f"persistence new_f1 {per['new_f1']:.3f} new_ap* {per['new_ap']:.3f} (* precision x recall)")


def write_rollout_csv(path, by_method, n_starts):
    """One row per (method, lead), methods in ROLLOUT_METHODS order (then the ensemble); counts
    pooled over starts."""
    rows = [dict(method=m, starts=n_starts, **row) for m in by_method for row in by_method[m]]
    data.atomic_write_csv(path, rows)


def print_rollout(by_method, n_starts):
    names = [m for m in ("model", "dilation", "ensemble") if m in by_method]
    print(f"rollout from {n_starts} starts (observed wind) | lead: per method new-burn F1 since t0 / "
          f"whole-area Jaccard / area bias / Brier near the fire, for {', '.join(names)}; "
          "persistence Jaccard")
    for k, p in enumerate(by_method["persistence"]):
        cells = [f"{r['new_f1']:.3f} / {r['area_jaccard']:.3f} / {r['area_bias']:.2f} / {r['brier']:.4f}"
                 for r in (by_method[m][k] for m in names)]
        if "ensemble" in by_method:
            cells[-1] += f" (spread {by_method['ensemble'][k]['spread']:.4f})"
        print(f"  lead {p['lead']}: " + " | ".join(cells) + f" | {p['area_jaccard']:.3f}")


def plot_rollout(by_method, n_starts, name, path):
    """Per lead and method: new-burn F1 (solid) and whole-area Jaccard (dashed), burned-area bias, Brier score
    (with the ensemble's spread: as large as its Brier score for a well-spread ensemble)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for m, color in zip(by_method, ("C0", "C1", "C2", "C3")):
        lead = [r["lead"] for r in by_method[m]]
        a.plot(lead, [r["new_f1"] for r in by_method[m]], "o-", c=color, ms=3, label=f"{m} new-burn F1")
        a.plot(lead, [r["area_jaccard"] for r in by_method[m]], "s--", c=color, ms=3,
               label=f"{m} whole-area Jaccard")
        b.plot(lead, [r["area_bias"] for r in by_method[m]], "o-", c=color, ms=3, label=m)
        c.plot(lead, [r["brier"] for r in by_method[m]], "o-", c=color, ms=3, label=m)
    if "ensemble" in by_method:
        c.plot(lead, [r["spread"] for r in by_method["ensemble"]], ":", c="C3", label="ensemble spread")
    a.set(xlabel="lead time (frames)", ylabel="score", ylim=(-0.02, 1.0),
          title=f"{name}: rollout from {n_starts} starts, observed wind")
    b.axhline(1.0, ls=":", c="gray")
    b.set(xlabel="lead time (frames)", ylabel="burned-area bias (forecast / true area)")
    c.set(xlabel="lead time (frames)", ylabel="Brier score", title="cells within 2 + lead of the start fire")
    a.legend(fontsize=6, ncol=2, loc="lower left")
    for ax in (b, c):
        ax.legend(fontsize=7)
    fig.tight_layout()
    data.atomic_savefig(fig, path, dpi=80)
    plt.close(fig)


def strip_start(D, n_steps):
    """The start (s, t0) whose true new burn over n_steps frames is largest: the rollout the strip shows."""
    s, t0 = rollout_starts(*D["fire"].shape[:2], n_steps)
    dev = D["fire"].device
    grown = (D["fire"][s.to(dev), (t0 + n_steps).to(dev)]
             > D["fire"][s.to(dev), t0.to(dev)]).flatten(1).sum(1)
    i = int(grown.argmax())
    return s[i:i + 1], t0[i:i + 1]


def shown_leads(n_steps, most=8):
    """The lead indices (0-based) a strip shows: all of them, or `most` spread evenly, always the last."""
    if n_steps <= most:
        return list(range(n_steps))
    return sorted({round(i * (n_steps - 1) / (most - 1)) for i in range(most)})


@torch.no_grad()
def plot_rollout_prob(cfg, model, D, n_steps, amp, path):
    """The strip's rollout as the ensemble sees it: per lead, the burn probability (ensemble_rollout) of each
    cell, with the true burned area's outline (white) and the start's (cyan)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s, t0 = strip_start(D, n_steps)
    prob = ensemble_rollout(cfg, model, D, s, t0, n_steps, amp)[0].cpu()  # (N, H, W)
    fire = D["fire"][s[0]].cpu().float()  # (T, H, W)
    leads = shown_leads(n_steps)
    fig, axes = plt.subplots(1, len(leads), figsize=(2.6 * len(leads), 3.0), squeeze=False)
    for ax, k in zip(axes[0], leads):
        im = ax.imshow(prob[k].numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.contour(fire[t0[0] + 1 + k].numpy(), levels=[0.5], colors="white", linewidths=0.8)
        ax.contour(fire[t0[0]].numpy(), levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"t0+{k + 1}", fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, label="burn probability (member mean)")
    fig.suptitle(f"{cfg['members']}-member ensemble, sequence {s[0].item()} from t0={t0[0].item()}, "
                 f"wind noise {cfg['wind_sigma']} m/s: white = true burned area, cyan = start", fontsize=9)
    data.atomic_savefig(fig, path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def plot_rollout_strip(cfg, model, D, n_steps, amp, path):
    """One rollout, lead by lead: the truth (grey = burning at t0, orange = burned since), then the
    model's and the wind dilation's forecasts as error maps (white hit, red false alarm, blue miss,
    grey burning at t0), with a legend of the colours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    s, t0 = strip_start(D, n_steps)
    fire = D["fire"][s[0]].cpu() > 0  # (T, H, W)
    start, truth = fire[t0[0]], fire[t0[0] + 1:t0[0] + 1 + n_steps]  # (H, W), (N, H, W)
    forecasts = dict(model=model_rollout(cfg, model, D, s, t0, n_steps, amp)[0].cpu(),
                     dilation=dilation_rollout(cfg, D, s, t0, n_steps)[0].cpu())  # (N, H, W) each
    grey, orange = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 0.6, 0.1])
    leads = shown_leads(n_steps)
    fig, axes = plt.subplots(3, len(leads), figsize=(2.4 * len(leads), 7.4), squeeze=False)
    for col, k in enumerate(leads):
        truth_img = start[..., None] * grey + (truth[k] & ~start)[..., None] * orange  # (H, W, 3)
        panels = [(truth_img, f"truth t0+{k + 1}")]
        for m, f in forecasts.items():
            f1 = losses.seg_metrics(losses.confusion_counts(f[k], truth[k], ~start))["f1"]
            panels.append((error_image(f[k], truth[k], start), f"{m}: new-burn F1 {f1:.2f}"))
        for r, (img, title) in enumerate(panels):
            axes[r, col].imshow(img.numpy(), interpolation="nearest")
            axes[r, col].set_title(title, fontsize=8)
            axes[r, col].axis("off")
    fig.suptitle(f"rollout of sequence {s[0].item()} from t0={t0[0].item()} (observed wind)", fontsize=9)
    swatches = {"truth: burned since t0": tuple(orange.tolist()), **ERROR_COLOURS}
    fig.legend(handles=[Patch(facecolor=c, edgecolor="k", label=name) for name, c in swatches.items()],
               loc="lower center", ncol=len(swatches), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # room for the legend
    data.atomic_savefig(fig, path, dpi=80)
    plt.close(fig)


# --- main ---

def parse_config(argv=None, only_given=False):
    """argparse built from the constants block above, so `-h` lists every constant with its comment;
    only_given: just the flags written on the command line (--eval_only lets them override the
    checkpoint's settings)."""
    return data.parse_constants(os.path.abspath(__file__), __doc__, globals(), argv, only_given)


def check_config(cfg, world=1):
    """The flags, for a run of `world` processes (torchrun), else one line (DataError) naming the flag."""
    data.check_choice(cfg, "monitor", MONITORS)
    data.check_choice(cfg, "target", ("new", "full"))
    data.check_choice(cfg, "cpu_bf16", ("auto", "on", "off"))
    data.check_range(cfg, "epochs batch_size history patch_size log_every unroll", 1)
    data.check_range(cfg, "val_frac pred_thresh", 0, 1, lo_open=True, hi_open=True)
    data.check_range(cfg, "test_frac warmup_frac", 0, 1, hi_open=True)
    data.check_range(cfg, "min_lr_frac", 0, 1)
    data.check_range(cfg, "lr weight_decay pos_weight bce_weight dice_weight grad_clip", 0)
    data.check_range(cfg, "lr_temporal lr_spatial dil_wind wind_scale", 0, lo_open=True)
    if cfg["bce_weight"] + cfg["dice_weight"] == 0:
        raise data.DataError("--bce_weight + --dice_weight must be > 0")
    check_mode(cfg)
    if cfg["unroll"] > 1 and world > 1:
        raise data.DataError("--unroll trains in one process: start it with python, not torchrun")
    if cfg["eval_only"] and world > 1:
        raise data.DataError(f"--eval_only runs in one process: start it with python, not torchrun with "
                             f"{world} processes")
    if cfg["batch_size"] < world:
        raise data.DataError(f"--batch_size {cfg['batch_size']} is the global batch, split over the {world} "
                             f"processes: it must be at least {world}")


def check_mode(cfg):
    """Training, or --eval_only of a trained --model: the flags of one mode are refused in the other."""
    data.check_range(cfg, "rollout members wind_sigma", 0)
    if (cfg["members"] or cfg["wind_sigma"]) and not cfg["rollout"]:
        raise data.DataError("--members and --wind_sigma make an ensemble of rollouts: give --rollout N too")
    if cfg["wind_sigma"] and not cfg["members"]:
        raise data.DataError("--wind_sigma perturbs the members of an ensemble: give --members M too")
    if not cfg["eval_only"]:
        if cfg["model"] or cfg["rollout"]:
            raise data.DataError(f"--{'model' if cfg['model'] else 'rollout'} is for --eval_only "
                                 "(scoring a trained model: --eval_only --model PATH); to continue a "
                                 "training run use --resume")
        return
    if not cfg["model"]:
        raise data.DataError("--eval_only needs --model PATH, a trained checkpoint (e.g. "
                             "outputs/emberformer/checkpoints/best.pth)")
    if cfg["resume"]:
        raise data.DataError("--resume continues a training run; --eval_only scores --model PATH "
                             "(drop --resume)")


def build_model(cfg, D, dev):
    model = EmberFormer(len(D["channels"]), cfg["patch_size"], cfg["wind_scale"], cfg["target"]).to(dev)
    model.static_mean.copy_(D["mean"])
    model.static_std.copy_(D["std"])
    return model


def maybe_resume(cfg, model, opt, scaler, gen, data_hash):
    """Load --resume into model, optimizer, scaler and RNGs -> (epoch, best, best_epoch, bad_epochs, the CPU
    precision the run chose); a fresh run starts at (0, worst, 0, 0, None)."""
    if not cfg["resume"]:
        return 0, -math.inf if cfg["monitor"] != "val/loss" else math.inf, 0, 0, None
    ckpt = data.load_checkpoint(cfg["resume"])  # on CPU: RNG states must stay CPU tensors
    if not {"model", "optimizer", "epoch", "config", "rng"} <= set(ckpt):
        raise data.DataError(f"{cfg['resume']}: not an emberformer checkpoint (keys {sorted(ckpt)[:6]})")
    if "model_config" in ckpt:  # mae.py's checkpoints have the same top-level keys
        raise data.DataError(f"{cfg['resume']}: a mae.py checkpoint, not an emberformer.py one")
    check_refine(cfg["resume"], ckpt)
    diff = [k for k in cfg if k not in FREE_ON_RESUME and ckpt["config"].get(k) != cfg[k]]
    if diff:
        raise data.DataError(f"{cfg['resume']}: checkpoint was made with different " + ", ".join(
            f"--{k} ({ckpt['config'].get(k)!r}, now {cfg[k]!r})" for k in diff))
    if ckpt["data_hash"] != data_hash:
        raise data.DataError(f"{cfg['resume']}: {cfg['data_path'] or 'the embedded fire file'} does not hold "
                             "the fires this checkpoint trained on (their fingerprint differs); "
                             "resume with its data")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise data.DataError(f"{cfg['resume']}: model weights do not fit "
                             f"({str(e).splitlines()[0]})") from None
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when the run had no GradScaler (CPU, bf16)
        scaler.load_state_dict(ckpt["scaler"])
    data.set_rng_state(ckpt["rng"], dict(gen=gen))
    return ckpt["epoch"], ckpt["best"], ckpt["best_epoch"], ckpt["bad_epochs"], ckpt.get("cpu_autocast")


def report_test(cfg, D, dev, amp):
    """best.pth on the test fires beside the baselines on the identical samples -> test_metrics.json + one
    line. The test split chose nothing: not the epoch, not the stopping point. Under torchrun rank 0 reads
    best.pth (the outputs are on its machine) and sends the weights; every process scores its slices."""
    with data.fail_together():
        best = os.path.join(cfg["out_dir"], "checkpoints", "best.pth")
        ckpt = data.load_checkpoint(best) if data.is_rank0() else None
    weights, best_epoch = data.broadcast_object((ckpt["model"], ckpt["epoch"]) if ckpt else None)
    model = build_model(cfg, D, dev)
    model.load_state_dict(weights)
    # reliability map and threshold from the val fires, stored in best.pth for --eval_only
    with data.fail_together():
        if data.is_rank0():
            ckpt["calibration"] = fit_calibration(cfg, model, D, amp)
            data.atomic_torch_save(ckpt, best)
    cal = data.broadcast_object(ckpt["calibration"] if ckpt else None)
    scores_ = evaluate(dict(cfg, pred_thresh=cal["pred_thresh"]), model, D, amp, "test")  # over all processes
    with data.fail_together():
        if data.is_rank0():
            report = calibration_report(cfg, model, D, amp, "test", cal["reliability"])
            plot_reliability(report, os.path.join(cfg["out_dir"], "plots", "reliability.png"), "test fires")
            write_test_report(cfg, scores_, D, best_epoch, dict(cal, test=report))


def write_test_report(cfg, scores_, D, best_epoch, cal):
    result = dict(model=scores_, **baselines(cfg, D, *D["test"]), best_epoch=best_epoch,
                  test_samples=len(D["test"][0]), target=cfg["target"], calibration=cal,
                  note="new_ap of the baselines = precision x recall at their single operating point; the "
                       "model's = average precision over new-burn cells; the model's hard-mask metrics use "
                       "the threshold chosen on val")
    data.atomic_write_json(os.path.join(cfg["out_dir"], "test_metrics.json"), result)
    m, dil, per = result["model"], result["dilation"], result["persistence"]
    print(f"test ({result['test_samples']} samples, best.pth epoch {best_epoch}): new_f1 {m['new_f1']:.3f} "
          f"new_ap {m['new_ap']:.3f} f1 {m['f1']:.3f} | wind dilation new_f1 {dil['new_f1']:.3f} new_ap* "
          f"{dil['new_ap']:.3f} | persistence new_f1 {per['new_f1']:.3f} new_ap* {per['new_ap']:.3f} "
          f"(* precision x recall)")
    print_calibration(cal["test"], f"test, threshold {cal['pred_thresh']:.3f} chosen on val (new_f1 "
                                   f"{cal['val_new_f1']:.3f})")


def prepare_logs(cfg, start):
    """Create and lock out_dir (a fresh run's holds no log: data.check_run_folder); a resumed run's logs are
    continued, trimmed back to its checkpoint's epoch (resuming an older checkpoint re-runs
    the later epochs)."""
    data.claim_out_dir(cfg["out_dir"])
    os.makedirs(os.path.join(cfg["out_dir"], "plots"), exist_ok=True)
    for name in ("log.csv", "log_steps.csv") if cfg["resume"] else ():
        data.trim_log(os.path.join(cfg["out_dir"], name), start)


def print_epoch(cfg, epoch, tr, va, base):
    print(f"[Epoch {epoch}/{cfg['epochs']}] BCE+Dice | train: loss={tr['loss']:.4f} "
          f"new_f1={tr['new_f1']:.3f} | val: loss={va['loss']:.4f} f1={va['f1']:.3f} "
          f"prec={va['precision']:.3f} iou={va['iou']:.3f} new_f1={va['new_f1']:.3f} "
          f"new_ap={va['new_ap']:.3f} (dilation new_f1 {base['dilation']['new_f1']:.3f})")


def write_epoch_outputs(cfg, row, step_rows, model, D, sample, amp, base):
    """The epoch's rows in log.csv and log_steps.csv, its preview plot and the updated curves."""
    data.append_csv(os.path.join(cfg["out_dir"], "log.csv"), [row])
    data.append_csv(os.path.join(cfg["out_dir"], "log_steps.csv"), step_rows)
    path = os.path.join(cfg["out_dir"], "plots", f"preview_epoch_{row['epoch']:03d}.png")
    plot_preview(cfg, model, D, sample, amp, path)
    plot_curves(os.path.join(cfg["out_dir"], "log.csv"), base, os.path.join(cfg["out_dir"], "curves.png"))


def save_checkpoints(cfg, improved, model, opt, scaler, gen, D, amp, dev, base, va, progress):
    """best.pth (on improvement) BEFORE latest.pth: a kill between the two re-runs the epoch on --resume.
    progress: epoch, best, best_epoch, bad_epochs."""
    ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                rng=data.rng_state(dict(gen=gen)), config=cfg, channels=D["channels"], baselines=base,
                val_metrics=va, **progress,
                cpu_autocast=("bf16" if amp else "fp32") if dev.type == "cpu" else None,
                arch=dataclasses.asdict(model.arch), data_file=os.path.abspath(D["path"]),
                train_fire_hashes=D["train_fire_hashes"], data_hash=D["data_hash"])
    ckpt_dir = os.path.join(cfg["out_dir"], "checkpoints")
    if improved:
        data.atomic_torch_save(ckpt, os.path.join(ckpt_dir, "best.pth"))
    data.atomic_torch_save(ckpt, os.path.join(ckpt_dir, "latest.pth"))


def setup(cfg, rank, world):
    """Flags, device, seeds, data, model, optimizer and --resume, alike on every process; nothing is
    written -> (dev, amp, D, model, opt, scaler, gen, what maybe_resume returns)."""
    check_config(cfg, world)
    if rank == 0:
        data.check_out_dir(cfg["out_dir"])  # unwritable, or held by a live run: refused before any work
        # one run per folder: never merged, never deleted
        data.check_run_folder(cfg["out_dir"], cfg["resume"])
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    # the shuffling order, alike on every process; checkpointed
    gen = torch.Generator().manual_seed(cfg["seed"])
    dev = data.ddp_device(data.pick_device(cfg["device"]))  # under torchrun: this process's own GPU
    amp = data.cuda_autocast(dev)[0]
    D = load_data(cfg, dev)  # every process holds the whole data set
    model = build_model(cfg, D, dev)
    # BatchNorm over the global batch where it can be: SyncBatchNorm runs on GPUs only, so on the CPU
    # each process normalises by its own slice's statistics (and evaluates with rank 0's running
    # statistics: broadcast_buffers)
    if dev.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)
    resumed = maybe_resume(cfg, model, opt, scaler, gen, D["data_hash"])
    if world > 1:  # dropout and drop-path masks per process (DDP has given every process rank 0's weights)
        torch.manual_seed(cfg["seed"] + 1_000_003 * rank + 7919 * resumed[0])
    return dev, amp, D, model, opt, scaler, gen, resumed


def announce_run(cfg, D, dev, amp, world, model):
    """Print the data, precision, sizes and the val baselines; returns the baselines (they go in
    every log row)."""
    print(f"data: {D['path']}  fire {tuple(D['fire'].shape)}  static {D['channels']}  "
          f"train {len(D['train'][0])} / val {len(D['val'][0])} / test {len(D['test'][0])} samples  "
          f"device {dev}  amp {amp}  target {cfg['target']}" +
          (f"; {world} processes share each batch of {cfg['batch_size']}" if world > 1 else ""))
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in part_params(model).items()))
    base = baselines(cfg, D, *D["val"])
    for k, m in base.items():
        print(f"baseline {k:<11} val: f1={m['f1']:.3f} prec={m['precision']:.3f} iou={m['iou']:.3f} "
              f"new_f1={m['new_f1']:.3f} new_ap(precision x recall)={m['new_ap']:.3f}")
    return base


def train(cfg):
    rank, world = data.rank_world()  # (0, 1) without torchrun
    # a bad flag, file or checkpoint on any process stops every process; rank 0 says why
    with data.fail_together():
        (dev, amp, D, model, opt, scaler, gen,
         (start, best, best_epoch, bad_epochs, stored)) = setup(cfg, rank, world)
        if dev.type == "cpu":  # a resumed run keeps the precision it chose, so its losses continue exactly
            amp = cpu_precision(cfg, model, D, stored)
    amp = data.broadcast_object(amp)  # one precision for all: rank 0's timing decides
    with data.fail_together():  # only from here on is anything written, by rank 0 alone
        if rank == 0:
            prepare_logs(cfg, start)
    # the depthwise convs' weight gradients (C, 1, 3, 3) differ from their weights' strides only
    # along the size-1 dimension (the same memory order); DDP copies them into its buckets and would
    # say so once per process
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    # trains; `model` (the same weights) is saved, evaluated and plotted
    ddp_model = data.ddp_wrap(model, dev)
    steps_per_epoch = math.ceil(len(D["train"][0]) / cfg["batch_size"])
    total_steps = cfg["epochs"] * steps_per_epoch
    n_train, n_val, n_test = len(D["train"][0]), len(D["val"][0]), len(D["test"][0])
    base = announce_run(cfg, D, dev, amp, world, model)
    sample = preview_samples(D)
    step, stopped_early = start * steps_per_epoch, False
    for epoch in range(start + 1, cfg["epochs"] + 1):
        t0, step_rows = time.time(), []
        tr, step = train_epoch(cfg, ddp_model, opt, scaler, D, gen, step, total_steps, amp, step_rows, epoch)
        t1 = time.time()
        print(f"  train: {n_train} samples in {t1 - t0:.1f}s ({n_train / (t1 - t0):.1f} samples/s)")
        data.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, the ones it saves, on every process
        va = evaluate(cfg, model, D, amp)  # over all processes, like tr
        t2 = time.time()
        print(f"  val:   {n_val} samples in {t2 - t1:.1f}s ({n_val / (t2 - t1):.1f} samples/s)")
        print_epoch(cfg, epoch, tr, va, base)
        # the same on every process, and so is every decision taken from it
        value = va[cfg["monitor"].split("/")[1]]
        delta = cfg["min_delta"]
        improved = value > best + delta if cfg["monitor"] != "val/loss" else value < best - delta
        if improved:
            best, best_epoch, bad_epochs = value, epoch, 0
        else:
            bad_epochs += 1
        row = dict(epoch=epoch, step=step, lr_temporal=group_lr(opt, "temporal"),
                   lr_spatial=group_lr(opt, "spatial"), **{f"train_{k}": tr[k] for k in METRICS},
                   **{f"val_{k}": va[k] for k in METRICS}, time_s=round(t2 - t0, 2))
        with data.fail_together():  # rank 0 writes; if that fails, every process stops, not rank 0 alone
            if rank == 0:
                write_epoch_outputs(cfg, row, step_rows, model, D, sample, amp, base)
                # checkpoints last: latest.pth then marks an epoch whose logs and plots are complete
                save_checkpoints(cfg, improved, model, opt, scaler, gen, D, amp, dev, base, va,
                                 dict(epoch=epoch, best=best, best_epoch=best_epoch, bad_epochs=bad_epochs))
        # decided alike by every process
        if data.any_rank(cfg["early_stop"] and bad_epochs >= cfg["patience"]):
            print(f"early stopping at epoch {epoch}: best {cfg['monitor']}={best:.4f} at epoch {best_epoch}")
            break
        if cfg["stop_after"] and epoch - start >= cfg["stop_after"] and epoch < cfg["epochs"]:
            print(f"stopping after {cfg['stop_after']} epoch(s) as asked; continue with --resume "
                  f"{os.path.join(cfg['out_dir'], 'checkpoints', 'latest.pth')}")
            stopped_early = True
            break
    print(f"best {cfg['monitor']}={best:.4f} at epoch {best_epoch} | val baselines new_f1: persistence "
          f"{base['persistence']['new_f1']:.3f}, wind dilation {base['dilation']['new_f1']:.3f}")
    if n_test and not stopped_early:  # a paused run is reported when it finishes
        report_test(cfg, D, dev, amp)


def check_refine(path, ckpt):
    """Checkpoints of the refinement head that ran on every cell (before commit 8cc068f; no refine_reach in
    their Arch) would load into the front-only head without complaint but forecast differently: refused.
    This also refuses every older checkpoint format (before --target, --unroll, the stored data hash)."""
    if "refine_reach" not in ckpt.get("arch", {}):
        raise data.DataError(f"{path}: checkpoint of the refinement head that ran on every cell (before commit "
                             "8cc068f); train a new model, or use it with `git checkout ced82b1`")


def load_trained(path, dev):
    """--model checkpoint -> (model in eval mode, checkpoint). Refused in one line: not an emberformer
    checkpoint, one of the dense refinement head (check_refine), or weights that do not fit."""
    ckpt = data.load_checkpoint(path)
    if not {"model", "config", "channels"} <= set(ckpt) or not isinstance(ckpt["config"], dict):
        raise data.DataError(f"{path}: not an emberformer checkpoint (keys {sorted(ckpt)[:6]})")
    check_refine(path, ckpt)
    cfg = ckpt["config"]
    arch = Arch(**ckpt["arch"])
    net = EmberFormer(len(ckpt["channels"]), cfg["patch_size"], cfg["wind_scale"], cfg["target"], arch)
    try:
        net.load_state_dict(ckpt["model"])  # static statistics and wind scale are buffers: they come with it
    except RuntimeError as e:
        raise data.DataError(f"{path}: model weights do not fit ({str(e).splitlines()[0]})") from None
    return net.to(dev).eval(), ckpt


def eval_config(cfg, ckpt, given):
    """This run's flags with the checkpoint's MODEL_SETTINGS (a different explicit flag is refused) and its
    EVAL_SETTINGS unless given on the command line."""
    trained = ckpt["config"]
    clash = [k for k in MODEL_SETTINGS if k in given and cfg[k] != trained[k]]
    if clash:
        raise data.DataError(f"{cfg['model']}: was trained with " + ", ".join(
            f"--{k} {trained[k]!r} (asked {cfg[k]!r})" for k in clash)
            + "; --model takes these from the checkpoint")
    taken = MODEL_SETTINGS + tuple(k for k in EVAL_SETTINGS if k not in given)
    cfg = dict(cfg, **{k: trained[k] for k in taken})
    if "calibration" in ckpt and "pred_thresh" not in given:  # the threshold chosen on the run's val fires
        cfg["pred_thresh"] = ckpt["calibration"]["pred_thresh"]
    # not a flag: the run's, for members
    cfg["reliability"] = ckpt.get("calibration", {}).get("reliability")  # None: a checkpoint without one
    return cfg


def evaluate_file(cfg, given):
    """--eval_only: --model on every pair of --data_path beside the baselines, and with --rollout N its N-step
    forecasts, into out_dir/eval_<file stem>/ (a training run's logs and checkpoints are never touched). Every
    check runs before anything is written."""
    check_config(cfg, data.rank_world()[1])  # refused under torchrun with several processes
    dev = data.pick_device(cfg["device"])
    net, ckpt = load_trained(cfg["model"], dev)
    cfg = eval_config(cfg, ckpt, given)
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    D = load_eval_data(cfg, dev, ckpt)
    eval_dir = os.path.join(cfg["out_dir"], "eval_" + os.path.splitext(os.path.basename(D["path"]))[0])
    data.claim_output_of(eval_dir, os.path.join(eval_dir, "input.txt"), D["path"])  # refuses another file's
    amp = data.cuda_autocast(dev)[0]  # CUDA's policy; on the CPU the precision the model trained in
    if dev.type == "cpu" and ckpt.get("cpu_autocast") == "bf16":
        amp = torch.bfloat16
    print(f"model {cfg['model']} (epoch {ckpt.get('epoch')}, target {cfg['target']}, "
          f"history {cfg['history']}, patch {cfg['patch_size']}, "
          f"pred_thresh {cfg['pred_thresh']:.3f}) -> {eval_dir}")
    report_one_step(cfg, net, D, amp, eval_dir)
    report_calibration(cfg, net, D, amp, eval_dir, cfg["reliability"])
    if cfg["rollout"]:
        report_rollout(cfg, net, D, amp, eval_dir)


def report_one_step(cfg, net, D, amp, eval_dir):
    """Model, wind dilation and persistence on the identical t -> t+1 pairs -> eval.csv,
    preview.png, one line."""
    t0 = time.time()
    one_step = dict(model=evaluate(cfg, net, D, amp, "eval"), **baselines(cfg, D, *D["eval"]))
    n_pairs, n_fires = len(D["eval"][0]), D["fire"].shape[0]
    write_eval_csv(os.path.join(eval_dir, "eval.csv"), one_step, n_pairs, n_fires)
    plot_preview(cfg, net, D, preview_samples(D, "eval"), amp, os.path.join(eval_dir, "preview.png"))
    print_one_step(D["path"], one_step, n_pairs, n_fires)
    print(f"  {n_pairs} pairs in {time.time() - t0:.1f}s")


def report_calibration(cfg, net, D, amp, eval_dir, reliability):
    """Brier, ECE and reliability of the probabilities near the fire, raw and through the run's map (raw again
    for a checkpoint without one) -> calibration.json, reliability.png, one line."""
    report = calibration_report(cfg, net, D, amp, "eval", reliability)
    data.atomic_write_json(os.path.join(eval_dir, "calibration.json"), report)
    plot_reliability(report, os.path.join(eval_dir, "reliability.png"), os.path.basename(D["path"]))
    print_calibration(report, os.path.basename(D["path"]))


def report_rollout(cfg, net, D, amp, eval_dir):
    """--rollout N from every start with N true frames after it -> rollout.csv, rollout.png, rollout_strip.png
    (and with --members, rollout_prob.png)."""
    t0 = time.time()
    by_method, n_starts = rollout_scores(cfg, net, D, cfg["rollout"], amp)
    write_rollout_csv(os.path.join(eval_dir, "rollout.csv"), by_method, n_starts)
    plot_rollout(by_method, n_starts, os.path.basename(D["path"]), os.path.join(eval_dir, "rollout.png"))
    plot_rollout_strip(cfg, net, D, cfg["rollout"], amp, os.path.join(eval_dir, "rollout_strip.png"))
    if cfg["members"]:
        plot_rollout_prob(cfg, net, D, cfg["rollout"], amp, os.path.join(eval_dir, "rollout_prob.png"))
    print_rollout(by_method, n_starts)
    print(f"  {n_starts} starts x {cfg['rollout']} steps in {time.time() - t0:.1f}s")


def main(argv=None):
    cfg = parse_config(argv)
    given = set(parse_config(argv, only_given=True))  # --eval_only: these override the checkpoint's settings
    data.run_stage(lambda: evaluate_file(cfg, given) if cfg["eval_only"] else train(cfg))


if __name__ == "__main__":
    main()
