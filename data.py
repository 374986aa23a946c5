"""
Shared data code: HDF5 schemas and their validation, the embedded synthetic datasets, splits and
batching. Stage scripts import this; nothing here trains anything.

Schemas (the same as the real files, so real data drops in):
  clouds  images float32 (N, 440) raw IR signal; metadata float32 (N, 4), attr columns =
          flight_idx, frame_idx, sza, saa; labelled files add cbh_km float32 (N,)
  fires   fire uint8 (S, T, H, W) cumulative burned area; static float32 (S, C, H, W), attr channels;
          wind float32 (S, T, 2) = (u east, v north) m/s, wind[:, t] drives frame t -> t+1; row 0 = north
"""
import argparse
import atexit
import contextlib
import csv
import errno
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time

import h5py
import numpy as np
import torch
import torch.distributed as dist

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(REPO_DIR, "data")
CLOUD_COLUMNS = ("flight_idx", "frame_idx", "sza", "saa")
CLOUD_WIDTH = 440
MAX_CBH_KM = 20.0  # physical bound for a cloud base; anything above is a unit or fill-value error
CLOUD_VERSION, FIRE_VERSION = 1, 1  # bump when a generator changes, so a stale cached file is not reused
MAX_WIND_MS = 100.0  # no surface wind exceeds this; larger values are fill values or wrong units


class DataError(Exception):
    """A problem with user-supplied input; the message names the file, dataset and problem (exit code 2)."""


class NonFiniteLoss(Exception):
    """Training produced a NaN/Inf loss; the message names the epoch, steps and likely
    causes (exit code 3)."""


def nonfinite_message(where, first_step, last_step):
    return (f"{where}: non-finite loss at steps {first_step}-{last_step}; likely causes: a learning "
            "rate too high (--lr), mixed precision (--amp / --cpu_bf16 off to test), or extreme values in "
            "the data. Checkpoints on disk are those of the last good epoch")


class Progress:
    """Live progress within an epoch: step/total, running loss, samples/s and the epoch's ETA. In a terminal
    one line rewritten in place about every 2 s; when stdout is a file (nohup, a batch job) a plain line
    about every 60 s, so logs stay readable. running_loss() is only called when a line is printed (it may
    sync a GPU)."""

    def __init__(self, total_steps, label, stream=None, clock=time.time):
        self.total, self.label, self.clock = total_steps, label, clock
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = 2.0 if self.tty else 60.0
        self.start = self.last = clock()
        self.shown = False

    def update(self, step, samples, running_loss):
        now = self.clock()
        if now - self.last < self.every or step >= self.total:
            return
        self.last = now
        rate = samples / max(now - self.start, 1e-9)
        eta = (now - self.start) / step * (self.total - step)
        line = (f"  {self.label}: step {step}/{self.total} | loss {running_loss():.5f} | "
                f"{rate:.0f} samples/s | ETA {eta:.0f}s")
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()
        self.shown = True

    def close(self):
        if self.tty and self.shown:  # clear the in-place line before the epoch's summary line
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- output folders: checked before any work, locked while a run writes them ---

def check_out_dir(out_dir):
    """Refuse an out_dir that cannot be written or that a live run holds, writing nothing: the folder (or its
    nearest existing parent) must be a writable directory, and out_dir/.lock must not name a live process."""
    path = os.path.abspath(out_dir)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:  # a real write test: permission bits do not tell (root, read-only or virtual file systems)
        os.remove(tempfile.mkstemp(dir=probe, prefix=".write_test_")[1])
    except OSError:
        raise DataError(f"--out_dir {out_dir}: {probe} is not a writable folder") from None
    holder, host = _lock_owner(os.path.join(path, ".lock"))
    # its liveness cannot be seen from here
    if holder is not None and host not in (None, socket.gethostname()):
        raise DataError(f"--out_dir {out_dir}: in use by process {holder} on host {host} "
                        f"(its lock {path}/.lock); wait for it, choose another --out_dir, or delete the "
                        "lock if that run has ended")
    if holder is not None and holder != os.getpid() and _alive(holder):
        raise DataError(f"--out_dir {out_dir}: in use by process {holder} (its lock {path}/.lock); "
                        "wait for it or choose another --out_dir")


def check_run_folder(out_dir, resume):
    """A training run's folder holds one run, never two merged and never a deleted one. A fresh run
    refuses a folder holding a previous run's log or checkpoint; --resume continues its own folder's
    run, or branches a checkpoint into a folder without a run, but refuses another run's folder (that
    run's log and checkpoints would mix)."""
    found = [n for n in ("log.csv", os.path.join("checkpoints", "latest.pth"))
             if os.path.exists(os.path.join(out_dir, n))]
    home = os.path.dirname(os.path.dirname(os.path.realpath(resume))) if resume else None
    if not found or home == os.path.realpath(out_dir):
        return
    if resume:
        raise DataError(f"--resume {resume}: --out_dir {out_dir} holds another run ({', '.join(found)}); "
                        f"resume into the checkpoint's own folder or a new --out_dir")
    if found == ["log.csv"]:  # killed between its first log row and its first checkpoint
        raise DataError(f"--out_dir {out_dir} holds a log.csv but no checkpoints/latest.pth (a run stopped "
                        "before it saved anything to resume): delete that folder to start over, or choose "
                        "another --out_dir")
    raise DataError(f"--out_dir {out_dir} holds a previous run ({', '.join(found)}): continue it with "
                    f"--resume {os.path.join(out_dir, 'checkpoints', 'latest.pth')}, or choose another "
                    "--out_dir (or delete that folder to start over)")


def claim_out_dir(out_dir):
    """Create out_dir and take its lock (.lock holding this process id, removed at exit). A lock left by a
    process that is no longer running is taken over with a notice. The lock names the host too
    ("pid host"): on a shared filesystem a live run on another node must not look stale; under torchrun
    call it on rank 0 only."""
    check_out_dir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out_dir {out_dir}: cannot create it ({e.strerror})") from None
    # temp files of a write a kill interrupted: no live run owns them
    for folder, _, names in os.walk(out_dir):
        for name in names:
            if name.startswith(".tmp_"):
                os.remove(os.path.join(folder, name))
    lock = os.path.join(out_dir, ".lock")
    holder = _lock_owner(lock)[0]
    if holder is not None and holder != os.getpid():
        print(f"note: taking over the stale lock {lock} of process {holder}, which is no longer running")
    with open(lock, "w") as f:
        # the host too: on a shared filesystem a pid alone misleads
        f.write(f"{os.getpid()} {socket.gethostname()}")
    atexit.register(lambda: _lock_owner(lock)[0] == os.getpid() and os.remove(lock))


def claim_output_of(folder, marker, source):
    """Outputs named after an input's file name (eval_<stem>/, cbh_pred_<stem>.h5) belong to that
    input: `marker` (a text file in `folder`) records its absolute path, and another input with
    the same file name is refused in one line instead of overwriting the first one's outputs.
    Claims (creates and locks) `folder`."""
    source = os.path.realpath(source)
    if os.path.isfile(marker):
        with open(marker) as f:
            before = f.read().strip()
        if before != source:
            raise DataError(f"{marker}: these outputs belong to {before}; {source} has the same file name: "
                            "pass another --out_dir (or rename the file)")
    claim_out_dir(folder)
    with open(marker, "w") as f:
        f.write(source + "\n")


