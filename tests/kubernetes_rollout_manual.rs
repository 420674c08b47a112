//! Manual promotion (`promotion: manual`) end to end: the candidate is validated and waits
//! (condition `AwaitingPromotion`, the old version serving) until `promote` (the usual switch)
//! or `abort` (failed, rolled back). The commands go through the admin API with a bearer
//! token from `admin.token_file`, through the same client the `reveille rollout` CLI uses.

#[path = "support/fake_kube.rs"]
mod fake_kube;
#[path = "support/fake_rollout.rs"]
mod fake_rollout;
mod support;

use std::path::PathBuf;
use std::time::Duration;

use fake_rollout::Rollout;
use reveille::admin::control::send;
use support::*;

const NS: &str = "shop";
const LONG: Duration = Duration::from_secs(30);

fn token_file(name: &str, token: &str) -> PathBuf {
    let f = std::env::temp_dir().join(format!("reveille-{}-{name}.token", std::process::id()));
    std::fs::write(&f, format!("{token}\n")).unwrap();
    f
}

fn reasons(sim: &Rollout, version: &str) -> Vec<String> {
    sim.validated_conditions(version)
        .iter()
        .map(|c| c["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_waits_for_promote_or_abort_with_the_token() {
    let sim = Rollout::start(NS, "web").await;
    sim.roll_to("v1", 1, 2, true, true).await;
    let file = token_file("manual", "first-token");
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0, token_file: {} }}\nservices:\n  - name: web\n    hosts: [web.test]\n    backend:\n      kubernetes: {{ namespace: {NS}, deployment: web, service: web, port: http }}\n    rollout: {{ validation: [ {{ path: /healthz }} ], quiesce: 1s, promotion: manual, candidate_header: x-reveille-version, on_failure: rollback }}\n",
        file.display()
    );
    let r = reveille::app::start_with_kube(
        reveille::Config::parse(&yaml).unwrap(),
        Some(sim.api.client().await),
    )
    .await
    .expect("start reveille");
    let c = client();
    let v1 = sim.addrs("v1");
    wait_until("routing to v1", LONG, || async { routed(&r) == v1 }).await;

    // The candidate passes its steps and waits; the old version keeps every request.
    sim.roll_to("v2", 2, 2, false, true).await;
    wait_until("v2 awaits promotion", LONG, || async {
        reasons(&sim, "v2") == ["AwaitingPromotion", "AwaitingPromotion"]
    })
    .await;
    for _ in 0..5 {
        let resp = get(&c, r.proxy_addr, "web.test", "/work").await;
        assert_eq!(resp.body, "version=v1");
    }
    // Reachable on purpose with the header (HTTP/1.1: the fast path hands it to hyper's).
    wait_until("the candidate reachable with the header", LONG, || async {
        with_header(&c, &r, "candidate").await == "version=v2"
    })
    .await;
    for _ in 0..5 {
        assert_eq!(with_header(&c, &r, "candidate").await, "version=v2");
        assert_eq!(with_header(&c, &r, "current").await, "version=v1");
        assert_eq!(
            get(&c, r.proxy_addr, "web.test", "/work").await.body,
            "version=v1"
        );
    }
    let body = get(&c, r.admin_addr, "admin", "/api/services").await.body;
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    let state = &state["services"][0]["rollout"];
    assert_eq!(state["candidate"]["awaiting_promotion"], 2, "{state}");
    assert_eq!(state["promotion"], "manual", "{state}");
    assert_eq!(state["in_progress"], true, "{state}");

    // A wrong or missing token changes nothing.
    let e = send(r.admin_addr, "web", "promote", "wrong-token")
        .await
        .unwrap_err();
    assert!(e.starts_with("401"), "{e}");
    let e = send(r.admin_addr, "web", "promote", "").await.unwrap_err();
    assert!(e.starts_with("401"), "{e}");
    assert_eq!(
        reasons(&sim, "v2"),
        ["AwaitingPromotion", "AwaitingPromotion"]
    );
    assert_eq!(routed(&r), v1);
    let e = send(r.admin_addr, "nope", "promote", "first-token")
        .await
        .unwrap_err();
    assert!(e.starts_with("404"), "{e}");

    // Promote: the candidate turns ready and the quiet switch follows.
    let done = send(r.admin_addr, "web", "promote", "first-token")
        .await
        .unwrap();
    assert_eq!(done, "web: promoting version v2 (2 pods)");
    let v2 = sim.addrs("v2");
    wait_until("routing to v2", LONG, || async { routed(&r) == v2 }).await;
    assert_eq!(reasons(&sim, "v2"), ["Validated", "Validated"]);
    assert_eq!(
        with_header(&c, &r, "candidate").await,
        "version=v2",
        "no candidate any more: the current version"
    );
    let e = send(r.admin_addr, "web", "promote", "first-token")
        .await
        .unwrap_err();
    assert!(
        e.starts_with("409") && e.contains("no validated version awaits"),
        "{e}"
    );

    // The token file is read again when it changes.
    std::fs::write(&file, "the-second-token\n").unwrap();
    sim.roll_to("v3", 3, 1, false, true).await;
    wait_until("v3 awaits promotion", LONG, || async {
        reasons(&sim, "v3") == ["AwaitingPromotion"]
    })
    .await;
    let e = send(r.admin_addr, "web", "abort", "first-token")
        .await
        .unwrap_err();
    assert!(e.starts_with("401"), "the old token no longer works: {e}");
    let done = send(r.admin_addr, "web", "abort", "the-second-token")
        .await
        .unwrap();
    assert_eq!(done, "web: aborted version v3 (1 pods)");
    let cond = &sim.validated_conditions("v3")[0];
    assert_eq!(cond["reason"], "ValidationFailed", "{cond}");
    assert_eq!(
        cond["message"], "aborted by hand (`reveille rollout abort`)",
        "{cond}"
    );
    wait_until("rolled back to v2's template", LONG, || async {
        let d = sim.api.get("deployments", NS, "web").unwrap();
        d["spec"]["template"]["metadata"]["annotations"]["version"] == "v2"
    })
    .await;
    assert_eq!(routed(&r), v2, "the current version stays");
    wait_until("the aborted candidate unreachable", LONG, || async {
        with_header(&c, &r, "candidate").await == "version=v2"
    })
    .await;
    let _ = std::fs::remove_file(&file);
    stop(r).await;
}

#[tokio::test]
async fn without_a_token_file_commands_are_refused_with_how_to_enable_them() {
    let r = start("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: web\n    hosts: [web.test]\n    backend:\n      static: { addresses: [127.0.0.1:1] }\n").await;
    let e = send(r.admin_addr, "web", "promote", "anything")
        .await
        .unwrap_err();
    assert!(e.starts_with("403"), "{e}");
    assert!(e.contains("token_file"), "says how to enable them: {e}");
    let resp = get(
        &client(),
        r.admin_addr,
        "admin",
        "/api/rollouts/web/promote",
    )
    .await;
    assert_eq!(resp.status.as_u16(), 405, "GET changes nothing");
    stop(r).await;
}

/// A GET carrying `x-reveille-version: <value>`; the answer's body.
async fn with_header(c: &TestClient, r: &Running, value: &str) -> String {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{}/work", r.proxy_addr))
        .header("host", "web.test")
        .header("x-reveille-version", value)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
