"""--profile_from: a jax.profiler trace of the chosen steps; off, jax.profiler is never touched."""

import gzip
import json

import jax

from parallel_gpt import profile
from test_train import TINY, run_cli


def test_a_profile_of_steps_3_to_5_lands_in_out_dir(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_cli("train", *TINY, f"--out_dir={out}", "--max_iters=6", "--sample_tokens=0", "--profile_from=3",
                     "--profile_steps=3")
    assert result.returncode == 0, result.stderr
    assert f"profile of steps 3-5 in {out / 'profile' / 'process_0'}" in result.stdout
    (folder,) = (out / "profile" / "process_0" / "plugins" / "profile").iterdir()
    (xplane,) = folder.glob("*.xplane.pb")
    assert xplane.stat().st_size > 0
    events = json.loads(gzip.decompress((folder / "perfetto_trace.json.gz").read_bytes()))["traceEvents"]
    assert [e["args"]["step_num"] for e in events if e.get("name") == "train"] == ["3", "4", "5"]


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"jax.profiler.{name} used")


def test_off_or_on_another_process_nothing_is_traced(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "profiler", Untouchable())
    for first, main_process in ((0, True), (3, False)):  # off; on, for process 0 only, seen from process 1
        monkeypatch.setattr(profile, "is_main_process", lambda: main_process)
        trace = profile.StepTrace(tmp_path, first, 3, all_processes=False)
        for step in range(1, 10):
            trace.before(step)
            trace.after(step, None)
        trace.close()
    assert not (tmp_path / "profile").exists()
