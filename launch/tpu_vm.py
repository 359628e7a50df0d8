"""TPU VM pods with `gcloud`: create, set up, run the trainer on every worker, babysit.

    python launch/tpu_vm.py create  --name pod --zone us-central2-b --accelerator_type v4-32 --spot
    python launch/tpu_vm.py setup   --name pod --zone us-central2-b
    python launch/tpu_vm.py run     --name pod --zone us-central2-b -- \\
        python3 -m parallel_gpt.train --preset shakespeare_char --out_dir /mnt/bucket/run1
    python launch/tpu_vm.py babysit --name pod --zone us-central2-b --accelerator_type v4-32 --spot -- \\
        python3 -m parallel_gpt.train --preset shakespeare_char --out_dir /mnt/bucket/run1

The trainer needs no flags on a pod: JAX detects the TPU VM cluster and every worker
joins the group. `create --queued` goes through queued resources (`--valid_until 6h`).
`run` first frees TPU devices held by stale processes, then starts the command on
`--worker=all`, each worker's output kept in `~/parallel_gpt_logs/<run>/<host>.log` there.
`babysit` reruns the command after an interruption (exit code 75, 76 or 134, or ssh
lost), re-creating the VM when it was preempted; the run resumes from its out_dir, so
put out_dir on storage every worker sees (a gcsfuse bucket or NFS). `--dry_run` prints
the gcloud command lines instead of running them. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REMOTE_DIR = "~/parallel_gpt"
LOG_ROOT = "~/parallel_gpt_logs"
# Runtime images per TPU generation (the pip-installed jax[tpu] brings its own libtpu).
VERSIONS = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
RETRY_CODES = {75, 76, 134, 255}  # interrupted after a checkpoint, peer lost or stuck, killed by JAX, ssh lost
FINAL_CODES = {0, 2, 3}  # done, bad input, non-finite updates: rerunning would change nothing
LIVE_STATES = {"READY", "CREATING", "STARTING", "RESTARTING", "REPAIRING"}
# Free the chips held by a process of an earlier run (a killed ssh session leaves them).
FREE_TPU = ("sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9; "
            "sudo rm -f /tmp/libtpu_lockfile")


class UsageError(ValueError):
    pass


def hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a slice: v4-32 has 4, v5litepod-16 has 4, v4-8 has 1."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not match:
        raise UsageError(f"unknown accelerator type {accelerator_type!r}: use e.g. v4-8, v4-32, v5litepod-16, v5p-8")
    generation, size = match.group(1), int(match.group(2))
    if generation in ("v5litepod", "v6e"):  # size counts chips, 4 per host beyond a single 8-chip host
        return 1 if size <= 8 else size // 4
    return max(1, size // 8)  # size counts TensorCores, 8 per host


class Gcloud:
    """Builds gcloud command lines for one TPU VM and runs them, or prints them (dry run)."""

    def __init__(self, name: str, zone: str, project: str | None, dry_run: bool):
        self.name, self.zone, self.dry_run = name, zone, dry_run
        self.where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])

    def tpu(self, *args) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", *args]

    def queued(self, *args) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", *args]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self.tpu("ssh", self.name, *self.where, f"--worker={worker}", f"--command={command}")

    def call(self, argv: list[str], check: bool = True) -> int:
        print(shlex.join(argv), flush=True)
        if self.dry_run:
            return 0
        code = subprocess.call(argv)
        if check and code:
            raise SystemExit(f"error: {argv[0]} {argv[3]} {argv[4]} failed with exit code {code}")
        return code

    def output(self, argv: list[str]) -> str | None:
        """stdout of a query; None when it fails (e.g. no such VM)."""
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return None
        result = subprocess.run(argv, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None


def create_commands(g: Gcloud, accelerator_type: str, version: str | None, spot: bool, queued: bool,
                    valid_until: str | None) -> list[list[str]]:
    version = version or VERSIONS[re.match(r"[a-z0-9]+?(?=-)", accelerator_type).group(0)]
    if queued:
        until = [f"--valid-until-time={valid_until}" if "T" in (valid_until or "")
                 else f"--valid-until-duration={valid_until}"] if valid_until else []
        return [g.queued("create", g.name, f"--node-id={g.name}", *g.where, f"--accelerator-type={accelerator_type}",
                         f"--runtime-version={version}", *(["--spot"] if spot else []), *until)]
    return [g.tpu("create", g.name, *g.where, f"--accelerator-type={accelerator_type}", f"--version={version}",
                  *(["--spot"] if spot else []))]


def setup_commands(g: Gcloud, archive: str) -> list[list[str]]:
    install = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/parallel_gpt.tar.gz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
               f"python3 -m pip install --quiet -e '.[tpu]'")
    return [g.tpu("scp", archive, f"{g.name}:~/parallel_gpt.tar.gz", *g.where, "--worker=all"), g.ssh(install)]


def run_command(g: Gcloud, command: list[str], run_name: str) -> list[str]:
    log_dir = f"{LOG_ROOT}/{run_name}"
    remote = (f"{FREE_TPU}; mkdir -p {log_dir} && cd {REMOTE_DIR} && set -o pipefail && "
              f"{shlex.join(command)} 2>&1 | tee {log_dir}/$(hostname).log")
    return g.ssh(remote)  # a TPU VM's login shell is bash: pipefail keeps the trainer's exit code


def pack_checkout(dest: str):
    """The checkout as a .tar.gz, without version control, environments and run output."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", "out", ".whl"}
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(ROOT, arcname=".", filter=lambda info: None if set(Path(info.name).parts) & skip else info)


