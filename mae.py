"""
Masked-autoencoder (MAE, He et al. 2022) pre-training on 1D cloud IR profiles.

Each 440-px cross-track profile is cut into patches; 75% of the patches are hidden, the encoder sees only
the visible ones, and a light decoder reconstructs the hidden pixels. The encoder is exported to
mae_encoder_pretrained.pth for finetune_cbh.py (which imports Encoder / load_encoder from here).

    python mae.py                                  # embedded synthetic data, small model, 100 epochs
    python mae.py --data_path my_profiles.h5 --epochs 50 --model_size tiny
    python mae.py --resume outputs/mae_pretrain/checkpoints/latest.pth   # continue exactly (same flags)
    torchrun --standalone --nproc_per_node 2 mae.py   # data parallel, same losses as one process

Every constant below is also a command-line flag (`python mae.py -h`).
"""
import contextlib
import copy
import csv
import math
import os
import random
import time

import matplotlib
matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

import data
import losses

# --- config ---
data_path = ''  # unlabelled cloud-profile HDF5 file ('' = the embedded synthetic dataset)
input = 'relative'  # relative (flat-fielded, minus the flight's sea level) | raw | contrast | both
out_dir = 'outputs/mae_pretrain'  # checkpoints/, plots/, log.csv and the exported encoder go here
epochs = 100  # training epochs; the cosine schedule spans all of them
batch_size = 128  # profiles per step, all processes together (torchrun); scale lr with it (1e-3 per 64)
lr = 2e-3  # peak AdamW learning rate (for batch_size 128), reached after warmup_epochs
min_lr = 1e-5  # learning rate at the end of the cosine decay
warmup_epochs = 5  # linear warmup from 0 to lr over this many epochs
weight_decay = 0.05  # AdamW weight decay (not on biases, norms, position embeddings, cls/mask tokens)
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2 (0.95 as in MAE: steadier than 0.999 at a high learning rate)
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
patience = 20  # early stopping: stop after this many epochs without a lower val loss
model_size = 'small'  # tiny | small (~2.0M params) | custom (the numbers below)
embed_dim = 192  # custom only: encoder width
depth = 4  # custom only: encoder blocks
num_heads = 3  # custom only: encoder attention heads (must divide embed_dim)
dec_dim = 96  # custom only: decoder width
dec_depth = 1  # custom only: decoder blocks
dec_heads = 3  # custom only: decoder attention heads (must divide dec_dim)
patch_size = 16  # custom only: pixels per patch (the profile is centre-cropped to a multiple of it)
mlp_ratio = 4.0  # custom only: MLP hidden width / model width
mask_ratio = 0.75  # fraction of patches hidden from the encoder
norm_pix_loss = False  # regress per-patch normalised pixels (MAE's option; drops absolute brightness)
augment = True  # master switch for the three augmentations below
aug_flip = True  # flip the profile left-right with probability 0.5
aug_crop = True  # random crop of 80-100% of the width, resized back to full width
aug_jitter = True  # brightness and contrast jitter +-30%
val_blocks = 10  # val split: each flight cut into this many contiguous time blocks, the last one is val
val_gap = 20  # frames next to the val block dropped from train (neighbouring frames are near-copies)
save_every = 10  # also keep checkpoints/epoch_NNN.pth every this many epochs (0 = never)
plot_every = 10  # reconstruction figure every this many epochs (and after the first and the last)
n_plot = 4  # val profiles in the reconstruction figures (always the same ones)
device = 'auto'  # auto (cuda > mps > cpu) | cpu | cuda | mps
amp = True  # CUDA mixed precision: bf16 autocast, or fp16 + GradScaler where bf16 is unsupported
cpu_bf16 = 'auto'  # CPU precision: on = bf16 autocast, off = fp32, auto = time both, take the faster
seed = 1337  # seeds model init, shuffling, masks and augmentations
resume = ''  # checkpoint to continue from exactly (e.g. outputs/mae_pretrain/checkpoints/latest.pth)
max_samples = 0  # use only the first N profiles (0 = all): quick trials and tests
num_threads = 0  # torch CPU threads (0 = torch default)
# --- end config ---

CHECK_EVERY = 50  # steps between looks at the on-device count of non-finite losses (a sync each time)
# settings that may change on --resume: they do not alter the run's losses, only where and how it reports
FREE_ON_RESUME = ("resume", "device", "num_threads", "out_dir", "save_every", "plot_every", "n_plot",
                  "patience", "cpu_bf16")  # cpu_bf16: a resumed run keeps the precision its checkpoint stored
CUSTOM_ONLY = ("embed_dim", "depth", "num_heads", "dec_dim", "dec_depth", "dec_heads", "patch_size",
               "mlp_ratio")

