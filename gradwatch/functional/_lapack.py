"""Eigenvalues of a float64 symmetric matrix through LAPACK ``dsyevd``, called without holding the GIL.

``numpy.linalg.eigvalsh`` keeps the GIL for matrices up to ~400 wide (measured: two threads solving
384 x 384 matrices took as long as one), so solving one Gram matrix per core needs a call that lets go
of it. SciPy exports its LAPACK to Cython as C function pointers (``scipy.linalg.cython_lapack``);
calling ``dsyevd`` through such a pointer with :mod:`ctypes` releases the GIL for the duration of the
call. Without SciPy (or if the pointer cannot be found) :func:`eigvalsh` falls back to numpy's, which
gives the same numbers, only without the concurrency.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import numpy as np

_c_int_p = ctypes.POINTER(ctypes.c_int)
# void dsyevd(char *jobz, char *uplo, int *n, double *a, int *lda, double *w,
#             double *work, int *lwork, int *iwork, int *liwork, int *info)   (scipy.linalg.cython_lapack)
_DSYEVD = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _c_int_p, ctypes.c_void_p, _c_int_p,
                           ctypes.c_void_p, ctypes.c_void_p, _c_int_p, ctypes.c_void_p, _c_int_p, _c_int_p)

_lock = threading.Lock()
_dsyevd: Callable[..., None] | None = None
_resolved = False
_lwork: dict[int, int] = {}


def _cython_lapack_dsyevd() -> Callable[..., None] | None:
    """SciPy's ``dsyevd`` as a ctypes function, or None."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:
        return None
    capsule = getattr(cython_lapack, "__pyx_capi__", {}).get("dsyevd")
    if capsule is None:
        return None
    # private prototypes: setting restype/argtypes on ctypes.pythonapi's shared attributes could clash with others
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    address = get_pointer(capsule, get_name(capsule))
    return _DSYEVD(address) if address else None


def lapack_available() -> bool:
    """Whether :func:`eigvalsh` calls LAPACK without the GIL (SciPy found)."""
    global _dsyevd, _resolved
    with _lock:
        if not _resolved:
            _dsyevd, _resolved = _cython_lapack_dsyevd(), True
    return _dsyevd is not None


def _optimal_lwork(fn: Callable[..., None], n: int) -> int:
    """LAPACK's workspace query (lwork = -1) for eigenvalues only; cached per size."""
    if n not in _lwork:
        work, iwork = np.zeros(1), np.zeros(1, dtype=np.intc)
        a = np.zeros((n, n))
        w = np.zeros(n)
        info = ctypes.c_int(0)
        fn(b"N", b"L", ctypes.byref(ctypes.c_int(n)), a.ctypes.data, ctypes.byref(ctypes.c_int(n)), w.ctypes.data,
           work.ctypes.data, ctypes.byref(ctypes.c_int(-1)), iwork.ctypes.data, ctypes.byref(ctypes.c_int(-1)),
           ctypes.byref(info))
        _lwork[n] = max(int(work[0]), 2 * n + 1)
    return _lwork[n]


def eigvalsh(gram: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Ascending eigenvalues of a symmetric float64 matrix (``dsyevd``, eigenvalues only).

    Args:
        gram: (n, n) symmetric, float64. Only one triangle is read.
        overwrite: allow the matrix to be destroyed (it must then be contiguous); saves a copy.
    """
    n = gram.shape[0]
    if gram.shape != (n, n):
        raise ValueError(f"gradwatch: expected a square matrix, got shape {gram.shape}")
    if n == 0 or not lapack_available():
        return np.linalg.eigvalsh(gram)
    assert _dsyevd is not None
    # a C-contiguous symmetric matrix is its own Fortran-ordered transpose
    a = gram if overwrite and gram.dtype == np.float64 and gram.flags.c_contiguous else np.array(gram, np.float64)
    lwork = _optimal_lwork(_dsyevd, n)
    work, iwork, w = np.empty(lwork), np.empty(1, dtype=np.intc), np.empty(n)
    info = ctypes.c_int(0)
    _dsyevd(b"N", b"L", ctypes.byref(ctypes.c_int(n)), a.ctypes.data, ctypes.byref(ctypes.c_int(n)), w.ctypes.data,
            work.ctypes.data, ctypes.byref(ctypes.c_int(lwork)), iwork.ctypes.data, ctypes.byref(ctypes.c_int(1)),
            ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"gradwatch: LAPACK dsyevd failed with info={info.value} on a {n}x{n} matrix")
    return w
