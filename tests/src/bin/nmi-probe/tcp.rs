//! TCP attempts: token requests over HTTP (one, or a concurrent loop), a bare connect, a connection from a chosen
//! source address (also one that is not the namespace's own), and a bind.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use nmi_agent_e2e::probe::Attempt;
use socket2::{Domain, Protocol, Socket, Type};

use crate::report::{emit, timed};
use crate::{Timeout, To};

const REQUEST: &[u8] = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net HTTP/1.1\r\n\
Host: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n";
/// The same request on a connection kept open for more.
const KEEP_ALIVE_REQUEST: &[u8] = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net HTTP/1.1\r\n\
Host: 169.254.169.254\r\nMetadata: true\r\n\r\n";

#[derive(Args)]
pub struct HttpArgs {
    #[command(flatten)]
    to: To,
    /// Attempts to make in all (0: no limit).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Attempts in flight at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Stop starting attempts after this long.
    #[arg(long = "duration-ms", value_name = "MS")]
    duration_ms: Option<u64>,
    /// Pause between one thread's attempts.
    #[arg(long = "interval-ms", value_name = "MS", default_value_t = 0)]
    interval_ms: u64,
    #[command(flatten)]
    timeout: Timeout,
    /// Stop starting attempts once stdin is closed.
    #[arg(long)]
    until_stdin_eof: bool,
}

/// Runs attempts on `concurrency` threads until the count, the duration or stdin says stop.
pub fn http(o: &HttpArgs) {
    static STDIN_CLOSED: AtomicBool = AtomicBool::new(false);
    if o.until_stdin_eof {
        // Detached: it must not keep the scope below alive when the loop ends for another reason.
        thread::spawn(|| {
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            STDIN_CLOSED.store(true, Ordering::Relaxed);
        });
    }
    let start = Instant::now();
    let duration = o.duration_ms.map(Duration::from_millis);
    let interval = Duration::from_millis(o.interval_ms);
    let next = AtomicUsize::new(0);
    let failed_spawn = Mutex::new(None);
    thread::scope(|s| {
        for _ in 0..o.concurrency {
            let h = thread::Builder::new().spawn_scoped(s, || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let by_count = o.count > 0 && i >= o.count;
                    let by_time = duration.is_some_and(|d| start.elapsed() >= d);
                    if by_count || by_time || STDIN_CLOSED.load(Ordering::Relaxed) {
                        break;
                    }
                    emit(&http_once(o.to.addr, o.timeout.get()));
                    thread::sleep(interval);
                }
            });
            if let Err(e) = h {
                *failed_spawn.lock().unwrap() = Some(e);
            }
        }
    });
    if let Some(e) = failed_spawn.into_inner().unwrap() {
        eprintln!("nmi-probe: could not start all threads: {e}");
    }
}

/// One token request, read to EOF or until `timeout` (from the start of the connect) has passed.
fn http_once(addr: SocketAddr, timeout: Duration) -> Attempt {
    timed("http", addr, |a| {
        let deadline = Instant::now() + timeout;
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
        a.local = s.local_addr().ok();
        a.peer = s.peer_addr().ok();
        exchange(&mut s, deadline, a)
    })
}

/// Sends the token request and reads the answer into `a`, to EOF or until `deadline`.
fn exchange(
    s: &mut TcpStream,
    deadline: Instant,
    a: &mut Attempt,
) -> Result<(), (&'static str, io::Error)> {
    s.write_all(REQUEST).map_err(|e| ("write", e))?;
    let mut buf = Vec::new();
    let read_result = read_to_end_by(s, deadline, &mut buf);
    // Whatever arrived before an error still says who answered.
    if !buf.is_empty() {
        let text = String::from_utf8_lossy(&buf);
        a.status = text.lines().next().map(str::to_string);
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            a.body = Some(body.chars().take(512).collect());
        }
    }
    read_result.map_err(|e| ("read", e))
}

#[derive(Args)]
pub struct FromArgs {
    #[command(flatten)]
    to: To,
    /// The local address and port to bind.
    #[arg(long)]
    source: SocketAddr,
    /// Allow a source address that is not this namespace's own (IP_TRANSPARENT; needs CAP_NET_ADMIN).
    #[arg(long)]
    transparent: bool,
    /// Once connected, send the token request and read the answer.
    #[arg(long)]
    request: bool,
    /// Keep the connection open this long before closing it.
    #[arg(long = "hold-ms", value_name = "MS", default_value_t = 0)]
    hold_ms: u64,
    #[command(flatten)]
    timeout: Timeout,
}