def _lock_owner(lock):
    """(pid, host) a lock names: "pid", or "pid host" under torchrun; None for what is
    missing or unreadable."""
    try:
        with open(lock) as f:
            words = f.read().split()
        return int(words[0]), (words[1] if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


# --- the constants block as command-line flags, CSV logs ---

def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def parse_constants(script, description, namespace, argv=None, only_given=False):
    """argparse built from the constants block of a stage script (between '# --- config ---' and '# --- end
    config ---'): one --flag per constant, its type from the default in `namespace` (the script's globals()),
    its help from the comment, so `-h` lists every knob. Returns the parsed flags as a dict; only_given: only
    the flags written on the command line (a default passed explicitly counts)."""
    block = open(script).read().split("# --- config ---\n")[1].split("# --- end config ---")[0]
    fmt = type("Fmt", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    p = argparse.ArgumentParser(description=description, formatter_class=fmt)
    for name, _, comment in re.findall(r"^(\w+) = (.+?)\s+# (.*)$", block, re.M):
        default = namespace[name]
        kind = (dict(type=str2bool, nargs="?", const=True) if isinstance(default, bool) else
                dict(type=str if default is None else type(default)))
        p.add_argument(f"--{name}", default=argparse.SUPPRESS if only_given else default,
                       help=comment.replace("%", "%%"), **kind)  # help is %-formatted
    return vars(p.parse_args(argv))


def check_range(cfg, keys, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """Refuse (DataError, one line naming the flag) any of the space-separated flags `keys` whose value is not
    finite or lies outside lo..hi (open ends: lo_open / hi_open). NaN fails every comparison: finite first."""
    for k in keys.split():
        v = cfg[k]
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
            low = f"{'>' if lo_open else '>='} {lo:g}" if lo > -math.inf else ""
            high = f"{'<' if hi_open else '<='} {hi:g}" if hi < math.inf else ""
            raise DataError(f"--{k} {v}: must be finite" + "".join(f" and {b}" for b in (low, high) if b))


def check_choice(cfg, key, choices):
    if cfg[key] not in choices:
        raise DataError(f"--{key} {cfg[key]!r}: choose {', '.join(choices)}")


# --- device and precision: the same policy in every stage ---

def pick_device(name):
    """--device auto (cuda > mps > cpu) | cpu | cuda | mps -> torch.device, or one line if it is not here."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    ok = dict(cpu=True, cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available())
    if name not in ok:
        raise DataError(f"--device {name!r}: choose auto, cpu, cuda or mps")
    if not ok[name]:
        raise DataError(f"--device {name}: not available on this machine")
    return torch.device(name)


def cuda_autocast(device):
    """(autocast dtype or None, whether a GradScaler is needed): CUDA runs bf16 where supported, else fp16 +
    GradScaler; other devices None here (the CPU's precision is chosen by choose_cpu_dtype)."""
    if device.type != "cuda":
        return None, False
    return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)


def choose_cpu_dtype(setting, time_step, timer=time.perf_counter, warmup=2, timed=3, rounds=3):
    """CPU precision for cpu_bf16 = on | off | auto -> (torch.bfloat16 or None, a one-line message).
    auto: time_step(dtype) runs one real training step of the stage's model and batch shape. After `warmup`
    untimed steps in each precision, `rounds` alternating rounds of `timed` steps are timed in fp32 and in
    bf16 autocast, and the precision with the faster best round wins (alternating and taking the best
    round keeps a busy, shared machine from deciding it). Whether bf16 pays depends on the CPU (AMX,
    AVX512-BF16 or neither), the model and the batch, so one CPU flag cannot decide it. A CPU where bf16
    autocast fails falls back to fp32 with a notice."""
    if setting != "auto":
        on = setting == "on"
        return (torch.bfloat16 if on else None), f"cpu_bf16 {setting}: {'bf16' if on else 'fp32'}"

    def run(dtype, n):
        for _ in range(n):
            time_step(dtype)
    try:
        run(torch.bfloat16, warmup)  # bf16 first: if autocast fails here, nothing else is timed
    except RuntimeError as e:
        return None, f"cpu_bf16 auto: bf16 autocast failed on this CPU ({type(e).__name__}); using fp32"
    run(None, warmup)
    best = dict(fp32=math.inf, bf16=math.inf)  # seconds per step of the best round
    for _ in range(rounds):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            t0 = timer()
            run(dtype, timed)
            best[name] = min(best[name], (timer() - t0) / timed)
    pick = "bf16" if best["bf16"] < best["fp32"] else "fp32"
    return (torch.bfloat16 if pick == "bf16" else None), (
        f"cpu_bf16 auto: fp32 {1 / best['fp32']:.1f} steps/s, bf16 {1 / best['bf16']:.1f} steps/s -> {pick}")


# --- training-loop plumbing: RNG state, non-finite losses ---

def rng_state(gens):
    """Every random stream a run draws from (torch, numpy, python, CUDA and the named generators `gens`), for
    a checkpoint: restored by set_rng_state, a resumed run draws what an uninterrupted one would have."""
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                **{name: g.get_state() for name, g in gens.items()})


def set_rng_state(state, gens):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in gens.items():
        g.set_state(state[name])


def check_finite(bad, scaler_on, where, first_step, last_step):
    """Stop (NonFiniteLoss) on non-finite losses among the steps first_step..last_step; bad (window,)
    bool = which of them had one on this process. A step counts if it had one on any process; with a
    GradScaler (fp16), which skips single overflowing steps by design, only a window in which every step
    did. Every process decides alike."""
    n_bad = int(all_reduce_max(bad.long()).sum())
    if n_bad == len(bad) or (n_bad > 0 and not scaler_on):
        raise NonFiniteLoss(nonfinite_message(where, first_step, last_step))


# --- data fingerprints and CSV logs ---

def fingerprint(*arrays):
    """A short hash of the arrays' values (numpy or torch, any device): a checkpoint stores it so --resume can
    tell that the data changed under the same file name."""
    h = hashlib.sha1()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def keep_first_rows(path, n):
    """Keep the header and the first n rows of a CSV log: the rows a checkpoint accounts for."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()[:n + 1]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def trim_log(path, last_epoch):
    """Keep the header and the complete rows of epochs <= last_epoch, so a resumed run never lists an
    epoch twice; a blank or partial line (a kill while appending) is dropped. A log without a complete
    header is removed."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    header = lines[0].rstrip("\n").split(",") if lines and lines[0].endswith("\n") else []
    if "epoch" not in header:
        os.remove(path)
        return
    col = header.index("epoch")
    cells = lambda line: line.rstrip("\n").split(",")
    keep = [line for line in lines[1:] if line.endswith("\n") and len(cells(line)) == len(header)
            and cells(line)[col].isdigit() and int(cells(line)[col]) <= last_epoch]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines[:1] + keep)
    os.replace(path + ".tmp", path)


def append_csv(path, rows):
    """Append rows (dicts) to a CSV log, with a header for a new file; returns the number of
    data rows it holds."""
    if rows:
        new = not os.path.isfile(path)
        try:
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                if new:
                    w.writeheader()
                w.writerows(rows)
        except OSError as e:  # a partial row is dropped by trim_log / keep_first_rows on --resume
            _raise_if_disk_full(e, path)
            raise
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return max(0, sum(1 for _ in f) - 1)


# --- atomic writes ---

def _atomic_write(path, write_fn):
    """write_fn(tmp_path) writes the file; it only appears under `path` once complete."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_" + os.path.basename(path))
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the user's umask, like any other tool (mkstemp makes files 0600)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        _raise_if_disk_full(e, path)
        raise


def _raise_if_disk_full(e, path):
    """A full disk as one line naming the file (exit 2), not torch's "unexpected pos" traceback:
    Python reports it as ENOSPC, torch's zip writer as a RuntimeError, which counts when the disk
    is (nearly) full."""
    torch_write = isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "write failed",
                                                                           "failed writing"))
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC
    if full or torch_write and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2 ** 26:
        raise DataError(f"{path}: cannot write it: no space left on device (the last complete version, "
                        "if any, is kept); free some space and --resume") from None


def atomic_torch_save(obj, path):
    """torch.save that never leaves a half-written checkpoint (temp file + rename)."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_csv(path, rows):
    """rows (dicts; the columns: every key, in order of first appearance; missing cells are empty) -> a CSV
    that appears under `path` only once complete, so a reader (or a crash) never leaves half a table."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            w.writeheader()
            w.writerows(rows)
    _atomic_write(path, write)


def atomic_write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _atomic_write(path, write)


def atomic_savefig(fig, path, **kwargs):
    """fig.savefig(path), atomically; the format comes from path's extension (the temp file's
    name has none)."""
    def write(tmp):
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png", **kwargs)
    _atomic_write(path, write)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint file not found")
    try:
        # weights_only=False: our checkpoints hold RNG states and config dicts, written by us
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{path}: checkpoint is not a dict")
    return ckpt


# --- data parallel (torchrun): every helper is a no-op without a process group, so a plain ---
# `python stage.py` runs the same code as one process of a torchrun job

def _distributed():
    return dist.is_available() and dist.is_initialized()


def ddp_setup():
    """Join the process group when launched by torchrun with more than one process (it sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain run, or torchrun with one process, starts none. One group
    serves CPU tensors with gloo and, where CUDA exists, CUDA tensors with nccl, so small decisions can always
    be agreed on the CPU. On ranks > 0 stdout goes to /dev/null: only rank 0 prints (stderr stays, for
    tracebacks)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _distributed():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")


def ddp_cleanup(together):
    """Leave the process group. together: every rank reached this point alike (a normal end, or an error that
    fail_together raised on every rank); they then wait for each other first, because rank 0 is still
    writing outputs when the others finish, and a peer that tears down its gloo connections meanwhile can
    abort rank 0 at exit ("terminate called without an active exception", seen in CI). After an error on
    one rank only there is nobody to wait for: torchrun stops the rest. So an error that can happen on one
    rank alone must be raised inside a fail_together block, or this barrier would wait for it forever."""
    if _distributed():
        gc.collect()  # free DDP wrappers (reference cycles) while the group lives, not at interpreter exit; a
        # mitigation of that abort whose effect was not measured
        if together:
            dist.barrier()
        dist.destroy_process_group()


def run_stage(work):
    """A stage's main: join the process group under torchrun (ddp_setup), run work(), leave the group
    (ddp_cleanup). A DataError (bad input) exits 2 and a NonFiniteLoss exits 3, with one line from rank 0;
    every process raises those alike (fail_together, or the all-reduced loss check), so all of them exit."""
    ddp_setup()
    together = False  # did every process get to the end alike?
    try:
        work()
        together = True
    except (DataError, NonFiniteLoss) as e:
        if is_rank0():
            print(f"error: {e}", file=sys.stderr)
        together = True
        sys.exit(2 if isinstance(e, DataError) else 3)
    finally:
        ddp_cleanup(together)


def rank_world():
    """(rank, world_size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def is_rank0():
    return rank_world()[0] == 0


def ddp_device(device):
    """The device this process trains on. Under torchrun CUDA means GPU LOCAL_RANK, one GPU per process (a
    node with fewer GPUs than processes is refused), and MPS is refused; otherwise `device` itself."""
    if not _distributed() or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DataError(f"--device {device.type}: torchrun with several processes needs --device cpu or cuda")
    per_node, n_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if n_gpus < per_node:
        raise DataError(f"--device cuda: {per_node} processes on this node but {n_gpus} GPU(s); one GPU per "
                        f"process: pass --nproc_per_node {n_gpus} or fewer")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def ddp_wrap(model, device):
    """model in DistributedDataParallel (its backward averages the gradients over the processes) under
    torchrun; the model itself otherwise. Keep the plain model for checkpoints, evaluation and plots."""
    if not _distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model):
    """The plain module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def rank_slice(n):
    """This process's contiguous part of a global batch of n samples, as a slice. Sizes differ by at most one
    (ranks below n % world take one more). A rank may get an empty slice (the last batch, n < world); it must
    still run its step, since DDP's gradient all-reduce needs every rank.
    slice(0, n) without a process group."""
    rank, world = rank_world()
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def rank_loss_weight(n):
    """Factor for this rank's loss, a mean over its rank_slice(n) of a global batch of n samples, so that the
    gradient DDP averages over the ranks (with equal weights, whatever their slice sizes) is exactly the
    gradient of the mean over all n: (slice size / n) * world. 1.0 without a process group."""
    mine = rank_slice(n)
    return (mine.stop - mine.start) / n * rank_world()[1]


def all_reduce_sum(t):
    """The sum of tensor t over the ranks (a new tensor; t itself without a process group)."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t):
    """The elementwise max of tensor t over the ranks (a new tensor; t itself without a process group)."""
    return _all_reduce(t, "MAX")


def _all_reduce(t, op):
    if not _distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, getattr(dist.ReduceOp, op))
    return t


def any_rank(flag):
    """True on every rank if flag is true on any: a decision (stop early, ...) that every rank takes alike."""
    return bool(all_reduce_max(torch.tensor(int(flag))).item())


def broadcast_buffers(model):
    """Copy rank 0's buffers (BatchNorm running statistics, which each process updates from its own slice)
    into every process's model, in place, so all of them evaluate the model rank 0 saves. A no-op without
    a process group."""
    if _distributed():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def broadcast_object(obj):
    """Rank 0's obj (any picklable value) on every rank; obj itself without a process group."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def fail_together():
    """Make a block end the same way on every rank: if it raised on any rank, every rank raises, so none goes
    on to wait in a collective that the others never reach. A failing rank re-raises its own exception; the
    others raise the first failing rank's DataError or NonFiniteLoss with its message (so rank 0 can print
    it), or a RuntimeError naming that rank and its error. The block itself must hold no collective. A no-op
    without a process group."""
    if not _distributed():
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # not KeyboardInterrupt and the like: torchrun stops every rank on those itself
        error = e
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failed:
        rank, (name, msg) = failed[0]
        known = {"DataError": DataError, "NonFiniteLoss": NonFiniteLoss}
        raise known[name](msg) if name in known else RuntimeError(f"rank {rank} failed: {name}: {msg}")

# --- HDF5 reading with validation ---

def _open_h5(path):
    if not path or not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file") from None


def _read(f, path, name, dtype_kind, ndim):
    """Read dataset `name`, checking presence, dtype kind ('f' float, 'u' unsigned int) and rank."""
    if name not in f:
        raise DataError(f"{path}: dataset '{name}' missing")
    d = f[name]
    if not isinstance(d, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is not a dataset")
    if d.dtype.kind != dtype_kind:
        want = {"f": "float", "u": "uint8"}[dtype_kind]
        raise DataError(f"{path}: dataset '{name}' has dtype {d.dtype}, expected {want}")
    if d.ndim != ndim:
        raise DataError(f"{path}: dataset '{name}' has shape {d.shape}, expected {ndim} dimensions")
    return d


def _check_finite(path, name, a):
    if not np.isfinite(a).all():
        raise DataError(f"{path}: dataset '{name}' contains NaN or Inf")


def _attr_strings(path, d, attr, name):
    if attr not in d.attrs:
        raise DataError(f"{path}: dataset '{name}' lacks attribute '{attr}'")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(d.attrs[attr])]


# --- clouds: schema ---

def write_clouds(path, images, metadata, cbh_km=None):
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=np.asarray(images, np.float32))
            m = f.create_dataset("metadata", data=np.asarray(metadata, np.float32))
            m.attrs["columns"] = np.array(CLOUD_COLUMNS, dtype=h5py.string_dtype())
            if cbh_km is not None:
                f.create_dataset("cbh_km", data=np.asarray(cbh_km, np.float32))
    _atomic_write(path, write)


