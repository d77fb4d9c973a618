"""Peak resident memory (RSS) of a stretch of code, for the bench scripts (Linux).

    start = peak_rss.start()          # resets the kernel's high-water mark to the current RSS
    ...work...
    rise_kib = peak_rss.rise_kib(start)

Exact where the kernel lets a process reset its own high-water mark (VmHWM, by writing 5 to
/proc/self/clear_refs): the rise is the peak during the work minus the RSS before it. Elsewhere it falls
back to ru_maxrss, the process's all-time peak, which over-counts if the process peaked earlier; the
returned `exact` flag says which one was used, and the benches print it.
"""
import resource


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_high_water_mark():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def start():
    """Begin a measurement: (exact, baseline KiB)."""
    if _reset_high_water_mark():
        return True, _status_kib("VmRSS")
    return False, max(_status_kib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rise_kib(begun):
    """Peak RSS since start() minus the baseline, in KiB (never negative)."""
    exact, baseline = begun
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak - baseline, 0)