def vm_state(g: Gcloud) -> str:
    state = g.output(g.tpu("describe", g.name, *g.where, "--format=value(state)"))
    return state or "MISSING"


def decide(exit_code: int, state: str) -> str:
    """What babysit does after the command ended with `exit_code` and the VM is in `state`:
    "done", "fail" (a final error), "recreate" (the VM is gone or preempted) or "rerun"."""
    if exit_code == 0:
        return "done"
    if state not in LIVE_STATES:
        return "recreate"
    if exit_code in RETRY_CODES:
        return "rerun"
    return "fail"  # 2, 3 and anything unknown (a crash): a rerun would fail the same way


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    command = argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="print the gcloud command lines, run nothing")
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("create", "setup", "run", "logs", "status", "stop", "delete", "babysit"):
        p = sub.add_parser(action)
        p.add_argument("--name", required=True)
        p.add_argument("--zone", required=True)
        p.add_argument("--project")
        if action in ("create", "babysit"):
            p.add_argument("--accelerator_type", required=True)
            p.add_argument("--version", help="runtime version (default: per TPU generation)")
            p.add_argument("--spot", action="store_true")
            p.add_argument("--queued", action="store_true", help="create through queued resources")
            p.add_argument("--valid_until", help="queued: a duration (6h) or an ISO time the request expires")
        if action in ("run", "babysit", "logs"):
            p.add_argument("--run_name", default="train", help="names the log folder on each worker")
        if action == "delete":
            p.add_argument("--queued", action="store_true", help="delete the queued resource too")
        if action == "babysit":
            p.add_argument("--max_restarts", type=int, default=20)
            p.add_argument("--poll", type=float, default=60, help="seconds between checks of a queued request")
        if action == "logs":
            p.add_argument("--worker", default="all")
            p.add_argument("--lines", type=int, default=100)
    try:
        args = parser.parse_args(argv[:split])
        if args.action in ("run", "babysit") and not command:
            raise UsageError(f"{args.action} needs the command after --, e.g. -- python3 -m parallel_gpt.train")
        if getattr(args, "accelerator_type", None):
            hosts(args.accelerator_type)
        return act(args, command, Gcloud(args.name, args.zone, args.project, args.dry_run))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def act(args, command: list[str], g: Gcloud) -> int:
    if args.action == "create":
        for c in create_commands(g, args.accelerator_type, args.version, args.spot, args.queued, args.valid_until):
            g.call(c)
        return 0
    if args.action == "setup":
        return setup(g)
    if args.action == "run":
        return g.call(run_command(g, command, args.run_name), check=False)
    if args.action == "logs":
        return g.call(g.ssh(f"tail -n {args.lines} {LOG_ROOT}/{args.run_name}/*.log", args.worker), check=False)
    if args.action == "status":
        return g.call(g.tpu("describe", g.name, *g.where, "--format=value(state,health,acceleratorType)"), check=False)
    if args.action == "stop":  # SIGTERM: every process saves a checkpoint and exits 75
        return g.call(g.ssh("pkill -TERM -f parallel_gpt.train || true"), check=False)
    if args.action == "delete":
        if args.queued:
            return g.call(g.queued("delete", g.name, *g.where, "--force", "--quiet"), check=False)
        return g.call(g.tpu("delete", g.name, *g.where, "--quiet"), check=False)
    return babysit(args, command, g)


def setup(g: Gcloud) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        archive = f"{tmp}/parallel_gpt.tar.gz"
        if not g.dry_run:
            pack_checkout(archive)
        for c in setup_commands(g, archive if not g.dry_run else "parallel_gpt.tar.gz"):
            g.call(c)
    return 0


def babysit(args, command: list[str], g: Gcloud) -> int:
    """Run until the command ends for good; re-create the VM after a preemption."""
    state = vm_state(g)
    for restart in range(args.max_restarts + 1):
        if state not in LIVE_STATES:
            print(f"# {g.name} is {state}: creating it", file=sys.stderr)
            if state != "MISSING":
                g.call(g.queued("delete", g.name, *g.where, "--force", "--quiet") if args.queued
                       else g.tpu("delete", g.name, *g.where, "--quiet"), check=False)
            for c in create_commands(g, args.accelerator_type, args.version, args.spot, args.queued,
                                     args.valid_until):
                g.call(c)
            while args.queued and not g.dry_run and vm_state(g) != "READY":
                time.sleep(args.poll)
            setup(g)
        code = g.call(run_command(g, command, args.run_name), check=False)
        if g.dry_run:
            return 0
        state = vm_state(g)
        action = decide(code, state)
        print(f"# run {restart}: exit code {code}, VM {state}: {action}", file=sys.stderr)
        if action == "done":
            return 0
        if action == "fail":
            return code
    print(f"error: still interrupted after {args.max_restarts} restarts", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
