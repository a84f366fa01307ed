"""Run the streamproxy benchmark: every target side by side, in one run, on loopback.

    python benchmarks/run.py [--quick] [--out DIR] [--rounds N]
                             [--targets direct,nginx,naive,streamproxy,streamproxy-w2]

Starts the fake SSE upstream (upstream.py) and every target on 127.0.0.1, drives each
with the same load (loadgen.py), and writes `results.md`, `results.json` and
`latency-cdf.png` into the out folder (default `benchmarks/results/<date>/`). Targets:

- direct: the load generator straight to the upstream (the floor every figure is added to);
- nginx: nginx from the system (1 worker, `proxy_buffering off`, upstream keepalive);
- naive: naive_relay.py (Starlette StreamingResponse + httpx, uvicorn defaults);
- streamproxy: `python -m streamproxy serve` with its default config (keepalive and
  metrics on, one worker); streamproxy-w2: the same with `--workers 2`.

Phases (see `phases()`): light (~1k events/s) and load (~10k events/s) run `--rounds`
times, the targets in alternating order (reversed every other round); max (offered far
above any target's capacity, cut at a time cap) runs once per target; scale runs the max
phase's load against streamproxy (and nginx) with 1 and with 2 workers, each started
afresh, each worker process in a cgroup of its own with a CPU quota of `--scale-quota`
cores, as if each had a core of its own (skipped, with a note, where no cpu cgroup can be
made); mem starts each target afresh and holds many idle streams. Before each measurement
the runner waits (bounded) until the target and the upstream are idle. Every child process
runs in its own session and is killed on exit, Ctrl-C or error; server logs go to the work
folder (`--work-dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import loadgen
import psutil
from loadgen import CDF_QUANTILES, LoadSpec

HERE = Path(__file__).resolve().parent
ALL_TARGETS = ["direct", "nginx", "naive", "streamproxy", "streamproxy-w2"]
T0 = time.monotonic()


# -- phases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One kind of measurement: its load and how long it may take."""

    name: str
    streams: int
    events: int  # per stream
    interval_ms: float  # between events of one stream; 0 = as fast as the target reads
    ramp_s: float  # streams open over this long
    time_cap_s: float
    about: str

    def spec(self, url: str, size: int, procs: int) -> LoadSpec:
        return LoadSpec(
            url=url,
            streams=self.streams,
            events=self.events,
            interval_ms=self.interval_ms,
            size=size,
            ramp_s=self.ramp_s,
            time_cap_s=self.time_cap_s,
            cut_expected=self.name in ("max", "scale"),
            hold=self.name == "mem",
            procs=procs,
        )


def phases(quick: bool, mem_streams: int | None) -> dict[str, Phase]:
    """The five phases; `--quick` shrinks them to a smoke test of a few seconds."""
    if quick:
        found = [
            Phase("light", 10, 20, 20, 0.05, 20, "10 streams x 20 events, 20 ms apart"),
            Phase("load", 20, 20, 20, 0.05, 20, "20 streams x 20 events, 20 ms apart"),
            Phase("max", 10, 10**7, 0, 0.05, 1, "10 streams, flood, cut after 1 s"),
            Phase("mem", mem_streams or 50, 2, 60_000, 0.2, 30, "idle streams"),
        ]
    else:
        found = [
            Phase("light", 20, 100, 20, 0.1, 30, "20 streams x 50 ev/s (~1k ev/s), 100 events"),
            Phase("load", 200, 200, 20, 0.2, 60, "200 streams x 50 ev/s (~10k ev/s), 200 events"),
            Phase("max", 100, 10**7, 0, 0.1, 5, "100 streams, flood, cut after 5 s"),
            Phase("mem", mem_streams or 1000, 2, 60_000, 1.0, 60, "idle streams"),
        ]
    light, load, max_, mem = found
    # scale is max's load, so the quota'd figures compare with the unconfined ones
    quota = "each worker in a cgroup of its own with a CPU quota of Q cores"
    scale = replace(max_, name="scale", about=f"{max_.about}, {quota}")
    return {phase.name: phase for phase in (light, load, max_, scale, mem)}


