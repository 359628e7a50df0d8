#!/usr/bin/env python3
"""Create, set up, run and babysit parallel_gpt on a Cloud TPU VM (one host or a pod slice).

Each subcommand is a few `gcloud compute tpus ...` calls; `--dry_run` prints them, one per
line, shell-quoted, instead of running them. A pod slice has several hosts ("workers",
v4-32 has 4): `run` starts the same command on every worker, and the trainer finds its
peers through jax.distributed, so the command carries no distributed flags:

    python launch/tpu_vm.py create --name pod --zone us-central2-b --accelerator_type v4-32 --spot
    python launch/tpu_vm.py setup --name pod --zone us-central2-b
    python launch/tpu_vm.py run --name pod --zone us-central2-b -- \\
        python -m parallel_gpt.train --preset shakespeare_char --out_dir=/mnt/bucket/run1
    python launch/tpu_vm.py logs --name pod --zone us-central2-b --follow
    python launch/tpu_vm.py delete --name pod --zone us-central2-b

`create --queued --valid_until 6h` waits for capacity through a queued resource (named like
the VM). `babysit` takes create's flags and the command, and creates, sets up and runs
until the trainer ends with a final exit code, re-creating a preempted VM; each rerun
resumes from out_dir, which must outlive the VM (a gcsfuse-mounted bucket or NFS).

On each worker: the checkout in ~/parallel_gpt, a Python 3.11 venv in ~/parallel_gpt_venv
(the TPU images ship Python 3.10 and JAX needs 3.11), and each run's output in
~/parallel_gpt_logs/<run_name>/worker-<N>.log. Training runs detached (setsid), so a dropped
ssh connection does not kill it; `stop` sends it SIGTERM, and the trainer saves and exits 75.
"""

import argparse
import datetime
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The trainer's exit codes, as parallel_gpt.errors names them (spelled here because this
# script runs where the package may not be installed; tests/test_errors.py checks they agree).
EXIT_DONE, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 2, 3
# Stopped by SIGTERM/SIGINT after a checkpoint; a peer died, was stuck or never joined; JAX
# aborted this process because a peer died. Rerunning resumes from out_dir.
EXIT_INTERRUPTED, EXIT_PEER, EXIT_ABORTED = 75, 76, 134
RETRY_CODES = (EXIT_INTERRUPTED, EXIT_PEER, EXIT_ABORTED)
SSH_FAILED = 255  # ssh's own exit code: the connection failed or dropped

# Runtime software per TPU generation, as Cloud TPU's "TPU software versions" page advises for JAX.
DEFAULT_VERSION = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                   "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}

# Node and queued-resource states: which ones mean "gone, make a new one" and which one
# means "usable"; any other (CREATING, REPAIRING, WAITING_FOR_RESOURCES, UNKNOWN, ...) is
# waited out, since deleting a VM on a state we do not know would be destructive.
READY = "READY"
GONE = frozenset({"MISSING", "PREEMPTED", "TERMINATED", "STOPPED", "FAILED", "SUSPENDED"})

# The metadata server tells each worker its index (0 .. workers-1), as it tells JAX.
WORKER_ID = ("W=$(curl -s -H Metadata-Flavor:Google "
             "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)")
# SIGTERM first, so a trainer still running from an earlier run saves its checkpoint
# (saving to a bucket can take a minute), SIGKILL after 120 s; libtpu's lock file would
# otherwise make the next process fail with "TPU in use".
FREE_TPU = ("pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u); "
            "if [ -n \"$pids\" ]; then echo \"$(hostname): SIGTERM to TPU holders\" $pids; "
            "sudo kill -TERM $pids; for i in $(seq 120); do alive=; "
            "for p in $pids; do [ -d /proc/$p ] && alive=1; done; [ -z \"$alive\" ] && break; sleep 1; done; "
            "sudo kill -KILL $pids 2>/dev/null; fi; sudo rm -f /tmp/libtpu_lockfile")
