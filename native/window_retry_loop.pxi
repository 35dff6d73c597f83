# The retry-loop guard (included by window.pyx; a helper of Core as a function of
# ``Core self``): a (user, prompt) admitted too often within its window is denied, and
# the map of recent admit times is kept bounded.


cdef object _retry_loop(Core self, tuple subject, bytes fingerprint, double now):
    cdef double cutoff = now - self.retry_loop_window
    cdef list times
    cdef Py_ssize_t n = 0
    key = (subject[0] or subject[1], fingerprint)
    found = self.recent.get(key)
    if found is None:
        # two at most, so an admit's work stays bounded; one more than it adds, so the
        # map also shrinks back under a cap that a reload lowered
        _prune_recent(self, cutoff, 2, self.retry_loop_max_keys - 1)
        times = self.recent[key] = []
    else:
        times = <list>found
        while n < len(times) and <double>times[n] <= cutoff:
            n += 1
        del times[:n]
    if len(times) >= self.retry_loop_max:
        return self.denial_type("retry_loop", "retry_loop", len(times), self.retry_loop_max,
                                times[0] + self.retry_loop_window - now, False)
    times.append(now)
    self.recent.move_to_end(key)  # keeps the map ordered by latest admit: oldest first
    return None


cdef Py_ssize_t _prune_recent(Core self, double cutoff, Py_ssize_t budget,
                              Py_ssize_t keep) except -1:
    """Drop up to ``budget`` retry-loop keys from the oldest on: those whose latest
    admit left the window, and while more than ``keep`` remain, the oldest at all."""
    cdef Py_ssize_t dropped = 0
    cdef list times
    while dropped < budget and self.recent:
        key, times = self.recent.popitem(last=False)
        if times and <double>times[len(times) - 1] > cutoff:  # still in its window
            if len(self.recent) >= keep:
                self.retry_loop_forgotten += 1
            else:
                self.recent[key] = times
                self.recent.move_to_end(key, last=False)
                break
        dropped += 1
    return dropped
