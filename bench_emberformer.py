"""
Benchmark of the emberformer.py model: samples/s and peak memory for a training step and for evaluation,
on batches drawn from the default fire data (data.default_fire_path(): real burned fractions and history
lengths, so the savings on never-burned patches and off the fire's front show), plus parameter counts per
part. Writes nothing.
    python bench_emberformer.py --batch_size 16 --steps 10 --num_threads 1
    python bench_emberformer.py --data_path fires400.h5 --patch_size 16 --device cuda
To compare two versions, run each checkout's copy on the same machine and batches (a fixed --num_threads,
rounds interleave phases so other load hits both alike). A train step is the stage's own
forward_batch (forward, loss, metrics) + backward + clipped AdamW step. Peak memory: RSS of the process on
CPU (getrusage; it only grows, so it is the max over everything timed so far), torch.cuda.max_memory_allocated
on CUDA. AMP as in emberformer.py on CUDA (bf16 / fp16); on the CPU the current model is timed in fp32 and,
with --bf16 (default), also in bf16 autocast, side by side, with the CPU's name.
"""
import argparse
import resource
import statistics
import time

import torch

import data
import emberformer as em
from bench_mae import cpu_name

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data_path", default="", help="fire file; '' = the embedded default data (64x64)")
p.add_argument("--patch_size", type=int, default=4, help="P; the spatial stage runs on the (size/P)^2 grid")
p.add_argument("--batch_size", type=int, default=16)
p.add_argument("--history", type=int, default=8, help="K frames (early frames of a fire have fewer, as in training)")
p.add_argument("--steps", type=int, default=10, help="timed steps per phase and round (after 2 warm-up steps)")
p.add_argument("--rounds", type=int, default=3, help="rounds; the median round is reported")
p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
p.add_argument("--bf16", type=int, default=1, help="CPU: also time the current model under bf16 autocast (1) or not (0)")
args = p.parse_args()
if args.num_threads > 0:
    torch.set_num_threads(args.num_threads)
try:
    dev = data.pick_device(args.device)
    fires = data.load_fire(args.data_path or data.default_fire_path())
except data.DataError as e:
    p.error(str(e))
amp = data.cuda_autocast(dev)[0]
B, K, P = args.batch_size, args.history, args.patch_size
S, T, H, W = fires["fire"].shape
D = dict(fire=torch.from_numpy(fires["fire"]).to(dev), wind=torch.from_numpy(fires["wind"]).to(dev),
         static=torch.from_numpy(fires["static"]).to(dev))
all_s, all_t = data.fire_sample_index(range(S), T)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(len(all_s), (B,), generator=gen) for _ in range(args.steps + 2)]  # same for every model


def setup(precision=None):
    """The model and optimizer with emberformer.py's default constants, K from --history; its autocast dtype."""
    torch.manual_seed(0)
    cfg = em.parse_config(["--history", str(K), "--patch_size", str(P)])
    model = em.EmberFormer(len(fires["channels"]), P, target=cfg["target"]).to(dev)
    return dict(cfg=cfg, model=model, opt=em.make_optimizer(cfg, model), amp=precision if dev.type == "cpu" else amp)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mb():
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step(run, idx, train):
    if not train:
        with torch.no_grad():
            return em.forward_batch(run["cfg"], run["model"], D, all_s[idx], all_t[idx], run["amp"])
    loss = em.forward_batch(run["cfg"], run["model"], D, all_s[idx], all_t[idx], run["amp"])[0]
    run["opt"].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
    run["opt"].step()


def timed(run, train):
    run["model"].train(train)
    for idx in batches[:2]:
        step(run, idx, train)
    sync()
    t = time.time()
    for idx in batches[2:]:
        step(run, idx, train)
    sync()
    return B * args.steps / (time.time() - t)


runs = {"current": setup()}
if dev.type == "cpu" and args.bf16:
    runs["cur_bf16"] = setup(torch.bfloat16)
where = torch.cuda.get_device_name() if dev.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
print(f"device {dev} ({where})"
      f", amp {amp}, data {H}x{W} ({S} fires), patch {P} -> {-(-H // P)}x{-(-W // P)} tokens, K {K}, batch {B}, "
      f"{args.rounds} rounds of {args.steps} steps")
for name, run in runs.items():
    print(f"{name:<8} parameters: " + ", ".join(f"{k} {v:,}" for k, v in em.part_params(run["model"]).items()))
rates = {(name, phase): [] for name in runs for phase in ("eval", "train")}
for r in range(args.rounds):
    for phase in ("eval", "train"):
        for name, run in runs.items():
            rates[name, phase].append(timed(run, phase == "train"))
kind = "CUDA allocated" if dev.type == "cuda" else "RSS"
for phase in ("eval", "train"):
    for name in runs:
        per_round = " ".join(f"{x:.1f}" for x in rates[name, phase])
        print(f"{phase:<5} {name:<8}: {statistics.median(rates[name, phase]):8.1f} samples/s (median; rounds {per_round})")
print(f"peak memory {peak_mb():.0f} MiB ({kind}, whole process)")
