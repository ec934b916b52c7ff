//! Per-caller shares and whole-connection limits: what one caller can do to the front door, and what it cannot take
//! from the others.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::{Instant, timeout},
};

use super::{Gate, Limits, start, start_with};

const REQUEST: &[u8] = b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nhost: agent\r\n\r\n";

/// A connection from `source` (a loopback address: its last byte is the caller's cgroup id in these tests).
async fn connect_from(source: [u8; 4], server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind source");
    socket.connect(server).await.expect("connect")
}

/// One request on `client` and the head of its answer.
async fn ask(client: &mut TcpStream) -> String {
    client.write_all(REQUEST).await.expect("send");
    let mut buf = vec![0u8; 4096];
    let n = timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_caller_over_its_share_of_connections_gets_429_and_others_are_still_served() {
    let run = start(Limits {
        max_connections_per_caller: 3,
        ..Limits::default()
    })
    .await;
    run.gate.open.add_permits(1000);
    let hostile = [127, 0, 0, 2];
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from(hostile, run.addr).await;
        assert!(ask(&mut c).await.starts_with("HTTP/1.1 200"));
        held.push(c);
    }
    let mut fourth = connect_from(hostile, run.addr).await;
    let answer = ask(&mut fourth).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("retry-after: 1") && lower.contains("connection: close"),
        "{answer}"
    );
    // Another caller is not affected by the first one's share.
    let mut other = connect_from([127, 0, 0, 3], run.addr).await;
    assert!(ask(&mut other).await.starts_with("HTTP/1.1 200"));
    // A share comes back when a connection closes.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut c = connect_from(hostile, run.addr).await;
        if ask(&mut c).await.starts_with("HTTP/1.1 200") {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "the closed connection's share never came back"
    );
    let text = run.metrics.render();
    assert!(
        text.contains(r#"nmi_caller_limited_total{reason="connections"}"#),
        "{text}"
    );
}

/// Pipelined requests whose answers are never read fill the socket buffers and stall the server's writes: the
/// connection is cut after the write timeout and its share given back, instead of being held for ever.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_cut_off() {
    let write_timeout = Duration::from_millis(300);
    let run = start_with(
        Limits {
            max_connections_per_caller: 1,
            write_timeout,
            ..Limits::default()
        },
        Gate {
            body: Bytes::from(vec![b'x'; 256 * 1024]),
            ..Gate::default()
        },
    )
    .await;
    run.gate.open.add_permits(100_000);
    let hostile = [127, 0, 0, 2];
    let mut wedged = connect_from(hostile, run.addr).await;
    // 64 MiB of answers asked for, none read.
    let pipelined: Vec<u8> = REQUEST.repeat(256);
    wedged.write_all(&pipelined).await.expect("send pipelined");

    let started = Instant::now();
    let mut served = false;
    while started.elapsed() < Duration::from_secs(10) {
        let mut c = connect_from(hostile, run.addr).await;
        if ask(&mut c).await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the wedged connection kept its caller's only share");
    assert!(
        started.elapsed() >= write_timeout,
        "served before the write timeout: was the connection wedged at all?"
    );
    let text = run.metrics.render();
    assert!(
        text.contains(r#"nmi_connections_cut_total{reason="io_timeout"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let run = start(Limits {
        idle_timeout: idle,
        ..Limits::default()
    })
    .await;
    run.gate.open.add_permits(10);
    let mut client = connect_from([127, 0, 0, 2], run.addr).await;
    assert!(ask(&mut client).await.starts_with("HTTP/1.1 200"));
    let since = Instant::now();
    let mut rest = Vec::new();
    timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("an idle connection was never closed")
        .expect("read to the end");
    assert!(
        since.elapsed() >= idle.mul_f32(0.8),
        "{:?}",
        since.elapsed()
    );
}

#[tokio::test]
async fn after_its_lifetime_a_connection_ends_with_its_next_answer() {
    let run = start(Limits {
        connection_lifetime: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    run.gate.open.add_permits(10);
    let mut client = connect_from([127, 0, 0, 2], run.addr).await;
    let first = ask(&mut client).await;
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = ask(&mut client).await;
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
}