# apt waits for the lock that a fresh VM's unattended upgrades hold for its first minutes.
APT = "sudo apt-get -qq -o DPkg::Lock::Timeout=600"
SETUP = ("set -e; rm -rf ~/parallel_gpt; mkdir ~/parallel_gpt; tar -xzf ~/parallel_gpt.tar.gz -C ~/parallel_gpt; "
         f"command -v python3.11 >/dev/null || {{ {APT} update && {APT} install -y python3.11 python3.11-venv; }}; "
         "[ -x ~/parallel_gpt_venv/bin/python ] || python3.11 -m venv ~/parallel_gpt_venv; "
         ". ~/parallel_gpt_venv/bin/activate; cd ~/parallel_gpt; "
         "python -m pip install -q --upgrade pip; python -m pip install -q -e '.[tpu]'")
TAR_EXCLUDES = ["--exclude=./.git", "--exclude=./.venv", "--exclude=./out", "--exclude=__pycache__",
                "--exclude=*.egg-info"]


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


def hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a TPU slice: v4-32 -> 4. v4 and v5p count TensorCores (8 per
    host), v5litepod and v6e count chips (4 per host from 16 up; 1, 4 and 8 are one host)."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    n = int(match.group(2)) if match else 0
    if match and match.group(1) in ("v4", "v5p") and n % 8 == 0 and n > 0:
        return n // 8
    if match and match.group(1) in ("v5litepod", "v6e") and (n in (1, 4, 8) or (n >= 16 and n % 4 == 0)):
        return 1 if n <= 8 else n // 4
    raise UsageError(f"unknown accelerator type {accelerator_type!r}: use v4-N, v5p-N (N a multiple of 8), "
                     "v5litepod-N or v6e-N (N 1, 4, 8, 16, 32, ...), e.g. v4-32")


def default_version(accelerator_type: str) -> str:
    hosts(accelerator_type)  # rejects an unknown type first
    return DEFAULT_VERSION[accelerator_type.split("-")[0]]


def valid_until_flag(value: str) -> str:
    """`--valid_until 2h` -> a duration flag, an ISO time -> a time flag, for queued resources."""
    if re.fullmatch(r"\d+[smhd]", value):
        return f"--valid-until-duration={value}"
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--valid_until {value!r}: give a duration (30m, 6h, 2d) or an ISO time "
                         "(2030-01-31T18:00:00Z)") from None
    return f"--valid-until-time={value}"


def vm_action(state: str) -> str:
    """What a node or queued-resource state calls for: "ready", "recreate" or "wait"."""
    return "ready" if state == READY else "recreate" if state in GONE else "wait"


def decide(exit_code: int, vm_state: str) -> str:
    """After a run: "done", "fail" (rerunning cannot help), "recreate" (the VM is gone)
    or "rerun" (the same VM, same command: it resumes from out_dir)."""
    if exit_code == EXIT_DONE:
        return "done"
    if exit_code in (EXIT_BAD_INPUT, EXIT_NONFINITE):
        return "fail"
    if vm_action(vm_state) == "recreate":
        return "recreate"  # whatever the code said, a preempted VM explains it
    if exit_code in RETRY_CODES or exit_code == SSH_FAILED:
        return "rerun"  # 255 on a live VM: the connection dropped; the rerun stops the old trainer first
    return "fail"  # a crash on a healthy VM (a traceback, an OOM kill) would only repeat


def run_exit_code(codes: list, gcloud_code: int) -> int:
    """One exit code for the run from each worker's (None: not known). The cause wins over
    its echo: a worker that crashed (1, 137) over its peers' 76 / 134. With a worker's code
    unknown (its host lost), gcloud's own code stands, e.g. 255."""
    if not codes or None in codes:
        return gcloud_code
    causes = [c for c in codes if c not in (EXIT_DONE, EXIT_PEER, EXIT_ABORTED)]
    return causes[0] if causes else max(codes)