def has_dataset(path, name):
    """Whether the HDF5 file at path holds dataset `name` (a missing or non-HDF5 file raises DataError)."""
    with _open_h5(path) as f:
        return name in f


def write_cbh_predictions(path, cbh_pred_km, metadata):
    """Predicted cloud base height per frame: cbh_pred_km float32 (N,), and the input's metadata (N, 4) with
    its columns, so every prediction keeps its flight, frame and solar angles. Written atomically."""
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("cbh_pred_km", data=np.asarray(cbh_pred_km, np.float32))
            m = f.create_dataset("metadata", data=np.asarray(metadata, np.float32))
            m.attrs["columns"] = np.array(CLOUD_COLUMNS, dtype=h5py.string_dtype())
    _atomic_write(path, write)


NO_BASE_FILL = -999.0  # cbh_km at or below this (or NaN) marks "no cloud base seen" in real lidar files


def load_clouds(path, labelled=False, max_samples=0, drop_unlabelled=False):
    """Read and validate a cloud-profile file. Returns numpy arrays (see module docstring).
    drop_unlabelled (with labelled): frames whose cbh_km is NaN or a fill value (<= NO_BASE_FILL), as real
    lidar files mark "no cloud base", are left out with a one-line count instead of refusing the file."""
    with _open_h5(path) as f:
        d_img = _read(f, path, "images", "f", 2)
        d_meta = _read(f, path, "metadata", "f", 2)
        n = d_img.shape[0] if max_samples <= 0 else min(max_samples, d_img.shape[0])
        if d_img.shape[0] == 0 or d_img.shape[1] == 0:
            raise DataError(f"{path}: dataset 'images' is empty (shape {d_img.shape})")
        if d_meta.shape != (d_img.shape[0], 4):
            raise DataError(f"{path}: dataset 'metadata' has shape {d_meta.shape}, "
                            f"expected ({d_img.shape[0]}, 4) to match 'images'")
        cols = tuple(_attr_strings(path, d_meta, "columns", "metadata"))
        if cols != CLOUD_COLUMNS:
            raise DataError(f"{path}: dataset 'metadata' columns {cols}, expected {CLOUD_COLUMNS}")
        images = d_img[:n].astype(np.float32)
        meta = d_meta[:n].astype(np.float32)
        out = dict(images=images, metadata=meta)
        if labelled:
            if "cbh_km" not in f:
                raise DataError(f"{path}: dataset 'cbh_km' missing (a labelled file is needed)")
            d_cbh = _read(f, path, "cbh_km", "f", 1)
            if d_cbh.shape[0] != d_img.shape[0]:
                raise DataError(f"{path}: dataset 'cbh_km' has {d_cbh.shape[0]} rows, "
                                f"'images' has {d_img.shape[0]}")
            out["cbh_km"] = d_cbh[:n].astype(np.float32)
    _check_finite(path, "images", images)
    _check_finite(path, "metadata", meta)
    if labelled and drop_unlabelled:
        keep = ~(np.isnan(out["cbh_km"]) | (out["cbh_km"] <= NO_BASE_FILL))  # +-inf stay: refused below
        if not keep.any():
            raise DataError(f"{path}: dataset 'cbh_km' has no frame with a cloud base")
        if not keep.all():
            print(f"note: {path}: {int((~keep).sum())} of {len(keep)} frames have no cloud base "
                  f"(cbh_km NaN or <= {NO_BASE_FILL:g}); left out")
            out = {k: v[keep] for k, v in out.items()}
            images, meta = out["images"], out["metadata"]
    sza, saa = meta[:, 2], meta[:, 3]
    if (sza < 0).any() or (sza > 180).any() or (saa < -360).any() or (saa > 360).any():
        raise DataError(f"{path}: dataset 'metadata' solar angles out of range "
                        "(sza 0..180, saa -360..360 deg)")
    if labelled:
        cbh = out["cbh_km"]
        _check_finite(path, "cbh_km", cbh)
        if (cbh < 0).any() or (cbh > MAX_CBH_KM).any():
            raise DataError(f"{path}: dataset 'cbh_km' has values outside 0..{MAX_CBH_KM} km "
                            f"(min {cbh.min():.3g}, max {cbh.max():.3g})")
    out["flight"] = meta[:, 0].round().astype(np.int64)
    out["frame"] = meta[:, 1].round().astype(np.int64)
    pairs, counts = np.unique(np.stack([out["flight"], out["frame"]], 1), axis=0, return_counts=True)
    if (counts > 1).any():
        fl, fr = pairs[counts > 1][0]
        raise DataError(f"{path}: dataset 'metadata' lists {int((counts > 1).sum())} (flight_idx, frame_idx) "
                        f"pairs more than once, e.g. flight {fl} frame {fr}: each frame must appear once")
    out["sza"], out["saa"] = sza, saa
    return out


