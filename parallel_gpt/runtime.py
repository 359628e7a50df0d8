"""Process setup: host settings made before JAX starts, the process group of a multi-host
run, and what keeps its processes in step: agreement checks, broadcasts, a watchdog.

Order matters: `keep_freed_memory` and `start_processes` (`jax.distributed.initialize`)
must run before any other JAX call, even `jax.devices()`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
import typing
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

from parallel_gpt import fatal_filter, files
from parallel_gpt.errors import EXIT_PEER, ProcessSetupError

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    XLA:CPU allocates the buffers of every step anew: tens of megabytes of activations and
    gradients at the shapes we train on a CPU. By default glibc serves such blocks with
    mmap, or from per-thread heaps that it unmaps once empty, so each step touches fresh
    pages and the kernel zeroes them in page faults. This setting keeps one heap, no mmap,
    no trimming below 2 GiB (README, Performance, has the step times with and without).
    The costs: the memory of the largest step stays with the process, and compiling is
    slower with every thread on one heap. So the training entry point and the benchmarks
    use it and sampling does not.

    Process-wide, and it only works before JAX starts its CPU threads: call it first thing.
    Returns whether it applied: with glibc, when JAX will compute on the CPU (JAX_PLATFORMS
    starts with cpu, or no accelerator plugin is installed); elsewhere it does nothing.
    """
    if platform.libc_ver()[0] != "glibc" or not _computes_on_cpu():
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def _computes_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, found without initialising a backend."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    # GPU plugins register under the `jax_plugins` namespace or entry-point group; TPUs need libtpu.
    return not (importlib.metadata.entry_points(group="jax_plugins")
                or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


# Programs that compile faster than this are not worth a cache file (JAX's default is 1 s;
# the training step of the `cpu` preset compiles in about that, its evaluation in less).
CACHE_MIN_COMPILE_SECS = 0.1


def use_compilation_cache(setting: str) -> str | None:
    """Turn on JAX's persistent compilation cache, so that a restarted or resumed run, or a
    second `evaluate`, loads its compiled programs instead of compiling them; returns the
    directory, or None for setting "off".

    setting: "auto" (JAX_COMPILATION_CACHE_DIR if set, else `files.cache_root()/xla`), "off",
    or a directory (a local path, or a bucket that every worker of a pod shares, e.g.
    gs://BUCKET/xla, which JAX reads through etils). JAX keys each entry by the program,
    the jaxlib version, the backend and its version, the XLA flags, the compile options
    and the devices it runs on, so a stale or foreign entry is never used; an entry it
    cannot read is compiled again after one warning. Call before the first compilation."""
    if setting == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = setting if setting != "auto" else (jax.config.jax_compilation_cache_dir
                                              or str(files.cache_root() / "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    if not getattr(warnings.showwarning, "damaged_cache_entries", False):
        warnings.showwarning = _one_line_for_damaged_entries(warnings.showwarning, path)
    return path


def _one_line_for_damaged_entries(show, path: str):
    """JAX warns about each cache entry it cannot read (and compiles it again), in two lines
    each; a damaged cache gets one line in all."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not str(message).startswith("Error reading persistent compilation cache entry"):
            return show(message, category, filename, lineno, file, line)
        if not showwarning.reported:
            showwarning.reported = True
            print(f"warning: damaged entries in the compilation cache {path} were compiled again "
                  f"({str(message).split(': ', 1)[-1][:120]})", file=sys.stderr, flush=True)

    showwarning.reported, showwarning.damaged_cache_entries = False, True
    return showwarning


def is_main_process() -> bool:
    """Process 0: the one that prints, logs and writes checkpoints."""
    return jax.process_index() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


# --- the process group ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """How this process joins a multi-process run (`jax.distributed`).

    None of the three identity settings given: JAX's cluster detection decides (TPU VM
    pods, SLURM inside `srun`, Open MPI, Kubernetes); outside a cluster the run is one
    process. `launch/local.py` passes them through JAX_COORDINATOR_ADDRESS (JAX's own
    variable), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """

    coordinator_address: typing.Optional[str] = None  # host:port of process 0
    num_processes: typing.Optional[int] = None
    process_id: typing.Optional[int] = None
    # JAX's defaults: 300 s for every process to join (TPU pod workers boot minutes apart),
    # 100 s without heartbeats before a process is declared dead.
    init_timeout: int = 300
    heartbeat_timeout: int = 100
    # A process whose training step, evaluation or checkpoint makes no progress for this
    # long is stuck (or waits for a stuck peer): every process stops. It bounds the
    # compilation of the first step and the slowest checkpoint write too.
    step_timeout: int = 600

    def __post_init__(self):
        for key in ("init_timeout", "heartbeat_timeout", "step_timeout"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive number of seconds")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be at least 1")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or sys.maxsize):
            raise ValueError(f"process_id={self.process_id} must be in [0, num_processes)")
        if self.coordinator_address is not None:
            host, colon, port = self.coordinator_address.rpartition(":")
            if not (host and colon and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"coordinator_address={self.coordinator_address!r} must be HOST:PORT, "
                                 f"e.g. 10.0.0.2:8476")

    def resolved(self, environ=os.environ) -> "ProcessConfig":
        """This config with unset identity settings taken from JAX_COORDINATOR_ADDRESS,
        JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
        def env_int(name):
            raw = environ.get(name)
            if raw is None:
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} must be an integer") from None
        return dataclasses.replace(
            self, coordinator_address=self.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=self.num_processes if self.num_processes is not None else env_int("JAX_NUM_PROCESSES"),
            process_id=self.process_id if self.process_id is not None else env_int("JAX_PROCESS_ID"))


def detected_cluster() -> str | None:
    """The cluster JAX's `jax.distributed.initialize()` would detect (its own detectors,
    which find no cluster on a workstation), or None."""
    from jax._src import clusters  # the detectors `initialize` itself runs; no public API lists them

    return next((env.name for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def start_processes(conf: ProcessConfig) -> str | None:
    """Join the process group before any other JAX call; returns how it was formed
    ("coordinator HOST:PORT", or the name of the cluster JAX detected), or None for a
    single-process run.

    JAX's preemption service is left off: it would install a SIGTERM handler of its own,
    and `train.StopSignals` agrees on stops across processes inside the training step.
    A group that does not form within init_timeout ends this process with one line (exit
    code 76) before JAX aborts it with a stack trace.
    """
    try:  # JAX_* variables are checked like the settings, before JAX sees them
        conf = conf.resolved()
    except ValueError as e:
        raise ProcessSetupError(f"{e} (from the JAX_* environment variables or the command line)") from None
    explicit = (conf.coordinator_address, conf.num_processes, conf.process_id) != (None, None, None)
    cluster = None if explicit else detected_cluster()
    if not explicit and cluster is None:
        return None
    jax.config.update("jax_enable_preemption_service", False)
    _filter_fatal_log()
    where = conf.coordinator_address or "the detected coordinator"
    timer = threading.Timer(conf.init_timeout, exit_now, args=(
        f"process {conf.process_id if conf.process_id is not None else '?'}: the process group did not form within "
        f"init_timeout={conf.init_timeout} s ({conf.num_processes or '?'} processes expected at {where}): start "
        f"every process with the same coordinator address and num_processes, or raise init_timeout",))
    timer.daemon = True
    timer.start()
    try:
        # JAX's own deadline comes later than ours, so the line above is what the user sees.
        jax.distributed.initialize(conf.coordinator_address, conf.num_processes, conf.process_id,
                                   initialization_timeout=conf.init_timeout + 30,
                                   heartbeat_timeout_seconds=conf.heartbeat_timeout)
    except (ValueError, TypeError) as e:
        raise ProcessSetupError(f"cannot join the process group: {e}") from None
    finally:
        timer.cancel()
    os.write(sys.stderr.fileno(), f"{fatal_filter.MARKER}{jax.process_index()}\n".encode())
    return f"coordinator {conf.coordinator_address}" if conf.coordinator_address else cluster


def _filter_fatal_log():
    """Route this process's stderr through `fatal_filter` (see there for why)."""
    sys.stderr.flush()
    child = subprocess.Popen([sys.executable, "-m", "parallel_gpt.fatal_filter"], stdin=subprocess.PIPE,
                             start_new_session=True)  # a terminal's Ctrl-C is the trainer's to handle
    os.dup2(child.stdin.fileno(), sys.stderr.fileno())
    child.stdin.close()


def stop_processes():
    """Leave the process group (after the final barrier), so that no process outlives it."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def exit_now(line: str, code: int = EXIT_PEER) -> typing.NoReturn:
    """Print `line` and end this process now, from any thread (a stuck main thread too),
    skipping JAX's shutdown, which would wait for every other process. (No flush of
    sys.stdout: a main thread stuck in a write holds its lock; print0 flushes anyway.)"""
    os.write(sys.stderr.fileno(), f"error: {line}\n".encode())
    os._exit(code)


def lost_peer(error: Exception) -> typing.NoReturn:
    """End this process after a collective with the other processes failed."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    exit_now(f"process {jax.process_index()}: a collective with the other processes failed ({reason[:300]}): "
             f"a process of the group died or left; rerun to resume from the newest checkpoint")


# --- keeping processes in step ---------------------------------------------------------------


def check_agreement(values: dict[str, object]):
    """Raise ProcessSetupError naming every key on which some process holds another value than
    process 0 (compared by digest; one small all-gather). Every process raises alike."""
    if jax.process_count() == 1:
        return
    keys = sorted(values)
    digests = np.array([int.from_bytes(hashlib.sha256(json.dumps(values[k], sort_keys=True).encode()).digest()[:4],
                                       "little") >> 1 for k in keys], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(digests))  # (processes, keys)
    differ = [f"{k} (process {', '.join(map(str, np.flatnonzero(gathered[:, j] != gathered[0, j])))})"
              for j, k in enumerate(keys) if (gathered[:, j] != gathered[0, j]).any()]
    if differ:
        raise ProcessSetupError(f"processes differ from process 0 in {', '.join(differ)}: start every process "
                                f"with the same command and data")


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (one small all-gather)."""
    if jax.process_count() == 1:
        return value
    return int(np.asarray(multihost_utils.process_allgather(np.int32(value))).max())


def on_process_0(fn, *args):
    """`fn(*args)` on process 0 only, for work on its files; returns its JSON-serialisable
    result on every process. When it raises, process 0 raises that error and every other
    process a ProcessSetupError with its message, so all of them stop together."""
    if jax.process_count() == 1:
        return fn(*args)
    outcome, error = None, None
    if is_main_process():
        try:
            outcome = {"result": fn(*args)}
        except Exception as e:  # noqa: BLE001 -- raised again below, after every process knows
            outcome, error = {"error": str(e)}, e
    outcome = broadcast_json(outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise ProcessSetupError(f"process 0 failed: {outcome['error']}")
    return outcome["result"]


def broadcast_json(obj):
    """Process 0's JSON-serialisable `obj`, on every process."""
    if jax.process_count() == 1:
        return obj
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    data = np.pad(data, (0, size - data.size))
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())


