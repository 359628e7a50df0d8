"""launch/tpu_vm.py and launch/slurm.sbatch without a cloud: `--dry_run` output against
golden files, the babysitter's decisions and loop, and the scripts' shell syntax.

No test runs gcloud: the dry runs find a `gcloud` (and a `tar`) first on PATH that records
being called, and the babysit loop runs against a scripted Gcloud.

Regenerate the golden files after an intended change:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_launch_tpu_vm.py
"""

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU_VM = ROOT / "launch" / "tpu_vm.py"
GOLDEN = Path(__file__).resolve().parent / "golden" / "launch"
_spec = importlib.util.spec_from_file_location("launch_tpu_vm", TPU_VM)
tpu_vm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu_vm)

TRAIN = ["--", "python3", "-m", "parallel_gpt.train", "--preset", "shakespeare_char", "--out_dir=/mnt/bucket/run 1"]
WHERE = ["--name", "pod", "--zone", "us-central2-b", "--project", "my-project"]
MODES = {"on_demand": [], "spot": ["--spot"], "queued": ["--spot", "--queued", "--valid_until", "6h"]}


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    """A folder whose `gcloud` and `tar` record their calls and fail: put first on PATH."""
    folder = tmp_path_factory.mktemp("bin")
    for tool in ("gcloud", "tar"):
        (folder / tool).write_text(f"#!/bin/sh\necho {tool} >> {folder}/called\n"
                                   f"echo '{tool} must not run in a test' >&2\nexit 99\n")
        (folder / tool).chmod(0o755)
    yield folder
    assert not (folder / "called").exists(), (folder / "called").read_text()


def cli(*args, fake_bin):
    return subprocess.run([sys.executable, str(TPU_VM), *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})


def dry_run(*args, fake_bin):
    result = cli("--dry_run", *args, fake_bin=fake_bin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def transcript(accelerator, mode, fake_bin):
    typed = ["--accelerator_type", accelerator, *MODES[mode]]
    queued = ["--queued"] if mode == "queued" else []
    steps = [("create", typed), ("setup", []), ("run", TRAIN), ("logs", []), ("status", queued), ("stop", []),
             ("delete", queued), ("babysit", [*typed, *TRAIN])]
    return "".join(f"$ tpu_vm.py {step}\n" + dry_run(step, *WHERE, *extra, fake_bin=fake_bin) for step, extra in steps)


@pytest.mark.parametrize("accelerator", ["v4-8", "v4-32"])
@pytest.mark.parametrize("mode", list(MODES))
def test_dry_run_prints_the_golden_commands(accelerator, mode, fake_bin):
    text = transcript(accelerator, mode, fake_bin)
    golden = GOLDEN / f"tpu_vm_{accelerator}_{mode}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("golden", sorted(GOLDEN.glob("tpu_vm_*.txt")), ids=lambda p: p.stem)
def test_every_command_round_trips_and_its_remote_script_parses(golden):
    for line in golden.read_text().splitlines():
        if line.startswith("$ "):
            continue
        argv = shlex.split(line)
        assert shlex.join(argv) == line and argv[0] in ("gcloud", "tar")
        for arg in argv:
            if arg.startswith("--command="):
                subprocess.run(["bash", "-n", "-c", arg[len("--command="):]], check=True)


def test_dry_run_flag_works_after_the_subcommand_too(fake_bin):
    assert dry_run("delete", *WHERE, fake_bin=fake_bin) == cli("delete", *WHERE, "--dry_run", fake_bin=fake_bin).stdout


def test_help_runs_from_the_repository_root(fake_bin):
    for args in (["--help"], ["babysit", "--help"]):
        result = cli(*args, fake_bin=fake_bin)
        assert result.returncode == 0 and "usage: launch/tpu_vm.py" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["create", *WHERE, "--accelerator_type", "v9-8"], "unknown accelerator type 'v9-8'"),
    (["create", *WHERE, "--accelerator_type", "v4-12"], "unknown accelerator type 'v4-12'"),
    (["create", *WHERE, "--accelerator_type", "v4-8", "--valid_until", "6h"], "--valid_until needs --queued"),
    (["create", *WHERE, "--accelerator_type", "v4-8", "--queued", "--valid_until", "soon"], "--valid_until 'soon'"),
    (["run", *WHERE], "run needs the train command after --"),
    (["stop", *WHERE, "--", "python"], "stop takes no command after --"),
])
def test_bad_usage_is_one_line_and_exit_code_2(args, message, fake_bin):
    result = cli("--dry_run", *args, fake_bin=fake_bin)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"tpu_vm: {message}")


