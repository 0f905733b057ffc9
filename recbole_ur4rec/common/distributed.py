"""Process groups for distributed runs (RecBole's ``nproc / world_size / ip / port / group_offset``, or torchrun's
environment): starting ranks and reporting a dead one, the backend chosen from the device (gloo on CPU, NCCL on
GPU), and the few collectives the plugin needs, with tensors and plain data only on the wire.

A rank is a process; ``rank = offset + local_rank`` with ``offset`` the first global rank of its machine. Every
helper here is a no-op (or returns its input) in a one-process run, so callers need no ``if distributed``.
"""
import ctypes
import datetime
import io
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

# RecBole's config keys of a distributed run (recbole/quick_start/quick_start.py ``run``): a rank's place in the job,
# never a setting of the model, so checkpoints and resumed runs leave them out
DISTRIBUTED_KEYS = ("local_rank", "world_size", "ip", "port", "nproc", "offset")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300  # config key dist_timeout's default: a collective waits this long for a missing rank


class RankFailed(RuntimeError):
    """A rank of a distributed run died or raised; the message names it."""


def _positive_int(value, flag, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
    return value


def launch_settings(nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0, environ=None):
    """The config entries of this machine's ranks (RecBole's keys, without ``local_rank``), or None for one process.

    ``nproc`` processes start on this machine as global ranks ``group_offset .. group_offset + nproc - 1`` of
    ``world_size`` (default ``nproc``), meeting at ``ip:port`` (rank 0's machine). A process started by torchrun
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set) is one rank already: its entries
    come from that environment and ``nproc`` must stay 1.
    """
    environ = os.environ if environ is None else environ
    _positive_int(nproc, "--nproc")
    if world_size != -1:
        _positive_int(world_size, "--world_size")
    _positive_int(group_offset, "--group_offset", 0)
    if all(name in environ for name in TORCHRUN_VARIABLES) and int(environ["WORLD_SIZE"]) > 1:
        if nproc != 1 or world_size != -1:
            raise ValueError("started by torchrun (RANK and WORLD_SIZE are set): torchrun starts the ranks, so give no --nproc or --world_size")
        rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
        return {
            "local_rank": local_rank,
            "world_size": int(environ["WORLD_SIZE"]),
            "ip": environ["MASTER_ADDR"],
            "port": str(environ["MASTER_PORT"]),
            "nproc": int(environ.get("LOCAL_WORLD_SIZE", 1)),
            "offset": rank - local_rank,
        }
    world_size = nproc if world_size == -1 else world_size
    if world_size == 1:
        return None
    if group_offset + nproc > world_size:
        raise ValueError(
            f"--group_offset {group_offset} + --nproc {nproc} exceeds --world_size {world_size}: this machine's ranks "
            f"are group_offset .. group_offset + nproc - 1, each below world_size"
        )
    return {"world_size": world_size, "ip": str(ip), "port": str(port), "nproc": nproc, "offset": group_offset}


def _end_with_launcher(launcher_pid):
    """Make this rank end when its launcher dies (killed, out of memory) instead of training on as an orphan: on
    Linux the kernel sends it SIGTERM then (``prctl(PR_SET_PDEATHSIG)``); a launcher already gone ends it now.
    torch's spawn sets SIGINT, which a job started in the background (``nohup ... &``) ignores."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher_pid:
        os._exit(1)


def _rank_main(local_rank, fn, args, settings, result_file, launcher_pid):
    """One spawned rank: ``fn(settings with local_rank, *args)``; rank 0 writes its result to ``result_file`` (a
    torch file of tensors and plain data; a pipe would block a large result until the launcher reads it). An error
    is written beside it with its time, so that the launcher names the rank that failed first, not one whose
    collective then lost its peer. The rank ends with its launcher."""
    _end_with_launcher(launcher_pid)
    try:
        result = fn({**settings, "local_rank": local_rank}, *args)
    except BaseException:
        with open(os.path.join(os.path.dirname(result_file), f"error-{local_rank}.txt"), "w") as f:
            f.write(f"{time.time()}\n{traceback.format_exc()}")
        raise
    if settings["offset"] + local_rank == 0:
        torch.save(_plain(result), result_file)
    leave()


def leave():
    """Leave the process group at the end of a rank's run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn, settings, *args):
    """Run ``fn(rank_settings, *args)`` in ``settings['nproc']`` new processes (this machine's ranks) and return
    global rank 0's result (None on a machine without rank 0).

    A rank that raises or dies stops this machine's other ranks at once (torch's ``spawn``); ranks on other
    machines stop when their next collective fails or passes ``dist_timeout``. The ranks end with this process.

    Raises:
        RankFailed: naming the first rank that failed, its exit code or signal and its error.
    """
    import torch.multiprocessing as mp

    folder = tempfile.mkdtemp(prefix="recbole_ur4rec_ranks_")
    result_file = os.path.join(folder, "rank0.pth")
    try:
        mp.spawn(_rank_main, args=(fn, args, settings, result_file, os.getpid()), nprocs=settings["nproc"], join=True)
    except mp.ProcessRaisedException as err:
        first, error = _first_error(folder, err.error_index, str(err))
        raise RankFailed(
            f"rank {settings['offset'] + first} of {settings['world_size']} (local rank {first}) raised an error; "
            f"this machine's other ranks were stopped:\n{error}"
        ) from None
    except mp.ProcessExitedException as err:
        rank = settings["offset"] + err.error_index
        how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
        raise RankFailed(
            f"rank {rank} of {settings['world_size']} (local rank {err.error_index}, pid {err.error_pid}) died ({how}); "
            f"this machine's other ranks were stopped"
        ) from None
    else:
        if os.path.isfile(result_file):
            return torch.load(result_file, map_location="cpu", weights_only=True)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _first_error(folder, index, message):
    """(local rank, traceback) of the rank whose error came first (``index``'s ``message`` without error files)."""
    errors = []
    for name in os.listdir(folder):
        if name.startswith("error-"):
            with open(os.path.join(folder, name)) as f:
                when, _, text = f.read().partition("\n")
            errors.append((float(when), int(name[len("error-") : -len(".txt")]), text))
    return min(errors)[1:] if errors else (index, message)


def init_process_group(rank, world_size, ip, port, device, timeout_s=DEFAULT_TIMEOUT_S):
    """Join the job's process group: NCCL when ``device`` is a GPU, gloo on CPU. A collective that waits longer than
    ``timeout_s`` for a rank (dead, or stuck) fails with an error instead of hanging."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if dist.is_initialized():  # a second Config in the same rank (e.g. a reload): the group exists
        if dist.get_rank() != rank or dist.get_world_size() != world_size or dist.get_backend() != backend:
            raise RuntimeError(
                f"this process is rank {dist.get_rank()} of {dist.get_world_size()} ({dist.get_backend()}) already; "
                f"it cannot become rank {rank} of {world_size} ({backend})"
            )
        return backend
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective ends the process
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{ip}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return backend


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def _device():
    """Where this rank's collectives put tensors: its GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over the ranks, in place (on this rank's collective device and back)."""
    if not is_distributed():
        return tensor
    device = _device()
    work = tensor.to(device)
    dist.all_reduce(work)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_tensors(tensors, src=0):
    """Overwrite ``tensors`` on every rank with ``src``'s values (e.g. a model's parameters and buffers)."""
    if not is_distributed():
        return
    device = _device()
    for tensor in tensors:
        work = tensor.data.to(device)
        dist.broadcast(work, src)
        if work is not tensor.data:
            tensor.data.copy_(work)


def _plain(obj):
    """``obj`` with numpy's scalars and arrays (RecBole's metric values) as numbers and tensors."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return type(obj)((key, _plain(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(value) for value in obj)
    return obj