def broadcast_tree(tree, template):
    """Process 0's `tree` of host arrays, on every process; the others pass None and a
    `template` of the same structure (shapes and dtypes, e.g. from `jax.eval_shape`)."""
    if jax.process_count() == 1:
        return tree
    if not is_main_process():
        tree = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    return multihost_utils.broadcast_one_to_all(tree)


def barrier(name: str):
    """Wait until every process reaches `name` (a device all-gather, so it also waits for
    each process's queued work)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Phase(enum.Enum):
    """What the main thread is doing, as the watchdog needs to know it."""

    STEP = "step"  # a training step: starts the step's time
    STEP_WAIT = "step wait"  # waiting for a step's results: still the step's time; may wait for the others
    WORK = "work"  # this process's own work outside a step (a checkpoint): not a step's time
    WAIT = "wait"  # waiting for the other processes (an evaluation's collectives, a barrier)

    @property
    def waits(self) -> bool:
        """Whether a process in this phase may only be waiting for a stuck peer."""
        return self in (Phase.STEP_WAIT, Phase.WAIT)


class Watchdog:
    """Ends every process of a multi-process run whose main thread stays in one phase
    (a step, an evaluation, a checkpoint, a barrier) longer than `timeout` seconds.

    A peer that is alive but stuck never trips JAX's heartbeats, and the others wait for
    it in a collective forever. The main thread names its phase with `phase()`; a phase
    that lasts half the timeout is published to JAX's key-value store, so that when the
    timeout passes each process can say which processes were stuck in their own work and
    which were only waiting for them.
    """

    def __init__(self, timeout: float):
        self.timeout, self.label, self.kind, self.since = timeout, "starting", Phase.WORK, time.monotonic()
        self.slowest, self._step_start = 0.0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")

    def __enter__(self):
        if jax.process_count() > 1:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def phase(self, kind: Phase, label: str):
        """The main thread enters `label`, a phase of `kind`. The time between two STEP
        phases, with only STEP_WAIT phases between them, is a step's time (`slowest`)."""
        now = time.monotonic()
        if kind is Phase.STEP:
            if self._step_start is not None:
                self.slowest = max(self.slowest, now - self._step_start)
            self._step_start = now
        elif kind is not Phase.STEP_WAIT:
            self._step_start = None  # an evaluation or a checkpoint is not a step's time
        self.kind, self.label, self.since = kind, label, now

    def _watch(self):
        from jax._src import distributed  # the key-value store of the process group; no public API

        client = distributed.global_state.client
        me, published = jax.process_index(), None
        while not self._stop.wait(min(1.0, self.timeout / 10)):
            kind, label, since = self.kind, self.label, self.since
            stalled = time.monotonic() - since
            if stalled > self.timeout / 2 and published != (label, since):
                client.key_value_set(f"parallel_gpt/phase/{me}", json.dumps([kind.value, label]), allow_overwrite=True)
                published = (label, since)
            if stalled > self.timeout:
                exit_now(self._verdict(client, me, label, stalled))

    def _verdict(self, client, me: int, label: str, stalled: float) -> str:
        phases = {int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in client.key_value_dir_get("parallel_gpt/phase/")}
        working = [p for p in range(jax.process_count()) if p not in phases or not Phase(phases[p][0]).waits]
        culprits = ", ".join(f"process {p} ({phases[p][1] if p in phases else 'no report'})"
                             for p in working) or "none in its own work"
        return (f"process {me}: no progress for {stalled:.0f} s in {label} (step_timeout={self.timeout:g} s, slowest "
                f"step so far {self.slowest:.2f} s); stuck: {culprits}; stopping: rerun to resume from the newest "
                f"checkpoint, or raise step_timeout if the work is merely slow")