def parse_exit_codes(text: str, workers: int) -> list:
    """Lines "exit_code <worker> <code>" from every worker -> [code or None per worker]."""
    codes = [None] * workers
    for worker, code in re.findall(r"^exit_code (\d+) (\d+)$", text, re.MULTILINE):
        if int(worker) < workers:
            codes[int(worker)] = int(code)
    return codes


class Gcloud:
    """Builds gcloud command lines for one TPU VM and runs them, or prints them (dry run)."""

    def __init__(self, args):
        self.args = args
        self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    def tpu_vm(self, verb, *rest):
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.args.name, *self.where, *rest]

    def queued(self, verb, *rest):
        return ["gcloud", "compute", "tpus", "queued-resources", verb, self.args.name, *self.where, *rest]

    def ssh(self, command, worker="all"):
        return self.tpu_vm("ssh", f"--worker={worker}", f"--command={command}")

    def call(self, cmd) -> int:
        """Run `cmd` with its output streaming to ours; its exit code."""
        print(shlex.join(cmd), flush=True)
        return 0 if self.args.dry_run else subprocess.run(cmd, cwd=REPO).returncode

    def query(self, cmd):
        """Run `cmd` for its output: (exit code, stdout, stderr); None in a dry run."""
        print(shlex.join(cmd), flush=True)
        if self.args.dry_run:
            return None
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        return done.returncode, done.stdout.strip(), done.stderr

    def state(self, cmd) -> str:
        answer = self.query(cmd)
        if answer is None:
            return "MISSING"  # a dry run shows the round that starts from nothing
        code, out, err = answer
        if code != 0:
            return "MISSING" if "NOT_FOUND" in err or "not found" in err else "UNKNOWN"
        return out or "UNKNOWN"

    def vm_state(self) -> str:
        """The VM's state; with --queued, the queued resource's until it is ACTIVE."""
        if self.args.queued:
            queued = self.state(self.queued("describe", "--format=value(state.state)"))
            if queued != "ACTIVE":  # WAITING_FOR_RESOURCES, PROVISIONING, ... are waited out
                return queued if queued in GONE else "WAITING"
        return self.state(self.tpu_vm("describe", "--format=value(state)"))


def create(g: Gcloud, args) -> int:
    version = args.version or default_version(args.accelerator_type)
    if args.queued:
        extra = [valid_until_flag(args.valid_until)] if args.valid_until else []
        code = g.call(g.queued("create", f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
                               f"--runtime-version={version}", *(["--spot"] if args.spot else []), *extra))
        # The request returns once queued; wait until the VM exists, so `setup` can follow.
        while code == 0 and (state := g.vm_state()) != READY and not args.dry_run:
            if vm_action(state) == "recreate":
                print(f"tpu_vm: queued resource {args.name} is {state}", file=sys.stderr)
                return 1
            print(f"tpu_vm: queued resource {args.name} is {state}; checking again in {args.poll:g} s",
                  file=sys.stderr)
            time.sleep(args.poll)
    else:
        code = g.call(g.tpu_vm("create", f"--accelerator-type={args.accelerator_type}", f"--version={version}",
                               *(["--spot"] if args.spot else [])))
    print(f"tpu_vm: {args.name}: {args.accelerator_type}, {hosts(args.accelerator_type)} worker(s)", file=sys.stderr)
    return code


def setup(g: Gcloud, args) -> int:
    """Copy this checkout (no .git, .venv, out) to every worker and install it there."""
    tarball = f"/tmp/parallel_gpt-{args.name}.tar.gz"
    for cmd in (["tar", "-czf", tarball, *TAR_EXCLUDES, "."],
                ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:parallel_gpt.tar.gz",
                 *g.where, "--worker=all"],
                g.ssh(SETUP)):
        if code := g.call(cmd):
            return code
    return 0


