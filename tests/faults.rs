//! The cheap fault scenarios of `loadtests/faults.rs`, with small counts: every request gets an
//! answer, none is lost.

mod support;

use support::load;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_during_drain_loses_nothing() {
    let t = load::backend_killed_during_drain(200).await;
    println!("backend killed during drain: {t}");
    assert_eq!(t.lost, 0, "{t}");
    assert_eq!(t.refused, 0, "{t}");
    assert_eq!(t.answered(), 200, "{t}");
    // Cut-off GETs are idempotent with no body: retried, held, answered by the new backend.
    assert_eq!(t.count(200), 200, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_backend_resets_lose_nothing() {
    let t = load::backend_resets_at_random(300).await;
    println!("backend resets at random: {t}");
    assert_eq!(t.lost, 0, "{t}");
    assert_eq!(t.answered(), 300, "{t}");
    // GETs are retried on reset (idempotent, nothing of the body sent): nearly all succeed.
    assert!(t.count(200) >= 290, "{t}");
    assert_eq!(t.count(200) + t.count(502), 300, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_starve_normal_clients() {
    let (t, closed) = load::slowloris(50, 100).await;
    println!("slowloris: normal {t}; slow connections closed: {closed}/50");
    assert_eq!(t.count(200), 100, "{t}");
    assert_eq!(t.lost, 0, "{t}");
    assert!(t.by_kind.is_empty(), "no refusal by Reveille: {t}");
    assert_eq!(
        closed, 50,
        "every slow connection was closed by the header timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_queue_bound_is_refused_not_lost() {
    // 200 at once at a cold service that holds 100, its backend up after 4 s (200 loopback
    // connections take far less, even on a loaded machine): the first 100 are held and
    // answered, the rest refused at once by the bound.
    let t = load::burst_beyond_the_queue(200, 100, "4s").await;
    println!("burst beyond the queue: {t}");
    assert_eq!(t.lost, 0, "{t}");
    assert_eq!(t.answered(), 200, "{t}");
    assert!(t.count(200) >= 100, "what the queue holds is answered: {t}");
    assert_eq!(t.count(200) + t.count(503), 200, "{t}");
    let full = t.by_kind.get("queue_full").copied().unwrap_or(0);
    assert_eq!(full, t.count(503), "every 503 is the queue bound's: {t}");
    assert!(full > 0, "a burst of twice the bound meets it: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_loses_nothing() {
    let (t, code) = load::sigterm_during_burst(200).await;
    println!("SIGTERM during burst: {t}, exit {code:?}");
    assert_eq!(t.lost, 0, "{t}");
    assert_eq!(
        t.count(200) + t.refused,
        200,
        "accepted ones are answered 200: {t}"
    );
    assert!(
        t.count(200) >= 100,
        "everything before SIGTERM was accepted: {t}"
    );
    assert_eq!(code, Some(0));
}