MODEL_SIZES = {
    "tiny": dict(embed_dim=128, depth=3, num_heads=2, dec_dim=64, dec_depth=1, dec_heads=2, patch_size=20),
    "small": dict(embed_dim=192, depth=4, num_heads=3, dec_dim=96, dec_depth=1, dec_heads=3, patch_size=16),
}  # "custom" takes every number from the constants block


def parse_config(argv=None):
    """argparse built from the constants block of this file: one flag per constant,
    the comment is the help."""
    return data.parse_constants(os.path.abspath(__file__), __doc__.split("\n\n")[1], globals(), argv)


def model_config(cfg, width, in_chans=1):
    """MAE constructor kwargs for the chosen size (custom: from the constants block)."""
    size = MODEL_SIZES.get(cfg["model_size"]) or {k: cfg[k] for k in CUSTOM_ONLY if k != "mlp_ratio"}
    mlp = cfg["mlp_ratio"] if cfg["model_size"] == "custom" else 4.0
    return dict(size, width=width, mlp_ratio=mlp, in_chans=in_chans)


# --- model ---

def drop_path(x, p, training):
    """Stochastic depth: during training, drop a residual branch x (B, ...) for a random fraction p of the
    samples and scale the kept ones by 1/(1-p), so the expected output is unchanged; identity in eval."""
    if p == 0.0 or not training:
        return x
    keep = (torch.rand(x.shape[0], *(1,) * (x.dim() - 1), device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); drop_path > 0 = stochastic depth."""

    def __init__(self, dim, heads, mlp_ratio, drop_path=0.0):
        super().__init__()
        self.heads, self.drop_path = heads, drop_path
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        # explicit attention, not F.scaled_dot_product_attention: with 7-28 tokens it is as fast, and
        # SDPA's CPU bf16 backward was several times slower than its fp32 one in a profile (see cpu_bf16)
        att = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5  # (B, H, L, L)
        a = att.softmax(dim=-1) @ v  # (B, H, L, D/H)
        x = x + drop_path(self.proj(a.transpose(1, 2).reshape(B, L, D)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.ln2(x)), self.drop_path, self.training)


def init_weights(module):
    """Xavier-uniform Linear weights, zero biases (as in MAE); LayerNorms keep their ones/zeros."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """ViT encoder over 1D patches of C-channel profiles. With mask_ratio > 0 it only ever sees the visible
    patches. drop_path: stochastic-depth rate of the last block, rising linearly from 0 (for fine-tuning)."""

    def __init__(self, width=440, patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                 in_chans=1, drop_path=0.0):
        super().__init__()
        self.width, self.patch_size, self.embed_dim, self.in_chans = width, patch_size, embed_dim, in_chans
        self.num_patches = width // patch_size  # 440 // 16 = 27
        self.crop = (width - self.num_patches * patch_size) // 2  # centre crop; edges are vignetted anyway
        self.patch_embed = nn.Linear(in_chans * patch_size, embed_dim)  # = Conv1d(C, D, kernel=stride=P)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))  # learned, 0 = CLS
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        init_weights(self)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def patchify(self, x):  # (B, C, W) full-width profiles -> (B, N, C*P), a patch's channels side by side
        N, P = self.num_patches, self.patch_size
        # not -1: an empty batch (a process's empty slice of a global batch) has none to infer
        C = self.in_chans
        x = x[..., self.crop:self.crop + N * P].reshape(len(x), C, N, P)  # (B, C, N, P)
        return x.transpose(1, 2).reshape(len(x), N, C * P)

    def forward(self, x, mask_ratio=0.0, generator=None, noise=None):
        patches = self.patchify(x)  # (B, N, C*P)
        B, N, P = patches.shape
        n_keep = int(N * (1 - mask_ratio))
        if mask_ratio > 0:  # per-sample random masking: sort uniform noise, keep the n_keep lowest
            if noise is None:  # not drawn by the caller (the training loop draws it for the global batch)
                noise = torch.rand(B, N, device=x.device, generator=generator)  # (B, N)
            ids_shuffle = noise.argsort(dim=1)
        else:
            ids_shuffle = torch.arange(N, device=x.device).expand(B, N)
        ids_restore = ids_shuffle.argsort(dim=1)  # (B, N): where each patch went in the shuffled order
        ids_keep = ids_shuffle[:, :n_keep]  # (B, n_keep)
        mask = (ids_restore >= n_keep).float()  # (B, N) 1 = masked, in patch order
        # gather the visible patches BEFORE embedding: hidden pixels never enter the network
        vis = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, P))  # (B, n_keep, C*P)
        h = self.patch_embed(vis) + self.pos_embed[0, 1:][ids_keep]  # (B, n_keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        h = torch.cat([cls, h], dim=1)  # (B, 1 + n_keep, D)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h), mask, ids_restore

    def features(self, x, pool="cls"):  # (B, C, W) -> (B, D), no masking: what a CBH head reads
        h = self.forward(x)[0]  # (B, 1 + N, D)
        return h[:, 0] if pool == "cls" else h[:, 1:].mean(1)  # CLS token, or the mean of the patch tokens


class MAE(nn.Module):
    """Encoder + light decoder: a shared mask token fills the hidden patches,
    a linear head predicts pixels."""

    def __init__(self, width=440, patch_size=16, embed_dim=192, depth=4, num_heads=3,
                 dec_dim=96, dec_depth=1, dec_heads=3, mlp_ratio=4.0, in_chans=1):
        super().__init__()
        self.encoder = Encoder(width, patch_size, embed_dim, depth, num_heads, mlp_ratio, in_chans)
        n = self.encoder.num_patches
        self.dec_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, 1 + n, dec_dim))  # the decoder's own, learned
        self.dec_blocks = nn.ModuleList(Block(dec_dim, dec_heads, mlp_ratio) for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dec_dim)
        self.head = nn.Linear(dec_dim, in_chans * patch_size)
        for m in (self.dec_embed, self.dec_blocks, self.head):
            init_weights(m)
        for p in (self.mask_token, self.dec_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x, mask_ratio=0.75, generator=None, noise=None):  # x (B, C, W) normalised profiles
        latent, mask, ids_restore = self.encoder(x, mask_ratio, generator, noise)  # (B, 1 + n_keep, D)
        h = self.dec_embed(latent)  # (B, 1 + n_keep, Dd)
        B, N = mask.shape
        # one shared mask token per hidden patch appended, then un-shuffled back to patch order
        tokens = torch.cat([h[:, 1:], self.mask_token.expand(B, N + 1 - h.shape[1], -1)], dim=1)  # (B, N, Dd)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, h.shape[2]))
        h = torch.cat([h[:, :1], tokens], dim=1) + self.dec_pos_embed  # (B, 1 + N, Dd)
        for blk in self.dec_blocks:
            h = blk(h)
        return self.head(self.dec_norm(h))[:, 1:], mask  # (B, N, C*P) predicted pixels, (B, N)


def encoder_config(model_cfg):
    """The kwargs that rebuild the Encoder (stored in the exported file)."""
    return dict(width=model_cfg.get("width", 440), patch_size=model_cfg["patch_size"],
                embed_dim=model_cfg["embed_dim"], depth=model_cfg["depth"],
                num_heads=model_cfg["num_heads"], mlp_ratio=model_cfg.get("mlp_ratio", 4.0),
                in_chans=model_cfg.get("in_chans", 1))


def build_encoder(enc_cfg, drop_path=0.0):
    return Encoder(**enc_cfg, drop_path=drop_path)


def load_encoder(path, map_location="cpu"):
    """Rebuild the exported encoder. Returns (Encoder, dict(config=, input=, norm_mean=, norm_std=)), the
    normalisation as one (mean, std) per input channel. Files from before input modes are raw, 1 channel."""
    if not os.path.isfile(path):
        raise data.DataError(f"{path}: pre-trained encoder not found; run `python mae.py` first, "
                             "or pass --pretrained none")
    ck = data.load_checkpoint(path, map_location)
    if not {"encoder", "config", "norm_mean", "norm_std"} <= ck.keys():
        raise data.DataError(f"{path}: not an exported MAE encoder (expected mae_encoder_pretrained.pth)")
    try:
        enc = build_encoder(ck["config"])
        enc.load_state_dict(ck["encoder"])
    except (TypeError, RuntimeError) as e:
        raise data.DataError(f"{path}: encoder weights do not match its config "
                             f"({type(e).__name__})") from None
    per_channel = lambda v: [float(s) for s in np.atleast_1d(v)]
    return enc, dict(config=ck["config"], input=ck.get("input", "raw"),
                     norm_mean=per_channel(ck["norm_mean"]), norm_std=per_channel(ck["norm_std"]),
                     flat_field=ck.get("flat_field"))


# --- optimisation ---

def make_optimizer(model, cfg, device):
    """AdamW; biases, norm gains, position embeddings and the cls/mask tokens get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        (no_decay if skip else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


def get_lr(step, total, warmup, peak, min_lr):
    """Learning rate at global step `step` of `total`: linear warmup to peak over `warmup` steps,
    then half-cosine to min_lr. A pure function of the step, so a resumed run lands on exactly the
    same schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def step_timer(model, cfg, X, dev):
    """time_step(dtype) for data.choose_cpu_dtype: one full training step (augment, forward, backward, clip,
    AdamW) on a throw-away copy of the model with its own generator, so timing never changes the run."""
    trial = copy.deepcopy(model)
    opt = make_optimizer(trial, cfg, dev)
    gen = torch.Generator(dev).manual_seed(0)
    x = X[:math.ceil(cfg["batch_size"] / data.rank_world()[1])]  # (B, C, W): this process's share of a batch

    def step(dtype):
        loss = loss_fn(trial, data.augment_profiles(x, gen), cfg, gen, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trial.parameters(), 1.0)
        opt.step()
    return step


def loss_fn(model, x, cfg, masks, dtype):
    """Masked-patch MSE of one batch x (B, C, W), computed in fp32: the mean over its profiles (each hides the
    same number of patches). masks decides what is hidden: the (B, N) noise from mask_noise, or a
    torch.Generator to draw it from. model may be wrapped in DistributedDataParallel."""
    noise, generator = (masks, None) if torch.is_tensor(masks) else (None, masks)
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with ctx:
        pred, mask = model(x, cfg["mask_ratio"], generator, noise)  # (B, N, P), (B, N)
    return losses.masked_mse(pred.float(), data.unwrap(model).encoder.patchify(x), mask, cfg["norm_pix_loss"])


def mask_noise(model, x, cfg, generator):
    """(B, N) uniform noise that decides the masks of a global batch x (B, C, W): each profile hides its
    highest-noise patches. Drawn for the whole global batch on every process, which then takes its slice, so
    every profile gets the mask a 1-process run gives it. Without masking: zeros, nothing drawn."""
    N = data.unwrap(model).encoder.num_patches
    if cfg["mask_ratio"] == 0:
        return torch.zeros(len(x), N, device=x.device)
    return torch.rand(len(x), N, device=x.device, generator=generator)


@torch.no_grad()
def evaluate(model, X, cfg, dtype):
    """Mean val loss over all processes (each scores its slice of every batch). Masks come from a freshly
    seeded generator, so every epoch (and a resumed run) scores the same masked patches and val losses are
    comparable across epochs."""
    model.eval()
    gen = torch.Generator(X.device).manual_seed(cfg["seed"] + 1)
    total = torch.zeros((), device=X.device)
    for idx in data.batch_indices(len(X), cfg["batch_size"], shuffle=False):
        x = X[idx.to(X.device)]  # (B, C, W) the global batch
        noise = mask_noise(model, x, cfg, gen)  # (B, N)
        mine = data.rank_slice(len(x))
        total += loss_fn(model, x[mine], cfg, noise[mine], dtype) * len(x[mine])
    model.train()
    return data.all_reduce_sum(total).item() / len(X)


# --- plots ---

def plot_reconstruction(model, x, cfg, norm, path, epoch, dtype):
    """Original, visible (encoder input) and reconstructed hidden patches for fixed val profiles x (n, C, W),
    one panel per profile and channel, in input units (before normalisation), with a fixed mask so figures
    from different epochs compare."""
    model.eval()
    with torch.no_grad():
        gen = torch.Generator(x.device).manual_seed(cfg["seed"] + 2)
        ctx = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            pred, mask = model(x, cfg["mask_ratio"], gen)
    model.train()
    target = model.encoder.patchify(x)  # (n, N, C*P)
    pred = pred.float()
    if cfg["norm_pix_loss"]:  # the model predicts per-patch normalised pixels: undo with the true stats
        pred = (pred * (target.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
                + target.mean(-1, keepdim=True))
    hidden = mask[..., None].bool().expand_as(target)  # (n, N, C*P)
    enc = model.encoder
    n, N, C, P = len(x), enc.num_patches, enc.in_chans, enc.patch_size
    mean, std = (torch.tensor(v, device=x.device)[:, None] for v in norm[:2])  # (C, 1) each

    def unpatch(t):  # (n, N, C*P) normalised -> (n, C, N*P) input units
        return (t.reshape(n, N, C, P).transpose(1, 2).reshape(n, C, N * P) * std + mean).cpu().numpy()

    orig = unpatch(target)
    visible = unpatch(target.masked_fill(hidden, float("nan")))
    recon = unpatch(pred.masked_fill(~hidden, float("nan")))
    px = np.arange(enc.crop, enc.crop + N * P)
    names = dict(relative=["signal - flight sea level"], raw=["signal"], contrast=["contrast"],
                 both=["signal", "contrast"])[cfg["input"]]
    fig, axes = plt.subplots(n * C, 1, figsize=(10, 2.2 * n * C), sharex=True, squeeze=False)
    for k, ax in enumerate(axes[:, 0]):
        i, c = divmod(k, C)
        ax.plot(px, orig[i, c], color="0.6", lw=1, label="original")
        ax.plot(px, visible[i, c], color="tab:blue", lw=1.5, label="masked input (visible patches)")
        ax.plot(px, recon[i, c], color="tab:red", lw=1.5, label="reconstruction (hidden patches)")
        ax.set_ylabel(names[c])
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=3)
    axes[0, 0].set_title(f"MAE reconstruction, epoch {epoch}, mask ratio {cfg['mask_ratio']}")
    axes[-1, 0].set_xlabel("pixel")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def plot_losses(log_path, path):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [float(r["train_loss"]) for r in rows], label="train")
    ax.plot(ep, [float(r["val_loss"]) for r in rows], label="val")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("masked-patch MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


# --- training ---

def check_config(cfg, world=1):
    """The flags, for a run of `world` processes (torchrun), else one line (DataError) naming the flag."""
    data.check_choice(cfg, "model_size", (*MODEL_SIZES, "custom"))
    data.check_choice(cfg, "device", ("auto", "cpu", "cuda", "mps"))
    data.check_choice(cfg, "input", data.INPUT_MODES)
    data.check_choice(cfg, "cpu_bf16", ("auto", "on", "off"))
    # none hidden: nothing to reconstruct
    data.check_range(cfg, "mask_ratio", 0, 1, lo_open=True, hi_open=True)
    data.check_range(cfg, "epochs batch_size patience embed_dim depth num_heads dec_dim dec_depth dec_heads "
                          "patch_size n_plot", 1)
    data.check_range(cfg, "val_blocks", 2)
    data.check_range(cfg, "warmup_epochs val_gap weight_decay grad_clip", 0)
    data.check_range(cfg, "lr", 0, lo_open=True)
    data.check_range(cfg, "min_lr", 0, cfg["lr"])
    data.check_range(cfg, "beta1 beta2", 0, 1, hi_open=True)
    if cfg["embed_dim"] % cfg["num_heads"] or cfg["dec_dim"] % cfg["dec_heads"]:
        raise data.DataError("--num_heads must divide --embed_dim, and --dec_heads must divide --dec_dim")
    if cfg["batch_size"] < world:
        raise data.DataError(f"--batch_size {cfg['batch_size']} is the global batch, split over the {world} "
                             f"processes: it must be at least {world}")


def load_data(cfg, dev):
    """The whole set as input channels, normalised and resident on the device; batches are gathered by
    indexing. Returns (X_train (N_train, C, W), X_val (N_val, C, W), per-channel (means, stds), path)."""
    path = cfg["data_path"] or data.default_cloud_paths()[0]
    d = data.load_clouds(path, labelled=False, max_samples=cfg["max_samples"])
    # the flat field comes from this file's profiles (label-free)
    # and travels with the encoder to finetune_cbh.py
    gain = data.flat_field(d["images"], path) if cfg["input"] == "relative" else None  # (W,) or None
    images = data.profile_channels(d["images"], cfg["input"], d["flight"], gain, path)  # (N, C, W)
    # val = the last of val_blocks contiguous time blocks of every flight, with val_gap frames removed from
    # train on its edge: random frames would leave near-identical neighbours on both sides of the split
    train_idx, val_idx = data.split_blocked(d["flight"], d["frame"], cfg["val_blocks"], cfg["val_blocks"] - 1,
                                            cfg["val_gap"])
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise data.DataError(f"{path}: too few profiles for a train/val split ({len(d['images'])} profiles)")
    norm = data.norm_stats(images[train_idx])  # per channel, train split only; stored with the encoder
    norm = norm + (None if gain is None else gain.tolist(),)  # (means, stds, flat field)
    mean, std = (np.array(v, np.float32)[:, None] for v in norm[:2])  # (C, 1)
    X_train, X_val = (torch.from_numpy((images[i] - mean) / std).float().to(dev)
                      for i in (train_idx, val_idx))
    return X_train, X_val, norm, path


def maybe_resume(cfg, model, opt, scaler, shuffle_gen, gen, data_hash):
    """Load a --resume checkpoint into the model, optimizer, scaler and generators; refused if the data
    are not those it trained on (data_hash: data.fingerprint of the train and val tensors). Returns
    (epochs done, best val loss, epochs without improvement, the CPU precision the run chose: 'bf16' or
    'fp32'); (0, inf, 0, None) for a fresh run."""
    if not cfg["resume"]:
        return 0, float("inf"), 0, None
    ckpt = data.load_checkpoint(cfg["resume"])
    if not {"model", "optimizer", "scaler", "epoch", "best_val", "bad_epochs", "rng"} <= ckpt.keys():
        raise data.DataError(f"{cfg['resume']}: not a mae.py training checkpoint")
    saved = ckpt.get("config", {})
    mine = {k: v.shape for k, v in model.state_dict().items()}
    # e.g. 'small' before its decoder became 1 block
    same_name_other_model = saved.get("model_size") == cfg["model_size"] and {
        k: v.shape for k, v in ckpt["model"].items()} != mine
    if same_name_other_model:
        raise data.DataError(f"{cfg['resume']}: checkpoint holds another model than --model_size "
                             f"{cfg['model_size']} builds today; resume it with the code that made it")
    unused = CUSTOM_ONLY if cfg["model_size"] != "custom" else ()  # a preset ignores them
    diff = [k for k in cfg if k not in FREE_ON_RESUME + unused and saved.get(k) != cfg[k]]
    if diff:  # another schedule, split or model would not continue the run: it would be a new one
        raise data.DataError(f"{cfg['resume']}: checkpoint was made with different settings; pass " +
                             " ".join(f"--{k} {saved.get(k)!r}" for k in diff))
    if ckpt.get("data_hash", data_hash) != data_hash:  # the same file name can hold other profiles
        raise data.DataError(f"{cfg['resume']}: {cfg['data_path'] or 'the embedded dataset'} does not hold "
                             "the profiles this checkpoint trained on (their fingerprint differs); "
                             "resume with its data, or start a new run")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # empty when the run had no GradScaler (CPU, bf16)
        scaler.load_state_dict(ckpt["scaler"])
    data.set_rng_state(ckpt["rng"], dict(shuffle=shuffle_gen, device_gen=gen))
    print(f"resumed from {cfg['resume']} after epoch {ckpt['epoch']} (best val {ckpt['best_val']:.5f})")
    return ckpt["epoch"], ckpt["best_val"], ckpt["bad_epochs"], ckpt.get("cpu_autocast")


def prepare_outputs(cfg, start_epoch):
    """Create and lock out_dir (a fresh run's holds no log: data.check_run_folder); a resumed run's log is
    trimmed back to its checkpoint."""
    data.claim_out_dir(cfg["out_dir"])
    os.makedirs(os.path.join(cfg["out_dir"], "checkpoints"), exist_ok=True)
    log_path = os.path.join(cfg["out_dir"], "log.csv")
    if cfg["resume"]:
        data.trim_log(log_path, start_epoch)  # resuming an older checkpoint re-runs the later epochs
    return log_path


def train_epoch(model, opt, scaler, X_train, cfg, shuffle_gen, gen, dtype, step, steps_per_epoch, epoch):
    """One pass over the shuffled training profiles. Returns (mean loss, next global step, last LR).
    Under torchrun (model wrapped in DDP) every process draws the global batch's order, augmentations and
    masks from identically seeded generators and trains on its slice, so the run does not depend on the
    number of processes. Non-finite losses are recorded on the device and looked at (over all processes)
    every CHECK_EVERY steps and at the end (no sync per step); the run stops (NonFiniteLoss) before anything
    of this epoch is saved. With a GradScaler (fp16) a step whose scaled gradients overflow is skipped by
    design, so only a window in which EVERY step was non-finite stops it."""
    # this process's summed losses, on the device: no sync per step
    total = torch.zeros((), device=X_train.device)
    # [k]: k-th step since the last check
    bad = torch.zeros(CHECK_EVERY, device=X_train.device, dtype=torch.bool)
    checked, seen, seen_mine = step, 0, 0  # seen: profiles of the global batches; seen_mine: this process's
    progress = data.Progress(steps_per_epoch, f"epoch {epoch}")
    for i, idx in enumerate(data.batch_indices(len(X_train), cfg["batch_size"], shuffle=True,
                                               generator=shuffle_gen)):
        lr = get_lr(step, cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch, cfg["lr"],
                    cfg["min_lr"])
        for g in opt.param_groups:
            g["lr"] = lr
        x = X_train[idx.to(X_train.device)]  # (B, C, W) the global batch
        if cfg["augment"]:  # drawn for the global batch, like the masks: the same as with one process
            x = data.augment_profiles(x, gen, cfg["aug_flip"], cfg["aug_crop"], cfg["aug_jitter"])
        noise = mask_noise(model, x, cfg, gen)  # (B, N)
        mine = data.rank_slice(len(x))  # this process's profiles (all of them without torchrun)
        loss = loss_fn(model, x[mine], cfg, noise[mine], dtype)  # the mean over this process's slice
        opt.zero_grad(set_to_none=True)
        # DDP averages gradients over processes with equal weights: weighting each process's loss by its share
        # makes the result the gradient of the global batch's mean, whatever the slice sizes
        scaler.scale(loss * data.rank_loss_weight(len(x))).backward()
        if cfg["grad_clip"] > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        finite = torch.isfinite(loss.detach())
        bad[step - checked] = ~finite
        total += torch.where(finite, loss.detach(), 0.0) * len(x[mine])
        step, seen, seen_mine = step + 1, seen + len(x), seen_mine + len(x[mine])
        progress.update(i + 1, seen, lambda: total.item() / max(seen_mine, 1))  # live: this process's loss
        if step % CHECK_EVERY == 0:
            data.check_finite(bad[:step - checked], scaler.is_enabled(), f"mae.py, epoch {epoch}",
                              checked + 1, step)
            bad.zero_()
            checked = step
    progress.close()
    if step > checked:
        data.check_finite(bad[:step - checked], scaler.is_enabled(), f"mae.py, epoch {epoch}",
                          checked + 1, step)
    return data.all_reduce_sum(total).item() / len(X_train), step, lr


def save_checkpoints(ckpt, model, cfg, improved, norm):
    """latest.pth every epoch, best.pth and the exported encoder on improvement, epoch_NNN.pth every
    save_every epochs; all atomic."""
    ckpt_dir = os.path.join(cfg["out_dir"], "checkpoints")
    if improved:  # best and the encoder BEFORE latest: a kill between them re-runs this epoch on resume
        data.atomic_torch_save(ckpt, os.path.join(ckpt_dir, "best.pth"))
        data.atomic_torch_save(dict(encoder=model.encoder.state_dict(),
                                    config=encoder_config(ckpt["model_config"]), input=cfg["input"],
                                    norm_mean=norm[0], norm_std=norm[1], flat_field=norm[2]),
                               os.path.join(cfg["out_dir"], "mae_encoder_pretrained.pth"))
    data.atomic_torch_save(ckpt, os.path.join(ckpt_dir, "latest.pth"))
    if cfg["save_every"] > 0 and ckpt["epoch"] % cfg["save_every"] == 0:
        data.atomic_torch_save(ckpt, os.path.join(ckpt_dir, f"epoch_{ckpt['epoch']:03d}.pth"))


def log_epoch(log_path, n, train_loss, val_loss, lr, secs, rate):
    data.append_csv(log_path, [dict(epoch=n, train_loss=f"{train_loss:.9g}", val_loss=f"{val_loss:.9g}",
                                    lr=f"{lr:.6g}", seconds=f"{secs:.2f}", samples_per_s=f"{rate:.1f}")])


def setup(cfg, rank, world):
    """Flags, device, seeds, data and model, alike on every process -> (dev, X_train, X_val, norm, path, model
    config, model). Nothing is written."""
    check_config(cfg, world)
    if rank == 0:
        data.check_out_dir(cfg["out_dir"])  # unwritable, or held by a live run: refused before any work
        # one run per folder: never merged, never deleted
        data.check_run_folder(cfg["out_dir"], cfg["resume"])
    if cfg["num_threads"] > 0:
        torch.set_num_threads(cfg["num_threads"])
    dev = data.ddp_device(data.pick_device(cfg["device"]))  # under torchrun: this process's own GPU
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    X_train, X_val, norm, path = load_data(cfg, dev)  # every process holds the whole set
    mcfg = model_config(cfg, X_train.shape[-1], in_chans=X_train.shape[1])
    if mcfg["patch_size"] > X_train.shape[-1]:
        raise data.DataError(f"{path}: profiles are {X_train.shape[-1]} px, narrower than patch_size "
                             f"{mcfg['patch_size']}")
    model = MAE(**mcfg).to(dev)
    n_params, n_enc = (sum(p.numel() for p in m.parameters()) for m in (model, model.encoder))
    print(f"model {cfg['model_size']}: {n_params:,} parameters (encoder {n_enc:,}, decoder "
          f"{n_params - n_enc:,}); {model.encoder.num_patches} patches of {mcfg['patch_size']} px, "
          f"input {cfg['input']}")
    return dev, X_train, X_val, norm, path, mcfg, model


def train(cfg):
    rank, world = data.rank_world()  # (0, 1) without torchrun
    # a bad flag, file or folder on any process stops every process; rank 0 says why
    with data.fail_together():
        dev, X_train, X_val, norm, path, mcfg, model = setup(cfg, rank, world)
        dtype, use_scaler = data.cuda_autocast(dev) if cfg["amp"] else (None, False)
        opt = make_optimizer(model, cfg, dev)
        scaler = torch.amp.GradScaler(dev.type if use_scaler else "cpu", enabled=use_scaler)
        # seeded alike on every process, so all of them draw the same global batches, augmentations and masks
        shuffle_gen = torch.Generator().manual_seed(cfg["seed"])  # batch order (CPU)
        gen = torch.Generator(dev).manual_seed(cfg["seed"])  # masks and augmentations (on the device)
        data_hash = data.fingerprint(X_train, X_val)
        start_epoch, best, bad_epochs, cpu_autocast = maybe_resume(cfg, model, opt, scaler, shuffle_gen, gen,
                                                                   data_hash)
        msg = None
        # a resumed run keeps the precision it chose: its losses continue
        if dev.type == "cpu" and cpu_autocast:
            dtype = torch.bfloat16 if cpu_autocast == "bf16" else None
        elif dev.type == "cpu":
            dtype, msg = data.choose_cpu_dtype(cfg["cpu_bf16"], step_timer(model, cfg, X_train, dev))
    dtype, msg = data.broadcast_object((dtype, msg))  # one precision for all: rank 0's timing decides
    if msg:
        print(msg)
    print(f"data {path}: {len(X_train)} train / {len(X_val)} val profiles; device {dev}, "
          f"autocast {dtype if dtype else 'off (fp32)'}" +
          (f"; {world} processes share each batch of {cfg['batch_size']}" if world > 1 else ""))
    with data.fail_together():  # only from here on is anything written, by rank 0 alone
        log_path = prepare_outputs(cfg, start_epoch) if rank == 0 else None
    # trains; `model` (the same weights) is saved, evaluated and plotted
    ddp_model = data.ddp_wrap(model, dev)
    plot_dir = os.path.join(cfg["out_dir"], "plots")
    plot_x = X_val[torch.linspace(0, len(X_val) - 1, min(cfg["n_plot"], len(X_val))).long().to(dev)]
    steps_per_epoch = math.ceil(len(X_train) / cfg["batch_size"])
    step = start_epoch * steps_per_epoch
    for n in range(start_epoch + 1, cfg["epochs"] + 1):  # n = the epoch number, from 1
        if data.any_rank(bad_epochs >= cfg["patience"]):  # decided alike by every process
            print(f"early stopping: val loss has not improved for {bad_epochs} epochs")
            break
        t0 = time.time()
        train_loss, step, lr = train_epoch(ddp_model, opt, scaler, X_train, cfg, shuffle_gen, gen, dtype,
                                           step, steps_per_epoch, n)
        rate = len(X_train) / (time.time() - t0)  # training samples/s (the val pass is not counted)
        val_loss = evaluate(model, X_val, cfg, dtype)  # over all processes, like train_loss
        secs = time.time() - t0
        improved = val_loss < best
        best, bad_epochs = (val_loss, 0) if improved else (best, bad_epochs + 1)
        with data.fail_together():  # rank 0 writes; if that fails, every process stops, not rank 0 alone
            if rank == 0:
                ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                            epoch=n, best_val=best, bad_epochs=bad_epochs,
                            rng=data.rng_state(dict(shuffle=shuffle_gen, device_gen=gen)), config=cfg,
                            model_config=mcfg, norm_mean=norm[0], norm_std=norm[1], data_hash=data_hash,
                            cpu_autocast=("bf16" if dtype else "fp32") if dev.type == "cpu" else None)
                # log first: a kill between the two re-runs epoch n on resume, and trims its row
                log_epoch(log_path, n, train_loss, val_loss, lr, secs, rate)
                save_checkpoints(ckpt, model, cfg, improved, norm)
                plot_losses(log_path, os.path.join(plot_dir, "loss.png"))
                if n == 1 or n == cfg["epochs"] or (cfg["plot_every"] > 0 and n % cfg["plot_every"] == 0):
                    plot_reconstruction(model, plot_x, cfg, norm,
                                        os.path.join(plot_dir, f"recon_epoch_{n:03d}.png"), n, dtype)
        print(f"epoch {n:3d}/{cfg['epochs']} | train {train_loss:.5f} | val {val_loss:.5f} | lr {lr:.2e} | "
              f"{secs:6.1f}s | {rate:7.0f} samples/s{' | new best, saved' if improved else ''}")
    print(f"best val loss {best:.5f}; encoder in "
          f"{os.path.join(cfg['out_dir'], 'mae_encoder_pretrained.pth')}")


def main(argv=None):
    cfg = parse_config(argv)
    data.run_stage(lambda: train(cfg))


if __name__ == "__main__":
    main()
