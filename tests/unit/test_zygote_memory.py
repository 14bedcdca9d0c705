"""What the zygote does before it forks: immortalisation (reference counting stops writing
to what it marked, nothing breaks afterwards, unchecked interpreters are left alone) and
the warm-up (which must leave nothing behind)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from ctrd.shim import immortal

needs_support = pytest.mark.skipif(not immortal.supported(),
                                   reason="immortal objects need CPython 3.12/3.13, 64-bit, GIL")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "dev", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, check=False)


@needs_support
def test_marked_objects_keep_their_count_and_survive_churn() -> None:
    result = _run("""
        import ctypes, gc, json, sys
        from ctrd.shim import immortal

        class Holder:
            pass

        module_level = Holder()
        payload = {"key": [1, 2, 3], "text": "x" * 100}
        objects, marked = immortal.immortalize(extra_roots=[payload])
        gc.freeze()
        assert objects > 1000 and 0 < marked <= objects, (objects, marked)

        raw = lambda o: ctypes.c_ssize_t.from_address(id(o)).value
        before = raw(module_level), raw(payload), raw(Holder), raw(json.dumps)
        refs = [module_level, payload, Holder, json.dumps] * 1000  # 1000 more references
        assert (raw(module_level), raw(payload), raw(Holder), raw(json.dumps)) == before
        assert before[0] & 0xFFFFFFFF == immortal.IMMORTAL_REFCNT
        del refs

        # New objects are mortal and are freed; marked containers still mutate.
        fresh = Holder()
        assert sys.getrefcount(fresh) == 2
        payload["key"].append(4)
        payload["new"] = [Holder() for _ in range(10000)]
        del payload["new"]
        for _ in range(3):
            junk = [[i] for i in range(100000)]
            del junk
            gc.collect()
        gc.unfreeze()
        gc.collect()
        print("ok", json.dumps(payload["key"]))
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok [1, 2, 3, 4]"


@needs_support
def test_a_forked_child_shares_marked_pages() -> None:
    """The point of it all: a child that only reads shared objects copies few pages."""
    result = _run("""
        import gc, os, sys
        from ctrd.shim import immortal

        table = [str(i) * 20 for i in range(200000)]  # ~16 MiB of small objects
        immortal.immortalize()
        gc.freeze()

        def private_dirty_kib():
            for line in open("/proc/self/smaps_rollup"):
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1])

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            start = private_dirty_kib()
            seen = 0
            for text in table:  # takes and drops a reference to every string
                seen += len(text) > 0
            os.write(w, f"{private_dirty_kib() - start}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 100).decode())
        """)
    assert result.returncode == 0, result.stderr
    # Without immortality this copies every page of the table (~16 MiB).
    assert int(result.stdout) < 2048, result.stdout


def test_unsupported_interpreters_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(immortal.sys, "version_info", (3, 14, 0))
    assert not immortal.supported()
    assert immortal.immortalize() == (0, 0)


def test_warm_up_leaves_nothing_behind() -> None:
    """The zygote forks right after: no thread, child, file or folder may remain."""
    result = _run("""
        import glob, os, threading, tempfile
        from ctrd.shim.warmup import warm_up

        fds = set(os.listdir("/proc/self/fd"))
        warm_up()
        assert threading.active_count() == 1, threading.enumerate()
        assert set(os.listdir("/proc/self/fd")) == fds, (fds, os.listdir("/proc/self/fd"))
        try:
            os.waitpid(-1, os.WNOHANG)
            raise AssertionError("a child is left")
        except ChildProcessError:
            pass
        assert not glob.glob(os.path.join(tempfile.gettempdir(), "ctrd-zygote-warmup-*"))
        print("ok")
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_failing_warm_up_raises_and_still_cleans_up() -> None:
    result = _run("""
        import os, threading
        from ctrd.shim.warmup import warm_up

        fds = set(os.listdir("/proc/self/fd"))
        try:
            warm_up("/nonexistent/command")
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("no error")
        assert threading.active_count() == 1, threading.enumerate()
        assert set(os.listdir("/proc/self/fd")) == fds
        print("ok")
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