def test_hosts_and_versions_follow_the_slice():
    types = ["v4-8", "v4-32", "v5p-8", "v5p-128", "v5litepod-4", "v5litepod-8", "v5litepod-16", "v6e-8", "v6e-64"]
    assert [tpu_vm.hosts(t) for t in types] == [1, 4, 1, 16, 1, 1, 4, 1, 16]
    assert [tpu_vm.default_version(t) for t in ("v4-32", "v5p-8", "v5litepod-16", "v6e-8")] == \
        ["tpu-ubuntu2204-base", "v2-alpha-tpuv5", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv6e"]


def test_valid_until_takes_a_duration_or_a_time():
    assert tpu_vm.valid_until_flag("6h") == "--valid-until-duration=6h"
    assert tpu_vm.valid_until_flag("2030-01-31T18:00:00Z") == "--valid-until-time=2030-01-31T18:00:00Z"


def test_vm_states():
    assert tpu_vm.vm_action("READY") == "ready"
    for state in ("MISSING", "PREEMPTED", "TERMINATED", "STOPPED", "FAILED", "SUSPENDED"):
        assert tpu_vm.vm_action(state) == "recreate"
    for state in ("CREATING", "REPAIRING", "WAITING", "UNKNOWN", "SOMETHING_NEW"):
        assert tpu_vm.vm_action(state) == "wait"  # never delete a VM on a state we do not know


# Exit code -> the decision on a ready VM, a VM still busy (e.g. REPAIRING), a gone one.
DECISIONS = {0: ("done", "done", "done"), 2: ("fail", "fail", "fail"), 3: ("fail", "fail", "fail"),
             75: ("rerun", "rerun", "recreate"), 76: ("rerun", "rerun", "recreate"),
             134: ("rerun", "rerun", "recreate"), 255: ("rerun", "rerun", "recreate"),
             1: ("fail", "fail", "recreate"), 137: ("fail", "fail", "recreate")}


@pytest.mark.parametrize("code", list(DECISIONS))
@pytest.mark.parametrize("state", ["READY", "REPAIRING", "MISSING", "PREEMPTED", "TERMINATED"])
def test_babysit_decisions(code, state):
    column = {"ready": 0, "wait": 1, "recreate": 2}[tpu_vm.vm_action(state)]
    assert tpu_vm.decide(code, state) == DECISIONS[code][column]


def test_the_run_exit_code_names_the_cause():
    assert tpu_vm.parse_exit_codes("exit_code 1 75\nnoise\nexit_code 0 75\n", 3) == [75, 75, None]
    assert tpu_vm.run_exit_code([75, 75, None], 255) == 255  # a worker's code unknown: gcloud's stands
    assert tpu_vm.run_exit_code([], 255) == 255
    assert tpu_vm.run_exit_code([0, 0], 1) == 0
    assert tpu_vm.run_exit_code([134, 137, 134], 1) == 137  # the killed worker, not its peers' echo
    assert tpu_vm.run_exit_code([76, 134, 0], 1) == 134


class Scripted(tpu_vm.Gcloud):
    """A Gcloud that answers from a script: VM states, and per run (gcloud's code, worker codes)."""

    def __init__(self, args, states, runs):
        super().__init__(args)
        self.states, self.runs, self.log = list(states), list(runs), []

    def call(self, cmd):
        step = cmd[4] if cmd[0] == "gcloud" else cmd[0]
        if step == "ssh":
            step = "run" if "setsid" in cmd[-1] else "setup"
        self.log.append(step)
        return self.runs[0][0] if step == "run" else 0

    def query(self, cmd):
        if cmd[4] == "describe":
            self.log.append("describe")
            return 0, self.states.pop(0), ""
        self.log.append("exit_codes")
        gcloud_code, codes = self.runs.pop(0)
        return 0, "".join(f"exit_code {w} {c}\n" for w, c in enumerate(codes)), ""


def babysit(states, runs, *flags):
    args = tpu_vm.parse(["babysit", *WHERE, "--accelerator_type", "v4-32", "--poll", "0", *flags, *TRAIN])
    g = Scripted(args, states, runs)
    return tpu_vm.babysit(g, args), g.log


def test_babysit_recreates_a_preempted_vm_and_reruns_until_done():
    code, log = babysit(["READY", "PREEMPTED", "PREEMPTED", "READY", "READY", "READY"],
                        [(255, []), (75, [75, 75, 75, 75]), (0, [0, 0, 0, 0])])
    assert code == 0
    assert log == ["describe", "tar", "scp", "setup", "run", "exit_codes", "describe",  # ssh lost, VM preempted
                   "describe", "delete", "create", "tar", "scp", "setup", "run", "exit_codes", "describe",  # 75
                   "describe", "run", "exit_codes", "describe"]  # same VM, no new setup: done


def test_babysit_stops_on_a_final_code_and_after_max_restarts():
    assert babysit(["READY", "READY"], [(1, [2, 2, 2, 2])])[0] == 2
    code, log = babysit(["READY"] * 10, [(1, [76, 76, 1, 76])] * 2)
    assert code == 1 and log.count("run") == 1  # a crash on a healthy VM would only repeat
    code, log = babysit(["READY"] * 10, [(75, [75] * 4)] * 3, "--max_restarts", "2")
    assert code == 75 and log.count("run") == 3


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], check=True)
