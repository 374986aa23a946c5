"""
Benchmark: one training epoch of mae.py's `small` MAE over the default ~60k cloud profiles, fed by
  resident_bf16  mae.py's pipeline: the whole normalised set in one tensor, batches gathered by indexing,
                 bf16 autocast (what mae.py's cpu_bf16 auto picks where it is faster)
  resident_fp32  the same in fp32 (isolates the batching from the precision)
  dataloader     a straightforward per-item torch.utils.data.Dataset (__getitem__ returns one normalised
                 float tensor) + DataLoader with default collate, fp32
Same model, optimizer, batch size, mask ratio and (vectorised, per batch) augmentations in all three.
Each pipeline runs in its own subprocess so its peak RSS is its own.

    python bench_mae.py                                     # the full default data (minutes)
    python bench_mae.py --max_samples 2000 --num_threads 2  # a quick check
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

import data
import mae

MODES = ("resident_bf16", "resident_fp32", "dataloader")


class Profiles(Dataset):
    """The per-item pipeline the resident tensor replaces: one normalised profile per __getitem__."""

    def __init__(self, images, mean, std):
        self.images, self.mean, self.std = images, mean, std

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy((self.images[i] - self.mean) / self.std).float()  # (W,)


def one_epoch(mode, args):
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    d = data.load_clouds(data.default_cloud_paths()[0], max_samples=args.max_samples)
    mean, std = data.norm_stats(d["images"])
    cfg = dict(mae.parse_args([]), batch_size=args.batch_size)  # mae.py's defaults
    dev = torch.device("cpu")
    dtype = torch.bfloat16 if mode == "resident_bf16" else None
    model = mae.MAE(**mae.model_config(dict(model_size="small"), d["images"].shape[1]))
    opt = mae.make_optimizer(model, cfg, dev)
    gen = torch.Generator().manual_seed(0)

    def step(x):  # (B, W) normalised profiles; the body of mae.py's training loop
        x = data.augment_profiles(x, gen)
        loss = mae.loss_fn(model, x, cfg, gen, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()

    t0 = time.time()  # timed: building the pipeline + one epoch (not reading the file)
    if mode.startswith("resident"):
        X = torch.from_numpy((d["images"] - mean) / std).float()  # (N, W)
        for idx in data.batch_indices(len(X), args.batch_size, shuffle=True, generator=gen):
            step(X[idx])
    else:
        loader = DataLoader(Profiles(d["images"], mean, std), batch_size=args.batch_size, shuffle=True,
                            num_workers=args.workers)
        for x in loader:
            step(x)
    secs = time.time() - t0
    n = len(d["images"])
    return dict(mode=mode, autocast=str(dtype), samples=n, seconds=secs, samples_per_s=n / secs,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max_samples", type=int, default=0, help="use only the first N profiles (0 = all ~60k)")
    p.add_argument("--batch_size", type=int, default=mae.batch_size, help="profiles per step (mae.py's default)")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (dataloader mode)")
    p.add_argument("--mode", choices=MODES, default="", help="run one pipeline (internal; default: all)")
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_epoch(args.mode, args)))
        return
    data.default_cloud_paths()  # generate the embedded data once, outside the timings
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k != "mode"]
    res = {}
    for m in MODES:
        r = subprocess.run([sys.executable, __file__, "--mode", m, *flags], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: {m} run failed: {r.stderr.strip().splitlines()[-1]}")
        res[m] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"one epoch of small MAE, {res['dataloader']['samples']} profiles, batch {args.batch_size}, "
          f"{torch.get_num_threads() if args.num_threads == 0 else args.num_threads} threads, CPU: {cpu_name()}")
    print(f"{'pipeline':15s} {'autocast':15s} {'seconds':>8s} {'samples/s':>10s} {'peak RSS MB':>12s}")
    for m, r in res.items():
        print(f"{m:15s} {r['autocast']:15s} {r['seconds']:8.1f} {r['samples_per_s']:10.0f} "
              f"{r['peak_rss_mb']:12.0f}")
    base = res["dataloader"]["seconds"]
    print(f"speedup vs dataloader: resident_bf16 {base / res['resident_bf16']['seconds']:.2f}x, "
          f"resident_fp32 {base / res['resident_fp32']['seconds']:.2f}x; bf16 vs fp32 "
          f"{res['resident_fp32']['seconds'] / res['resident_bf16']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