# --- clouds: embedded synthetic dataset ---

def _smooth_noise(rng, n, corr_len, size=None):
    """Gaussian-filtered white noise (unit std) of length n, correlation length corr_len samples."""
    corr_len = min(corr_len, n / 8)  # longer than the series would leave only its mean
    shape = (n,) if size is None else (size, n)
    w = rng.standard_normal(shape)
    f = np.fft.rfftfreq(n)
    filt = np.exp(-0.5 * (f * corr_len * 2 * np.pi) ** 2)
    out = np.fft.irfft(np.fft.rfft(w, axis=-1) * filt, n=n, axis=-1)
    return out / (out.std(axis=-1, keepdims=True) + 1e-12)


def _fractal_field(rng, n_rows, n_cols, beta=3.0, row_stretch=4.0):
    """2D Gaussian random field with a power-law spectrum |k|^-beta (unit std).
    Rows are frames along the flight, columns are cross-track pixels; row_stretch > 1 makes
    features longer along-track, so neighbouring frames are strongly correlated, as in real data."""
    ky = np.fft.fftfreq(n_rows)[:, None] * row_stretch
    kx = np.fft.rfftfreq(n_cols)[None, :]
    k = np.sqrt(ky ** 2 + kx ** 2)
    k[0, 0] = 1.0
    amp = k ** (-beta / 2)
    amp[0, 0] = 0.0
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    field = np.fft.irfft2(spec, s=(n_rows, n_cols))
    return (field - field.mean()) / field.std()


