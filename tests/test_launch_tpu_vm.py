"""launch/tpu_vm.py and launch/slurm.sbatch, without a cloud: `--dry_run` output against
golden files, the babysitter's decisions, and the batch script's syntax.

Regenerate the golden files after an intended change with UPDATE_GOLDEN=1."""

import importlib.util
import os
import shlex
import shutil
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


def dry_run(*args, path=None):
    """stdout of a dry run; a `gcloud` on PATH that fails the test if it is ever called."""
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}"} if path else os.environ
    result = subprocess.run([sys.executable, str(TPU_VM), "--dry_run", *args], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def no_gcloud(tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    fake = bin_dir / "gcloud"
    fake.write_text("#!/bin/sh\necho 'gcloud must not run in a dry run' >&2\nexit 99\n")
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("accelerator", ["v4-8", "v4-32"])
@pytest.mark.parametrize("mode", ["on_demand", "spot", "queued"])
def test_dry_run_prints_the_golden_commands(accelerator, mode, no_gcloud):
    flags = {"on_demand": [], "spot": ["--spot"], "queued": ["--spot", "--queued", "--valid_until", "6h"]}[mode]
    typed = ["--accelerator_type", accelerator, *flags]
    text = "".join(f"$ tpu_vm.py {action}\n" + dry_run(action, *WHERE, *extra, path=no_gcloud) for action, extra in [
        ("create", typed), ("setup", []), ("run", TRAIN), ("logs", []), ("status", []), ("stop", []),
        ("delete", ["--queued"] if mode == "queued" else []), ("babysit", [*typed, *TRAIN])])
    for line in text.splitlines():
        if line.startswith("gcloud"):
            assert shlex.join(shlex.split(line)) == line  # each line is exactly what would run
    golden = GOLDEN / f"tpu_vm_{accelerator}_{mode}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_hosts_follow_the_slice():
    assert [tpu_vm.hosts(t) for t in ("v4-8", "v4-32", "v5litepod-8", "v5litepod-16", "v5p-8", "v6e-64")] == \
        [1, 4, 1, 4, 1, 16]


@pytest.mark.parametrize("code, state, action", [
    (0, "READY", "done"), (0, "PREEMPTED", "done"),
    (75, "READY", "rerun"), (76, "READY", "rerun"), (134, "READY", "rerun"), (255, "READY", "rerun"),
    (255, "PREEMPTED", "recreate"), (75, "MISSING", "recreate"), (134, "TERMINATED", "recreate"),
    (2, "READY", "fail"), (3, "READY", "fail"), (1, "READY", "fail"),
])
def test_babysit_decisions(code, state, action):
    assert tpu_vm.decide(code, state) == action


def test_bad_usage_is_one_line_and_exit_code_2():
    for args in (["create", *WHERE, "--accelerator_type", "v9-8"], ["run", *WHERE]):
        result = subprocess.run([sys.executable, str(TPU_VM), "--dry_run", *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error:")


def test_the_packed_checkout_leaves_out_environments_and_history(tmp_path):
    import tarfile

    archive = tmp_path / "c.tar.gz"
    tpu_vm.pack_checkout(str(archive))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "./parallel_gpt/train.py" in names and "./launch/tpu_vm.py" in names
    assert not [n for n in names if set(Path(n).parts) & {".git", ".venv", "__pycache__"}]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], check=True)
