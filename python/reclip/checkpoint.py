"""Run directories: tensors as safetensors, everything else as JSON, both written atomically.

A run directory holds ``run.json`` (metadata, including the name of the current tensor file)
and ``tensors-<n>.safetensors``. Each save writes a new tensor file first, then replaces
``run.json`` in one rename, then removes the older tensor file, so a process killed at any
moment leaves a consistent pair. Reading uses only safetensors and json: no code in a file is
ever executed. ``write_json`` needs only the standard library (torch and safetensors are
imported by the tensor functions), so scripts without torch or open_clip can use it too.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT = "reclip-run/1"
META = "run.json"
#: the lock file of a run directory, held by the one process writing it (see lock)
LOCK = ".reclip-lock"


def exists(directory: str | Path) -> bool:
    return (Path(directory) / META).is_file()


def lock(directory: str | Path, name: str = "--out"):
    """Take the exclusive advisory lock of a run directory, creating it, and return the open
    lock file: the lock lasts until that file is closed or the process ends, however it ends
    (a SIGKILL too: the kernel releases it). The file names its holder's PID and host.

    A POSIX record lock (lockf), not flock: an flock belongs to the open file, which the
    DataLoader's forked workers share, so a killed run's lock would outlive it for as long as
    its orphaned workers do; a record lock belongs to the process alone.
    FileExistsError naming both (and `name`) while another process holds it: two processes
    writing one run (a resubmitted job beside a live one) would interleave their checkpoints.
    Advisory locks on network file systems hold only as far as the file system supports them."""
    import fcntl
    import socket

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / LOCK, "a+")
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FileExistsError(f"{name}: {directory} is being written by {holder}; wait for it "
                              "to end, or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"reclip (PID {os.getpid()} on host {socket.gethostname()})\n")
    f.flush()
    return f


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in its folder and one rename: `path`
    is the old file or the new one, never part of one. An OSError (a full disk, a read-only
    or quota-bound file system) names `path`, not the temporary file, which is removed."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from None
        raise


def json_default(obj: Any) -> Any:
    """JSON for what json.dumps does not know: arrays and their scalars (numpy, torch: anything
    with ``tolist``) and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_text(path: str | Path, text: str) -> None:
    """Atomically write `text` to `path`, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, text.encode())


def write_json(path: str | Path, obj: Any, default=json_default) -> None:
    """Atomically write `obj` as indented JSON (`default` as in json.dumps), creating the folder."""
    write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def write(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _current_tensor_file(directory)
    serial = int(previous.stem.split("-")[-1]) + 1 if previous else 0
    tensor_file = directory / f"tensors-{serial}.safetensors"
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # serialised here and written by Python: safetensors' own writer reports a full disk as a
    # SafetensorError, which names neither the file nor the cause as an OSError does
    _atomic_write(tensor_file, save(contiguous))
    try:
        # the file's own keys last: metadata read from an older checkpoint names its file
        write_json(directory / META, {**meta, "format": FORMAT, "tensors": tensor_file.name})
    except BaseException:
        tensor_file.unlink(missing_ok=True)  # run.json still names the previous one
        raise
    if previous and previous != tensor_file:
        previous.unlink(missing_ok=True)
    return directory


def _current_tensor_file(directory: Path) -> Path | None:
    if not exists(directory):
        return None
    name = json.loads((directory / META).read_text()).get("tensors")
    return directory / name if name else None


def read(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a run directory; ValueError / FileNotFoundError naming the path."""
    directory = Path(directory)
    meta = read_meta(directory)
    tensor_path = directory / meta["tensors"]
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path}: missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(tensor_path)), meta
    except SafetensorError as err:  # truncated or not a safetensors file
        raise ValueError(f"{tensor_path}: unreadable ({err})") from None


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The metadata of a run directory alone (cheap: no tensors are read)."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a reclip run directory (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path}: unreadable ({err})") from None
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise ValueError(f"{meta_path}: unknown format {found!r}, expected {FORMAT!r}")
    name = meta.get("tensors")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{meta_path}: no valid 'tensors' (the name of the run's tensor file)")
    return meta