# -- child processes ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the runner dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Service:
    """A child process in its own session (so its whole tree can be signalled at once)."""

    running: list[Service] = []  # noqa: RUF012 - every live service, for stop_all()

    def __init__(self, name: str, argv: list[str], work: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = work / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cwd = work / "targets" / name  # its own folder: nothing there shadows a package
        cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: the runner starts no threads
            )
        Service.running.append(self)

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants (nginx workers, streamproxy workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM the session, SIGKILL what is left after 10 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self in Service.running:
            Service.running.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for service in list(cls.running):
            service.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str) -> int:
    """The status of `GET path` on 127.0.0.1:port, 0 if it cannot be had."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def wait_ready(service: Service, port: int, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
        if http_status(port, path) == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{service.name} not ready after {timeout:.0f} s:\n{service.log_tail()}")


# -- CPU quota (cgroups) -----------------------------------------------------------------

CFS_PERIOD_US = 100_000  # the kernel's default period, and the one Kubernetes limits use
QUOTA_SLACK = 1.1  # CPU use above quota x wall time x this (+ counting edges): not held
TICK_S = 0.01  # psutil's CPU times (cpu_seconds' fallback) come in ticks (USER_HZ = 100)
QUOTA_BOUND = 0.9  # a target that used this share of its quota or more was held by it
MACHINE_FULL = 0.9  # busy share of all cores above which the machine, not a quota, limits


class CgroupUnavailable(Exception):
    """No cpu cgroup can be made or joined here (the note says why): scale is skipped."""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_version(folder: Path) -> int | None:
    """2 or 1 when cpu cgroups can be made below `folder` with that interface, else None."""
    if "cpu" in _read(folder / "cgroup.controllers").split():
        return 2
    if (folder / "cpu.cfs_quota_us").exists():
        return 1
    return None


def cgroup_parent(chosen: str | None) -> tuple[Path, int]:
    """Where to make the cgroups and their version: `chosen`, else the root of the cgroup
    hierarchy that has the cpu controller (v2 first: on a hybrid layout the unified
    hierarchy usually lacks it, and v1 has it). Raises CgroupUnavailable."""
    if chosen:
        candidates = [Path(chosen)]
    else:
        mounts = [line.split() for line in _read(Path("/proc/self/mounts")).splitlines()]
        candidates = [Path(m[1]) for m in mounts if len(m) > 2 and m[2] == "cgroup2"]
        candidates += [Path(m[1]) for m in mounts if len(m) > 3 and m[2] == "cgroup"]
    for folder in candidates:
        version = cgroup_version(folder)
        if version is not None:
            return folder, version
    where = chosen or "any mounted cgroup hierarchy (see /proc/self/mounts)"
    raise CgroupUnavailable(f"no cpu controller in {where}")


def cpu_stat(folder: Path) -> dict[str, int]:
    """cpu.stat as numbers (v1: nr_periods, nr_throttled, throttled_time in ns;
    v2: usage_usec, nr_periods, nr_throttled, throttled_usec and more)."""
    found: dict[str, int] = {}
    for line in _read(folder / "cpu.stat").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found


class CpuCgroup:
    """A cgroup with a CPU quota: a target's process tree is started in one, and each of
    its worker processes is then moved into one of its own."""

    made: list[CpuCgroup] = []  # noqa: RUF012 - every cgroup not yet removed, for remove_all()

    def __init__(self, parent: Path, version: int, label: str, cores: float):
        """Make `parent/spbench-<pid>-<label>` with a quota of `cores` and check that a
        process can join it. Raises CgroupUnavailable (and leaves nothing behind)."""
        self.version = version
        self.cores = cores
        self.quota_us = max(1000, round(cores * CFS_PERIOD_US))  # the kernel's minimum
        self.path = parent / f"spbench-{os.getpid()}-{label}"
        _remove_stale(parent)
        if version == 2:
            _enable_cpu(parent)
        try:
            self.path.mkdir()
        except OSError as error:
            raise CgroupUnavailable(f"cannot create {self.path}: {error.strerror}") from None
        CpuCgroup.made.append(self)
        try:
            self._set_quota()
            self._check_join()
        except CgroupUnavailable:
            self.remove()
            raise

    def _set_quota(self) -> None:
        if self.version == 2:
            writes = {"cpu.max": f"{self.quota_us} {CFS_PERIOD_US}"}
        else:
            writes = {
                "cpu.cfs_period_us": str(CFS_PERIOD_US),
                "cpu.cfs_quota_us": str(self.quota_us),
            }
        for name, value in writes.items():
            try:
                (self.path / name).write_text(value)
            except OSError as error:
                raise CgroupUnavailable(
                    f"cannot write {value!r} to {self.path / name}: {error.strerror}"
                ) from None

    def _check_join(self) -> None:
        """Joining can fail where making succeeded (v2's delegation rules): try it once
        with a process that exits at once, so a target never starts half-confined."""
        done = subprocess.run(
            [*self.launcher(), "true"], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            raise CgroupUnavailable(f"cannot join {self.path}: {why[0]}")

    def launcher(self) -> list[str]:
        """argv prefix: the shell moves itself into the cgroup, then execs the target, so
        the target and every worker it forks or spawns start inside (no race)."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    def adopt(self, pid: int) -> None:
        """Move a running process (all its threads) into this cgroup. A move after start
        is enough: the quota applies from the next scheduling decision on."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as error:
            raise CgroupUnavailable(
                f"cannot move pid {pid} into {self.path}: {error.strerror}"
            ) from None
        if not self.holds(pid):
            raise CgroupUnavailable(f"pid {pid} is not in {self.path} after moving it there")

    def holds(self, pid: int) -> bool:
        return str(pid) in _read(self.path / "cgroup.procs").split()

    def remove(self) -> None:
        """rmdir the cgroup once its processes are gone (they exit right after a stop;
        what is still listed was started by this runner and is killed by its pid)."""
        deadline = time.monotonic() + 5
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError as error:
                if time.monotonic() > deadline:
                    progress(f"cannot remove {self.path}: {error.strerror}")
                    break
                for pid in _read(self.path / "cgroup.procs").split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.05)
        if self in CpuCgroup.made:
            CpuCgroup.made.remove(self)

    @classmethod
    def remove_all(cls) -> None:
        for cgroup in list(cls.made):
            cgroup.remove()


def _enable_cpu(parent: Path) -> None:
    """v2: a child gets cpu.max only if the parent hands the cpu controller down."""
    control = parent / "cgroup.subtree_control"
    if "cpu" in _read(control).split():
        return
    try:
        control.write_text("+cpu")
    except OSError as error:  # EBUSY: the parent holds processes itself (v2's rule)
        raise CgroupUnavailable(f"cannot enable +cpu in {control}: {error.strerror}") from None


def _remove_stale(parent: Path) -> None:
    """Empty cgroups left by a runner that was SIGKILLed (its pid is in their name)."""
    for folder in parent.glob("spbench-*-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(OSError):
                folder.rmdir()


@dataclass
class Slot:
    """One cgroup of a confined target and the processes in it: a worker, or the parent
    (streamproxy's supervisor and multiprocessing's resource tracker; nginx's master)."""

    role: str  # "worker 1", "worker 2", ..., "supervisor" or "master"
    cgroup: CpuCgroup
    procs: list[psutil.Process]

    @property
    def is_worker(self) -> bool:
        return self.role.startswith("worker")

    def snapshot(self) -> dict[str, float]:
        """cpu.stat and the CPU seconds of the processes in the slot."""
        return {**cpu_stat(self.cgroup.path), "cpu_s": cpu_seconds(self.procs)}


def snapshot(slots: list[Slot]) -> dict[str, Any]:
    """Every slot's counters, and the machine's idle CPU time: a quota that binds and a
    machine that is full (the load generator and upstream share it) look alike otherwise."""
    idle_us = int(psutil.cpu_times().idle * 1e6)
    return {"machine_idle_us": idle_us, "slots": [slot.snapshot() for slot in slots]}


def slot_use(
    slot: Slot, before: dict[str, float], after: dict[str, float], wall_s: float
) -> dict[str, Any]:
    """One cgroup over the measurement: its processes' CPU seconds against quota x wall
    time, and its throttling counters. Held when the CPU seconds are at most QUOTA_SLACK
    x quota x wall time, plus what counting allows without the quota being broken: one
    period's quota (the window starts and ends mid-period, and the budget of the periods
    cut in two can all fall inside it) and two clock ticks per process (psutil truncates
    user and system time to ticks at each end)."""
    delta = {key: after[key] - before.get(key, 0) for key in after}
    cpu_s = delta.pop("cpu_s")
    ns_throttled = delta.get("throttled_time", delta.get("throttled_usec", 0) * 1000)
    cores_used = cpu_s / wall_s if wall_s else None
    of_quota = ratio(cores_used, slot.cgroup.cores)
    edge_s = slot.cgroup.quota_us / 1e6 + 2 * TICK_S * len(slot.procs)
    allowed_s = QUOTA_SLACK * slot.cgroup.cores * wall_s + edge_s
    return {
        "role": slot.role,
        "pids": [proc.pid for proc in slot.procs],
        "cgroup": str(slot.cgroup.path),
        "cores": slot.cgroup.cores,
        "quota_us": slot.cgroup.quota_us,
        "cpu_stat_delta": delta,
        "cgroup_cpu_s": delta["usage_usec"] / 1e6 if "usage_usec" in delta else None,
        "periods": delta.get("nr_periods"),
        "throttled_periods": delta.get("nr_throttled"),
        "throttled_s": ns_throttled / 1e9,
        "cpu_s": cpu_s,
        "cores_used": cores_used,
        "of_quota": of_quota,
        "allowed_cpu_s": allowed_s,
        "held": bool(wall_s) and cpu_s <= allowed_s,
    }


def quota_use(
    slots: list[Slot], before: dict[str, Any], after: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """Did every quota hold over the measurement (each worker's, and the parent's)? Did the
    workers' quotas bind? Throttled periods say so; a machine with no idle CPU left says
    something else set the pace."""
    idle_s = (after["machine_idle_us"] - before["machine_idle_us"]) / 1e6
    used = [
        slot_use(slot, b, a, wall_s)
        for slot, b, a in zip(slots, before["slots"], after["slots"], strict=True)
    ]
    workers = [u for slot, u in zip(slots, used, strict=True) if slot.is_worker]
    shares = [u["of_quota"] for u in workers]
    cores = os.cpu_count() or 1
    return {
        "version": slots[0].cgroup.version,
        "period_us": CFS_PERIOD_US,
        "per_worker_cores": workers[0]["cores"],
        "cores": sum(u["cores"] for u in workers),  # the workers' quotas together
        "cores_used": sum(u["cores_used"] or 0.0 for u in workers),
        "min_of_quota": None if None in shares else min(shares),
        "held": all(u["held"] for u in used),
        "workers": workers,
        "parent": [u for slot, u in zip(slots, used, strict=True) if not slot.is_worker],
        "wall_s": wall_s,
        "machine_busy": max(0.0, 1 - idle_s / (wall_s * cores)) if wall_s else None,
    }


WORKER_MARKS = {  # in the command line of a worker process, not of its parent's other children
    "streamproxy": "--multiprocessing-fork",  # spawned workers; not the resource tracker
    "nginx": "nginx: worker process",  # not the master (nor a cache manager)
}


def worker_processes(target: Target, timeout: float = 10) -> list[psutil.Process]:
    """The processes that do a target's work: a one-worker streamproxy is its own worker;
    otherwise the children of the main process that carry the kind's mark (waits, at most
    `timeout`, until there are as many as the target has workers)."""
    kind, workers = split_workers(target.name)
    if kind == "streamproxy" and workers == 1:
        return target.tree()[:1]
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for proc in target.tree()[1:]:
            with contextlib.suppress(psutil.Error):
                if WORKER_MARKS[kind] in " ".join(proc.cmdline()):
                    found.append(proc)
        if len(found) == workers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if len(found) != workers:
        raise RuntimeError(f"{target.name}: {len(found)} worker processes, not {workers}")
    return found


def confine_workers(
    target: Target, home: CpuCgroup, quota: float, made: list[CpuCgroup]
) -> list[Slot]:
    """Give each worker process of `target` (started in `home`) a cgroup of its own with a
    quota of `quota` cores, as a core of its own would; the parent, idle, stays in `home`.
    A one-worker streamproxy is a single process: `home` is its cgroup. Each cgroup made
    is added to `made` (for removal) as soon as it exists."""
    found = worker_processes(target)
    if found == target.tree()[:1]:
        return [Slot("worker 1", home, found)]
    parent = home.path.parent
    slots = []
    for number, proc in enumerate(found, 1):
        cgroup = CpuCgroup(parent, home.version, f"{target.name}-worker{number}", quota)
        made.append(cgroup)
        cgroup.adopt(proc.pid)
        slots.append(Slot(f"worker {number}", cgroup, [proc]))
    pids = {proc.pid for proc in found}
    rest = [proc for proc in target.tree() if proc.pid not in pids]
    role = "master" if split_workers(target.name)[0] == "nginx" else "supervisor"
    return [*slots, Slot(role, home, rest)]


# -- targets -----------------------------------------------------------------------------


@dataclass
class Target:
    """Where the load generator connects, and the processes whose cost is measured."""

    name: str
    url: str
    service: Service | None  # None for direct: no process of its own

    def tree(self) -> list[psutil.Process]:
        return self.service.tree() if self.service else []

    def stop(self) -> None:
        if self.service:
            self.service.stop()


class Skipped(Exception):
    """A target that cannot run here (the note says why and goes into the table)."""


class TargetDied(RuntimeError):
    """A target's process exited while it was being measured."""


def find_nginx(name: str) -> str | None:
    """The nginx to run: `name` on PATH or as a path, else Debian's /usr/sbin/nginx."""
    found = shutil.which(name)
    if found or name != "nginx":
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def split_workers(name: str) -> tuple[str, int]:
    """A target's kind and worker processes: "streamproxy-w2" -> ("streamproxy", 2)."""
    kind, sep, workers = name.rpartition("-w")
    return (kind, int(workers)) if sep and workers.isdigit() else (name, 1)


def start_target(
    name: str, upstream_port: int, work: Path, nginx: str | None, cgroup: CpuCgroup | None = None
) -> Target:
    """Start one target (inside `cgroup` when given) and wait until it serves.
    Raises Skipped or RuntimeError."""
    upstream = f"http://127.0.0.1:{upstream_port}"
    if name == "direct":
        return Target(name, upstream, None)
    kind, workers = split_workers(name)
    label = name if cgroup is None else f"{name}-quota"  # its own folder and log
    port = free_port()
    folder = work / "targets" / label
    folder.mkdir(parents=True, exist_ok=True)
    prefix = cgroup.launcher() if cgroup else []

    def launch(argv: list[str], env: dict[str, str] | None = None) -> Service:
        return Service(label, [*prefix, *argv], work, env)

    if kind == "nginx":
        if nginx is None:
            raise Skipped("nginx not found (apt-get install nginx, or --nginx PATH)")
        conf = write_nginx_conf(folder, port, upstream_port, workers)
        service = launch([nginx, "-e", "stderr", "-p", str(folder), "-c", str(conf)])
        wait_ready(service, port, "/healthz")
    elif kind == "naive" and workers == 1:
        argv = [sys.executable, str(HERE / "naive_relay.py"), "--upstream", upstream]
        service = launch([*argv, "--port", str(port)])
        wait_ready(service, port, "/healthz")
    elif kind == "streamproxy":
        admin = free_port()
        config = folder / "streamproxy.yaml"
        config.write_text(streamproxy_config(port, admin, upstream))
        argv = [sys.executable, "-m", "streamproxy", "serve", "--config", str(config)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        service = launch(argv, env=clean_env())
        wait_ready(service, admin, "/readyz")
    else:
        raise ValueError(f"unknown target {name!r}")
    return Target(name, f"http://127.0.0.1:{port}", service)


def streamproxy_config(port: int, admin: int, upstream: str) -> str:
    """streamproxy's default config, except loopback ports and the fake upstream."""
    return (
        "# Everything not set here is streamproxy's default (keepalive 15s, metrics on).\n"
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin}}}\n"
        "upstreams:\n"
        f'  - {{name: bench, url: "{upstream}", path_prefix: /}}\n'
    )


def clean_env() -> dict[str, str]:
    """The environment without STREAMPROXY_* overrides: the default config is measured."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STREAMPROXY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }


def write_nginx_conf(folder: Path, port: int, upstream_port: int, workers: int = 1) -> Path:
    """nginx as a streaming reverse proxy, as its docs recommend for SSE."""
    folder.chmod(0o755)  # the worker runs as nobody when nginx starts as root
    for parent in folder.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        with contextlib.suppress(PermissionError):
            parent.chmod(parent.stat().st_mode | 0o055)
    conf = folder / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {folder}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 10000; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream bench {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    return conf


# -- measuring ---------------------------------------------------------------------------


def stolen_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests, summed over this machine's CPUs
    (`steal` in /proc/stat); None where there is no such figure. A round in which the
    proxy's vCPU was taken away for milliseconds shows up in its latency tail."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def steal_share(before: float | None, after: float | None, wall: float) -> float | None:
    """Stolen CPU time as a percentage of all CPUs' time over `wall` seconds."""
    if before is None or after is None or wall <= 0:
        return None
    return (after - before) / (wall * (os.cpu_count() or 1)) * 100


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of these processes (those that still exist), all threads."""
    return sum(process_cpu_seconds(proc) for proc in procs)


def process_cpu_seconds(proc: psutil.Process) -> float:
    """One process's CPU time from its CPU clock (Linux: clock_gettime on
    MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), the scheduler's own count, in ns), else
    from psutil, whose user and system times come in 10 ms ticks: 5 µs per event in
    the light phase's 2,000 events. 0 for a process that is gone."""
    try:
        return time.clock_gettime_ns(((~proc.pid) << 3) | 2) / 1e9
    except (OSError, OverflowError, AttributeError):  # AttributeError: no such clock here
        pass
    try:
        times = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def rss_bytes(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def settle(procs: list[psutil.Process], limit_s: float) -> float:
    """Wait until these processes use < ~5 % of a core (at most limit_s); seconds waited."""
    start = time.monotonic()
    window = 0.3
    while time.monotonic() - start < limit_s:
        before = cpu_seconds(procs)
        time.sleep(window)
        if cpu_seconds(procs) - before <= 0.05 * window:
            break
    return time.monotonic() - start


@dataclass
class Bench:
    """One run: settings, the upstream, and every measurement taken."""

    args: argparse.Namespace
    phases: dict[str, Phase]
    upstream: Service
    upstream_port: int
    work: Path
    nginx: str | None  # the binary, None when not found
    measurements: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what went wrong, for results.md
    scale_skipped: str | None = None  # why the scale phase could not run (not an error)

    def measure(
        self,
        target: Target,
        phase: Phase,
        round_no: int,
        hold: Callable[[], None] | None = None,
        slots: list[Slot] | None = None,
    ) -> dict[str, Any]:
        """Run one phase against one target; record CPU of the target and the harness
        (and, confined, each cgroup's CPU use and throttling over the same window)."""
        spec = phase.spec(target.url, self.args.size, self.args.procs)
        tree, upstream = target.tree(), self.upstream.tree()
        settled = settle(tree + upstream, self.args.settle_s)
        cpu: dict[str, float] = {}
        stat: dict[str, dict[str, int]] = {}
        steal: dict[str, float | None] = {}

        def start() -> None:
            cpu["target"], cpu["upstream"] = cpu_seconds(tree), cpu_seconds(upstream)
            cpu["wall"] = time.monotonic()
            steal["before"] = stolen_seconds()
            if slots:
                stat["before"] = snapshot(slots)

        def end() -> None:
            cpu["target"] = cpu_seconds(tree) - cpu["target"]
            cpu["upstream"] = cpu_seconds(upstream) - cpu["upstream"]
            cpu["wall"] = time.monotonic() - cpu["wall"]
            steal["after"] = stolen_seconds()
            if slots:
                stat["after"] = snapshot(slots)

        result = loadgen.run(spec, on_all_first=hold, on_start=start, on_end=end)
        if target.service is not None and not target.service.alive():
            code, last = target.service.proc.returncode, target.service.log_tail(1)
            raise TargetDied(
                f"{target.name} exited (code {code}) during the {phase.name} phase; "
                f"last log line: {last[:300]}"
            )
        for slot in slots or []:  # a worker restarted meanwhile would run unconfined
            for proc in slot.procs if slot.is_worker else []:
                if not proc.is_running() or not slot.cgroup.holds(proc.pid):
                    raise TargetDied(
                        f"{target.name}: {slot.role} (pid {proc.pid}) exited or left its "
                        f"cgroup during the {phase.name} phase"
                    )
        events = max(result["events"], 1)
        result.update(
            target=target.name,
            phase=phase.name,
            round=round_no,
            settle_s=settled,
            target_cpu_s=cpu["target"] if tree else None,
            wall_s=cpu["wall"],
            cpu_us_per_event=cpu["target"] / events * 1e6 if tree else None,
            upstream_cpu_us_per_event=cpu["upstream"] / events * 1e6,
            loadgen_cpu_us_per_event=result["loadgen_cpu_s"] / events * 1e6,
            steal_pct=steal_share(steal.get("before"), steal.get("after"), cpu["wall"]),
        )
        if phase.name == "max":
            result["busy_after_cut_s"] = settle(tree, self.args.settle_s) if tree else None
        if slots:
            used = quota_use(slots, stat["before"], stat["after"], cpu["wall"])
            result.update(workers=split_workers(target.name)[1], quota=used)
        self.measurements.append(result)
        if phase.name != "mem":
            progress(describe(result))
        return result

    def measure_scaled(self, name: str, parent: Path, version: int) -> None:
        """Start `name` afresh in a cgroup with a CPU quota of Q cores, move each of its
        worker processes into a cgroup of its own at Q, warm it, and run the scale phase.
        Raises CgroupUnavailable, Skipped or RuntimeError."""
        quota = self.args.scale_quota
        made = [CpuCgroup(parent, version, name, quota)]
        try:
            target = start_target(name, self.upstream_port, self.work, self.nginx, made[0])
            try:
                slots = confine_workers(target, made[0], quota, made)
                warm_up(target)
                result = self.measure(target, self.phases["scale"], 1, slots=slots)
            finally:
                target.stop()
        finally:
            for cgroup in reversed(made):
                cgroup.remove()
        used = result["quota"]
        each = ", ".join(
            f"{u['role']} {fmt(u['cores_used'], 2)} ({fmt(u['of_quota'], 2)} of it, throttled "
            f"in {u['throttled_periods']}/{u['periods']} periods)"
            for u in used["workers"] + used["parent"]
        )
        progress(f"{name} scale: quota {quota:g} cores per worker; used: {each}")

    def measure_memory(self, name: str) -> dict[str, Any]:
        """Start `name` afresh, warm it, then hold idle streams and sample RSS."""
        target = start_target(name, self.upstream_port, self.work, self.nginx)
        try:
            warm_up(target)
            tree = target.tree()
            settle(tree, self.args.settle_s)
            baseline = rss_bytes(tree)
            held: dict[str, int] = {}

            def sample() -> None:
                held["rss"] = rss_bytes(tree)
                time.sleep(1.0)
                held["rss_1s_later"] = rss_bytes(tree)

            result = self.measure(target, self.phases["mem"], 0, hold=sample)
        finally:
            target.stop()
        streams = max(result["events"], 1)  # each held stream got exactly one event
        result.update(
            rss_baseline=baseline,
            rss_held=held.get("rss"),
            rss_held_1s_later=held.get("rss_1s_later"),
            rss_per_stream_kib=(held["rss"] - baseline) / streams / 1024 if held else None,
        )
        errors = sum(result["errors"].values())
        progress(
            f"{name} mem: {result['events']} idle streams, {fmt(result['rss_per_stream_kib'], 1)}"
            f" KiB each, TTFB p99 {result['ttfb_ms']['p99']:.1f} ms, errors {errors}"
        )
        return result


def warm_up(target: Target) -> None:
    """A few short streams: imports, pools and caches are warm before anything counts."""
    spec = LoadSpec(url=target.url, streams=20, events=5, interval_ms=5, ramp_s=0.05)
    result = loadgen.run(spec)
    if result["ok"] != spec.streams:
        raise RuntimeError(f"{target.name}: warm-up failed: {result['errors']}")


def describe(result: dict[str, Any]) -> str:
    cpu = result["cpu_us_per_event"]
    errors = sum(result["errors"].values())
    where = f"round {result['round']} " if result["phase"] in ("light", "load") else ""
    return (
        f"{where}{result['target']} {result['phase']}: "
        f"{result['events_per_s']:.0f} ev/s, p50 {result['latency_ms']['p50']:.3f} ms, "
        f"p99 {result['latency_ms']['p99']:.3f} ms, TTFB p99 {result['ttfb_ms']['p99']:.3f} ms, "
        f"CPU {'-' if cpu is None else f'{cpu:.1f}'} us/ev, errors {errors}, "
        f"exact {'yes' if result['byte_exact'] else 'NO'}, "
        f"steal {fmt(result.get('steal_pct'), 1)} %"
    )


def progress(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- the run -----------------------------------------------------------------------------


def run_all(bench: Bench, names: list[str]) -> dict[str, str]:
    """Every phase against every target; returns the targets not measured and why."""
    not_run: dict[str, str] = {}
    targets: list[Target] = []
    for name in names:
        try:
            target = start_target(name, bench.upstream_port, bench.work, bench.nginx)
            warm_up(target)
        except Skipped as why:
            not_run[name] = f"skipped: {why}"
            progress(f"{name}: {not_run[name]}")
            continue
        except RuntimeError as error:
            last = str(error).strip().splitlines()[-1]
            not_run[name] = f"FAILED to start (logs/{name}.log in the work folder): {last}"
            progress(f"{name}: {error}")
            continue
        targets.append(target)
        progress(f"{name}: ready at {target.url}")
    dead: set[str] = set()

    def attempt(name: str, step: Callable[[], object]) -> None:
        """Run one measurement; a target that dies is noted and measured no further."""
        if name not in dead:
            try:
                step()
            except RuntimeError as error:  # TargetDied, or no fresh start for mem
                dead.add(name)
                bench.notes.append(f"{name}: {error}".splitlines()[0])
                progress(f"{name}: {error}")

    wanted = bench.args.phases
    for round_no in range(1, bench.args.rounds + 1):
        for target in targets if round_no % 2 else targets[::-1]:
            for phase in ("light", "load"):
                if phase in wanted:
                    attempt(
                        target.name, partial(bench.measure, target, bench.phases[phase], round_no)
                    )
    if "max" in wanted:
        for target in targets:
            attempt(target.name, partial(bench.measure, target, bench.phases["max"], 1))
    for target in targets:
        target.stop()
    if "scale" in wanted:
        run_scale(bench, scale_targets([t.name for t in targets]), attempt)
    if "mem" in wanted:
        for target in targets:
            if target.service is not None:
                attempt(target.name, partial(bench.measure_memory, target.name))
    return not_run


SCALE_KINDS = ("streamproxy", "nginx")  # the targets whose workers scale is measured


def scale_targets(started: list[str]) -> list[str]:
    """The scale phase's runs: 1 and 2 workers of each kind among the started targets."""
    kinds = {split_workers(name)[0] for name in started}
    return [name for kind in SCALE_KINDS if kind in kinds for name in (kind, f"{kind}-w2")]


def run_scale(
    bench: Bench, names: list[str], attempt: Callable[[str, Callable[[], object]], None]
) -> None:
    """The scale phase; where no cpu cgroup can be had it is skipped with a note."""
    if not names:
        return
    try:
        parent, version = cgroup_parent(bench.args.scale_cgroup_parent)
        for name in names:
            # a target that fails is noted under its own name + " scale", so its other
            # phases still run; a cgroup that cannot be made ends the phase
            attempt(f"{name} scale", partial(bench.measure_scaled, name, parent, version))
    except CgroupUnavailable as why:
        bench.scale_skipped = str(why)
        progress(f"scale phase skipped: {why}")


# -- aggregation -------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    """The middle round. On a shared VM a round in which the hypervisor took the CPU away
    for milliseconds moves that round's tail by as much, for every target (nginx's too);
    the median keeps each round's p99 whole and lets no single such round decide."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


FIGURES: dict[str, Callable[[dict[str, Any]], float]] = {
    "p50": lambda m: m["latency_ms"]["p50"],
    "p99": lambda m: m["latency_ms"]["p99"],
    "ttfb_p50": lambda m: m["ttfb_ms"]["p50"],
    "ttfb_p99": lambda m: m["ttfb_ms"]["p99"],
}


def aggregate(measurements: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per target: each figure's median over rounds; `added_*` = target - direct, per round
    (each round's values are kept too, as `*_rounds`)."""
    direct = {(m["phase"], m["round"]): m for m in measurements if m["target"] == "direct"}
    summaries: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [m for m in measurements if m["target"] == name]
        if not mine:
            continue
        s: dict[str, Any] = {}
        for phase in ("light", "load"):
            runs = [m for m in mine if m["phase"] == phase]
            s[f"{phase}_cpu_us"] = median([m["cpu_us_per_event"] for m in runs])
            s[f"{phase}_events_per_s"] = median([m["events_per_s"] for m in runs])
            s[f"{phase}_upstream_cpu_us"] = median([m["upstream_cpu_us_per_event"] for m in runs])
            s[f"{phase}_loadgen_cpu_us"] = median([m["loadgen_cpu_us_per_event"] for m in runs])
            s[f"{phase}_steal_pct"] = median([m.get("steal_pct") for m in runs])
            for key, get in FIGURES.items():
                s[f"{phase}_{key}"] = median([get(m) for m in runs])
                added: list[float | None] = [
                    get(m) - get(direct[phase, m["round"]])
                    for m in runs
                    if (phase, m["round"]) in direct
                ]
                if name != "direct":
                    s[f"{phase}_added_{key}"] = median(added)
                    s[f"{phase}_added_{key}_rounds"] = added
                else:
                    s[f"{phase}_added_{key}"] = None
            if runs:  # the CDF: quantiles averaged over rounds
                s[f"{phase}_cdf_ms"] = [
                    round(sum(q) / len(q), 4)
                    for q in zip(*(m["latency_cdf_ms"] for m in runs), strict=True)
                ]
        for m in mine:
            if m["phase"] == "max":
                s["max_events_per_s"] = m["events_per_s"]
                s["max_cpu_us"] = m["cpu_us_per_event"]
                s["busy_after_cut_s"] = m["busy_after_cut_s"]
            if m["phase"] == "mem":
                s["rss_per_stream_kib"] = m["rss_per_stream_kib"]
                s["rss_baseline_mib"] = m["rss_baseline"] / 2**20
                s["rss_held_mib"] = (m["rss_held"] or 0) / 2**20
                s["mem_streams"] = m["events"]
        errors: dict[str, int] = {}
        for m in mine:
            for reason, count in m["errors"].items():
                key = f"{m['phase']}: {reason}"
                errors[key] = errors.get(key, 0) + count
        s["errors"] = errors
        s["byte_exact"] = all(m["byte_exact"] for m in mine)
        s["not_exact"] = sum(m["not_exact"] for m in mine)
        s["out_of_order"] = sum(m["out_of_order"] for m in mine)
        s["keepalives"] = sum(m["keepalives"] for m in mine)
        summaries[name] = s
    nginx, naive = summaries.get("nginx", {}), summaries.get("naive", {})
    for s in summaries.values():
        s["cpu_x_nginx"] = ratio(s.get("load_cpu_us"), nginx.get("load_cpu_us"))
        s["max_x_naive"] = ratio(s.get("max_events_per_s"), naive.get("max_events_per_s"))
    return summaries


def scaling(bench: Bench) -> dict[str, Any]:
    """The scale phase: a row per run, events/s with 2 workers over 1 per kind, and notes
    where a quota did not hold or a worker's did not bind."""
    rows, notes = [], []
    for m in bench.measurements:
        if m["phase"] != "scale":
            continue
        used = m["quota"]
        workers, parent = used["workers"], used["parent"]
        rows.append(
            {
                "target": m["target"],
                "workers": m["workers"],
                "quota_per_worker_cores": used["per_worker_cores"],
                "quota_cores": used["cores"],  # the workers' quotas together
                "events_per_s": m["events_per_s"],
                "errors": sum(m["errors"].values()),
                "byte_exact": m["byte_exact"],
                "upstream_cpu_us_per_event": m["upstream_cpu_us_per_event"],
                "loadgen_cpu_us_per_event": m["loadgen_cpu_us_per_event"],
                "cores_used": used["cores_used"],  # the workers' together
                "min_of_quota": used["min_of_quota"],
                "held": used["held"],  # every cgroup's quota, the parent's too
                "worker_cores_used": [u["cores_used"] for u in workers],
                "worker_of_quota": [u["of_quota"] for u in workers],
                "worker_periods": [u["periods"] for u in workers],
                "worker_throttled_periods": [u["throttled_periods"] for u in workers],
                "worker_cgroup_cpu_s": [u["cgroup_cpu_s"] for u in workers],
                "parent_cores_used": sum(u["cores_used"] or 0.0 for u in parent)
                if parent
                else None,
                "cgroups": [u["cgroup"] for u in workers + parent],
                "version": used["version"],
                "machine_busy": used["machine_busy"],
            }
        )
        for u in workers + parent:
            if not u["held"]:
                notes.append(
                    f"{m['target']} {u['role']}: used {fmt(u['cores_used'], 2)} cores, "
                    f"{fmt(u['of_quota'], 2)}x its quota of {u['cores']:g}: "
                    "the quota did not hold"
                )
        spare = [u for u in workers if (u["of_quota"] or 0.0) < QUOTA_BOUND]
        if spare:
            who = " and ".join(u["role"] for u in spare)
            notes.append(f"{m['target']} ({who}): {unbound(used)}")
    eps = {row["target"]: row["events_per_s"] for row in rows}
    return {
        "ran": bool(rows),
        "skipped": bench.scale_skipped,
        "quota_per_worker_cores": bench.args.scale_quota,
        "rows": rows,
        "w2_x_w1": {k: ratio(eps.get(f"{k}-w2"), eps.get(k)) for k in SCALE_KINDS if k in eps},
        "notes": notes,
    }


def machine_bound(used: dict[str, Any]) -> bool:
    """A worker left quota over while the machine was full: the quotas did not set the
    figure."""
    spare = (used["min_of_quota"] or 0.0) < QUOTA_BOUND
    return spare and (used["machine_busy"] or 0.0) >= MACHINE_FULL


def unbound(used: dict[str, Any]) -> str:
    """Why workers that left part of their quota unused went no faster."""
    busy, share = used["machine_busy"] or 0.0, used["min_of_quota"] or 0.0
    if machine_bound(used):
        return (
            f"a worker used {share:.0%} of its quota while the machine was {busy:.0%} busy "
            f"(load generator, upstream and target share its {os.cpu_count()} cores): the "
            "machine, not the quotas, set this figure; a smaller --scale-quota leaves it room"
        )
    return (
        f"a worker used {share:.0%} of its quota with the machine {busy:.0%} busy: its limit "
        "was its own, or a single-process load generator or upstream at a full core"
    )


@dataclass
class Check:
    """One of the issue's targets, judged on this run."""

    goal: str
    measured: str
    passed: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def of_rounds(values: list[float | None] | None) -> str:
    """' (median of rounds at a, b, c ms)' for a check's detail; '' for one round."""
    if not values or len(values) < 2:
        return ""
    return f" (median of rounds at {', '.join(fmt(v, 1) for v in values)} ms)"


# Above this share of all CPUs (the median load round of streamproxy or of direct), the
# hypervisor, not the target, set the latency tails: on the 2-core VM of 2026-12-02 the idle
# machine showed 0.5-2.5 %, and in a run whose load rounds had 5-49 % nginx's own +p99
# reached 20 ms in one round and direct's tail exceeded the proxies' in others. A coarse
# screen: a 30 ms stall is under 1 % of a round, so calm-looking runs still vary (nginx,
# under the same checks, is told beside each latency figure as the control).
STEAL_LIMIT_PCT = 5.0


def undisturbed(check: Check, stolen: tuple[float, str] | None) -> Check:
    """The latency check, or "inconclusive" (either way, with what it would have said) when
    `stolen`, (steal %, whose median load round), is over the limit."""
    if stolen is None or stolen[0] <= STEAL_LIMIT_PCT or check.passed is None:
        return check
    pct, whose = stolen
    why = (
        f"inconclusive (it would be {check.verdict}): the hypervisor took {pct:.1f} % of the "
        f"CPUs in {whose}'s median load round (over {STEAL_LIMIT_PCT:g} %)"
    )
    return Check(check.goal, f"{why}: {check.measured}", None)


def most_stolen(s: dict[str, dict[str, Any]], names: tuple[str, ...]) -> tuple[float, str] | None:
    """The highest median-round steal among these targets, and whose it was."""
    found = [
        (s[n]["load_steal_pct"], n) for n in names if s.get(n, {}).get("load_steal_pct") is not None
    ]
    return max(found, default=None)


def worst_ttfb(summary: dict[str, Any]) -> float | None:
    """The worse of a target's added TTFB p99 at ~1k and at ~10k events/s (None unless both)."""
    both = [summary.get("light_added_ttfb_p99"), summary.get("load_added_ttfb_p99")]
    return None if None in both else max(v for v in both if v is not None)


def control(value: float | None, label: str) -> str:
    """'; nginx 0.4 ms' after a latency figure: the same check, on nginx in the same run."""
    return "" if value is None else f"; {label} {fmt(value, 3)} ms"


def judge(goal: str, value: float | None, limit: float, at_most: bool, detail: str) -> Check:
    """A Check: `value` against `limit` (at most or at least); n/a when not measured."""
    if value is None:
        return Check(goal, "not measured in this run", None)
    return Check(goal, detail, value <= limit if at_most else value >= limit)


def checks(s: dict[str, dict[str, Any]], scale: dict[str, Any]) -> list[Check]:
    """The issue #6 targets for streamproxy (default config, one worker)."""
    sp, w2 = s.get("streamproxy", {}), s.get("streamproxy-w2", {})
    nginx, naive = s.get("nginx", {}), s.get("naive", {})
    cpu, cpu_nginx = sp.get("load_cpu_us"), nginx.get("load_cpu_us")
    cpu_x = ratio(cpu, cpu_nginx)
    p99 = sp.get("load_added_p99")
    ttfb = [sp.get("light_added_ttfb_p99"), sp.get("load_added_ttfb_p99")]
    eps, eps_naive, eps_w2 = (t.get("max_events_per_s") for t in (sp, naive, w2))
    max_x, w2_x = ratio(eps, eps_naive), ratio(eps_w2, eps)
    rss = sp.get("rss_per_stream_kib")
    steal = most_stolen(s, ("streamproxy", "direct"))
    found = [
        judge(
            "CPU per relayed event at ~10k ev/s <= 3x nginx's",
            cpu_x,
            3,
            True,
            f"{fmt(cpu, 1)} us vs {fmt(cpu_nginx, 1)} us = {fmt(cpu_x, 2)}x",
        ),
        undisturbed(
            judge(
                "added delivery latency p99 at ~10k ev/s <= 5 ms",
                p99,
                5,
                True,
                f"{fmt(p99, 3)} ms{of_rounds(sp.get('load_added_p99_rounds'))}"
                f"{control(nginx.get('load_added_p99'), 'nginx')}",
            ),
            steal,
        ),
        undisturbed(
            judge(
                "added TTFB p99 <= 5 ms (at ~1k and at ~10k ev/s)",
                worst_ttfb(sp),
                5,
                True,
                f"{fmt(ttfb[0], 3)} ms at ~1k{of_rounds(sp.get('light_added_ttfb_p99_rounds'))}"
                f", {fmt(ttfb[1], 3)} ms at ~10k"
                f"{of_rounds(sp.get('load_added_ttfb_p99_rounds'))}"
                f"{control(worst_ttfb(nginx), 'nginx (the worse of the two)')}",
            ),
            steal,
        ),
        judge(
            "max events/s on one worker >= 2x the Starlette+httpx relay's",
            max_x,
            2,
            False,
            f"{fmt(eps, 0)} vs {fmt(eps_naive, 0)} = {fmt(max_x, 2)}x",
        ),
        judge(
            f"RSS per idle open stream <= 25 KiB ({sp.get('mem_streams', '?')} streams)",
            rss,
            25,
            True,
            f"{fmt(rss, 1)} KiB",
        ),
        workers_check(
            scale, None if w2_x is None else f"{fmt(eps_w2, 0)} vs {fmt(eps, 0)} = {fmt(w2_x, 2)}x"
        ),
    ]
    for name in ("streamproxy", "streamproxy-w2"):
        if name in s:
            clean = s[name]["byte_exact"] and not s[name]["errors"]
            goal = f"{name}: every event byte-exact and in order, no stream errors"
            errors = sum(s[name]["errors"].values())
            found.append(Check(goal, f"byte-exact {exactness(s[name])}, {errors} errors", clean))
    return found


def workers_check(scale: dict[str, Any], unconfined: str | None) -> Check:
    """--workers 2 vs 1, each worker in a cgroup of its own with a quota of Q cores: as
    if each had a core of its own, so the figure is the proxy's, not the share of the
    cores that the load generator and the upstream leave it. n/a (with why) when the scale
    phase did not run or a quota did not hold, inconclusive when a full machine kept a
    worker below its quota. The unconfined max-phase ratio, when measured, is told
    alongside."""
    q = scale["quota_per_worker_cores"]
    goal = (
        "--workers 2 carries about twice the events/s of one worker (>= 1.7x; each worker "
        f"in its own cgroup with a CPU quota of {q:g} core)"
    )
    rows = {row["target"]: row for row in scale["rows"]}
    w1, w2 = rows.get("streamproxy"), rows.get("streamproxy-w2")
    shared = f"{os.cpu_count()} cores shared with loadgen and upstream"
    also = f"; unconfined max phase on {shared}: {unconfined}" if unconfined else ""
    if scale["skipped"] or w1 is None or w2 is None:
        why = scale["skipped"] or "the scale phase did not run for both (see --phases, --targets)"
        return Check(goal, f"not measured: {why}{also}", None)
    x = scale["w2_x_w1"]["streamproxy"]
    held = "every quota held" if w1["held"] and w2["held"] else "a quota NOT held (see the notes)"
    detail = f"{fmt(w2['events_per_s'], 0)} vs {fmt(w1['events_per_s'], 0)} = {fmt(x, 2)}x, {held}"
    for row, label in ((w1, "1 worker"), (w2, "2 workers")):
        if (row["min_of_quota"] or 0.0) < QUOTA_BOUND:  # budget left (see the notes)
            shares = "/".join(fmt((v or 0.0) * 100, 0) for v in row["worker_of_quota"])
            busy = fmt((row["machine_busy"] or 0.0) * 100, 0)
            detail += f"; {label}: {shares}% of the quota used, machine {busy}% busy"
    verdict = judge(goal, x, 1.7, False, detail + also)
    if not (w1["held"] and w2["held"]):  # a worker ran beyond its budget: no verdict on it
        return Check(goal, f"not valid, a quota did not hold: {detail}{also}", None)
    # a full machine held workers below their quota: 2 workers' figure is then a lower
    # bound, too low to fail them on; 1 worker's, too low to pass them on (a smaller
    # --scale-quota can tell)
    if (verdict.passed is False and machine_bound(w2)) or (verdict.passed and machine_bound(w1)):
        return Check(goal, f"inconclusive, the machine was the limit: {detail}{also}", None)
    return verdict


# -- the report --------------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if digits == 0 else f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def exactness(s: dict[str, Any]) -> str:
    if s["byte_exact"]:
        return "yes"
    return f"NO ({s['not_exact']} altered, {s['out_of_order']} out of order)"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(
    meta: dict[str, Any],
    summaries: dict[str, dict[str, Any]],
    not_run: dict[str, str],
    verdicts: list[Check],
    phases_: dict[str, Phase],
    problems: list[str],
    scale: dict[str, Any],
    measurements: list[dict[str, Any]],
) -> str:
    """results.md: the main table, the absolute figures, the scaling table, the target
    checks, notes."""
    names = meta["targets"]
    main_rows, abs_rows = [], []
    for name in names:
        if name in not_run or name not in summaries:
            why = not_run.get(name, "not measured (see the notes)")
            main_rows.append([name, why] + ["-"] * 15)
            continue
        s = summaries[name]
        errors = sum(s["errors"].values())
        main_rows.append(
            [
                name,
                fmt(s.get("load_cpu_us"), 1),
                fmt_ratio(s.get("cpu_x_nginx")),
                fmt(s.get("light_added_p50"), 3),
                fmt(s.get("light_added_p99"), 3),
                fmt(s.get("load_added_p50"), 3),
                fmt(s.get("load_added_p99"), 3),
                fmt(s.get("light_added_ttfb_p50"), 3),
                fmt(s.get("light_added_ttfb_p99"), 3),
                fmt(s.get("load_added_ttfb_p50"), 3),
                fmt(s.get("load_added_ttfb_p99"), 3),
                fmt(s.get("max_events_per_s"), 0),
                fmt_ratio(s.get("max_x_naive")),
                fmt(s.get("rss_per_stream_kib"), 1),
                str(errors),
                exactness(s),
            ]
        )
        abs_rows.append(
            [
                name,
                fmt(s.get("light_p50"), 3),
                fmt(s.get("light_p99"), 3),
                fmt(s.get("load_p50"), 3),
                fmt(s.get("load_p99"), 3),
                fmt(s.get("load_ttfb_p50"), 3),
                fmt(s.get("load_ttfb_p99"), 3),
                fmt(s.get("load_events_per_s"), 0),
                fmt(s.get("light_cpu_us"), 1),
                fmt(s.get("max_cpu_us"), 1),
                fmt(s.get("busy_after_cut_s"), 1),
                fmt(s.get("rss_baseline_mib"), 1),
                fmt(s.get("rss_held_mib"), 1),
                fmt(s.get("load_upstream_cpu_us"), 1),
                fmt(s.get("load_loadgen_cpu_us"), 1),
            ]
        )
    main = table(
        [
            "target",
            "CPU µs/event @10k",
            "vs nginx",
            "+p50 @1k ms",
            "+p99 @1k ms",
            "+p50 @10k ms",
            "+p99 @10k ms",
            "+TTFB p50 @1k ms",
            "+TTFB p99 @1k ms",
            "+TTFB p50 @10k ms",
            "+TTFB p99 @10k ms",
            "max events/s",
            "vs naive",
            "RSS/idle stream KiB",
            "errors",
            "byte-exact",
        ],
        main_rows,
    )
    absolute = table(
        [
            "target",
            "p50 @1k ms",
            "p99 @1k ms",
            "p50 @10k ms",
            "p99 @10k ms",
            "TTFB p50 @10k ms",
            "TTFB p99 @10k ms",
            "events/s @10k",
            "CPU µs/event @1k",
            "CPU µs/event @max",
            "busy after cut s",
            "RSS base MiB",
            "RSS held MiB",
            "upstream µs/event @10k",
            "loadgen µs/event @10k",
        ],
        abs_rows,
    )
    m = meta["machine"]
    lines = [
        f"# streamproxy benchmark, {meta['started']}" + (" (quick)" if meta["quick"] else ""),
        "",
        f"`{meta['command']}` took {meta['runtime_s']:.0f} s; {meta['rounds']} round(s), "
        "targets in alternating order.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['os']}, "
        f"Python {m['python']}, {m['nginx'] or 'no nginx'}, streamproxy {m['streamproxy']} "
        f"({m['commit']}); load average at start {m['loadavg_at_start']}.",
        "",
        "Phases: "
        + "; ".join(f"**{p.name}** {p.about}" for p in phases_.values())
        + f"; events of {meta['event_size']} bytes.",
        "Every figure in the tables is the median over rounds (the plot averages the rounds' "
        "quantiles); `+` figures are the target's percentile minus direct's in the same "
        "round (each load round is listed below the tables), so a `+p99` can come out below "
        "a `+p50`. CPU counts the target's whole process tree only.",
        "",
        main,
        "",
        "Absolute figures (ms; median over rounds):",
        "",
        absolute,
        "",
        *rounds_section(measurements),
        *scale_section(scale),
        "## Targets (issue #6; streamproxy, default config)",
        "",
    ]
    lines += [f"- **{c.verdict}** {c.goal}: {c.measured}" for c in verdicts]
    notes = [f"- {name}: {why}" for name, why in not_run.items()]
    notes += [f"- {problem}" for problem in problems]
    for name, s in summaries.items():
        if s["errors"]:
            detail = ", ".join(f"{k} x{v}" for k, v in s["errors"].items())
            notes.append(f"- {name} stream errors: {detail}")
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "![delivery latency CDF](latency-cdf.png)", ""]
    return "\n".join(lines)


def rounds_section(measurements: list[dict[str, Any]]) -> list[str]:
    """results.md's lines on the load phase round by round: how far each round's tail
    moved, beside the CPU time the hypervisor stole from the machine meanwhile."""
    load = [m for m in measurements if m["phase"] == "load"]
    direct = {m["round"]: m for m in load if m["target"] == "direct"}
    rows = []
    for m in sorted(load, key=lambda m: (m["round"], m["target"])):
        base = direct.get(m["round"]) if m["target"] != "direct" else None
        p99 = m["latency_ms"]["p99"]
        rows.append(
            [
                str(m["round"]),
                m["target"],
                fmt(p99, 2),
                "-" if base is None else fmt(p99 - base["latency_ms"]["p99"], 2),
                fmt(m["ttfb_ms"]["p99"], 2),
                fmt(m["cpu_us_per_event"], 1),
                fmt(m.get("steal_pct"), 1),
            ]
        )
    if not rows:
        return []
    header = ["round", "target", "p99 ms", "+p99 ms", "TTFB p99 ms", "CPU µs/event", "steal %"]
    return [
        "The load phase round by round (steal: CPU time the hypervisor gave to other "
        "guests while the round ran; a round's latency tail moves with it):",
        "",
        table(header, rows),
        "",
    ]


def scale_section(scale: dict[str, Any]) -> list[str]:
    """results.md's lines on the scale phase: its table, or why it was skipped."""
    q = scale["quota_per_worker_cores"]
    head = [
        "Scaling under CPU quotas (**scale**: the max phase's load against a target started "
        f"afresh, each worker process in a cgroup of its own with a CPU quota of {q:g} cores, "
        "the parent in one more; the figures above are without a quota):",
        "",
    ]
    if scale["skipped"]:
        return [*head, f"Skipped: {scale['skipped']}.", ""]
    if not scale["rows"]:
        return []

    def each(values: list[Any], digits: int) -> str:
        return " / ".join(fmt(v, digits) for v in values)

    rows = [
        [
            row["target"],
            str(row["workers"]),
            f"{row['quota_per_worker_cores']:g}",
            fmt(row["events_per_s"], 0),
            fmt_ratio(scale["w2_x_w1"].get(split_workers(row["target"])[0]))
            if row["workers"] > 1
            else "-",
            each(row["worker_cores_used"], 2),
            each(row["worker_of_quota"], 2),
            " / ".join(
                f"{t}/{n}"
                for t, n in zip(row["worker_throttled_periods"], row["worker_periods"], strict=True)
            ),
            fmt(row["parent_cores_used"], 2),
            "yes" if row["held"] else "NO",
            fmt(row["upstream_cpu_us_per_event"], 1),
            fmt(row["loadgen_cpu_us_per_event"], 1),
            str(row["errors"]),
            "yes" if row["byte_exact"] else "NO",
        ]
        for row in scale["rows"]
    ]
    header = ["target", "workers", "quota cores per worker", "events/s", "vs 1 worker"]
    header += ["CPU used cores per worker", "of quota per worker", "throttled periods per worker"]
    header += ["parent cores", "quotas held", "upstream µs/event", "loadgen µs/event"]
    header += ["errors", "byte-exact"]
    notes = [f"- {note}" for note in scale["notes"]]
    return [*head, table(header, rows), "", *notes, *([""] if notes else [])]


def plot_cdf(summaries: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Delivery-latency CDF per target at ~10k events/s (the load phase), log x-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, s in summaries.items():
        cdf = s.get("load_cdf_ms") or s.get("light_cdf_ms")
        if cdf:
            ax.step([max(v, 1e-3) for v in cdf], CDF_QUANTILES, where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("delivery latency, ms (log scale)")
    ax.set_ylabel("fraction of events delivered within")
    ax.set_ylim(0, 1.005)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------


def machine(nginx: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx_version = None
    if nginx:
        done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        nginx_version = done.stderr.strip().removeprefix("nginx version: ")
    commit = subprocess.run(
        ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    from streamproxy import __version__

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "os": platform.platform(),
        "python": platform.python_version(),
        "nginx": nginx_version,
        "streamproxy": __version__,
        "commit": commit or "unknown",
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def default_scale_quota() -> float:
    """Q: half a core, less on a machine under 4 cores, so that 2 workers (2Q) leave the
    load generator and the upstream the rest (about 1-1.3 cores at the max load)."""
    return min(0.5, (os.cpu_count() or 1) / 8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test of a few seconds")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<date>)")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list")
    parser.add_argument("--phases", default="light,load,max,scale,mem", help="comma list")
    parser.add_argument("--rounds", type=int, help="rounds of light+load (default 5, quick 1)")
    parser.add_argument("--size", type=int, default=256, help="bytes per SSE event")
    parser.add_argument("--procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--upstream-procs", type=int, default=1, help="fake upstream processes")
    parser.add_argument("--mem-streams", type=int, help="idle streams (default 1000, quick 50)")
    parser.add_argument("--settle-s", type=float, help="max wait for idle (default 10, quick 3)")
    parser.add_argument("--work-dir", help="configs and server logs (default: a new temp dir)")
    parser.add_argument("--nginx", default="nginx", help="nginx binary (name on PATH or path)")
    parser.add_argument(
        "--scale-quota",
        type=float,
        help="scale: CPU quota in cores of each worker's own cgroup (default min(0.5, cores/8): "
        "0.25 on 2 cores, 0.5 from 4 on; the 2-worker run takes 2x this, the load generator "
        "and the upstream the rest)",
    )
    parser.add_argument(
        "--scale-cgroup-parent",
        help="scale: make the cgroups in this folder (default: the cpu controller's root)",
    )
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = [t for t in args.targets if t not in ALL_TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {ALL_TARGETS}")
    if args.scale_quota is None:
        args.scale_quota = default_scale_quota()
    if args.scale_quota < 0.01:
        parser.error("--scale-quota is at least 0.01 (the kernel's smallest quota is 1 ms)")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.settle_s is None:
        args.settle_s = 3.0 if args.quick else 10.0
    return args


def _exit_on_sigterm(signum: int, _: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every child


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nginx = find_nginx(args.nginx)
    started = dt.datetime.now().astimezone()
    out = Path(args.out) if args.out else HERE / "results" / started.strftime("%Y-%m-%d")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="spbench-"))
    work.mkdir(parents=True, exist_ok=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 streams, 2 fds each
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with `&`
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    progress(f"work folder (configs, server logs): {work}")
    all_phases = phases(args.quick, args.mem_streams)
    try:
        port = free_port()
        argv_up = [sys.executable, str(HERE / "upstream.py"), "--port", str(port)]
        upstream = Service("upstream", [*argv_up, "--procs", str(args.upstream_procs)], work)
        wait_ready(upstream, port, "/healthz")
        bench = Bench(args, all_phases, upstream, port, work, nginx)
        not_run = run_all(bench, args.targets)
    except (KeyboardInterrupt, SystemExit):
        progress("interrupted: stopping every process started")
        raise
    finally:
        Service.stop_all()
        CpuCgroup.remove_all()  # after the processes: a cgroup with members cannot go
    runtime = time.monotonic() - T0
    summaries = aggregate(bench.measurements, args.targets)
    scale = scaling(bench)
    verdicts = checks(summaries, scale)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "runtime_s": runtime,
        "command": command.strip(),
        "quick": args.quick,
        "rounds": args.rounds,
        "event_size": args.size,
        "targets": args.targets,
        "machine": machine(nginx),
        "work_dir": str(work),
    }
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "meta": meta,
        "phases": {name: vars(phase) for name, phase in all_phases.items()},
        "not_run": not_run,
        "notes": bench.notes,
        "summaries": summaries,
        "scaling": scale,
        "checks": [vars(c) | {"verdict": c.verdict} for c in verdicts],
        "measurements": bench.measurements,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = render(
        meta, summaries, not_run, verdicts, all_phases, bench.notes, scale, bench.measurements
    )
    (out / "results.md").write_text(markdown)
    load = all_phases["load"]
    plot_cdf(summaries, out / "latency-cdf.png", f"Delivery latency, {load.about.split(', ')[0]}")
    print(markdown)
    progress(f"wrote {out}/results.md, results.json, latency-cdf.png")
    failed = bench.notes or any(why.startswith("FAILED") for why in not_run.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
