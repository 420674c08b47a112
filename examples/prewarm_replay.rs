//! The figure of docs/prewarm.md: a synthetic weekly trace replayed through the learner for
//! two months from an empty history (`cargo run --example prewarm_replay`).

use std::time::Duration;

use reveille::prewarm::replay::{replay, totals, AD_HOC_PER_WEEK, TRACE};

fn main() {
    let lead = Duration::from_secs(60);
    let weeks = replay(8, lead, 10.0, Duration::from_secs(300), 7);
    println!(
        "trace: {} recurring jobs ({} starts a week) + {AD_HOC_PER_WEEK} ad-hoc requests a week; lead 60s, idle_timeout 5m, max_hours_per_week 10",
        TRACE.len(),
        TRACE.iter().map(|j| j.days.len()).sum::<usize>()
    );
    println!("| week | starts | warm | warm hours |");
    println!("|---:|---:|---:|---:|");
    for (i, w) in weeks.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.2} |",
            i + 1,
            w.starts,
            w.warm,
            w.warm_hours
        );
    }
    for (name, range) in [("month 1 (weeks 1-4)", 0..4), ("month 2 (weeks 5-8)", 4..8)] {
        let (s, w, h) = totals(&weeks[range]);
        println!(
            "{name}: {w} of {s} starts warm ({:.0}%), {h:.1} warm hours",
            100.0 * w as f64 / s as f64
        );
    }
}