def run(g: Gcloud, args) -> int:
    log_dir = f"~/parallel_gpt_logs/{args.run_name}"
    # The trainer runs detached, appending to its log; `tail --pid` streams it until the
    # trainer's wrapper has written its exit code (to the file named by its $0), which
    # becomes this worker's.
    train = shlex.quote(f'{shlex.join(args.command)}; echo $? > "$0"')
    script = (f"{WORKER_ID}; {FREE_TPU}; mkdir -p {log_dir}; rm -f {log_dir}/worker-$W.exit; "
              f"start=$(( $(stat -c %s {log_dir}/worker-$W.log 2>/dev/null || echo 0) + 1 )); "
              ". ~/parallel_gpt_venv/bin/activate; cd ~/parallel_gpt; "
              f"setsid bash -c {train} {log_dir}/worker-$W.exit >> {log_dir}/worker-$W.log 2>&1 < /dev/null & "
              f"tail -c +$start -f --pid=$! {log_dir}/worker-$W.log | sed -u \"s/^/[worker $W] /\"; "
              f"exit \"$(cat {log_dir}/worker-$W.exit 2>/dev/null || echo 1)\"")
    return g.call(g.ssh(script))


def logs(g: Gcloud, args) -> int:
    follow = "-f " if args.follow else ""
    return g.call(g.ssh(f"{WORKER_ID}; tail -n {args.lines} {follow}~/parallel_gpt_logs/{args.run_name}/worker-$W.log"
                        " | sed -u \"s/^/[worker $W] /\"", worker=args.worker))


def status(g: Gcloud, args) -> int:
    if args.queued and (code := g.call(g.queued("describe", "--format=value(state.state)"))):
        return code
    return g.call(g.tpu_vm("describe", "--format=table(name.basename(), acceleratorType, state, health, "
                                       "networkEndpoints.len():label=WORKERS)"))


def delete(g: Gcloud, args) -> int:
    # --force: delete the queued resource's VM with it.
    return g.call(g.queued("delete", "--force", "--quiet") if args.queued else g.tpu_vm("delete", "--quiet"))


def babysit(g: Gcloud, args) -> int:
    """create / setup / run until the trainer ends with a final exit code; see decide()."""
    workers, restarts, fresh = hosts(args.accelerator_type), 0, True
    while True:
        state = g.vm_state()
        action = vm_action(state)
        if action == "wait":
            print(f"tpu_vm: {args.name} is {state}; checking again in {args.poll:g} s", file=sys.stderr)
            time.sleep(args.poll)
            continue
        if action == "recreate":
            print(f"tpu_vm: {args.name} is {state}; creating it", file=sys.stderr)
            if state != "MISSING":
                delete(g, args)
            fresh = True  # a new VM needs the checkout (the first round copies it too, so it is current)
        # A failed create or setup (no capacity, a network error) is tried again after a pause.
        if (action == "recreate" and (code := create(g, args))) or (fresh and (code := setup(g, args))):
            print(f"tpu_vm: creating or setting up {args.name} failed (exit code {code})", file=sys.stderr)
        else:
            fresh = False
            code = run(g, args)
            answer = g.query(g.ssh(f"{WORKER_ID}; echo exit_code $W "
                                   f"$(cat ~/parallel_gpt_logs/{args.run_name}/worker-$W.exit 2>/dev/null)"))
            if args.dry_run:
                return 0  # one round shown; from here on babysit acts on real exit codes and states
            code = run_exit_code(parse_exit_codes(answer[1], workers), code)
            verdict = decide(code, g.vm_state())
            print(f"tpu_vm: the run ended with exit code {code}: {verdict}", file=sys.stderr)
            if verdict in ("done", "fail"):
                return code
        restarts += 1
        if restarts > args.max_restarts:
            print(f"tpu_vm: giving up after {args.max_restarts} restarts (last exit code {code})", file=sys.stderr)
            return code or 1
        time.sleep(args.poll)


def stop(g: Gcloud, args) -> int:
    return g.call(g.ssh(FREE_TPU))


