"""Files only their owner may read: a node's state, keys, partitions (mode 0700 folders, 0600 files)."""
import os


def private_dir(path):
    """Create ``path`` (and missing parents) and make it owner-only (0700)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path, write):
    """Write ``path`` atomically with mode 0600 from its first byte: ``write(f)`` fills a binary file object."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
