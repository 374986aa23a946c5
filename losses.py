"""
Losses and metrics shared by the stages. Torch in, torch out for losses; metrics return floats.
"""

import numpy as np
import torch
import torch.nn.functional as F


def masked_mse(pred, target, mask, norm_pix=False):
    """MSE over masked patches only (the MAE objective).
    pred, target (B, N, P) patch pixels; mask (B, N) with 1 = masked (counted), 0 = visible (ignored).
    norm_pix: regress each target patch normalised by its own mean/std (He et al. 2022), which weights
    texture over absolute level. A batch with no masked patch gives 0."""
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def bce_dice_loss(logits, target, bce_weight=0.5, dice_weight=0.5, pos_weight=None, smooth=1.0, mask=None):
    """bce_weight * BCE + dice_weight * soft Dice loss. logits, target (B, H, W) (any trailing shape).
    pos_weight (float or None) up-weights positive pixels in BCE, for sparse fire fronts.
    Dice is computed per sample and averaged; `smooth` keeps an empty target with an empty prediction
    at Dice loss 0 instead of 0/0. `mask` (bool, like target) keeps only those pixels in both terms (BCE
    is their mean, Dice sees only them): pixels outside get no loss and no gradient.
    Returns (loss, bce, dice)."""
    target = target.to(logits.dtype)
    keep = torch.ones_like(target) if mask is None else mask.to(logits.dtype)
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    bce = (bce * keep).sum() / keep.sum().clamp(min=1)
    p = (torch.sigmoid(logits) * keep).flatten(1)  # (B, H*W)
    t = (target * keep).flatten(1)
    inter = (p * t).sum(1)
    dice = 1 - ((2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()
    return bce_weight * bce + dice_weight * dice, bce, dice


def pr_histogram(logits, target, mask, bins=4000, lim=16.0):
    """(2, bins) long [negatives, positives] per logit bin, for average_precision. Bins are equal steps of
    the logit clamped to [-lim, lim] (0.008 wide by default: finer than any threshold anyone would pick,
    and ranking by logit is ranking by probability). Counts add up over batches on the inputs' device,
    so an epoch's AP is exact up to ties inside a bin. logits, target, mask (bool) of equal shape. A NaN
    logit (a diverged model, stopped by the stage's non-finite check) counts in the lowest bin,
    not a crash."""
    logits = torch.nan_to_num(logits.detach().float(), nan=-lim)
    idx = ((logits.clamp(-lim, lim) + lim) * ((bins - 1) / (2 * lim))).round().long()
    idx = idx + bins * (target > 0.5).long()  # positives in the second row
    counts = torch.zeros(2 * bins, dtype=torch.long, device=logits.device)
    return counts.scatter_add_(0, idx.flatten(), mask.flatten().long()).view(2, bins)


def average_precision(hist):
    """Area under the precision-recall curve (step-wise, as sklearn's average_precision_score) from a
    (2, bins) [negatives, positives] histogram: sum over thresholds, highest first, of precision there
    times the recall gained; a bin is one threshold (its cells tie). No positives at all -> 1.0 (nothing
    to find, as seg_metrics)."""
    neg, pos = hist.double().flip(1)  # highest scores first
    n_pos = pos.sum()
    if n_pos == 0:
        return 1.0
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    precision = tp / (tp + fp).clamp(min=1)
    return float((precision * pos).sum() / n_pos)


def best_f1_threshold(hist, lim=16.0):
    """(logit threshold, F1): the cut with the highest F1 on a pr_histogram (predict every cell whose
    logit lies at or above the threshold); the threshold sits at the lower edge of the chosen bin, so the
    cells of that bin count."""
    bins = hist.shape[1]
    neg, pos = hist.double().flip(1)  # highest logits first
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    f1 = 2 * tp / (2 * tp + fp + (pos.sum() - tp)).clamp(min=1)
    # the k-th bin from the top, i.e. bin bins - 1 - k, centred at its index x step - lim
    k = int(f1.argmax())
    step = 2 * lim / (bins - 1)
    return (bins - 1 - k) * step - lim - step / 2, float(f1[k])


def calibration(prob, target, n_bins=10):
    """How far probabilities prob (N,) can be taken at their word for 0/1 outcomes target (N,): the
    Brier score, the climatological Brier score (always forecasting these cells' base rate) and the
    skill 1 - Brier / climatological, the expected calibration error over n_bins equal-width bins (sum
    over bins of |mean prob - observed frequency| weighted by the bin's share of cells), and per bin
    [count, mean prob, observed frequency]."""
    p, y = prob.detach().double().flatten(), target.detach().double().flatten()
    n, rate = len(p), float(y.mean()) if len(y) else float("nan")
    b = (p * n_bins).long().clamp(0, n_bins - 1)
    count = torch.bincount(b, minlength=n_bins).double()
    sum_p, sum_y = torch.bincount(b, p, n_bins), torch.bincount(b, y, n_bins)
    brier, clim = float(((p - y) ** 2).mean()) if n else float("nan"), rate * (1 - rate)
    return dict(n_cells=n, base_rate=rate, brier=brier, brier_clim=clim,
                brier_skill=1 - brier / clim if clim > 0 else float("nan"),
                ece=float((sum_p - sum_y).abs().sum() / max(n, 1)),
                bins=[[int(c), float(sp / c) if c else None, float(sy / c) if c else None]
                      for c, sp, sy in zip(count, sum_p, sum_y)])


def fit_reliability(logits, target, n_bins=50):
    """A monotone map logit -> probability fitted on (logits, target) (N,): isotonic regression on n_bins bins
    of equal count (Zadrozny & Elkan 2002): each bin's mean logit and observed frequency, adjacent bins pooled
    while the frequency would fall as the logit rises. One temperature only rescales the logits; this also
    fixes probabilities that overstate in every bin. -> dict(logit=[...], prob=[...]), both increasing."""
    z, y = logits.detach().double().flatten(), target.detach().double().flatten()
    order = z.argsort()
    blocks = []  # [sum of logits, sum of outcomes, count] per pooled bin
    for idx in torch.tensor_split(order, min(n_bins, len(z))):
        blocks.append([float(z[idx].sum()), float(y[idx].sum()), len(idx)])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    return dict(logit=[s / n for s, _, n in blocks], prob=[k / n for _, k, n in blocks])


def apply_reliability(logits, m):
    """Probabilities of logits (any shape) through a fit_reliability map: linear between its points, its end
    values beyond them."""
    x = torch.tensor(m["logit"], dtype=torch.float64, device=logits.device)
    p = torch.tensor(m["prob"], dtype=torch.float64, device=logits.device)
    if len(x) == 1:
        return torch.full_like(logits, float(p[0]), dtype=torch.float32)
    z = logits.double().clamp(float(x[0]), float(x[-1]))
    i = torch.searchsorted(x, z.contiguous()).clamp(1, len(x) - 1)  # x[i - 1] <= z <= x[i]
    w = (z - x[i - 1]) / (x[i] - x[i - 1])
    return (p[i - 1] + w * (p[i] - p[i - 1])).float()


def regression_metrics(pred, true):
    """R^2, MAE and RMSE (in the units of the inputs). R^2 = 1 - SS_res / SS_tot; it is undefined
    (returned as nan) when the targets are all equal."""
    pred = np.asarray(pred, np.float64).ravel()
    true = np.asarray(true, np.float64).ravel()
    err = pred - true
    ss_res = float((err ** 2).sum())
    ss_tot = float(((true - true.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return dict(r2=r2, mae=float(np.abs(err).mean()), rmse=float(np.sqrt((err ** 2).mean())))


def confusion_counts(pred, target, mask=None):
    """[tp, fp, fn, tn] as a LongTensor on the inputs' device, from boolean tensors of equal shape.
    `mask` (bool) restricts the pixels counted (e.g. only cells not yet burning, for new-burn scores).
    Counts add up over batches, so metrics from the summed counts are exact for the whole epoch; no
    boolean indexing and no .cpu() here, so a GPU loop only syncs when the metrics are read."""
    pred, target = pred.bool(), target.bool()
    keep = torch.ones_like(pred) if mask is None else mask.bool()
    tp = (pred & target & keep).sum()
    fp = (pred & ~target & keep).sum()
    fn = (~pred & target & keep).sum()
    tn = (~pred & ~target & keep).sum()
    return torch.stack([tp, fp, fn, tn]).long()


def seg_metrics(counts):
    """Precision, recall, F1, IoU, accuracy from [tp, fp, fn, tn].
    Edge cases follow 'nothing to find and nothing found is perfect': a ratio whose denominator is 0
    is 1.0 when there was nothing to get wrong (e.g. precision with no predicted positives and no
    missed positives), else 0.0. Accuracy of zero pixels is 1.0."""
    tp, fp, fn, tn = [int(c) for c in counts]
    def ratio(num, den, perfect):
        return num / den if den > 0 else (1.0 if perfect else 0.0)
    return dict(
        precision=ratio(tp, tp + fp, fn == 0),
        recall=ratio(tp, tp + fn, fp == 0),
        f1=ratio(2 * tp, 2 * tp + fp + fn, True),
        iou=ratio(tp, tp + fp + fn, True),
        accuracy=ratio(tp + tn, tp + fp + fn + tn, True),
    )


def block_bootstrap_diff(y, pred_a, pred_b, groups, order, n_boot=1000, block=20, seed=0,
                         resample_groups=False):
    """Paired difference of pooled R^2, method a minus method b on the same test frames, with a
    percentile-bootstrap 95% interval. Returns (diff, lo, hi) as floats.
    y, pred_a, pred_b (N,): targets and the two methods' predictions, one per frame; groups (N,): the
    flight of each frame; order (N,): its position in time (frame index).
    Neighbouring frames are not independent (CBH along a flight is strongly autocorrelated), so frames
    are resampled in blocks: sorted by (group, order), each group is cut into contiguous blocks of
    `block` frames (a group's last block may be shorter; no block spans two groups), and n_boot
    resamples draw as many blocks as there are, with replacement. Both R^2 are recomputed on the same
    resample, so what the methods share (hard frames, a hard flight) cancels in the difference.
    resample_groups=False keeps every group in every resample: the interval says how sure we are about
    THESE flights. True draws the groups with replacement first (as many as there are), then each drawn
    group's blocks within it: the interval then also carries how much the difference varies from flight
    to flight, which is the question for a flight nobody has seen yet (with 5 flights it is wide). Drawing
    at both levels counts the within-flight variation a second time, so this interval errs on the wide side
    (Davison & Hinkley 1997, sec. 3.8, discuss drawing the groups alone for that reason); with 5 flights,
    drawing flights alone would leave only 126 distinct resamples.
    block=20: labels in the embedded data are ~60 frames apart, so 20 labelled frames span ~1200
    frames, the lag past which CBH autocorrelation is ~0; ~1000 test frames then give ~50 blocks.
    For other data, pick block so that one block spans that decorrelation lag.
    Identical predictions give exactly (0.0, 0.0, 0.0)."""
    y, a, b = (np.asarray(v, np.float64).ravel() for v in (y, pred_a, pred_b))
    if block < 1:
        raise ValueError("block must be >= 1")
    idx = np.lexsort((np.asarray(order).ravel(), np.asarray(groups).ravel()))  # by group, then time
    g = np.asarray(groups).ravel()[idx]
    first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])  # first frame of each group
    pos = np.arange(len(y)) - np.repeat(first, np.diff(np.r_[first, len(y)]))  # position within its group
    starts = np.flatnonzero(pos % block == 0)  # first frame of each block
    yc = y - y.mean()  # centred: R^2 is unchanged and the sums below lose no precision
    per_frame = np.stack([np.ones_like(yc), yc, yc ** 2, (a - y) ** 2, (b - y) ** 2], 1)[idx]  # (N, 5)
    sums = np.add.reduceat(per_frame, starts, axis=0)  # (n_blocks, 5) per-block sums
    rng = np.random.default_rng(seed)
    times = (group_block_counts(g[starts], n_boot, rng) if resample_groups
             else block_counts(len(starts), n_boot, rng))  # (n_boot, n_blocks) how often each block is drawn
    tot = np.concatenate([sums.sum(0, keepdims=True), times @ sums])  # (1 + n_boot, 5)
    ss_tot = tot[:, 2] - tot[:, 1] ** 2 / tot[:, 0]
    diff = (tot[:, 4] - tot[:, 3]) / ss_tot  # R2_a - R2_b = (SS_res_b - SS_res_a) / SS_tot
    lo, hi = np.percentile(diff[1:], [2.5, 97.5])
    return float(diff[0]), float(lo), float(hi)


def block_counts(nb, n_boot, rng):
    """(n_boot, nb): each resample draws nb of the nb blocks with replacement; how often each was drawn."""
    pick = rng.integers(0, nb, (n_boot, nb))
    return np.bincount((pick + nb * np.arange(n_boot)[:, None]).ravel(),
                       minlength=n_boot * nb).reshape(n_boot, nb)


def group_block_counts(block_group, n_boot, rng):
    """(n_boot, n_blocks) for a two-level resample: draw as many groups as there are, with replacement, then
    for each drawn group as many of ITS blocks as it has, with replacement. block_group (n_blocks,)."""
    members = [np.flatnonzero(block_group == k) for k in np.unique(block_group)]  # each group's blocks
    times = np.zeros((n_boot, len(block_group)))
    for r in range(n_boot):
        for k in rng.integers(0, len(members), len(members)):
            np.add.at(times[r], rng.choice(members[k], len(members[k])), 1)
    return times
