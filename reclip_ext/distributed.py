"""Label propagation over torch.distributed, with the images sharded across ranks.

Each rank holds a shard of the image embeddings (shards in rank order, sizes may differ, a
shard may be empty); the result is the same as :func:`reclip_ext.label_propagate` on the
concatenated images, and each rank gets the rows of its own shard.

Data flow (N = m + n nodes: the m class nodes, then every shard's images in rank order):

1. A small all-gather of every rank's metadata (shard rows, width, dtype, device, argument
   errors), so that a mismatch makes *every* rank raise instead of one rank raising while the
   others wait in a collective.
2. The database: rank 0's class embeddings are broadcast and the shards all-gathered (padded
   to the largest shard, the sizes being known from step 1), so every rank holds [text; images].
3. Each rank computes the k-NN rows of the nodes it owns with ``knn_affinity(rows=(start,
   stop))``: rank 0 owns the class nodes and its images, rank r its images. The blocks are
   bitwise the rows of the whole graph (see :func:`reclip_ext.knn_affinity`).
4. The blocks (indices and weights) are gathered on rank 0, which normalises the graph, runs
   CG and reads out labels with the code of the single-process function, then scatters each
   rank its rows and broadcasts the per-class CG iterations and residuals.

Why rank 0 solves (instead of every rank solving the same graph): the CPU CG hands out the
rows of its product with W to whichever thread is free, so its per-thread partial dot products
cover other rows from run to run and two solves of one graph can differ in the last bits, and ranks on different hardware (thread counts, SIMD level,
GPU model) differ more. One solve, scattered, makes every rank's result come from the same
arithmetic, and needs the whole graph in one rank's memory only. The cost is that the other
ranks wait during the solve.

torch is imported inside the function, so ``import reclip_ext`` needs only numpy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import arrays, checks, ops
from .defaults import DEFAULTS

__all__ = ["label_propagate"]


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise ImportError("reclip_ext.distributed needs torch (pip install torch)") from None
    if not dist.is_available():
        raise RuntimeError("group: this torch build has no torch.distributed support")
    return torch, dist


def _as_tensor(torch, x: Any, name: str):
    """x as a torch tensor (zero-copy for numpy, torch and other DLPack producers)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError) as err:
            raise TypeError(f"{name}: could not read it through DLPack ({err})") from err
    raise TypeError(f"{name}: expected a numpy array, torch tensor or an object exposing "
                    f"__dlpack__, got {type(x).__name__}")


_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _local_meta(torch, text, images, name_t="text", name_v="images_shard") -> dict:
    """This rank's shapes, dtypes and placement; raises the local argument errors."""
    meta = {}
    for x, name, key in ((text, name_t, "text"), (images, name_v, "images")):
        dt = str(x.dtype).replace("torch.", "")
        if dt not in _DTYPES or (dt in ("float16", "bfloat16") and not x.is_cuda):
            raise TypeError(f"{name}: dtype must be float32 or float64 (or float16 / bfloat16 "
                            f"on CUDA), got {dt}")
        if x.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array (rows, dims), got shape "
                             f"{tuple(x.shape)}")
        meta[key] = (tuple(int(s) for s in x.shape), dt,
                     "cpu" if not x.is_cuda else f"cuda:{x.device.index}")
    (tshape, tdt, tdev), (vshape, vdt, vdev) = meta["text"], meta["images"]
    if tshape[0] < 2:
        raise ValueError(f"{name_t}: needs at least 2 rows (classes), got shape {tshape}")
    if vdt != tdt:
        raise TypeError(f"{name_v}: dtype {vdt} differs from {name_t} dtype {tdt}")
    if vshape[1] != tshape[1]:
        raise ValueError(f"{name_v}: has {vshape[1]} columns but {name_t} has {tshape[1]}")
    if vdev != tdev:
        raise ValueError(f"{name_v}: is on {vdev} but {name_t} is on {tdev}; all arrays "
                         "must be on one device")
    return meta


def _check_across_ranks(metas: list) -> None:
    """Raises the same error on every rank when the ranks' arrays disagree."""
    tshape, tdt, _ = metas[0]["text"]
    for r, meta in enumerate(metas[1:], 1):
        (rt, rdt, _), (vshape, _, _) = meta["text"], meta["images"]
        if rdt != tdt:
            raise TypeError(f"images_shard: dtype {rdt} on rank {r} differs from {tdt} on "
                            "rank 0; every rank must pass one dtype")
        if vshape[1] != tshape[1]:
            raise ValueError(f"images_shard: has {vshape[1]} columns on rank {r} but "
                             f"{tshape[1]} on rank 0")
        if rt != tshape:
            raise ValueError(f"text: shape {rt} on rank {r} differs from {tshape} on rank 0; "
                             "every rank must pass the same class embeddings")
    kinds = {meta["images"][2] == "cpu" for meta in metas}
    if len(kinds) > 1:
        raise ValueError("images_shard: some ranks pass CPU arrays and others CUDA arrays; "
                         "pass one kind on every rank")
    if sum(meta["images"][0][0] for meta in metas) == 0:
        raise ValueError("images_shard: every rank's shard is empty; there is nothing to label")