def _solar_angles(lat_deg, doy, hour):
    """Solar zenith and azimuth (deg, azimuth clockwise from north) from latitude,
    day and local solar hour."""
    lat = np.radians(lat_deg)
    dec = np.radians(-23.44 * np.cos(2 * np.pi * (doy + 10) / 365))
    ha = np.radians(15.0 * (hour - 12.0))
    cos_z = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha)
    zen = np.arccos(np.clip(cos_z, -1, 1))
    cos_a = (np.sin(dec) - np.sin(lat) * cos_z) / (np.cos(lat) * np.sin(zen) + 1e-9)
    az = np.degrees(np.arccos(np.clip(cos_a, -1, 1)))
    az = np.where(ha > 0, 360.0 - az, az)  # afternoon: sun in the west
    return np.degrees(zen), az


def generate_clouds(n_flights=5, frames_per_flight=12000, n_labelled=1000, seed=0):
    """Synthetic ER-2 thermal-IR profiles of marine boundary-layer cloud, in the real files' schema.

    Physics (simple, but with the dependencies that matter for CBH retrieval):
    - per flight: sea-surface temperature T_s (288-296 K), boundary-layer lapse rate G (6-7.5 K/km), a CBH
      regime (mean base 0.4-1.2 km) and a typical geometric thickness (0.2-0.5 km); flights differ, so
      predicting an unseen flight is a real generalisation test;
    - along the flight: smooth (autocorrelated over hundreds of frames) cloud base height in 0.1-2 km,
      thickness and cloud fraction; cloud-top height z_top = base + thickness;
    - across the 440 pixels: a fractal (power-law spectrum) field, correlated between neighbouring frames,
      sets where cloud is (thresholded at the local cloud fraction) and its optical depth tau, which grows
      with thickness (cloud cores opaque in the IR, edges thin);
    - emissivity eps = 1 - exp(-0.75 tau); brightness temperature T_b = eps T_top + (1 - eps) T_s with
      T_top = T_s - G z_top, so higher clouds are colder;
    - raw signal = 100 counts/K x (T_b - 200 K) x vignetting (cross-track falloff) + 1000 + sensor noise,
      one camera calibration for every flight (so absolute brightness means the same thing everywhere);
    - solar zenith/azimuth from the time of day along the flight (flights start 8-12 h local);
    - labels: only where a nadir lidar would see the base (cloud present, nadir optical depth < 3), with
      30 m noise (a short overcast flight with too few such frames gets its optically thinnest ones);
      ~n_labelled frames spread evenly along the flights (so ~60 frames apart: still
      correlated neighbours).
    Returns (unlabelled, labelled) dicts with images, metadata and (labelled only) cbh_km.
    """
    rng = np.random.default_rng(seed)
    W, n = CLOUD_WIDTH, frames_per_flight
    x = np.linspace(-1, 1, W)
    vignette = 1.0 - 0.04 * x ** 2  # a few percent cross-track falloff
    imgs, metas, lab_idx, cbhs = [], [], [], []
    for fl in range(n_flights):
        t_s = rng.uniform(288, 296)
        lapse = rng.uniform(6.0, 7.5)
        base_mean = rng.uniform(0.4, 1.2)
        thick_mean = rng.uniform(0.2, 0.5)
        base = np.clip(base_mean + 0.3 * _smooth_noise(rng, n, 400), 0.1, 2.0)
        thick = np.clip(thick_mean * np.exp(0.3 * _smooth_noise(rng, n, 300)), 0.05, 1.2)
        cover = np.clip(0.65 + 0.2 * _smooth_noise(rng, n, 500), 0.15, 1.0)
        z_top = base + thick
        field = _fractal_field(rng, n, W)  # (n, W)
        # cloud where the field exceeds the quantile that gives the local cloud fraction
        thresh = np.sqrt(2) * _erfinv(1 - 2 * cover)  # Gaussian quantile of (1 - cover)
        excess = np.clip(field - thresh[:, None], 0, None)
        tau = 40.0 * thick[:, None] * (0.05 + excess) * (excess > 0)
        eps = 1.0 - np.exp(-0.75 * tau)
        t_top = t_s - lapse * z_top
        t_b = eps * t_top[:, None] + (1 - eps) * t_s
        signal = 100.0 * (t_b - 200.0) * vignette + 1000.0 + rng.normal(0, 15.0, (n, W))
        hour = rng.uniform(8, 12) + 4.0 * np.arange(n) / n  # ~4 h of flight
        sza, saa = _solar_angles(rng.uniform(25, 40), rng.uniform(150, 250), hour)
        meta = np.stack([np.full(n, fl), np.arange(n), sza, saa], 1)
        tau_nadir = tau[:, W // 2 - 5: W // 2 + 5].mean(1)
        seen = np.flatnonzero((tau_nadir > 0.05) & (tau_nadir < 3.0))
        if len(seen) < n_labelled // n_flights:  # short, overcast flights: take the thinnest cloudy frames
            cloudy = np.flatnonzero(tau_nadir > 0.05)
            seen = np.sort(cloudy[np.argsort(tau_nadir[cloudy], kind="stable")[:n_labelled // n_flights]])
        k = min(len(seen), n_labelled // n_flights)
        pick = seen[np.linspace(0, len(seen) - 1, k).round().astype(int)] if k > 0 else seen[:0]
        lab_idx.append(pick + fl * n)
        cbhs.append(base[pick] + rng.normal(0, 0.03, k))
        imgs.append(signal.astype(np.float32))
        metas.append(meta.astype(np.float32))
    images, metadata = np.concatenate(imgs), np.concatenate(metas)
    li = np.concatenate(lab_idx)
    cbh = np.clip(np.concatenate(cbhs), 0.05, None).astype(np.float32)
    return (dict(images=images, metadata=metadata),
            dict(images=images[li], metadata=metadata[li], cbh_km=cbh))


def _erfinv(y):
    """Inverse error function (Giles 2010 single-precision approximation; numpy has none)."""
    y = np.clip(y, -0.999999, 0.999999)
    w = -np.log((1.0 - y) * (1.0 + y))
    small = w < 5.0
    ws, wl = w - 2.5, np.sqrt(np.maximum(w, 5.0)) - 3.0
    ps = [2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
          -0.00125372503, -0.00417768164, 0.246640727, 1.50140941]
    pl = [-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
          -0.0076224613, 0.00943887047, 1.00167406, 2.83297682]
    a, b = ps[0], pl[0]
    for cs, cl in zip(ps[1:], pl[1:]):
        a, b = cs + a * ws, cl + b * wl
    return np.where(small, a, b) * y


def default_cloud_paths():
    """The embedded datasets' paths, generating them on first use (a few seconds)."""
    unlab = os.path.join(DATA_DIR, f"clouds_unlabelled_v{CLOUD_VERSION}.h5")
    lab = os.path.join(DATA_DIR, f"clouds_labelled_v{CLOUD_VERSION}.h5")
    if not (os.path.isfile(unlab) and os.path.isfile(lab)):
        print(f"generating the embedded cloud datasets in {DATA_DIR} (first run only)")
        u, l = generate_clouds()
        write_clouds(unlab, **u)
        write_clouds(lab, **l)
    return unlab, lab


# --- clouds: splits, normalisation, batching, augmentation ---

def split_blocked(flight, frame, n_blocks=5, test_block=0, gap=20):
    """Within each flight (frames sorted in time) cut n_blocks contiguous blocks; test = block
    `test_block` of every flight; train = the rest minus frames within `gap` frames of a test frame,
    so correlated neighbours never straddle train and test."""
    flight, frame = np.asarray(flight), np.asarray(frame)
    train, test = [], []
    for fl in np.unique(flight):
        idx = np.flatnonzero(flight == fl)
        idx = idx[np.argsort(frame[idx], kind="stable")]
        blocks = np.array_split(idx, n_blocks)
        t_idx = blocks[test_block]
        if len(t_idx) == 0:
            train.append(idx)
            continue
        lo, hi = frame[t_idx].min() - gap, frame[t_idx].max() + gap
        keep = np.ones(len(idx), bool)
        keep[np.isin(idx, t_idx)] = False
        keep &= ~((frame[idx] >= lo) & (frame[idx] <= hi))
        train.append(idx[keep])
        test.append(t_idx)
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return cat(train), cat(test)


def decorrelation_lag(y, flight, frame, threshold):
    """Lag in frames after which labels y along a flight are no longer correlated: the autocorrelation,
    estimated on the irregular (sparse) label series from every pair of labelled frames of the same flight
    (values centred on their flight's mean, lags binned by the median label spacing), first falls below
    `threshold`. Returns the upper edge of that lag bin (the largest lag seen if it never falls)."""
    prods, lags = [], []
    for fl in np.unique(flight):
        sel = flight == fl
        yc, fr = y[sel] - y[sel].mean(), frame[sel]
        i, j = np.triu_indices(len(yc), 1)  # every pair once
        prods.append(yc[i] * yc[j])
        lags.append(np.abs(fr[i] - fr[j]))
    prods, lags = np.concatenate(prods), np.concatenate(lags)
    var = np.mean(np.concatenate([y[flight == fl] - y[flight == fl].mean() for fl in np.unique(flight)]) ** 2)
    if len(lags) == 0 or var == 0:
        return 0
    spacing = max(1, int(np.median(np.concatenate([np.diff(np.sort(frame[flight == fl]))
                                                   for fl in np.unique(flight)] + [[1]]))))
    b = lags // spacing  # lag bin of every pair
    acf = np.bincount(b, prods) / np.maximum(np.bincount(b), 1) / var  # (n_bins,)
    below = np.flatnonzero((acf < threshold) & (np.bincount(b) > 0))
    return int((below[0] + 1) * spacing) if len(below) else int(lags.max())


def split_lofo(flight):
    """Leave one flight out: one (held_out_flight, train_idx, test_idx) per flight."""
    flight = np.asarray(flight)
    return [(int(fl), np.flatnonzero(flight != fl), np.flatnonzero(flight == fl))
            for fl in np.unique(flight)]


def split_random(n, n_folds=5, seed=0):
    """Random K-fold over frames. Neighbouring frames leak between train and test: comparison only."""
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(perm, n_folds)
    return [(np.sort(np.concatenate(folds[:k] + folds[k + 1:])), np.sort(folds[k]))
            for k in range(n_folds)]


INPUT_MODES = ("relative", "raw", "contrast", "both")
WARM_PERCENTILE = 98  # a profile's warm reference: the clear-sea surface when any pixel sees it
SURFACE_PERCENTILE = 90  # a flight's clear-sky level: this percentile of its profiles' warmest pixels
MIN_FLAT_FIELD = 200  # profiles needed to estimate the camera's cross-track response
MIN_FLIGHT_PROFILES = 20  # profiles of a flight needed to estimate its clear-sky level


def flat_field(images, where):
    """The camera's relative cross-track response (W,) from raw profiles (N, W): their mean profile over its
    own mean. Why: the optics lose a few percent of the signal towards the swath edges, so the same sea reads
    colder at the edge than at nadir; averaged over many frames a scene is alike at every cross-track
    position, so what is left in the mean profile is the response. Label-free: any profiles of the camera will
    do (mae.py uses the pre-training file's and stores it with the encoder). Too few profiles: no flat field,
    said in one line."""
    if len(images) < MIN_FLAT_FIELD:
        print(f"warning: {where}: {len(images)} profiles are too few for a flat field "
              f"(need {MIN_FLAT_FIELD}); using the profiles as they are")
        return np.ones(np.shape(images)[1])
    mean_profile = np.asarray(images, np.float64).mean(0)  # (W,)
    return mean_profile / mean_profile.mean()


def flight_levels(flat, flight, where):
    """(N,) the clear-sky (sea-surface) level of each profile's flight: the SURFACE_PERCENTILE-th
    percentile of the warmest pixel over that flight's flat-fielded profiles flat (N, W). Why: the sea's
    temperature sets every pixel's absolute level and differs between flights, so with few flights it
    identifies each flight (a shortcut that does not transfer); relative to it, a cloud's contrast is
    what the lapse rate turns into height. An overcast profile sees no sea itself; the flight's other
    profiles do. Uses profiles only, never labels, so it holds at any label budget and for a new flight.
    A flight with too few profiles falls back to each profile's own warmest pixel, said in one line."""
    warmest = np.asarray(flat, np.float64).max(1)  # (N,)
    level = warmest.copy()
    few = []
    for f in np.unique(flight):
        sel = flight == f
        if sel.sum() >= MIN_FLIGHT_PROFILES:
            level[sel] = np.percentile(warmest[sel], SURFACE_PERCENTILE)
        else:
            few.append(f"{int(f)} ({int(sel.sum())})")
    if few:
        print(f"warning: {where}: flights with fewer than {MIN_FLIGHT_PROFILES} profiles: {', '.join(few)}; "
              "their level is each profile's own warmest pixel")
    return level


def relative_profiles(images, flight, gain, where):
    """Label-free preprocessing every CBH method shares: raw profiles (N, W) divided by the flat field
    gain (W,), minus their flight's clear-sky level (flight_levels) -> (N, W) float32, 0 = the sea,
    negative = colder."""
    flat = np.asarray(images, np.float64) / np.asarray(gain, np.float64)
    return (flat - flight_levels(flat, flight, where)[:, None]).astype(np.float32)


def profile_channels(images, mode, flight=None, gain=None, where=""):
    """Raw profiles (N, W) -> model input channels (N, C, W), float32.
      relative  relative_profiles: flat-fielded, minus the flight's clear-sky level (needs flight (N,),
                gain (W,))
      raw       the signal itself (C=1). Absolute brightness holds cloud-top temperature, but also the
                flight's sea-surface temperature, which with few flights identifies each flight's CBH regime:
                a shortcut that does not transfer to a new flight.
      contrast  the signal minus the profile's own warm reference, its WARM_PERCENTILE-th percentile (the
                clear-sky surface where there is one) (C=1): keeps the cloud-top-to-surface contrast, which
                is what the lapse rate turns into height, and drops the flight's absolute temperature.
      both      raw and contrast as two channels (C=2)."""
    if mode not in INPUT_MODES:
        raise DataError(f"--input {mode!r}: expected one of {', '.join(INPUT_MODES)}")
    if mode == "relative":
        return relative_profiles(images, flight, gain, where)[:, None]  # (N, 1, W)
    x = np.asarray(images, np.float32)
    contrast = x - np.percentile(x, WARM_PERCENTILE, axis=1, keepdims=True).astype(np.float32)
    chans = dict(raw=[x], contrast=[contrast], both=[x, contrast])[mode]
    return np.stack(chans, 1)  # (N, C, W)


def norm_stats(images):
    """Global mean/std of the training inputs: one pair of scalars for (N, W), or one pair per channel for
    (N, C, W) (as lists). Global, not per profile, so the absolute level within a channel survives: in
    raw input it carries cloud-top temperature and hence height."""
    images = np.asarray(images, np.float64)
    if images.ndim == 3:
        return images.mean((0, 2)).tolist(), (images.std((0, 2)) + 1e-6).tolist()
    return float(images.mean()), float(images.std() + 1e-6)


def batch_indices(n, batch_size, shuffle, generator=None):
    """Index batches over n samples (CPU LongTensors). Pass a Generator you own to make shuffling
    reproducible and resumable."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def augment_profiles(x, generator=None, flip=True, crop=True, jitter=True):
    """Vectorised batch augmentation of normalised profiles x (B, C, W) (or (B, W)): horizontal flip
    (p=0.5), random crop of 80-100% of the width resized back to W (linear interpolation), brightness and
    contrast jitter +-30%. Every channel of a profile gets the same flip, crop and jitter."""
    B, W = x.shape[0], x.shape[-1]
    dev = x.device
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)
    one = (1,) * (x.dim() - 1)  # broadcast a per-profile draw (B, 1[, 1]) over channels and pixels
    if flip:
        x = torch.where(rand(B, *one) < 0.5, x.flip(-1), x)
    if crop:
        frac = 0.8 + 0.2 * rand(B, *one)  # kept fraction of the width
        start = (1 - frac) * rand(B, *one)  # left edge, as a fraction of W
        pos = (start + frac * torch.linspace(0, 1, W, device=dev)) * (W - 1)  # (B, 1[, 1], W) source coords
        lo = pos.floor().long().clamp(0, W - 2).expand_as(x)
        w = pos - lo
        x = torch.gather(x, -1, lo) * (1 - w) + torch.gather(x, -1, lo + 1) * w
    if jitter:
        contrast = 1 + 0.6 * (rand(B, *one) - 0.5)
        brightness = 0.6 * (rand(B, *one) - 0.5)
        mean = x.mean(-1, keepdim=True)
        x = (x - mean) * contrast + mean + brightness
    return x


# --- fires: schema ---

FIRE_CHANNELS = ("elevation_m", "slope_deg", "fuel_type", "fuel_density")


def write_fire(path, fire, static, channels, wind):
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("fire", data=np.asarray(fire, np.uint8), compression="gzip", compression_opts=1)
            s = f.create_dataset("static", data=np.asarray(static, np.float32))
            s.attrs["channels"] = np.array(list(channels), dtype=h5py.string_dtype())
            f.create_dataset("wind", data=np.asarray(wind, np.float32))
    _atomic_write(path, write)


def _check_cumulative(path, fire):
    """The schema's masks are cumulative burned area (emberformer's new-burn target keeps burning cells
    burning): refuse a file where a cell un-burns, e.g. an active-fire product, naming the first case."""
    unburn = fire[:, 1:] < fire[:, :-1]  # (S, T-1, H, W): burning at t, not at t+1
    if unburn.any():
        s, t = np.argwhere(unburn.any((2, 3)))[0]
        raise DataError(f"{path}: dataset 'fire' is not cumulative: sequence {s} has cells burning at "
                        f"frame {t} and not at frame {t + 1} (masks must be burned area so far, "
                        "not active fire)")


def load_fire(path, max_sequences=0):
    """Read and validate a fire-sequence file. Returns fire uint8 (S,T,H,W), static float32 (S,C,H,W),
    channels (list of str), wind float32 (S,T,2) as numpy arrays."""
    with _open_h5(path) as f:
        d_fire = _read(f, path, "fire", "u", 4)
        if d_fire.dtype != np.uint8:
            raise DataError(f"{path}: dataset 'fire' has dtype {d_fire.dtype}, expected uint8")
        d_static = _read(f, path, "static", "f", 4)
        d_wind = _read(f, path, "wind", "f", 3)
        S, T, H, W = d_fire.shape
        if S == 0:
            raise DataError(f"{path}: dataset 'fire' holds no sequences")
        if T < 2:
            raise DataError(f"{path}: dataset 'fire' has T={T} frames; at least 2 are needed for a sample")
        if H == 0 or W == 0:
            raise DataError(f"{path}: dataset 'fire' has an empty grid (H={H}, W={W})")
        if d_static.shape[0] != S or d_static.shape[2:] != (H, W):
            raise DataError(f"{path}: dataset 'static' has shape {d_static.shape}, "
                            f"expected (S={S}, C, {H}, {W}) to match 'fire'")
        if d_wind.shape != (S, T, 2):
            raise DataError(f"{path}: dataset 'wind' has shape {d_wind.shape}, expected ({S}, {T}, 2)")
        channels = _attr_strings(path, d_static, "channels", "static")
        if len(channels) != d_static.shape[1]:
            raise DataError(f"{path}: dataset 'static' has {d_static.shape[1]} channels but "
                            f"{len(channels)} channel names")
        n = S if max_sequences <= 0 else min(S, max_sequences)
        fire, static, wind = d_fire[:n], d_static[:n].astype(np.float32), d_wind[:n].astype(np.float32)
    if fire.max() > 1:
        raise DataError(f"{path}: dataset 'fire' is not binary (max value {fire.max()}, expected 0/1)")
    _check_cumulative(path, fire)
    _check_finite(path, "static", static)
    _check_finite(path, "wind", wind)
    if np.abs(wind).max() > MAX_WIND_MS:
        raise DataError(f"{path}: dataset 'wind' has |u| or |v| up to {np.abs(wind).max():.3g} m/s "
                        f"(limit {MAX_WIND_MS}); wrong units or fill values?")
    return dict(fire=fire, static=static, channels=channels, wind=wind)


# --- fires: embedded synthetic dataset ---

# neighbour offsets (drow, dcol); row 0 is north, so a step (dr, dc) points east by dc and north by -dr
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def generate_fires(n_seq=300, size=64, n_frames=24, seed=0, max_wind=12.0, slope_coef=0.078):
    """Synthetic fire-spread sequences from a stochastic cellular automaton after Alexandridis et al.
    (2008). A burning cell ignites each unburned neighbour with probability
        p = p_h (1 + p_veg) (1 + p_den) p_w p_s,
        p_w = exp(c1 V) exp(c2 V (cos(theta) - 1))   theta: angle between wind and spread direction,
        p_s = exp(slope_coef * slope_angle_deg)        slope_angle from the burning cell to the neighbour,
    (diagonal steps use the distance sqrt(2) in the slope) with p_h = 0.58, c1 = 0.045, c2 = 0.131;
    so fires run downwind and uphill. A cell burns for one CA step then is burned out; the stored mask
    is cumulative (burning or burned). One CA step per frame.
    Landscape per sequence: smooth random elevation (0-600 m relief, 30 m cells), slope from its gradient,
    fuel type 1-3 (grass/shrub/forest, p_veg -0.3/0/0.4) in smooth patches, fuel density (p_den -0.4..0.3),
    and non-burnable cells (fuel_type 0): a straight road and, in some sequences, a lake in a low area.
    Wind per sequence: random direction and speed up to max_wind m/s, drifting (random walk) every frame.
    Ignition: a 2x2 cell seed near the centre.
    """
    rng = np.random.default_rng(seed)
    S, N, T = n_seq, size, n_frames
    cell_m, p_h, c1, c2 = 30.0, 0.58, 0.045, 0.131
    # landscape
    elev = np.stack([_smooth_noise_2d(rng, N, N / 4) for _ in range(S)])  # (S, N, N)
    relief = rng.uniform(50, 600, (S, 1, 1))
    elev = (elev - elev.min((1, 2), keepdims=True)) / (np.ptp(elev, (1, 2), keepdims=True) + 1e-9) * relief
    gy, gx = np.gradient(elev, cell_m, axis=(1, 2))
    slope = np.degrees(np.arctan(np.hypot(gx, gy)))
    fuel_type = 1 + np.digitize(np.stack([_smooth_noise_2d(rng, N, N / 8) for _ in range(S)]), [-0.5, 0.5])
    density = np.clip(0.5 + 0.3 * np.stack([_smooth_noise_2d(rng, N, N / 8) for _ in range(S)]), 0, 1)
    rr, cc = np.mgrid[0:N, 0:N]
    for s in range(S):  # a straight road at a random angle, away from the ignition area
        ang, off = rng.uniform(0, np.pi), rng.uniform(0.3, 0.45) * N * rng.choice([-1, 1])
        dist = (cc - N / 2) * np.cos(ang) + (rr - N / 2) * np.sin(ang) - off
        fuel_type[s][np.abs(dist) < 0.7] = 0
        if rng.uniform() < 0.4:  # a lake in the lowest ground
            fuel_type[s][elev[s] < np.quantile(elev[s], 0.06)] = 0
    p_veg = np.array([0.0, -0.3, 0.0, 0.4])[fuel_type]
    p_den = -0.4 + 0.7 * density
    burnable = fuel_type > 0
    base_p = p_h * (1 + p_veg) * (1 + p_den) * burnable  # (S, N, N)
    # wind: direction and speed random walks, one value per frame
    direction = rng.uniform(0, 2 * np.pi, (S, 1)) + np.cumsum(rng.normal(0, 0.12, (S, T)), 1)
    speed = np.clip(rng.uniform(0, max_wind, (S, 1)) + np.cumsum(rng.normal(0, 0.4, (S, T)), 1), 0, max_wind)
    wind = np.stack([speed * np.cos(direction), speed * np.sin(direction)], -1).astype(np.float32)  # (S,T,2)
    # ignition
    state = np.zeros((S, N, N), np.uint8)  # 0 unburned, 1 burning, 2 burned
    cr, ccol = rng.integers(N // 2 - N // 8, N // 2 + N // 8, (2, S))
    for s in range(S):
        state[s, cr[s]:cr[s] + 2, ccol[s]:ccol[s] + 2] = 1
    fire = np.zeros((S, T, N, N), np.uint8)
    fire[:, 0] = state > 0
    pad_e = np.pad(elev, ((0, 0), (1, 1), (1, 1)), mode="edge")
    for t in range(T - 1):
        u, v = wind[:, t, 0][:, None, None], wind[:, t, 1][:, None, None]
        V = np.hypot(u, v)
        burning = np.pad(state == 1, ((0, 0), (1, 1), (1, 1)))
        p_none = np.ones((S, N, N))
        for dr, dc in _NEIGHBOURS:
            # the neighbour that would ignite cell (i, j) sits at (i - dr, j - dc): spread direction (dr, dc)
            src = burning[:, 1 - dr:1 - dr + N, 1 - dc:1 - dc + N]
            dist = np.hypot(dr, dc)
            cos_th = (u * dc + v * (-dr)) / (V * dist + 1e-9)
            p_w = np.exp(c1 * V) * np.exp(c2 * V * (cos_th - 1))
            rise = elev - pad_e[:, 1 - dr:1 - dr + N, 1 - dc:1 - dc + N]
            p_s = np.exp(slope_coef * np.degrees(np.arctan(rise / (cell_m * dist))))
            p = np.clip(base_p * p_w * p_s, 0, 1)
            p_none *= 1 - p * src
        ignite = (state == 0) & burnable & (rng.uniform(size=(S, N, N)) < 1 - p_none)
        state[state == 1] = 2
        state[ignite] = 1
        fire[:, t + 1] = state > 0
    static = np.stack([elev, slope, fuel_type, density], 1).astype(np.float32)
    return dict(fire=fire, static=static, channels=list(FIRE_CHANNELS), wind=wind)


def _smooth_noise_2d(rng, n, corr_len):
    """(n, n) Gaussian-filtered white noise, unit std."""
    f = np.fft.fftfreq(n)
    filt = np.exp(-0.5 * ((f[:, None] ** 2 + f[None, :] ** 2) * (corr_len * 2 * np.pi) ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * filt))
    return (out - out.mean()) / (out.std() + 1e-12)


def default_fire_path():
    path = os.path.join(DATA_DIR, f"fires_v{FIRE_VERSION}.h5")
    if not os.path.isfile(path):
        print(f"generating the embedded fire dataset in {path} (first run only)")
        write_fire(path, **generate_fires())
    return path


# --- fires: splits and batching ---

def split_sequences(n_seq, val_frac=0.2, seed=0):
    """Split by whole sequences: frames of one fire never sit in both train and val."""
    perm = np.random.default_rng(seed).permutation(n_seq)
    n_val = max(1, int(round(val_frac * n_seq))) if n_seq > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fire_sample_index(seqs, n_frames):
    """Every (sequence, t) pair with t in 0..T-2 (the target is frame t + 1)."""
    seqs = torch.as_tensor(np.asarray(seqs), dtype=torch.long)
    t = torch.arange(n_frames - 1)
    return seqs.repeat_interleave(n_frames - 1), t.repeat(len(seqs))


def fire_batch(fire, wind, s, t, K):
    """Gather a batch by indexing tensors already on the device.
    fire (S,T,H,W) uint8, wind (S,T,2); s, t (B,) long. Returns
      hist (B,K,H,W) float: frames max(0,t-K+1)..t, RIGHT-padded (positions 0..L-1 real, oldest first,
                            position L-1 = frame t, the rest zeros)
      wind_hist (B,K,2) float, same layout; lengths (B,) long = L; target (B,H,W) float = fire[s, t+1]."""
    s, t = s.to(fire.device), t.to(fire.device)
    lengths = torch.clamp(t + 1, max=K)  # (B,)
    pos = torch.arange(K, device=fire.device)[None]  # (1, K)
    real = pos < lengths[:, None]  # (B, K)
    frame = torch.where(real, t[:, None] - lengths[:, None] + 1 + pos, t[:, None])  # (B, K) valid index
    hist = fire[s[:, None], frame].float() * real[:, :, None, None]
    wind_hist = wind[s[:, None], frame].float() * real[:, :, None]
    target = fire[s, t + 1].float()
    return hist, wind_hist, lengths, target
