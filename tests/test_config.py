"""Settings from the environment (hub/config.py): the abuse limits and the drain window."""

from __future__ import annotations

import pytest

from hub.config import ConfigError, Settings


def test_limits_have_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.allowed_origins == ()
    assert (settings.rate_per_s, settings.rate_burst, settings.rate_flood) == (50, 200, 100)
    assert settings.max_connections_per_tenant == 10_000
    assert (settings.connect_rate_per_ip, settings.connect_burst_per_ip) == (600, 300)
    assert (settings.rest_rate_per_ip, settings.rest_burst_per_ip) == (6000, 1000)


def test_allowed_origins_are_a_comma_separated_list_of_normalized_origins() -> None:
    env = {"ATTENDANCE_ALLOWED_ORIGINS": " https://Dash.example.com/ ,, capacitor://localhost,*"}
    assert Settings.from_env(env).allowed_origins == (
        "https://dash.example.com",
        "capacitor://localhost",
        "*",
    )


@pytest.mark.parametrize("value", ["dash.example.com", "https://dash.example.com/app", "null"])
def test_what_is_not_an_origin_stops_the_hub_with_an_example(value: str) -> None:
    with pytest.raises(ConfigError, match=r"ATTENDANCE_ALLOWED_ORIGINS: .*https://dash\."):
        Settings.from_env({"ATTENDANCE_ALLOWED_ORIGINS": value})


@pytest.mark.parametrize(
    "name",
    [
        "ATTENDANCE_RATE_BURST",
        "ATTENDANCE_MAX_CONNECTIONS_PER_TENANT",
        "ATTENDANCE_CONNECT_BURST_PER_IP",
        "ATTENDANCE_REST_BURST_PER_IP",
    ],
)
def test_bursts_and_the_tenant_cap_are_at_least_one(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be at least 1"):
        Settings.from_env({name: "0"})


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("ATTENDANCE_RATE_PER_S", "rate_per_s"),
        ("ATTENDANCE_RATE_FLOOD", "rate_flood"),
        ("ATTENDANCE_CONNECT_RATE_PER_IP", "connect_rate_per_ip"),
        ("ATTENDANCE_REST_RATE_PER_IP", "rest_rate_per_ip"),
    ],
)
def test_rates_and_the_flood_limit_may_be_zero(name: str, field: str) -> None:
    # A rate of 0 turns that limit off; a flood limit of 0 closes at the first refusal.
    assert getattr(Settings.from_env({name: "0"}), field) == 0


@pytest.mark.parametrize(("rate", "flood"), [("5", "50"), ("1", "10"), ("5", "1000")])
def test_a_flood_limit_the_rate_could_never_reach_is_refused(rate: str, flood: str) -> None:
    env = {"ATTENDANCE_RATE_PER_S": rate, "ATTENDANCE_RATE_FLOOD": flood}
    with pytest.raises(ConfigError, match=r"ATTENDANCE_RATE_FLOOD .* must be below"):
        Settings.from_env(env)


def test_a_flood_limit_within_reach_of_the_rate_is_taken() -> None:
    env = {"ATTENDANCE_RATE_PER_S": "5", "ATTENDANCE_RATE_FLOOD": "49"}
    assert Settings.from_env(env).rate_flood == 49


def test_the_drain_window_is_short_for_a_hub_on_its_own() -> None:
    assert Settings.from_env({}).drain_window_s == 1.0
    assert Settings.from_env({"ATTENDANCE_REDIS_URL": "redis://r:6379"}).drain_window_s == 5.0
    chosen = {"ATTENDANCE_REDIS_URL": "redis://r:6379", "ATTENDANCE_DRAIN_WINDOW_S": "2.5"}
    assert Settings.from_env(chosen).drain_window_s == 2.5
    assert Settings.from_env({"ATTENDANCE_DRAIN_WINDOW_S": "0"}).drain_window_s == 0.0
