"""The exit codes and the one-line error path every command shares."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_gpt import errors

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def raising(error):
    def body(argv):
        raise error
    return body


def test_run_cli_turns_failures_and_os_errors_into_one_line_and_their_code(capsys):
    assert errors.run_cli(raising(errors.HFError("bad config.json")), []) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: bad config.json\n"
    assert errors.run_cli(raising(errors.NonFiniteError("nan")), []) == errors.EXIT_NONFINITE
    capsys.readouterr()

    def unreadable(_):
        open("/nonexistent/dir/file")

    assert errors.run_cli(unreadable, []) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: /nonexistent/dir/file: No such file or directory")


def test_run_cli_lets_a_group_process_leave_first_and_passes_other_errors_through():
    left = []
    assert errors.run_cli(raising(errors.DataError("x")), [], leave=lambda line, code: left.append((line, code))) == 2
    assert left == [("x", 2)]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        errors.run_cli(raising(ZeroDivisionError()), [])


def test_every_user_error_is_one_class_and_exit_2():
    for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.OutputError,
                errors.LayoutError, errors.ProcessSetupError, errors.HFError):
        assert issubclass(cls, errors.UserError) and cls.exit_code == errors.EXIT_BAD_INPUT


def test_errors_import_nothing_heavy():
    code = "import sys, parallel_gpt.errors; print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_launch_scripts_spell_the_exit_codes_the_trainer_uses():
    sys.path.insert(0, str(LAUNCH))
    try:
        import local
        import tpu_vm
    finally:
        sys.path.remove(str(LAUNCH))
    assert local.EXIT_INTERRUPTED == errors.EXIT_INTERRUPTED
    assert (tpu_vm.EXIT_DONE, tpu_vm.EXIT_BAD_INPUT, tpu_vm.EXIT_NONFINITE) == (
        errors.EXIT_OK, errors.EXIT_BAD_INPUT, errors.EXIT_NONFINITE)
    assert tpu_vm.RETRY_CODES == errors.RESUMABLE
    (requeue,) = re.findall(r"^\s*([\d|]+)\) scontrol requeue", (LAUNCH / "slurm.sbatch").read_text(), re.M)
    assert tuple(map(int, requeue.split("|"))) == errors.RESUMABLE
