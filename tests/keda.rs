//! The KEDA external scaler end to end on one replica: Reveille in-process, a real gRPC client
//! over loopback, a real demo backend woken by a held request.

mod support;

use std::time::{Duration, Instant};

use reveille::keda::proto::GetMetricsRequest;
use support::keda::*;
use support::*;

/// One service with a backend that takes `delay` to start, KEDA on, long stream interval (so
/// the only `true` a stream sees early is the pushed one).
fn config(port: u16, delay: &str) -> String {
    format!(
        "{}keda: {{ listen: 127.0.0.1:0, stream_interval: 1h }}\n",
        process_config(
            port,
            delay,
            &["queue: { capacity: 100, timeout: 30s }", "concurrency: 4"]
        )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pushes_true_on_the_first_held_request() {
    let port = free_port();
    let r = start(&config(port, "1500ms")).await;
    let mut g = grpc(r.keda_addr.expect("keda listener"));

    // Nothing held: inactive, concurrency 0, the target from the service's concurrency.
    assert!(!is_active(&mut g, "hello").await);
    assert_eq!(metric_value(&mut g, "hello").await, 0.0);
    let spec = g
        .get_metric_spec(sor("hello", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        spec.metric_specs[0].metric_name,
        "reveille-hello-concurrency"
    );
    assert_eq!(spec.metric_specs[0].target_size_float, 4.0);
    let spec = g
        .get_metric_spec(sor("so", &[("service", "hello"), ("targetValue", "12.5")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size_float, 12.5);

    let mut stream = g
        .stream_is_active(sor("hello", &[]))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("initial state")
        .unwrap()
        .unwrap();
    assert!(!first.result, "nothing held yet");

    // One request, held while the backend starts: `true` must follow at once, pushed on the
    // held event. The bound is generous (a loaded CI machine): it only has to tell a push from
    // the periodic state (1 h here; KEDA's own polling is 30 s) and from a push that waited
    // for the wake-up (the backend takes 1.5 s; the held-state checks below catch that too).
    // The figure itself is measured by `cargo bench --bench keda` (docs/performance.md).
    let c = client();
    let proxy = r.proxy_addr;
    let sent = Instant::now();
    let req = tokio::spawn(async move { get(&c, proxy, "hello.test", "/cold").await });
    let pushed = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a push")
        .unwrap()
        .unwrap();
    let latency = sent.elapsed();
    assert!(pushed.result);
    eprintln!("push latency (request sent -> true received): {latency:?}");
    assert!(latency < Duration::from_secs(1), "pushed after {latency:?}");

    // While held: active, concurrency 1 (also through the metrics-api JSON).
    assert!(is_active(&mut g, "hello").await);
    assert_eq!(metric_value(&mut g, "hello").await, 1.0);
    let admin = client();
    let scaling: serde_json::Value =
        serde_json::from_str(&get(&admin, r.admin_addr, "a", "/api/scaling").await.body).unwrap();
    assert_eq!(scaling["services"]["hello"]["concurrency"], 1);
    assert_eq!(scaling["services"]["hello"]["held"], 1);
    assert_eq!(scaling["services"]["hello"]["replicas"], 1);

    // The backend starts; the held request is answered; the cold start is timed in phases.
    let resp = req.await.unwrap();
    assert_eq!(resp.status, 200);
    wait_until("inactive after the answer", Duration::from_secs(10), || {
        let mut g = g.clone();
        async move { !is_active(&mut g, "hello").await }
    })
    .await;
    let m = get(&admin, r.admin_addr, "a", "/metrics").await.body;
    for phase in ["scale_accepted", "endpoint_ready", "first_forwarded"] {
        let series =
            format!("reveille_wakeup_seconds_count{{phase=\"{phase}\",service=\"hello\"}}");
        assert_eq!(metric(&m, &series), Some(1.0), "{series} in\n{m}");
    }
    let sum = |phase: &str| {
        metric(
            &m,
            &format!("reveille_wakeup_seconds_sum{{phase=\"{phase}\",service=\"hello\"}}"),
        )
        .unwrap()
    };
    // The backend sleeps 1.5 s before listening: spawn is quick, ready is not, and the
    // milestones come in order.
    assert!(sum("scale_accepted") < 1.0, "{}", sum("scale_accepted"));
    assert!(sum("endpoint_ready") >= 1.4, "{}", sum("endpoint_ready"));
    assert!(sum("first_forwarded") >= sum("endpoint_ready"));
    assert_eq!(
        metric(
            &m,
            "reveille_keda_pushes_total{active=\"true\",cause=\"event\",service=\"hello\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, "reveille_keda_streams"), Some(1.0));
    drop(stream);
    wait_until("stream closed", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let m = get(&admin, r.admin_addr, "a", "/metrics").await.body;
            metric(&m, "reveille_keda_streams") == Some(0.0)
        }
    })
    .await;
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_follows_a_service_replaced_by_a_reload() {
    let (p1, p2) = (free_port(), free_port());
    let first_yaml = config(p1, "1s");
    let first = reveille::Config::parse(&first_yaml).unwrap();
    let r = start(&first_yaml).await;
    let mut g = grpc(r.keda_addr.expect("keda listener"));
    let mut stream = g
        .stream_is_active(sor("hello", &[]))
        .await
        .unwrap()
        .into_inner();
    let initial = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("initial state")
        .unwrap()
        .unwrap();
    assert!(!initial.result);

    // A new backend (another port): the service gets a new gate, the stream was opened on the
    // old one and stays open.
    let second = reveille::Config::parse(&config(p2, "1s")).unwrap();
    let before = r.gates()[0].clone();
    r.reload(&second, &first).await;
    let c = client();
    let proxy = r.proxy_addr;
    let req = tokio::spawn(async move { get(&c, proxy, "hello.test", "/after-reload").await });
    let pushed = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a push for the request held on the new gate")
        .unwrap()
        .unwrap();
    assert!(pushed.result);
    assert_eq!(
        before.holds_total(),
        0,
        "the request was held on the new gate"
    );
    assert_eq!(req.await.unwrap().status, 200);

    // Removed by a reload: the stream ends (KEDA reopens it and gets "not configured").
    let other = config(p1, "1s").replace("name: hello", "name: other");
    let other = reveille::Config::parse(&other).unwrap();
    r.reload(&other, &second).await;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_and_bad_metadata_are_clear_errors() {
    let port = free_port();
    let r = start(&config(port, "0s")).await;
    let mut g = grpc(r.keda_addr.unwrap());
    let e = g.is_active(sor("nope", &[])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("\"nope\" is not configured"), "{e:?}");
    let e = g
        .stream_is_active(sor("x", &[("service", "missing")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = g
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(sor("hello", &[("metric", "cpu")])),
            metric_name: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("scalerMetadata.metric"), "{e:?}");
    // The rate metric, with the caller's metric name echoed back.
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, r.proxy_addr, "hello.test", "/").await.status, 200);
    }
    let v = g
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(sor("hello", &[("metric", "rate")])),
            metric_name: "s0-rate".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.metric_values[0].metric_name, "s0-rate");
    assert!(v.metric_values[0].metric_value_float > 0.0, "{v:?}");
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_long_poll_answers_when_a_request_is_held() {
    let port = free_port();
    let r = start(&config(port, "1500ms")).await;
    let c = client();
    let admin = r.admin_addr;
    let now: serde_json::Value =
        serde_json::from_str(&get(&c, admin, "a", "/api/local?wait=hello").await.body).unwrap();
    assert_eq!(now["services"]["hello"]["holds_total"], 0);
    assert_eq!(
        get(&c, admin, "a", "/api/local?wait=nope&since=0")
            .await
            .status,
        404
    );
    let poll = {
        let c = c.clone();
        tokio::spawn(async move {
            get(
                &c,
                admin,
                "a",
                "/api/local?wait=hello&since=0&timeout_ms=20000",
            )
            .await
        })
    };
    // The long-poll is waiting (counted by the gauge) rather than answered.
    wait_until("the long-poll waiting", Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let m = get(&c, admin, "a", "/metrics").await.body;
            metric(&m, "reveille_admin_long_polls") == Some(1.0)
        }
    })
    .await;
    assert!(!poll.is_finished(), "nothing held yet: the long-poll waits");
    let sent = Instant::now();
    let proxy = r.proxy_addr;
    let held = {
        let c = c.clone();
        tokio::spawn(async move { get(&c, proxy, "hello.test", "/").await })
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("long-poll answered")
        .unwrap();
    eprintln!(
        "long-poll answered {:?} after the request was sent",
        sent.elapsed()
    );
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["services"]["hello"]["holds_total"], 1);
    assert_eq!(v["services"]["hello"]["held"], 1);
    // A poll that is not behind times out with the same counts.
    let t = Instant::now();
    let again = get(
        &c,
        admin,
        "a",
        "/api/local?wait=hello&since=1&timeout_ms=300",
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(again.status, 200);
    assert_eq!(held.await.unwrap().status, 200);
    stop(r).await;
}