def _agree(dist, group, outcome) -> list:
    """All-gathers every rank's outcome (a value, or the exception it raised) and re-raises
    the first failure on every rank."""
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, outcome, group=group)
    for r, got in enumerate(gathered):
        if isinstance(got, BaseException):
            if got is outcome:
                raise got
            raise type(got)(f"{got} (on rank {r})")
    return gathered


def _padded(torch, x, rows: int):
    """x with zero rows appended up to `rows` rows (collectives need equal shapes)."""
    if x.shape[0] == rows:
        return x.contiguous()
    pad = torch.zeros((rows - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype,
                      device=x.device)
    return torch.cat([x, pad])


def label_propagate(text, images_shard, group=None, *, k=DEFAULTS.k, alpha=DEFAULTS.alpha,
                    max_iter=DEFAULTS.max_iter, tol=DEFAULTS.tol, weight=DEFAULTS.weight,
                    gamma=DEFAULTS.gamma, normalize=True, block_rows=None, threads=None,
                    precision="exact", spmm="kernel") -> ops.LabelPropagation:
    """Pseudo labels for sharded images by label propagation (ReCLIP §3.2) over
    torch.distributed: :func:`reclip_ext.label_propagate` on the images of every rank, each
    rank receiving the rows of its own shard.

    Every rank of ``group`` calls it with the same ``text`` and keywords and its own shard;
    the shards, in rank order, are the images. The k-NN rows are computed where the data are
    (each rank its own nodes); rank 0 normalises the gathered graph, solves and scatters, so
    every rank's rows come from one solve (see the module docstring for the data flow and why).
    The graph is bitwise the single-process graph, so the results equal those of
    :func:`reclip_ext.label_propagate` on the whole set computed on rank 0's device (bitwise
    with ``threads=1``; with more CPU threads the CG's last bits may vary between runs, as they
    do for the single-process function).

    Args:
        text: (m, d) class embeddings, m >= 2; rank 0's are used, every rank's must have the
            same shape and dtype.
        images_shard: (n_r, d) this rank's images (n_r may be 0), of text's dtype and device.
            numpy arrays and CPU tensors need a gloo group; CUDA tensors an NCCL group (each
            rank on its own device, set with ``torch.cuda.set_device``).
        group: the torch.distributed process group; None is the default group, which must
            be initialised (``torch.distributed.init_process_group``).
        k, alpha, max_iter, tol, weight, gamma, normalize, block_rows, threads, precision,
            spmm: as in :func:`reclip_ext.label_propagate`; k <= m + n - 1 for the n images of
            all ranks (``spmm="cusparse"`` is checked, and cuSPARSE loaded, on every rank, so
            that a rank that cannot load it fails all of them before any collective work).

    Argument errors are found on every rank: a rank whose arguments are wrong raises its
    error and every other rank raises it too, naming that rank, rather than waiting in a
    collective.

    Returns:
        :class:`reclip_ext.LabelPropagation` for this rank's rows: labels (n_r,), scores
        (n_r, m), confidence (n_r,), and the iterations (m,) and residuals (m,) of the one
        solve; arrays of ``images_shard``'s kind (numpy for numpy) on its device.

    Example (on every rank of an initialised gloo group)::

        res = reclip_ext.distributed.label_propagate(text, my_images, k=20)
        my_labels = res.labels
    """
    torch, dist = _torch()
    if not dist.is_initialized():
        raise RuntimeError("group: no torch.distributed process group is initialised; call "
                           "torch.distributed.init_process_group(...) on every rank first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group it was given")
    root = dist.get_global_rank(group, 0) if group is not None else 0
    comm = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")

    # Step 1: local checks, then everyone learns everyone's shapes (or error).
    try:
        t = _as_tensor(torch, text, "text")
        v = _as_tensor(torch, images_shard, "images_shard")
        meta = _local_meta(torch, t, v)
        # The values are checked where they live, so that an error names this rank's own
        # array and row; on the gathered set it could only name the stacked pair.
        ns = arrays.namespace([(t, "text"), (v, "images_shard")], v)
        with ns.guard:
            for a, name in ((t, "text"), (v, "images_shard")):
                a = ns.array(a, name)
                checks.check_finite(ns, a, name)
                if normalize:
                    checks.check_nonzero_rows(ns, a, name)
        # types and ranges only: k against N is checked on the gathered set, on every rank
        checks.affinity_options(k, 1 << 62, True, weight, gamma, block_rows)
        cg_opts = checks.cg_options(alpha, max_iter, tol, spmm, v.device.type == "cuda")
        checks.threads(threads)
        if not isinstance(precision, str) or precision not in checks.PRECISIONS:
            raise ValueError(f"precision must be one of {checks.PRECISIONS}, got {precision!r}")
        outcome = meta
    except (TypeError, ValueError, RuntimeError) as err:
        outcome = err
    metas = _agree(dist, group, outcome)
    _check_across_ranks(metas)
    m, d = metas[0]["text"][0]
    sizes = [meta["images"][0][0] for meta in metas]
    n, largest = sum(sizes), max(max(sizes), 1)
    device = v.device
    numpy_out = not isinstance(images_shard, torch.Tensor) and device.type == "cpu"

    # Step 2: the database [text; images], identical on every rank.
    # (a copy on the receiving ranks: the broadcast writes into it, never into the caller's)
    t = t.to(comm, copy=rank != 0).contiguous()
    dist.broadcast(t, src=root, group=group)
    shards = [torch.empty((largest, d), dtype=v.dtype, device=comm) for _ in range(world)]
    dist.all_gather(shards, _padded(torch, v.to(comm), largest), group=group)
    images = torch.cat([s[:size] for s, size in zip(shards, sizes)]).to(device)
    del shards
    t = t.to(device)
    if t.dtype in (torch.float16, torch.bfloat16):
        # The kernels compute half floats in float32: the graph is then float32 as in
        # reclip_ext.label_propagate (the gather above moved half the bytes).
        t, images = t.float(), images.float()

    # Step 3: the k-NN rows of this rank's nodes (an error in one block, e.g. an overflowing
    # weight, is raised on every rank).
    start = 0 if rank == 0 else m + sum(sizes[:rank])
    stop = m + sum(sizes[: rank + 1])
    try:
        block = ops.knn_affinity((t, images), k, rows=(start, stop), weight=weight, gamma=gamma,
                                 normalize=normalize, block_rows=block_rows, threads=threads,
                                 precision=precision)
        outcome = None
    except (TypeError, ValueError, RuntimeError, MemoryError) as err:
        block, outcome = None, err
    _agree(dist, group, outcome)
    del images
    idx, w = block
    k = int(idx.shape[1])

    # Step 4: rank 0 gathers the graph, solves and scatters.
    owned = [m + sizes[0]] + sizes[1:]
    rows_max = max(owned)
    idx_list = w_list = None
    if rank == 0:
        idx_list = [torch.empty((rows_max, k), dtype=torch.int64, device=comm)
                    for _ in range(world)]
        w_list = [torch.empty((rows_max, k), dtype=w.dtype, device=comm) for _ in range(world)]
    dist.gather(_padded(torch, idx.to(comm), rows_max), idx_list, dst=root, group=group)
    dist.gather(_padded(torch, w.to(comm), rows_max), w_list, dst=root, group=group)
    del idx, w, block

    result = None
    outcome = None
    if rank == 0:
        try:
            graph = [torch.cat([a[:r] for a, r in zip(idx_list, owned)]).to(device),
                     torch.cat([a[:r] for a, r in zip(w_list, owned)]).to(device)]
            del idx_list, w_list
            ns = arrays.namespace([(graph[1], "weights")], graph[1])
            with ns.guard:
                graph = [ns.layout(ns.array(a, name)) for a, name in
                         zip(graph, ("indices", "weights"))]
                dt = metas[0]["text"][1]
                result = ops._propagate_graph(ns, graph, m, dt, cg_opts, checks.threads(threads))
        except (TypeError, ValueError, RuntimeError, MemoryError) as err:
            outcome = err
    status = [outcome]
    dist.broadcast_object_list(status, src=root, group=group)
    if status[0] is not None:
        if rank == 0:
            raise status[0]
        raise type(status[0])(f"{status[0]} (on rank 0, which solves)")

    score_dt = getattr(torch, metas[0]["text"][1])
    image_rows = max(max(sizes), 1)
    labels = torch.empty((image_rows,), dtype=torch.int64, device=comm)
    scores = torch.empty((image_rows, m), dtype=score_dt, device=comm)
    confidence = torch.empty((image_rows,), dtype=score_dt, device=comm)
    summary = torch.empty((2, m), dtype=torch.float64, device=comm)
    lists = [None, None, None]
    if rank == 0:
        parts = [torch.as_tensor(a) for a in (result.labels, result.scores, result.confidence)]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        lists = [[_padded(torch, p[offsets[r]:offsets[r + 1]].to(comm), image_rows)
                  for r in range(world)] for p in parts]
        summary = torch.stack([torch.as_tensor(result.iterations).to(comm, torch.float64),
                               torch.as_tensor(result.residuals).to(comm, torch.float64)])
    for out, scatter_list in zip((labels, scores, confidence), lists):
        dist.scatter(out, scatter_list, src=root, group=group)
    dist.broadcast(summary, src=root, group=group)

    own = sizes[rank]
    fields = (labels[:own], scores[:own], confidence[:own], summary[0].to(torch.int64),
              summary[1])
    fields = tuple(f.to(device) for f in fields)
    if numpy_out:
        fields = tuple(f.cpu().numpy() for f in fields)
    return ops.LabelPropagation(*fields)
