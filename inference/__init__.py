"""HipAtlas inference core: geometry, data, network, pipeline. Never imports Qt or VTK."""

from __future__ import annotations

import os


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hipatlas")
    except Exception:  # not installed (e.g. run from a source tree): read pyproject.toml
        import pathlib
        import re

        pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
            return match.group(1) if match else "0+unknown"
        except OSError:
            return "0+unknown"


__version__ = _version()


#: The environment variable NumPy reads for the same choice; when it is set, it stands.
HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"
#: The environment variable that sets NumPy's OpenBLAS thread count; when it is set, it stands.
BLAS_THREADS_ENV = "OPENBLAS_NUM_THREADS"


def _one_blas_thread() -> bool:
    """Run NumPy's OpenBLAS on one thread (before NumPy is first imported); True when this call set it.

    The registration's matrix products are point lists times 3 x 3 matrices: too small to share
    out. With OpenBLAS's default (a thread per core) its second thread busy-waits between products,
    so a warm registration on the demo used 5.2 s of CPU for 3.2 s of wall time against 3.8 s of
    CPU with one thread and the same wall time (2-core machine, session 20); when another process
    holds a core, the split products wait for it. TensorFlow does not use OpenBLAS. A user who sets
    the variable keeps their choice; an interpreter that imported NumPy first keeps its threads.
    """
    import sys

    if BLAS_THREADS_ENV in os.environ or "numpy" in sys.modules:
        return False
    os.environ[BLAS_THREADS_ENV] = "1"
    return True


_one_blas_thread()


def _no_madvised_huge_pages() -> bool:
    """Stop NumPy asking the kernel for transparent huge pages for its large arrays (``madvise``);
    True when this call changed it.

    NumPy marks every array of 4 MB or more for huge pages. Where the kernel then compacts memory
    on the page fault (``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``, Ubuntu's and
    Debian's default), a process that allocates its first gigabyte stalls in the kernel: a fresh
    ``hipatlas register`` on the demo took 7.2-8.1 s (3.1-3.8 s of it system time) against
    4.9-5.0 s (0.8 s) with NumPy's own switch ``NUMPY_MADVISE_HUGEPAGE=0`` (this machine, after
    a day of uptime; docs/performance.md). The registration's arrays are read a few times each, so
    huge pages buy it nothing back. A user who sets the variable keeps their choice.
    """
    if HUGEPAGE_ENV in os.environ:
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # NumPy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return False
    return bool(_set_madvise_hugepage(False))


_no_madvised_huge_pages()
