"""Give the serving worker thread the CPU's OpenMP threads to itself.

Why: torch's CPU kernels split work over an OpenMP team, and each OS thread that starts a parallel region keeps its
own team (GNU libgomp, the runtime torch's Linux wheels bundle). The server loads the model in the main thread (a
team of `torch.get_num_threads()` there) and then computes in the worker thread (a second team). libgomp counts
every thread it manages, and once they outnumber the CPUs its idle threads stop spinning between parallel regions
and sleep at once (its "throttled" spin count, which no environment variable raises), so every one of the thousands
of small parallel regions of a decode step pays a futex wake-up. Measured on this project's 2-core VM: a SmolLM2
decode step of 8 mixed rows took 160-190 ms in the worker thread against 78-105 ms in the main thread, the same
step, the same process; one 8 x 576 by 576 x 1536 product 145 us against 89 us.

`omp_pause_resource_all(omp_pause_soft)` (OpenMP 5.0) frees, in libgomp, the calling thread's team only; called in
the thread that loaded the model before the worker starts, the worker's team is then the only one and the same step
runs at the main thread's speed. Nothing changes in what is computed; a later parallel torch call in the calling
thread makes a team again (correct, only slower). Only libgomp is asked: LLVM's libomp (torch on macOS) pauses its
whole runtime on that call, which is not safe while another worker thread computes.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIME = "libgomp"  # GNU's OpenMP runtime, bundled by torch's Linux wheels


def _loaded_runtime() -> str | None:
    """The path of the libgomp this process has loaded (torch's bundled copy), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:  # not Linux: no runtime found, nothing released
        return None
    return next((p for p in sorted(paths) if p.rsplit("/", 1)[-1].startswith(_RUNTIME)), None)


def release_openmp_team() -> bool:
    """Free the calling thread's OpenMP team (its threads exit); True if the runtime did. Call it outside any
    parallel region, in the thread that loaded the model, before the worker thread computes."""
    path = _loaded_runtime()
    if path is None:
        return False
    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all
    except (OSError, AttributeError):  # an older runtime without OpenMP 5.0's pause
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    done = pause(OMP_PAUSE_SOFT) == 0
    log.debug("released the OpenMP team of the loading thread (%s): %s", path, done)
    return done