def _to_bytes(obj):
    buffer = io.BytesIO()
    torch.save(_plain(obj), buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _from_bytes(data):
    # the checkpoints' format: tensors and plain data only
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)


def _row_counts(local_rows):
    """Every rank's row count, in rank order."""
    device = _device()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local_rows], dtype=torch.int64, device=device))
    return [int(count.item()) for count in counts]


def _gather_counted(local, counts):
    """Every rank's rows (``counts[r]`` of rank ``r``; zero too) concatenated in rank order, on every rank."""
    work = local.detach().to(_device()).contiguous()
    padded = work.new_zeros((max(counts), *work.shape[1:]))
    padded[: work.size(0)] = work
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(local.device)


def all_gather_plain(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``obj``: tensors and plain data (no pickled objects)."""
    if not is_distributed():
        return [obj]
    data = _to_bytes(obj)
    counts = _row_counts(data.numel())
    return [_from_bytes(part) for part in torch.split(_gather_counted(data, counts), counts)]


_step_weight = 1.0  # this rank's weight in the current step's gradient mean (see set_step_weight)


def set_step_weight(weight):
    """Declare this rank's weight in the current training step's gradient mean (its loss units, what the trainer
    weighs its gradient by): :func:`gather_rows`'s backward converts the other ranks' gradients to it."""
    global _step_weight
    _step_weight = float(weight)


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, differentiable: the backward sums every rank's gradient of the gathered rows (each weighted
    by its rank's step weight, over this rank's) and keeps this rank's rows, so that the trainer's weighted gradient
    mean is the gradient of the ranks' weighted loss mean, as one process computes it over the whole batch."""

    @staticmethod
    def forward(ctx, local, counts):
        start = sum(counts[: rank()])
        ctx.span = (start, start + counts[rank()])
        return _gather_counted(local, counts)

    @staticmethod
    def backward(ctx, grad):
        weight = _step_weight
        work = (grad * weight).contiguous()
        all_reduce_sum(work)  # every rank runs this backward: the gathered rows enter every rank's loss
        start, end = ctx.span
        return (work[start:end] / weight if weight > 0 else torch.zeros_like(work[start:end])), None


def gather_rows(local):
    """``(the rows of every rank in rank order, the index of this rank's first row in them)``, differentiable where
    ``local`` needs a gradient: in-batch terms (contrastive negatives) over the whole batch instead of the rank's
    share. Every rank must call it, and the gathered rows must enter every rank's loss (times zero where a rank has
    no rows), or the backward waits for the missing rank. In one process: ``(local, 0)``."""
    if not is_distributed():
        return local, 0
    counts = _row_counts(local.size(0))
    rows = _GatherRows.apply(local, counts) if local.requires_grad else _gather_counted(local, counts)
    return rows, sum(counts[: rank()])


def batch_mean(values):
    """This rank's share of the mean of per-row ``values`` [n] over every rank's rows, scaled so that the trainer's
    gradient mean (each rank weighted by its step weight) gives the gradient of that one mean: the whole batch's
    mean, exactly, whatever the ranks' row counts and weights. Every rank must call it (a collective)."""
    totals = all_reduce_sum(torch.tensor([float(values.numel()), _step_weight], dtype=torch.float64))
    rows, weights = totals.tolist()
    if rows == 0 or _step_weight <= 0:
        return values.sum() * 0
    return values.sum() * (weights / _step_weight / rows)


def broadcast_plain(obj, src=0):
    """``src``'s ``obj`` (tensors and plain data) on every rank; the others pass anything (None)."""
    if not is_distributed():
        return obj
    device = _device()
    data = _to_bytes(obj).to(device) if rank() == src else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if data is None:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src)
    return obj if rank() == src else _from_bytes(data)


@contextmanager
def first_on_each_machine(local_rank):
    """Run the block on global rank 0 first, then on each other machine's local rank 0, then on every other rank:
    what the block caches on disk (feature encodings) is computed once per machine without a shared disk, and once
    in all with one."""
    if not is_distributed():
        yield
        return
    turn = 0 if rank() == 0 else (1 if local_rank == 0 else 2)
    for phase in range(3):
        if phase == turn:
            yield  # an error here leaves the other ranks at the barrier until the launcher stops them
        barrier()
