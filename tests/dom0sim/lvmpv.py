"""The bytes and extents of a simulated PV (a sparse file): copying an LV's bytes between the PV and
its device node without filling holes, punching holes, and the allocation of extents as lvcreate's
normal policy makes it (first fit among the free gaps, else after the last LV).
"""
import bisect
import ctypes
import errno
import os

EXTENT_SIZE = 4 * 1024 * 1024
COPY_CHUNK = 4 * 1024 * 1024
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch(fd, offset, length):
    """Make [offset, offset+length) of a file read as zeros without allocating (a hole)."""
    if length <= 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_longlong(offset),
                      ctypes.c_longlong(length)) == 0:
        return
    end = min(offset + length, os.fstat(fd).st_size)
    for pos in range(offset, end, COPY_CHUNK):
        os.pwrite(fd, bytes(min(COPY_CHUNK, end - pos)), pos)


def _data_runs(fd, start, length):
    """[(offset, count)] of the data (not holes) in [start, start+length) of a file."""
    end = start + length
    runs = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole - data))
        pos = hole
    return runs


def copy_sparse(src_fd, src_offset, dst_fd, dst_offset, length):
    """Copy `length` bytes between files, skipping the source's holes (the target's range is
    expected to read as zeros already)."""
    for data, count in _data_runs(src_fd, src_offset, length):
        done = 0
        while done < count:
            chunk = os.pread(src_fd, min(COPY_CHUNK, count - done), data + done)
            if not chunk:
                break
            os.pwrite(dst_fd, chunk, dst_offset + data - src_offset + done)
            done += len(chunk)


class Extents(object):
    """The PV's extents: first fit among the free gaps, else after the last LV (lvcreate's normal
    policy); the largest gap is remembered so that big LVs skip the search."""

    def __init__(self, lvs):
        self.gaps = []          # sorted [start, length] of free runs below `tail`
        self.tail = 0
        self.max_gap = 0
        self.used = sum(lv["size"] // EXTENT_SIZE for lv in lvs)
        for start, end in sorted((lv["start_extent"], lv["start_extent"] + lv["size"] // EXTENT_SIZE)
                                 for lv in lvs):
            if start > self.tail:
                self.gaps.append([self.tail, start - self.tail])
            self.tail = max(self.tail, end)
        self.max_gap = max([length for _, length in self.gaps] or [0])

    def allocate(self, extents):
        self.used += extents
        if extents <= self.max_gap:
            for index, gap in enumerate(self.gaps):
                if gap[1] >= extents:
                    start = gap[0]
                    self._shrink(index, gap[0] + extents, gap[1] - extents)
                    return start
        start = self.tail
        self.tail += extents
        return start

    def grow_in_place(self, start, extents, more):
        """Take `more` extents right after [start, start+extents) if they are free."""
        end = start + extents
        if end == self.tail:
            self.tail += more
            self.used += more
            return True
        index = bisect.bisect_left(self.gaps, [end, 0])
        if index < len(self.gaps) and self.gaps[index][0] == end and self.gaps[index][1] >= more:
            gap = self.gaps[index]
            self._shrink(index, end + more, gap[1] - more)
            self.used += more
            return True
        return False

    def free(self, start, extents):
        if extents <= 0:
            return
        self.used -= extents
        end = start + extents
        index = bisect.bisect_left(self.gaps, [start, 0])
        if index > 0 and sum(self.gaps[index - 1]) == start:
            index -= 1
            start = self.gaps[index][0]
            del self.gaps[index]
        if index < len(self.gaps) and self.gaps[index][0] == end:
            end += self.gaps[index][1]
            del self.gaps[index]
        if end >= self.tail:
            self.tail = start
            if self.gaps and sum(self.gaps[-1]) == start:
                self.tail = self.gaps.pop()[0]
            self.max_gap = max([length for _, length in self.gaps] or [0])
            return
        self.gaps.insert(index, [start, end - start])
        self.max_gap = max(self.max_gap, end - start)

    def _shrink(self, index, start, length):
        old = self.gaps[index][1]
        if length:
            self.gaps[index] = [start, length]
        else:
            del self.gaps[index]
        if old == self.max_gap:
            self.max_gap = max([gap[1] for gap in self.gaps] or [0])
