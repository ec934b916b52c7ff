//! The load generators, run inside the pod as `nmi-bench worker <mode> ...`: each prints one JSON object.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::{Value, json};

#[derive(Subcommand)]
pub enum Mode {
    /// N sequential TCP connect+close.
    Connect { addr: SocketAddr, n: usize },
    /// Token requests on THREADS threads for SECS seconds.
    Load {
        addr: SocketAddr,
        threads: usize,
        secs: u64,
        query: String,
    },
    /// N sequential token requests, each timed; `{i}` in QUERY becomes the request's index.
    Latency {
        addr: SocketAddr,
        n: usize,
        query: String,
    },
}

impl Mode {
    pub fn run(self) -> Value {
        match self {
            Mode::Connect { addr, n } => connect_loop(addr, n.max(1)),
            Mode::Load {
                addr,
                threads,
                secs,
                query,
            } => load(
                addr,
                threads.max(1),
                Duration::from_secs(secs.max(1)),
                &query,
            ),
            Mode::Latency { addr, n, query } => latency(addr, n.max(1), &query),
        }
    }
}

/// Sets SO_LINGER {on, 0}: close sends RST, so neither side keeps a TIME_WAIT and tens of thousands of
/// connections from one source address never run out of ports.
fn linger0(s: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
}

fn connect_loop(addr: SocketAddr, n: usize) -> Value {
    let mut errors = 0u64;
    let mut first_error = None;
    let t = Instant::now();
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(s) => {
                linger0(&s);
                drop(s);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let elapsed = t.elapsed();
    json!({ "n": n, "elapsed_ns": elapsed.as_nanos() as u64, "errors": errors, "first_error": first_error })
}

/// One token request, `Connection: close`, read to EOF. Ok if the answer is a 200.
fn request(addr: SocketAddr, query: &str, buf: &mut Vec<u8>) -> Result<(), String> {
    let req = format!(
        "GET /metadata/identity/oauth2/token?api-version=2018-02-01&{query} HTTP/1.1\r\n\
         Host: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    );
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    buf.clear();
    s.read_to_end(buf).map_err(|e| format!("read: {e}"))?;
    linger0(&s);
    if buf.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        let head = String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned();
        Err(format!("answer: {head}"))
    }
}

fn load(addr: SocketAddr, threads: usize, dur: Duration, query: &str) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let t = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            let (stop, ok, errors, first_error) = (&stop, &ok, &errors, &first_error);
            s.spawn(move || {
                let mut buf = Vec::with_capacity(8192);
                while !stop.load(Ordering::Relaxed) {
                    match request(addr, query, &mut buf) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().expect("lock").get_or_insert(e);
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = t.elapsed();
    let first_error = first_error.lock().expect("lock").clone();
    json!({
        "ok": ok.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "elapsed_ns": elapsed.as_nanos() as u64,
        "first_error": first_error,
    })
}

/// `n` sequential requests; `{i}` in the query is replaced by the request's index (a distinct cache key each).
fn latency(addr: SocketAddr, n: usize, query: &str) -> Value {
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0u64;
    let mut first_error = None;
    let mut buf = Vec::with_capacity(8192);
    for i in 0..n {
        let q = query.replace("{i}", &i.to_string());
        let t = Instant::now();
        match request(addr, &q, &mut buf) {
            Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e6),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    json!({ "lat_us": lat, "errors": errors, "first_error": first_error })
}
