use std::{collections::VecDeque, net::Ipv4Addr, sync::Arc, time::Duration};

use super::*;

/// Retries fast enough for a unit test.
const FAST: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(10))
    .with_max_delay(Duration::from_millis(50))
    .without_max_times();

/// A listener holding a free loopback port, as another process on a shared host network would.
fn hold_a_port() -> (std::net::TcpListener, SocketAddr) {
    let held = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    let addr = held.local_addr().expect("local_addr");
    (held, addr)
}

#[tokio::test]
async fn a_taken_health_address_is_retried_counted_and_bound_once_it_is_free() {
    let (held, addr) = hold_a_port();
    let metrics = Arc::new(Metrics::new());
    let binding = tokio::spawn({
        let metrics = Arc::clone(&metrics);
        async move { bind_retrying(addr, &metrics, FAST).await }
    });
    for _ in 0..200 {
        if metrics.health_bind_failures.get() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics.health_bind_failures.get() >= 2,
        "no retries while the address was taken"
    );
    assert!(
        !binding.is_finished(),
        "gave up while the address was taken"
    );

    drop(held);
    let listener = tokio::time::timeout(Duration::from_secs(5), binding)
        .await
        .expect("not bound within 5 s of the address being freed")
        .expect("bind task panicked")
        .expect("bound");
    assert_eq!(listener.local_addr().expect("local_addr"), addr);
    let failures = metrics.health_bind_failures.get();
    assert!(
        metrics.render().contains(&format!(
            "nmi_health_listener_bind_failures_total {failures}"
        )),
        "{}",
        metrics.render()
    );
}

#[tokio::test]
async fn a_free_health_address_is_bound_at_once_without_a_failure() {
    let (held, addr) = hold_a_port();
    drop(held);
    let metrics = Metrics::new();
    let listener = bind_retrying(addr, &metrics, FAST).await.expect("bound");
    assert_eq!(listener.local_addr().expect("local_addr"), addr);
    assert_eq!(metrics.health_bind_failures.get(), 0);
}

#[tokio::test]
async fn a_policy_that_gives_up_leaves_the_health_listener_unbound() {
    let (_held, addr) = hold_a_port();
    let metrics = Metrics::new();
    assert!(
        bind_retrying(addr, &metrics, FAST.with_max_times(2))
            .await
            .is_none()
    );
}

/// A sustained flood of idle connections from the host network (an attacker reopening them as fast as they are
/// closed): the health address holds at most its cap, and the kubelet's probes are answered all the while, so the
/// flood cannot get the agent restarted by its liveness probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_during_a_sustained_flood_of_idle_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(serve(
        listener,
        Arc::new(Readiness::default()),
        Arc::clone(&metrics),
    ));

    let flooding = tokio::spawn(async move {
        let mut idle = VecDeque::new();
        loop {
            if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
                idle.push_back(c);
            }
            if idle.len() > 4 * MAX_CONNECTIONS {
                idle.pop_front();
            }
            tokio::task::yield_now().await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for probe_number in 0..20 {
        let mut answer = String::new();
        let mut probe = tokio::net::TcpStream::connect(addr).await.expect("connect");
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("send");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), probe.read_to_string(&mut answer)).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "probe {probe_number} during the flood: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flooding.abort();
    let text = metrics.render();
    assert!(
        !text.contains(r#"nmi_caller_limited_total{reason="health_connections"} 0"#)
            && text.contains(r#"nmi_caller_limited_total{reason="health_connections"}"#),
        "the flood never reached the cap: {text}"
    );
}
