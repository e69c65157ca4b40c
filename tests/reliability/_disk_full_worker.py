"""Worker of tests/reliability/test_surroundings.py: ``python _disk_full_worker.py ROOT LIMIT_BYTES STEPS``.

A Lightning run of the tiny classifier with gradwatch writing into ``ROOT/gw`` (its own TensorBoard writer and
JSONL records) and nothing else writing files (no logger, no checkpoints), under a file-size limit
(``RLIMIT_FSIZE``, with SIGXFSZ ignored so a write past it fails with EFBIG as on a full disk). Prints
``FINISHED <global_step>`` and each warning gradwatch gave, one per line, ``WARNING <text>``.
:func:`run` lifts the limit again when it returns: ``_rank_fault_worker.py`` runs it first, in the same
process as its two-rank runs, to save an interpreter start.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _support


def run(root: str, limit: int, steps: int) -> list[str]:
    """The run under the limit; its report lines (``FINISHED <step>``, ``WARNING <text>``)."""
    from _support.lit import fit

    from gradwatch import StabilityConfig
    from gradwatch.callbacks.lightning import GradWatch

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    gw = GradWatch(spectra=1, stability=StabilityConfig(every=1, adam=False), log_dir=os.path.join(root, "gw"),
                   max_overhead=None)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, _ = fit(root, [gw], max_steps=steps, logger=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    return [f"FINISHED {trainer.global_step}"] + [
        "WARNING " + str(w.message).replace("\n", " ") for w in caught if str(w.message).startswith("gradwatch")]


if __name__ == "__main__":
    print("\n".join(run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
