"""metrics.py: metrics.jsonl and TensorBoard rows, rewound on resume; the progress line."""

import json

from parallel_gpt.metrics import MetricsLog, progress


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_log_drops_the_rows_after_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, start_step=0)
    for step in range(1, 6):
        log.write(step, loss=1.0 / step, mfu=None)  # None figures are left out
    log.close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5] and "mfu" not in rows(tmp_path)[0]

    resumed = MetricsLog(tmp_path, start_step=3)  # a crash after step 5, the newest checkpoint at 3
    resumed.write(4, loss=0.3)
    resumed.flush()
    resumed.close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4] and rows(tmp_path)[-1]["loss"] == 0.3


def test_progress_shows_the_fraction_done_and_the_time_left():
    assert progress(50, 100, elapsed=30.0, done_since_start=25) == "[##########..........]  50% ETA 1m00s"
    assert progress(100, 100, elapsed=5.0, done_since_start=0).endswith("100% ETA 0m00s")