/// One TCP connection from `--source`. A connect that gets no answer keeps its socket (and its 4-tuple) in SYN_SENT
/// until the timeout, then closes it.
pub fn from_source(o: &FromArgs) -> Attempt {
    timed("from", o.to.addr, |a| {
        let deadline = Instant::now() + o.timeout.get();
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| ("socket", e))?;
        if o.transparent {
            s.set_ip_transparent_v4(true).map_err(|e| ("socket", e))?;
        }
        s.bind(&o.source.into()).map_err(|e| ("bind", e))?;
        a.local = Some(o.source);
        s.connect_timeout(&o.to.addr.into(), o.timeout.get())
            .map_err(|e| ("connect", e))?;
        let mut s = TcpStream::from(s);
        a.peer = s.peer_addr().ok();
        if o.request {
            exchange(&mut s, deadline, a)?;
        }
        thread::sleep(Duration::from_millis(o.hold_ms));
        Ok(())
    })
}

/// Reads until EOF into `buf`; fails with `TimedOut` at `deadline`.
fn read_to_end_by(s: &mut TcpStream, deadline: Instant, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn connect(mode: &str, addr: SocketAddr, timeout: Duration) -> Attempt {
    timed(mode, addr, |a| {
        let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
        a.local = s.local_addr().ok();
        a.peer = s.peer_addr().ok();
        Ok(())
    })
}

#[derive(Args)]
pub struct HoldArgs {
    #[command(flatten)]
    to: To,
    /// Connections to open, one after the other.
    #[arg(long)]
    count: usize,
    /// Do not wait for the handshake: a non-blocking connect that is in progress counts as held (a pod keeping
    /// sockets in SYN_SENT).
    #[arg(long)]
    pending: bool,
    #[command(flatten)]
    timeout: Timeout,
}

/// Opens `count` connections (reporting each) and holds those that connected (or, with `--pending`, are still
/// connecting) open until stdin is closed: a pod sitting on as many redirected sockets as it can get.
pub fn hold(o: &HoldArgs) {
    let mut held = Vec::new();
    for _ in 0..o.count {
        let mut socket = None;
        let a = timed("hold", o.to.addr, |a| {
            let s = if o.pending {
                connect_pending(o.to.addr)?
            } else {
                TcpStream::connect_timeout(&o.to.addr, o.timeout.get())
                    .map_err(|e| ("connect", e))?
                    .into()
            };
            a.local = s.local_addr().ok().and_then(|l| l.as_socket());
            socket = Some(s);
            Ok(())
        });
        emit(&a);
        held.extend(socket);
    }
    let _ = io::copy(&mut io::stdin(), &mut io::sink());
    drop(held);
}

/// A non-blocking connect left in progress.
fn connect_pending(addr: SocketAddr) -> Result<Socket, (&'static str, io::Error)> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ("socket", e))?;
    s.set_nonblocking(true).map_err(|e| ("socket", e))?;
    match s.connect(&addr.into()) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => Ok(s),
        Err(e) => Err(("connect", e)),
    }
}

/// Binds a TCP listener to `addr` (as something standing in for the agent would).
pub fn bind(addr: SocketAddr) -> Attempt {
    timed("bind", addr, |a| {
        let l = TcpListener::bind(addr).map_err(|e| ("bind", e))?;
        a.local = l.local_addr().ok();
        Ok(())
    })
}

#[derive(Args)]
pub struct WedgeArgs {
    #[command(flatten)]
    to: To,
    /// Connections to open and keep.
    #[arg(long, default_value_t = 500)]
    connections: usize,
    /// Keep-alive token requests written on each connection at once; no answer is ever read.
    #[arg(long, default_value_t = 64)]
    pipelined: usize,
    /// How long to keep the connections before closing them all.
    #[arg(long = "hold-ms", value_name = "MS", default_value_t = 10_000)]
    hold_ms: u64,
}

/// The attack of a pod that wants to take the token service from the others: many connections, each asking for many
/// answers it never reads. Reports one attempt per connection (ok: opened and written).
pub fn wedge(o: &WedgeArgs) {
    let pipelined = KEEP_ALIVE_REQUEST.repeat(o.pipelined);
    let mut held = Vec::with_capacity(o.connections);
    for _ in 0..o.connections {
        let attempt = timed("wedge", o.to.addr, |a| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| ("socket", e))?;
            // A small receive window, so the server's answers stall after a few kilobytes instead of filling
            // megabytes of buffers first: the attacker's cheapest way to hold a connection.
            s.set_recv_buffer_size(4096).map_err(|e| ("socket", e))?;
            s.connect_timeout(&o.to.addr.into(), Duration::from_secs(5))
                .map_err(|e| ("connect", e))?;
            let mut s = TcpStream::from(s);
            a.local = s.local_addr().ok();
            s.set_nonblocking(true).map_err(|e| ("socket", e))?;
            // As much as the socket takes without blocking: the attacker never waits for the server.
            match s.write(&pipelined) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(("write", e)),
            }
            held.push(s);
            Ok(())
        });
        emit(&attempt);
    }
    thread::sleep(Duration::from_millis(o.hold_ms));
    drop(held);
}
