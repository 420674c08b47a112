//! Fault load tests: each scenario sends a bounded burst to Reveille on loopback while a fault
//! is injected, then prints what the requests got — sent, answered by status, refused, lost.
//! `lost` (a request sent that got no answer) must be 0; the run exits 1 otherwise.
//!
//! ```sh
//! loadtests/faults.sh            # builds in release and runs every scenario
//! ```
//! The same scenarios run with small counts as integration tests (`tests/faults.rs`).

#[path = "../tests/support/mod.rs"]
mod support;

use support::load;

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let mut failed = false;
    let mut report = |name: &str, t: &load::Tally, extra: String| {
        println!("{name:<32} {t}{extra}");
        if t.lost > 0 {
            failed = true;
        }
    };
    let t = load::backend_killed_during_drain(n).await;
    report("backend killed during drain", &t, String::new());
    let t = load::backend_resets_at_random(n).await;
    report("backend resets at random", &t, String::new());
    let (t, closed) = load::slowloris(200, n).await;
    report(
        "slowloris (200 slow clients)",
        &t,
        format!("; slow connections closed: {closed}/200"),
    );
    let t = load::burst_beyond_the_queue(n, n / 2, "2s").await;
    report(
        "burst of twice the queue bound",
        &t,
        format!(" (capacity {})", n / 2),
    );
    let t = load::reload_during_burst(n).await;
    report(
        "config reloaded during burst",
        &t,
        " (5 reloads)".to_string(),
    );
    let (t, code) = load::sigterm_during_burst(n).await;
    report("SIGTERM during burst", &t, format!("; exit {code:?}"));
    if failed {
        eprintln!("FAILED: some requests were lost");
        std::process::exit(1);
    }
}
