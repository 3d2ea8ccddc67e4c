"""Peak memory, as the paper reports it: the GPU allocator's peaks, or on a CPU the process's own resident
high-water mark (``peak_memory``), started over where it can be (``reset_peak_memory``), from what is in use
(``release_free_memory``), with the image LMDB's pages said apart; and a run's peaks from its start, by phase
(its training steps', its evaluations') and over its attempts (``MemoryPeaks``)."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys

import psutil
import torch

from .bounds import finite_number


def release_free_memory(device: torch.device) -> None:
    """Give back what earlier work in this process freed but kept (a sweep's earlier points, the demo's cache
    build, an epoch's evaluation), so that a peak starts from what is still in use: the CUDA allocator's cached
    blocks released (else max_reserved counts them), glibc's free heap pages returned (Linux; the resident set,
    so the CPU peak, counts them: a sweep's third point peaked 0.26 GiB above its first, now 0.06). No cycle
    collection: it took seconds in a process holding many models (the test suite), for little more."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # (a C library other than glibc: none to trim)
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak over from now: the GPU allocator's peaks; on a Linux CPU the process's resident
    high-water mark (VmHWM, reset to the current resident set by writing 5 to /proc/self/clear_refs).
    False where it cannot be reset (elsewhere, or /proc refuses): the peak is then the process's whole life."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return own_peak_rss() is not None


def own_peak_rss() -> int | None:
    """Bytes of this process's resident high-water mark on Linux (VmHWM): a fresh process image starts its
    own, unlike ``ru_maxrss``, which a child inherits from its parent across fork and exec. None elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as fh:  # (a name cut inside a character)
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: torch.device, reset_at: str | None = None, images: bool = True) -> dict:
    """GPU: the allocator's peaks since the last reset; CPU: the process's peak resident set and which figure
    it is (``rss_peak_source``: VmHWM on Linux, else ``ru_maxrss``, which on Linux would be the larger of
    the parent's and the child's), since ``reset_at`` (when ``reset_peak_memory`` returned True: "the
    warm-up's end") or since the process started (``rss_peak_since``); with ``images``, how much of it is an
    image LMDB's pages (``mapped_lmdb_bytes``: reading them takes ~20 ms beside torch's many mappings)."""
    if device.type == "cuda":
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    peak, source = own_peak_rss(), "VmHWM"
    if peak is None:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        peak = peak if sys.platform == "darwin" else peak * 1024
    since = reset_at if reset_at and source == "VmHWM" else "the process's start"
    lmdb = mapped_lmdb_bytes() if images else None
    return {"peak_rss_gib": peak / 2**30, "current_rss_gib": psutil.Process().memory_info().rss / 2**30,
            "rss_peak_source": source, "rss_peak_since": since,
            **({"lmdb_resident_gib": lmdb / 2**30} if lmdb else {})}


def mapped_lmdb_bytes() -> int | None:
    """Resident bytes of the LMDB data files (``data.mdb``) this process maps, on Linux: pages of an image store
    that reading images brought in. The resident set, and so its peak, counts them although they are the
    file's, which the kernel may drop: a live run's CPU peak holds them, a cached run's not. None elsewhere."""
    total, counting = 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if not head.endswith(":"):  # a mapping's first line: "start-end perms offset dev inode [path]"
                    counting = line.rstrip().endswith("/data.mdb")
                elif counting and head == "Rss:":
                    total += int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return total


PHASES = ("training", "evaluation")  # results.json's peak_memory_by_phase: the training steps', the evaluations'


def highest(earlier: dict, now: dict) -> dict:
    """``now``'s memory figures, each peak (``max_*``, ``peak_*``) at its highest of the two (``earlier``'s finite
    numbers only); ``earlier`` where ``now`` holds none."""
    if not now:
        return dict(earlier)
    kept = {k: v for k, v in earlier.items() if finite_number(v)}
    return {k: max(v, kept.get(k, v)) if k.startswith(("max_", "peak_")) and finite_number(v) else v
            for k, v in now.items()}


class MemoryPeaks:
    """A run's memory peaks from its start, not those of what ran before in its process (a cache build, a
    sweep's earlier point), and those of its training steps and of its evaluations alone (``report``): the
    paper's memory is training's, as its time per epoch is. A checkpoint carries both, so a resumed run reports
    the peaks of every attempt (``resume``)."""

    def __init__(self, device: torch.device, images: bool = True):
        self.device, self.images = device, images  # images: whether the run reads an image LMDB (a live image tower)
        release_free_memory(device)
        self.resettable = reset_peak_memory(device)
        self.since = "the run's start" if self.resettable else None
        self.earlier: dict = {}  # the attempts before this one's
        self.earlier_phases: dict[str, dict] = {}
        self.attempt: dict = {}  # this attempt's, up to the last phase boundary (``enter``)
        self.phases: dict[str, dict] = {}
        self.phase = ""  # the phase running: one of PHASES, or '' (building the run, writing checkpoints)

    def resume(self, state: dict) -> None:
        """Take the peaks a checkpoint's ``state`` carries (what is not a dict is left out)."""
        self.earlier = state.get("peak_memory") if isinstance(state.get("peak_memory"), dict) else {}
        phases = state.get("peak_memory_by_phase") if isinstance(state.get("peak_memory_by_phase"), dict) else {}
        self.earlier_phases = {p: phases[p] for p in PHASES if isinstance(phases.get(p), dict)}

    def enter(self, phase: str) -> None:
        """A phase boundary: the peak since the last one is the run's and the phase that ran's; then ``phase``
        (one of PHASES, or '') starts the peak over, where it can be."""
        now = peak_memory(self.device, self.since, self.images)
        self.attempt = highest(self.attempt, now)
        if self.phase:
            self.phases[self.phase] = highest(self.phases.get(self.phase, {}), self._of(self.phase, now))
        self.phase = phase
        if phase == "training":  # not from what the last evaluation freed but kept (its scores, its item table)
            release_free_memory(self.device)
        if self.resettable:
            reset_peak_memory(self.device)

    def report(self) -> dict:
        """results.json's and a checkpoint's ``peak_memory``: each peak of this device (``max_*``, ``peak_*``) at
        its highest over the run's attempts, the current resident set as it is now; and ``peak_memory_by_phase``:
        those figures of the training steps alone and of the evaluations alone (item table included), where the
        peak cannot be started over (on a CPU, not Linux) the process's whole life's, as ``rss_peak_since`` says.
        One reading of the device for both."""
        now = peak_memory(self.device, self.since, self.images)
        by_phase = {}
        for phase in PHASES:
            mine = self.phases.get(phase, {})
            if phase == self.phase:  # running now: an interruption, a failure
                mine = highest(mine, self._of(phase, now))
            if mine or phase in self.earlier_phases:
                by_phase[phase] = highest(self.earlier_phases.get(phase, {}), mine)
        return {"peak_memory": highest(highest(self.earlier, self.attempt), now), "peak_memory_by_phase": by_phase}

    def _of(self, phase: str, reading: dict) -> dict:
        """``reading``, its CPU peak said to start where ``phase`` did, where the peak was started over."""
        if "rss_peak_since" in reading and self.resettable:
            return {**reading, "rss_peak_since": f"each {phase} phase's start"}
        return reading
