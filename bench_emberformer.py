"""
Benchmark of the emberformer.py model: samples/s and peak memory for a training step and for evaluation,
on random inputs of the right shapes, plus parameter counts per part. Nothing is written to disk.
    python bench_emberformer.py --size 64 --patch_size 4 --batch_size 16 --steps 10          # 2-core CPU
    python bench_emberformer.py --size 400 --patch_size 16 --batch_size 16 --device cuda      # seed guide setup
Peak memory: RSS of the process on CPU (getrusage; it only grows, so eval is measured before training),
torch.cuda.max_memory_allocated on CUDA. AMP as in emberformer.py (bf16 / fp16 on CUDA, fp32 on CPU).
"""
import argparse
import resource
import time

import torch

import emberformer as em
import losses

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--size", type=int, default=64, help="grid side H = W in pixels")
p.add_argument("--patch_size", type=int, default=4, help="P; the spatial stage runs on the (size/P)^2 grid")
p.add_argument("--batch_size", type=int, default=16)
p.add_argument("--history", type=int, default=8, help="K frames; every sample uses all K (the costliest case)")
p.add_argument("--channels", type=int, default=4, help="static channels")
p.add_argument("--steps", type=int, default=10, help="timed steps per phase (after 2 warm-up steps)")
p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
args = p.parse_args()
if args.num_threads > 0:
    torch.set_num_threads(args.num_threads)
try:
    dev = em.pick_device(args.device)
except em.data.DataError as e:
    p.error(str(e))
amp = em.amp_dtype_for(dev)
torch.manual_seed(0)

B, K, H, C = args.batch_size, args.history, args.size, args.channels
model = em.EmberFormer(C, args.patch_size).to(dev)
opt = em.make_optimizer(model)
scaler = torch.amp.GradScaler(dev.type, enabled=amp is torch.float16)
hist = (torch.rand(B, K, H, H, device=dev) > 0.7).float()
wind = torch.randn(B, K, 2, device=dev) * 5
lengths = torch.full((B,), K, device=dev)
static = torch.randn(B, C, H, H, device=dev)
target = (torch.rand(B, H, H, device=dev) > 0.7).float()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mb():
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def forward():
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        return model(hist, wind, lengths, static)


def train_step():
    loss = losses.bce_dice_loss(forward().float(), target)[0]
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()


def eval_step():
    with torch.no_grad():
        forward()


def timed(fn, train):
    model.train(train)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        fn()
    sync()
    t = time.time()
    for _ in range(args.steps):
        fn()
    sync()
    return B * args.steps / (time.time() - t), peak_mb()


print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
      f", amp {amp}, grid {H}x{H}, patch {args.patch_size} -> {-(-H // args.patch_size)}^2 tokens, K {K}, batch {B}")
print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in em.part_params(model).items()))
for name, fn, train in (("eval", eval_step, False), ("train", train_step, True)):
    sps, mb = timed(fn, train)
    kind = "CUDA allocated" if dev.type == "cuda" else "RSS"
    print(f"{name:<5}: {sps:8.1f} samples/s  peak memory {mb:8.0f} MiB ({kind})")
