use super::*;
use crate::config::Config;

fn windows(yaml: &str) -> Vec<ScheduledWindow> {
    let cfg = Config::parse(&format!(
        "services:\n  - name: a\n    hosts: [a]\n    backend: {{ process: {{ command: [x], address: \"127.0.0.1:9\" }} }}\n    prewarm:\n      schedule:\n{yaml}"
    ))
    .unwrap();
    cfg.services[0].prewarm.clone().unwrap().schedule
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn occ(ws: &[ScheduledWindow], from: &str, to: &str) -> Vec<(String, String)> {
    all_occurrences(ws, ts(from), ts(to))
        .into_iter()
        .map(|o| (o.start.to_string(), o.end.to_string()))
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[test]
fn a_weekday_window_in_utc() {
    let ws = windows(
        "        - { days: [mon, tue, wed, thu, fri], start: \"06:00\", end: \"06:30\" }\n",
    );
    // 2026-12-07 is a Monday.
    let got = occ(&ws, "2026-12-05T00:00:00Z", "2026-12-09T00:00:00Z");
    assert_eq!(
        got,
        vec![
            pair("2026-12-07T06:00:00Z", "2026-12-07T06:30:00Z"),
            pair("2026-12-08T06:00:00Z", "2026-12-08T06:30:00Z"),
        ]
    );
}

#[test]
fn a_window_moves_in_utc_when_the_clocks_change() {
    let ws = windows(
        "        - { days: [mon], start: \"07:45\", end: \"11:00\", timezone: Europe/Amsterdam }\n",
    );
    // Summer time ends on Sunday 2026-10-25: the Monday before is +02, the one after +01.
    let got = occ(&ws, "2026-10-19T00:00:00Z", "2026-10-27T00:00:00Z");
    assert_eq!(
        got,
        vec![
            pair("2026-10-19T05:45:00Z", "2026-10-19T09:00:00Z"),
            pair("2026-10-26T06:45:00Z", "2026-10-26T10:00:00Z"),
        ]
    );
}

#[test]
fn a_window_in_the_skipped_hour_starts_at_the_first_valid_minute() {
    // 2026-03-29 in Amsterdam: 02:00 jumps to 03:00 (CET +01 to CEST +02).
    let ws = windows(
        "        - { days: [sun], start: \"02:30\", end: \"04:00\", timezone: Europe/Amsterdam }\n",
    );
    let got = occ(&ws, "2026-03-28T00:00:00Z", "2026-03-30T00:00:00Z");
    // 03:00 CEST = 01:00Z; 04:00 CEST = 02:00Z.
    assert_eq!(
        got,
        vec![pair("2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z")]
    );
    // A window ending in the gap ends at its first valid minute too.
    let ws = windows(
        "        - { days: [sun], start: \"01:00\", end: \"02:30\", timezone: Europe/Amsterdam }\n",
    );
    let got = occ(&ws, "2026-03-28T00:00:00Z", "2026-03-30T00:00:00Z");
    assert_eq!(
        got,
        vec![pair("2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z")]
    );
}

#[test]
fn a_window_in_the_repeated_hour_covers_both_passes() {
    // 2026-10-25 in Amsterdam: 03:00 CEST falls back to 02:00 CET; 02:15–02:45 happens twice.
    let ws = windows(
        "        - { days: [sun], start: \"02:15\", end: \"02:45\", timezone: Europe/Amsterdam }\n",
    );
    let got = occ(&ws, "2026-10-24T00:00:00Z", "2026-10-26T00:00:00Z");
    // From the first 02:15 (+02, 00:15Z) to the second 02:45 (+01, 01:45Z).
    assert_eq!(
        got,
        vec![pair("2026-10-25T00:15:00Z", "2026-10-25T01:45:00Z")]
    );
}

#[test]
fn a_window_in_new_york_across_the_spring_change() {
    // 2026-03-08: 02:00 EST jumps to 03:00 EDT.
    let ws = windows(
        "        - { days: [sat, sun], start: \"01:30\", end: \"03:30\", timezone: America/New_York }\n",
    );
    let got = occ(&ws, "2026-03-07T00:00:00Z", "2026-03-09T00:00:00Z");
    assert_eq!(
        got,
        vec![
            // Saturday, EST (-05): two hours.
            pair("2026-03-07T06:30:00Z", "2026-03-07T08:30:00Z"),
            // Sunday: 01:30 EST (06:30Z) to 03:30 EDT (07:30Z): one hour of wall time.
            pair("2026-03-08T06:30:00Z", "2026-03-08T07:30:00Z"),
        ]
    );
}

#[test]
fn a_window_crossing_midnight_and_the_end_of_the_week() {
    let ws = windows("        - { days: [sun], start: \"22:00\", end: \"02:00\" }\n");
    // Sunday 2026-12-13 22:00 to Monday 02:00; seen from Monday 01:00 it is still open.
    let got = occ(&ws, "2026-12-14T01:00:00Z", "2026-12-14T12:00:00Z");
    assert_eq!(
        got,
        vec![pair("2026-12-13T22:00:00Z", "2026-12-14T02:00:00Z")]
    );
    // And none is open on Monday evening.
    assert!(occ(&ws, "2026-12-14T03:00:00Z", "2026-12-20T21:00:00Z").is_empty());
}

#[test]
fn a_window_ending_at_midnight_in_a_zone() {
    let ws = windows(
        "        - { days: [fri], start: \"23:00\", end: \"00:00\", timezone: Asia/Tokyo }\n",
    );
    let got = occ(&ws, "2026-12-10T00:00:00Z", "2026-12-12T00:00:00Z");
    // Friday 2026-12-11 23:00 JST = 14:00Z, to Saturday 00:00 JST = 15:00Z.
    assert_eq!(
        got,
        vec![pair("2026-12-11T14:00:00Z", "2026-12-11T15:00:00Z")]
    );
}

#[test]
fn bad_windows_are_reported_with_their_path() {
    let e = Config::parse(
        "services:\n  - name: a\n    hosts: [a]\n    backend: { process: { command: [x], address: \"127.0.0.1:9\" } }\n    prewarm:\n      lead: soon\n      max_hours_per_week: 0\n      schedule:\n        - { days: [mon, funday], start: \"25:00\", end: \"7:5\", timezone: Mars/Olympus }\n        - { days: [], start: \"06:00\", end: \"06:00\" }\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "services[0].prewarm.lead: \"soon\" is neither `auto`",
        "services[0].prewarm.max_hours_per_week: must be more than 0",
        "services[0].prewarm.schedule[0].days[1]: \"funday\" is not a day",
        "services[0].prewarm.schedule[0].start: \"25:00\" is not a time",
        "services[0].prewarm.schedule[0].end: \"7:5\" is not a time",
        "services[0].prewarm.schedule[0].timezone: \"Mars/Olympus\" is not a known IANA time zone",
        "services[0].prewarm.schedule[1].days: at least one day is required",
        "services[0].prewarm.schedule[1].end: must differ from start",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn depends_on_rejects_unknown_names_self_and_cycles() {
    let svc = |name: &str, port: u16, deps: &str| {
        format!("  - name: {name}\n    hosts: [{name}]\n    backend: {{ process: {{ command: [x], address: \"127.0.0.1:{port}\" }} }}\n    depends_on: [{deps}]\n")
    };
    let text = format!(
        "services:\n{}{}{}{}",
        svc("a", 1, "b"),
        svc("b", 2, "c"),
        svc("c", 3, "a, nope"),
        svc("d", 4, "d"),
    );
    let e = Config::parse(&text).unwrap_err().to_string();
    for want in [
        "services[2].depends_on[1]: unknown service \"nope\"",
        "services[3].depends_on[0]: a service cannot depend on itself",
        "services[0].depends_on: dependency cycle: a -> b -> c -> a",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    assert_eq!(e.matches("dependency cycle").count(), 1, "{e}");
    let ok = format!("services:\n{}{}", svc("a", 1, "b"), svc("b", 2, ""));
    assert!(Config::parse(&ok).is_ok());
}
