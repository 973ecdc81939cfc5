"""`balance-server` arguments and BALANCE_* environment variables -> Settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from balance_server.cli import parse_settings
from balance_server.settings import Settings

# Each option: its flag, its environment variable, a value as text, the Settings field and the
# value it becomes.
OPTIONS = [
    ("--listen", "BALANCE_LISTEN", "0.0.0.0:6000", "listen", "0.0.0.0:6000"),
    ("--dsn", "BALANCE_DSN", "postgresql://balance@db/balance", "dsn", "postgresql://balance@db/balance"),
    ("--data-dir", "BALANCE_DATA_DIR", "/var/lib/balance", "data_dir", Path("/var/lib/balance")),
    ("--pool-min-size", "BALANCE_POOL_MIN_SIZE", "2", "pool_min_size", 2),
    ("--pool-max-size", "BALANCE_POOL_MAX_SIZE", "32", "pool_max_size", 32),
    ("--read-pool-max-size", "BALANCE_READ_POOL_MAX_SIZE", "3", "read_pool_max_size", 3),
    ("--report-pool-max-size", "BALANCE_REPORT_POOL_MAX_SIZE", "5", "report_pool_max_size", 5),
    ("--default-currency", "BALANCE_DEFAULT_CURRENCY", "eur", "default_currency", "EUR"),
    ("--log-level", "BALANCE_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("--shutdown-grace", "BALANCE_SHUTDOWN_GRACE", "2.5", "shutdown_grace_seconds", 2.5),
    ("--db-connect-attempts", "BALANCE_DB_CONNECT_ATTEMPTS", "3", "db_connect_attempts", 3),
    ("--db-connect-interval", "BALANCE_DB_CONNECT_INTERVAL", "0.25", "db_connect_interval_seconds", 0.25),
    ("--health-check-interval", "BALANCE_HEALTH_CHECK_INTERVAL", "5", "health_check_interval_seconds", 5.0),
    (
        "--idempotency-key-retention-days",
        "BALANCE_IDEMPOTENCY_KEY_RETENTION_DAYS",
        "30",
        "idempotency_key_retention_days",
        30,
    ),
    ("--workers", "BALANCE_WORKERS", "4", "workers", 4),
    ("--max-calls-in-flight", "BALANCE_MAX_CALLS_IN_FLIGHT", "64", "max_calls_in_flight", 64),
    ("--event-loop", "BALANCE_EVENT_LOOP", "AsyncIO", "event_loop", "asyncio"),
]
OPTION_IDS = [option[0] for option in OPTIONS]


def test_no_arguments_serve_with_the_defaults():
    """Without flags or environment the command is serve and every setting is its default."""
    assert parse_settings([], {}) == ("serve", Settings())


def test_the_defaults_are_the_documented_ones():
    """The defaults are a local listener, the embedded database and modest pools."""
    defaults = Settings()
    assert (defaults.listen, defaults.dsn, defaults.default_currency, defaults.log_level, defaults.workers) == (
        "127.0.0.1:50051",
        None,
        "USD",
        "INFO",
        1,
    )


@pytest.mark.parametrize(("command", "expected"), [(["serve"], "serve"), (["migrate"], "migrate")])
def test_the_command_is_parsed(command, expected):
    """`serve` and `migrate` are the commands; the settings come with either."""
    assert parse_settings([*command, "--workers", "2"], {}) == (expected, Settings(workers=2))


@pytest.mark.parametrize(("flag", "variable", "text", "field", "value"), OPTIONS, ids=OPTION_IDS)
def test_each_flag_sets_its_field(flag, variable, text, field, value):
    """Each flag sets exactly its own setting, parsed to its type."""
    _, settings = parse_settings([flag, text], {})
    assert settings == Settings(**{field: value})


@pytest.mark.parametrize(("flag", "variable", "text", "field", "value"), OPTIONS, ids=OPTION_IDS)
def test_each_environment_variable_sets_its_field(flag, variable, text, field, value):
    """Each BALANCE_* variable sets exactly its own setting, parsed to its type."""
    _, settings = parse_settings([], {variable: text})
    assert settings == Settings(**{field: value})


def test_unrelated_environment_variables_are_ignored():
    """Only BALANCE_* variables of known options are read."""
    assert parse_settings([], {"PGHOST": "elsewhere", "BALANCE_COLOUR": "blue", "LISTEN": "x"}) == (
        "serve",
        Settings(),
    )


def test_flags_win_over_the_environment():
    """A flag given on the command line overrides its environment variable."""
    _, settings = parse_settings(
        ["--workers", "5", "--listen", "0.0.0.0:7000", "--log-level", "warning"],
        {"BALANCE_WORKERS": "3", "BALANCE_LISTEN": "0.0.0.0:6000", "BALANCE_LOG_LEVEL": "ERROR"},
    )
    assert (settings.workers, settings.listen, settings.log_level) == (5, "0.0.0.0:7000", "WARNING")


def test_an_empty_dsn_means_the_embedded_database():
    """An empty DSN, as flag or variable, means no DSN: the embedded PostgreSQL."""
    assert parse_settings(["--dsn", ""], {"BALANCE_DSN": "postgresql://x"})[1].dsn is None
    assert parse_settings([], {"BALANCE_DSN": ""})[1].dsn is None


@pytest.mark.parametrize(
    "arguments",
    [
        ["--pool-min-size", "x"],
        ["--pool-min-size", "0"],
        ["--pool-min-size", "5", "--pool-max-size", "4"],
        ["--read-pool-max-size", "0"],
        ["--report-pool-max-size", "0"],
        ["--workers", "0"],
        ["--workers", "-1"],
        ["--log-level", "verbose"],
        ["--event-loop", "trio"],
        ["--max-calls-in-flight", "0"],
        ["--shutdown-grace", "soon"],
        ["--db-connect-attempts", "1.5"],
        ["--unknown-flag", "1"],
        ["deploy"],
        ["serve", "migrate"],
    ],
)
def test_bad_flags_are_refused(arguments, capsys):
    """Unparsable numbers, impossible pool sizes, unknown levels, flags or commands stop with SystemExit."""
    with pytest.raises(SystemExit) as stopped:
        parse_settings(arguments, {})
    assert stopped.value.code not in (0, None)


@pytest.mark.parametrize(
    "environment",
    [{"BALANCE_WORKERS": "0"}, {"BALANCE_LOG_LEVEL": "verbose"}, {"BALANCE_POOL_MIN_SIZE": "20"}],
)
def test_bad_environment_values_that_parse_are_refused(environment):
    """A variable with a well-formed but impossible value stops with SystemExit, as its flag would."""
    with pytest.raises(SystemExit):
        parse_settings([], environment)


@pytest.mark.parametrize(
    "environment",
    [{"BALANCE_WORKERS": "many"}, {"BALANCE_POOL_MAX_SIZE": "1.5"}, {"BALANCE_SHUTDOWN_GRACE": "soon"}],
)
def test_unparsable_environment_values_are_refused(environment):
    """A variable whose value is not of its option's type stops with SystemExit, as its flag would."""
    with pytest.raises(SystemExit):
        parse_settings([], environment)


@pytest.mark.parametrize(
    "arguments",
    [
        ["--db-connect-attempts", "0"],
        ["--db-connect-interval", "-1"],
        ["--health-check-interval", "0"],
        ["--shutdown-grace", "-5"],
        ["--shutdown-grace", "nan"],
    ],
)
def test_meaningless_counts_and_durations_are_refused(arguments):
    """Zero connection attempts, a zero health-check interval, and negative or NaN durations stop with SystemExit."""
    with pytest.raises(SystemExit):
        parse_settings(arguments, {})
