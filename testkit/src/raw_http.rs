//! A minimal HTTP/1.1 client for the fakes' own tests: one request per connection, the answer read to EOF as text,
//! so the tests see the wire as a client would (status line, headers, chunked bodies) and need no client crate.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What came back; `status` is 0 when the server closed the connection without answering.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// Everything after the blank line, as sent (chunk sizes included).
    pub body: String,
}

pub(crate) async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `GET target` without headers or body.
pub(crate) async fn get(addr: SocketAddr, target: &str) -> Reply {
    send(addr, "GET", target, &[], "").await
}
