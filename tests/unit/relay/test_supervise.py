"""The --processes supervisor's pure parts: what each child is started with."""

from __future__ import annotations

from outbox.relay.supervise import child_argv, child_env


def test_child_drops_the_supervisors_own_options_in_both_spellings() -> None:
    argv = ["relay", "--db", "u", "--processes", "2", "--metrics-port=9400", "--slots", "4"]
    assert child_argv(argv) == ["relay", "--db", "u", "--slots", "4"]
    assert child_argv(["relay", "--processes=3", "--once"]) == ["relay", "--once"]


def test_each_child_runs_one_process_and_gets_its_own_metrics_port() -> None:
    base = {"OUTBOX_PROCESSES": "2", "OUTBOX_METRICS_PORT": "9400", "PATH": "/bin"}
    assert child_env(base, 1, 9400) == {
        "OUTBOX_PROCESSES": "1",
        "OUTBOX_METRICS_PORT": "9401",
        "PATH": "/bin",
    }
    assert "OUTBOX_METRICS_PORT" not in child_env(base, 0, None)
