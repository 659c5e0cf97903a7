"""``outbox verify --since`` with hostile values (I8).

A value the duration parser lets through but ``timedelta`` or the date arithmetic cannot
take (NaN, infinity, more days than a timedelta holds, a window reaching before year 1) must
be a usage error naming --since and the fix (exit 2), not a traceback whose exit code (1) is
the one documented for findings.
"""

from __future__ import annotations

import pytest

from outbox.cli.commands import ExitCode, main
from outbox.cli.delivery import parse_duration
from outbox.errors import ConfigError

# float() reads each of these: "nan", "inf", "1e400" (infinity) and a finite number of days
# past timedelta's 999,999,999.
UNPARSABLE = ["nand", "infh", "1e400s", "1e9d"]


@pytest.mark.parametrize("raw", UNPARSABLE)
def test_i8_since_values_float_reads_but_no_duration_holds_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="--since"):
        parse_duration(raw)


@pytest.mark.parametrize("raw", [*UNPARSABLE, "5000000d"])
def test_i8_verify_refuses_such_a_since_with_the_usage_exit_code_before_connecting(
    raw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """5000000d is a valid timedelta, but now minus it is before year 1 (OverflowError)."""
    args = [
        "verify",
        "--db",
        "postgresql://app:s3cret@127.0.0.1:1/app",  # never reached: the option is checked first
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--topic",
        "orders",
        "--since",
        raw,
    ]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    err = capsys.readouterr().err
    assert stopped.value.code == ExitCode.USAGE, err
    assert "--since" in err
    assert "s3cret" not in err
