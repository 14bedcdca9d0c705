"""ctrd against Debian's containerd, side by side: `python -m bench` or `python bench/run.py`.

Both daemons run at once on temporary roots; each workload is prepared on both,
then measured in alternating order (ctrd first on even repetitions, containerd
first on odd ones) so that drift of the machine hits both alike. Per workload the
table gives each daemon's median and the median of the per-repetition ratios
ctrd/containerd. A workload ctrd cannot do yet is tried once and reported as
"unavailable" with the error it gave.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository importable, so `bench` resolves as a package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

import grpc  # noqa: E402
import structlog  # noqa: E402

from ctrd.daemon import logconfig  # noqa: E402

from bench.daemons import (  # noqa: E402
    NAMESPACE, CommandFailed, Containerd, ContainerdAsCtrd, Ctrd, Daemon,
)
from bench.profiling import Profiler  # noqa: E402
from bench.report import ERROR, SKIPPED, UNAVAILABLE, Row, table, write_json  # noqa: E402
from bench.workloads import MIB, Bench, Settings, Workload, all_workloads, sweep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Where both daemons' runc shims keep runc's state, a folder per namespace: the bench's
# namespace is its own, so whatever is in there is the bench's.
RUNC_ROOT = Path("/run/containerd/runc") / NAMESPACE

log = structlog.get_logger()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="one repetition with tiny sizes, to check the bench works (CI)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per daemon (default 5)")
    p.add_argument("--size", type=float, help="content blob size in MiB (default 1024, 8 smoke)")
    p.add_argument("--only", nargs="+", metavar="WORKLOAD",
                   help="run only these workloads: " + ", ".join(
                       w.name for w in all_workloads(Settings.smoke())))
    p.add_argument("--profile", nargs="?", const="auto", choices=["auto", "py-spy", "cprofile"],
                   help="profile ctrd into bench/results/profile: py-spy flame graphs per "
                        "workload when installed (auto), else cProfile of the whole run")
    p.add_argument("--aa", action="store_true",
                   help="A/A run: containerd in both columns, to see the noise of the ratios")
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json",
                   help="where to write the results (default bench/results/latest.json)")
    p.add_argument("--log-level", default="info")
    return p


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CommandFailed):
        return exc.reason
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def measure(workload: Workload, bench: Bench, ctrd: Daemon, containerd: Daemon,
            profiler: Profiler | None) -> list[Row]:
    if workload.skip_reason:
        return [Row(m, SKIPPED, workload.skip_reason) for m in workload.metrics]
    log.info("workload", name=workload.name)
    try:
        try:
            workload.setup(bench, ctrd)
        except (CommandFailed, grpc.RpcError) as exc:
            # Whatever ctrd lacks, the row says so and the bench goes on.
            log.info("ctrd cannot run workload", name=workload.name, reason=_reason(exc))
            return [Row(m, UNAVAILABLE, f"capability not available: {_reason(exc)}")
                    for m in workload.metrics]
        except Exception as exc:  # the bench's own preparation failed, not ctrd
            log.exception("workload setup failed", name=workload.name)
            return [Row(m, ERROR, f"bench: {_reason(exc)}") for m in workload.metrics]
        try:
            workload.setup(bench, containerd)
        except Exception as exc:
            log.error("containerd cannot run workload", name=workload.name, reason=_reason(exc))
            return [Row(m, ERROR, f"containerd: {_reason(exc)}") for m in workload.metrics]
        rows = {m.key: Row(m) for m in workload.metrics}
        with profiler.during(workload.name, ctrd) if profiler else contextlib.nullcontext():
            _repeat(workload, bench, ctrd, containerd, rows)
        return list(rows.values())
    finally:
        for daemon in (ctrd, containerd):
            try:
                workload.teardown(bench, daemon)
            except Exception as exc:
                log.warning("teardown failed", name=workload.name, daemon=daemon.name,
                            reason=_reason(exc))


def _repeat(workload: Workload, bench: Bench, ctrd: Daemon, containerd: Daemon,
            rows: dict[str, Row]) -> None:
    for rep in range(bench.settings.reps):
        order = (ctrd, containerd) if rep % 2 == 0 else (containerd, ctrd)
        for daemon in order:
            try:
                values = workload.run(bench, daemon, rep)
            except Exception as exc:
                failed = daemon is ctrd
                status = UNAVAILABLE if failed and rep == 0 else ERROR
                prefix = "capability not available" if status == UNAVAILABLE else daemon.name
                log.info("run failed", name=workload.name, daemon=daemon.name, rep=rep,
                         reason=_reason(exc))
                for row in rows.values():
                    row.status, row.reason = status, f"{prefix}: {_reason(exc)}"
                if status == UNAVAILABLE:
                    return  # no ratio can come of it; do not spend time on containerd
                continue
            for key, value in values.items():
                rows[key].add(daemon.name, rep, value)
        for key, value in workload.floor(bench, rep).items():
            rows[key].floor.append(value)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cleanup(daemons: list[Daemon], bench: Bench | None, base: Path) -> None:
    """Leave nothing behind: tasks, containers, shims, daemons, registry, mounts, files."""
    for daemon in daemons:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                sweep(daemon)
            except Exception as exc:
                log.warning("sweep failed", daemon=daemon.name, reason=_reason(exc))
        shims = daemon.shim_pids()
        daemon.stop()
        # Shims outlive their daemon by design; these were started for the bench only.
        for pid in shims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if bench is not None and bench.registry is not None:
        bench.registry.stop()
    _delete_runc_containers()
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(base) + "/")), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    for cgroup in Path("/sys/fs/cgroup").glob(f"*/{NAMESPACE}"):
        # Only empty cgroups can be removed, so busy ones (not ours) are safe.
        for child in sorted(cgroup.rglob("*"), reverse=True):
            if child.is_dir():
                _rmdir(child)
        _rmdir(cgroup)
    _rmdir(RUNC_ROOT)
    shutil.rmtree(base, ignore_errors=True)


def _delete_runc_containers() -> None:
    """Containers whose creation an interrupt cut short: no shim knows of them any more."""
    if not RUNC_ROOT.is_dir():
        return
    for state in RUNC_ROOT.iterdir():
        subprocess.run(["runc", "--root", str(RUNC_ROOT), "delete", "--force", state.name],
                       check=False, capture_output=True)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logconfig.configure(args.log_level, "console")
    settings = Settings.smoke() if args.smoke else Settings.full(args.reps)
    if args.size:
        settings = dataclasses.replace(settings, blob_size=int(args.size * MIB))
    workloads = all_workloads(settings)
    if args.only:
        unknown = set(args.only) - {w.name for w in workloads}
        if unknown:
            print(f"bench: unknown workloads: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        workloads = [w for w in workloads if w.name in args.only]

    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="ctrd-bench-", dir="/tmp"))
    profiler = Profiler(RESULTS / "profile", args.profile) if args.profile else None
    ctrd: Daemon = (ContainerdAsCtrd(base=base / "containerd-a") if args.aa else
                    Ctrd(base=base / "ctrd", wrapper=profiler.wrapper() if profiler else []))
    containerd = Containerd(base=base / "containerd")
    bench: Bench | None = None
    rows: list[Row] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        ctrd.start()
        containerd.start()
        bench = Bench(settings, base / "work")
        bench.workdir.mkdir(parents=True)
        for workload in workloads:
            rows += measure(workload, bench, ctrd, containerd, profiler)
            if ctrd.proc is not None and ctrd.proc.poll() is not None:
                log.error("ctrd died; restarting it", workload=workload.name,
                          status=ctrd.proc.returncode, log=ctrd.log()[-2000:])
                ctrd.start()
    except KeyboardInterrupt:
        log.warning("interrupted; cleaning up")
        return 130
    finally:
        _cleanup([ctrd, containerd], bench, base)
        signal.signal(signal.SIGTERM, previous)
        if rows:
            duration = time.monotonic() - started
            write_json(args.json, rows, {**dataclasses.asdict(settings), "smoke": args.smoke,
                                         "profile": args.profile, "aa": args.aa}, duration)
            print(table(rows))
            print(f"\n{len(rows)} rows in {duration:.0f}s; JSON: {args.json}")
        if profiler:
            print(profiler.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
