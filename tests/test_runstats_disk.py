"""disk_read_bytes counts what the kernel read from storage for this process, not what the page cache served."""

from __future__ import annotations

import os
import sys

import pytest

from mixtral_lite.runtime.runstats import disk_read_bytes, format_stats


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and /proc/self/io are Linux's")
def test_a_read_past_the_page_cache_is_counted_and_a_cached_one_is_not(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(8 << 20)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the page cache
        before = disk_read_bytes()
        if before is None:
            pytest.skip("this kernel does not count per-process storage reads")
        assert os.read(fd, len(data)) == data
        cold = disk_read_bytes() - before
        if cold == 0:
            pytest.skip(f"{tmp_path} is not on a block device (tmpfs?): nothing is read from storage")
        os.lseek(fd, 0, os.SEEK_SET)
        before = disk_read_bytes()
        assert os.read(fd, len(data)) == data
        warm = disk_read_bytes() - before
    finally:
        os.close(fd)
    assert cold >= len(data) and warm < len(data) // 8


def test_the_stderr_line_names_the_disk_reads():
    stats = {"load_s": 1.0, "prompt_tokens": 3, "generated_tokens": 5, "ttft_s": 0.1, "decode_tokens_per_s": 2.0,
             "peak_rss_bytes": 1 << 30, "peak_device_bytes": 1 << 20, "disk_read_bytes": 16 << 20}
    assert "disk: 16.0 MiB read from storage while generating (2.00 MiB per token" in format_stats(stats)
    assert "disk:" not in format_stats(stats | {"disk_read_bytes": None})
