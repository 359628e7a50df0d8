"""Start N processes of one command on this machine, as one multi-process JAX run.

    python launch/local.py --num_processes 2 --devices_per_process 2 -- \
        python -m parallel_gpt.train --preset tiny --out_dir out/two

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES
and JAX_PROCESS_ID, which `parallel_gpt.runtime.start_processes` reads; with
--devices_per_process, JAX_NUM_CPU_DEVICES (CPU devices per process) and
JAX_LOCAL_DEVICE_IDS (the process's share of this machine's GPUs). Every line of output
is prefixed with its process id. SIGTERM and SIGINT are forwarded to every process. When
one process fails, the others get SIGTERM, then SIGKILL after --grace seconds (a process
that exits 75, interrupted after a checkpoint, gets no SIGTERM sent after it: the others
stop at the same step by themselves). The exit code is the first non-zero one (0 when
all succeed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

# The trainer's exit code after SIGTERM/SIGINT and a checkpoint (parallel_gpt.errors; spelled
# here because this script runs without the package; tests/test_errors.py checks they agree).
EXIT_INTERRUPTED = 75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int, devices: int | None) -> dict:
    """The environment of process `process_id` of the group."""
    # The group talks over 127.0.0.1: proxy settings must not reach it (gRPC would use them).
    env = {k: v for k, v in base.items() if "_proxy" not in k.lower()}
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(process_id * devices + i) for i in range(devices))
    return env


def _pump(stream, prefix: str, out):
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix.encode() + line)
        out.flush()
    stream.close()


class Group:
    """The child processes, their output pumps, and the signals forwarded to them."""

    def __init__(self, command: list[str], num_processes: int, devices: int | None, port: int):
        self.children, self.signalled = [], False
        self.pumps = []
        for i in range(num_processes):
            child = subprocess.Popen(command, env=process_env(os.environ, i, num_processes, port, devices),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            self.children.append(child)
            for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                pump = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out), daemon=True)
                pump.start()
                self.pumps.append(pump)

    def forward(self, signum: int):
        self.signalled = True
        self.signal(signum)

    def signal(self, signum: int):
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def wait(self, grace: float) -> int:
        """The first non-zero exit code (0 if none); after a failure the rest are stopped."""
        first, deadline = 0, None
        while any(c.poll() is None for c in self.children):
            for i, child in enumerate(self.children):
                code = child.poll()
                if code and not first:
                    first = code if code > 0 else 128 - code  # killed by a signal: the shell's convention
                    deadline = time.monotonic() + grace
                    if first != EXIT_INTERRUPTED and not self.signalled:  # a second SIGTERM would end them without saving
                        print(f"[launch] process {i} exited with code {first}: stopping the others", file=sys.stderr)
                        self.signal(signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
            time.sleep(0.1)
        for child in self.children:
            code = child.returncode
            if code and not first:
                first = code if code > 0 else 128 - code
        for pump in self.pumps:
            pump.join()
        return first


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- COMMAND [ARGS...]")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="CPU devices each process simulates, and GPUs each process takes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the other processes get to stop after one fails (default 10)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        print("error: no command to run: give it after --, e.g. -- python -m parallel_gpt.train", file=sys.stderr)
        return 2
    if args.num_processes < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
        print("error: --num_processes and --devices_per_process must be at least 1", file=sys.stderr)
        return 2
    if shutil.which(command[0]) is None:
        print(f"error: command {command[0]!r} not found or not executable: check the command after --", file=sys.stderr)
        return 2
    group = Group(command, args.num_processes, args.devices_per_process, args.port or free_port())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _: group.forward(s))
    return group.wait(args.grace)


if __name__ == "__main__":
    sys.exit(main())
