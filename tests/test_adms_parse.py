"""The ZKTeco ATTLOG parser and handshake, as pure code (the endpoints: test_adms.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hub.adms import handshake, parse_attlog

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_record_maps_status_verify_and_the_site_time() -> None:
    body = "1001\t2026-11-30 08:00:00\t0\t15\t0\t0\t0\t0\n1001\t2026-11-30 12:00:00\t2\t1\t0\n"
    records, bad = parse_attlog(body, BERLIN)
    assert bad == []
    assert [(r.pin, r.at, r.kind, r.method) for r in records] == [
        ("1001", at("2026-11-30 07:00:00"), "in", "face"),
        ("1001", at("2026-11-30 11:00:00"), "break_start", "fingerprint"),
    ]


def test_every_status_and_verify_code() -> None:
    lines = [
        f"7\t2026-06-01 09:00:0{s}\t{s}\t{v}" for s, v in enumerate(("1", "3", "4", "15", "0", "2"))
    ]
    records, bad = parse_attlog("\r\n".join(lines), BERLIN)
    assert bad == []
    assert [r.kind for r in records] == ["in", "out", "break_start", "break_end", "in", "out"]
    assert [r.method for r in records] == ["fingerprint", "pin", "badge", "face", None, None]
    # Summer in Berlin: UTC+2.
    assert records[0].at == at("2026-06-01 07:00:00")


def test_a_time_with_its_own_offset_wins_over_the_site() -> None:
    records, _ = parse_attlog(
        "1\t2026-11-30 08:00:00+05:30\t0\n"
        "2\t2026-11-30 08:00:00Z\t0\n"
        "3\t2026-11-30T08:00:00-0800\t1",
        BERLIN,
    )
    assert [r.at for r in records] == [
        at("2026-11-30 02:30:00"),
        at("2026-11-30 08:00:00"),
        at("2026-11-30 16:00:00"),
    ]


def test_the_night_clocks_go_back_takes_the_first_of_the_repeated_hour() -> None:
    # 2026-10-25 in Berlin: 02:00-03:00 happens twice (CEST, then CET).
    records, _ = parse_attlog("1\t2026-10-25 02:30:00\t1\n1\t2026-03-29 02:30:00\t0", BERLIN)
    assert records[0].at == at("2026-10-25 00:30:00")
    # 02:30 never happened on 2026-03-29: the clock was still on CET.
    assert records[1].at == at("2026-03-29 01:30:00")


def test_bad_lines_are_reported_and_the_good_ones_kept() -> None:
    body = "\n".join(
        [
            "1\t2026-11-30 08:00:00\t0",
            "only two\tfields",
            "2\t30/11/2026 08:00\t0",
            "3\t2026-11-30 08:00:00\t9",
            "\t2026-11-30 08:00:00\t0",
            f"{'x' * 65}\t2026-11-30 08:00:00\t0",
            "4\t2026-02-30 08:00:00\t0",
            "",
            "5\t2026-11-30 09:00:00\t1",
        ]
    )
    records, bad = parse_attlog(body, BERLIN)
    assert [r.pin for r in records] == ["1", "5"]
    assert [b.line.split("\t")[0] for b in bad] == ["only two", "2", "3", "", "x" * 65, "4"]
    assert "fewer than 3" in bad[0].reason
    assert "unreadable time" in bad[1].reason
    assert "unknown status" in bad[2].reason
    assert "PIN" in bad[3].reason and "PIN" in bad[4].reason
    assert "unreadable time" in bad[5].reason


def test_a_record_is_keyed_by_its_own_fields() -> None:
    one, _ = parse_attlog("9\t2026-11-30 08:00:00\t0\t1\t0", BERLIN)
    again, _ = parse_attlog("9\t2026-11-30 08:00:00\t0\t4\t0\t255\n", BERLIN)
    other, _ = parse_attlog("9\t2026-11-30 08:00:00\t1\t1\t0", BERLIN)
    assert one[0].key == again[0].key != other[0].key


def test_the_handshake_lists_the_options_in_order() -> None:
    text = handshake("CKJ1", ("42", None), 10, ZoneInfo("Asia/Kolkata"))
    lines = text.splitlines()
    assert lines[0] == "GET OPTION FROM: CKJ1"
    options = dict(line.split("=", 1) for line in lines[1:])
    assert list(options) == [
        "ATTLOGStamp",
        "OPERLOGStamp",
        "ATTPHOTOStamp",
        "ErrorDelay",
        "Delay",
        "TransTimes",
        "TransInterval",
        "TransFlag",
        "TimeZone",
        "Realtime",
        "Encrypt",
    ]
    assert options["ATTLOGStamp"] == "42"
    assert options["OPERLOGStamp"] == "None"
    assert options["TimeZone"] == "5.5"
    assert options["Delay"] == "10"
    assert text.endswith("\n")