COMMANDS = {"create": create, "setup": setup, "run": run, "logs": logs, "status": status,
            "stop": stop, "delete": delete, "babysit": babysit}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="launch/tpu_vm.py", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="Example: launch/tpu_vm.py --dry_run babysit --name pod --zone us-central2-b "
                                         "--accelerator_type v4-32 --spot -- python -m parallel_gpt.train")
    dry_run_help = "print the gcloud command lines instead of running them"
    top.add_argument("--dry_run", action="store_true", help=dry_run_help)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the flag works after the subcommand too, without resetting the top-level one.
    common.add_argument("--dry_run", action="store_true", default=argparse.SUPPRESS, help=dry_run_help)
    common.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    common.add_argument("--project", help="default: gcloud's configured project")
    common.add_argument("--queued", action="store_true", help="the VM comes from a queued resource of the same name")
    creating = argparse.ArgumentParser(add_help=False)
    creating.add_argument("--accelerator_type", required=True, help="v4-8, v4-32, v5p-8, v5litepod-16, v6e-8 ...")
    creating.add_argument("--version", help="TPU software version (default: the one Cloud TPU advises for the type)")
    creating.add_argument("--spot", action="store_true", help="spot capacity: cheaper, may be preempted")
    creating.add_argument("--valid_until", help="with --queued: give up waiting after 6h, 2d, or at an ISO time")
    creating.add_argument("--poll", type=float, default=60, help="seconds between state checks (default 60)")
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--run_name", default="train", help="log folder on each worker (default train)")
    subs = top.add_subparsers(dest="subcommand", required=True)
    helps = {"create": "create the VM (on demand, --spot, or --queued)", "setup": "copy this checkout and install it",
             "run": "free the TPUs, run the command after -- on every worker", "logs": "print the workers' logs",
             "status": "state, health, worker count", "stop": "SIGTERM the trainers (they save and exit 75)",
             "delete": "delete the VM (with --queued: the queued resource)",
             "babysit": "create, setup and run until a final exit code, re-creating a preempted VM"}
    for name, help_ in helps.items():
        parents = [common] + ([creating] if name in ("create", "babysit") else []) + \
                  ([running] if name in ("run", "logs", "babysit") else [])
        sub = subs.add_parser(name, parents=parents, help=help_, description=help_)
        if name == "logs":
            sub.add_argument("--worker", default="all", help="all (default), or one worker's index")
            sub.add_argument("--lines", type=int, default=100, help="last lines to print (default 100)")
            sub.add_argument("--follow", action="store_true", help="keep printing new lines")
        if name == "babysit":
            sub.add_argument("--max_restarts", type=int, default=20, help="reruns and re-creations (default 20)")
    return top


def parse(argv: list) -> argparse.Namespace:
    """The command line -> settings, with the train command (everything after the first
    `--`, passed on untouched) as `command`; UsageError for a mistake argparse cannot see."""
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:split])
    args.command = argv[split + 1:]
    if args.subcommand in ("run", "babysit") and not args.command:
        raise UsageError(f"{args.subcommand} needs the train command after --, e.g. "
                         "-- python -m parallel_gpt.train --out_dir=/mnt/bucket/run1")
    if args.subcommand not in ("run", "babysit") and args.command:
        raise UsageError(f"{args.subcommand} takes no command after --")
    if getattr(args, "valid_until", None) and not args.queued:
        raise UsageError("--valid_until needs --queued")
    if args.subcommand in ("create", "babysit"):
        hosts(args.accelerator_type)
    # The name is part of the shell script run on every worker, and of a path there.
    run_name = getattr(args, "run_name", None)
    if run_name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", run_name):
        raise UsageError(f"--run_name {run_name!r}: use letters, digits, '.', '_' and '-' (not first) only")
    return args


def main(argv=None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else list(argv))
        return COMMANDS[args.subcommand](Gcloud(args), args)
    except UsageError as e:
        print(f"tpu_vm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpu_vm: interrupted; a started trainer keeps running on the workers (use `stop`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
