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


def bce_dice_loss(logits, target, bce_weight=0.5, dice_weight=0.5, pos_weight=None, smooth=1.0):
    """bce_weight * BCE + dice_weight * soft Dice loss. logits, target (B, H, W) (any trailing shape).
    pos_weight (float or None) up-weights positive pixels in BCE, for sparse fire fronts.
    Dice is computed per sample and averaged; `smooth` keeps an empty target with an empty prediction
    at Dice loss 0 instead of 0/0. Returns (loss, bce, dice)."""
    target = target.to(logits.dtype)
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
    p = torch.sigmoid(logits).flatten(1)  # (B, H*W)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    dice = 1 - ((2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()
    return bce_weight * bce + dice_weight * dice, bce, dice


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
