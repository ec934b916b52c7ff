//! nmi-probe: makes network attempts from wherever it was started (a pod's cgroup and network namespace) and
//! prints one JSON object per attempt on stdout (see `nmi_agent_e2e::probe::Attempt`).
//!
//! ```text
//! nmi-probe http [--count N] [--concurrency C] [--addr A] [--duration-ms D] [--interval-ms I] [--timeout-ms T]
//!                [--until-stdin-eof]
//! nmi-probe connect [--addr A] [--timeout-ms T]
//! nmi-probe bind --addr A                            a TCP listener bound to A
//! nmi-probe udp [--addr A] [--connect]
//! nmi-probe v6mapped [--port P] [--timeout-ms T]     TCP over an IPv6 socket to [::ffff:169.254.169.254]:P
//! nmi-probe raw [--addr IP:PORT] [--hdrincl]          one UDP datagram through a SOCK_RAW socket
//! nmi-probe whoami                                    pid, cgroup and network namespace of the probe
//! ```
//! `--addr` defaults to 169.254.169.254:80. `http` runs until N attempts were made, or, with `--duration-ms`, until
//! that time has passed, or, with `--until-stdin-eof`, until its stdin is closed (N = 0 means no count limit; the
//! last form lets a test stop a background loop cleanly at a moment it chooses). Exit status is 0 whatever the attempts' outcome; only bad
//! arguments fail, because the outcome is the measurement.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nmi_agent_e2e::probe::{Attempt, Whoami};

const REQUEST: &[u8] = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net HTTP/1.1\r\n\
Host: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n";
const IMDS: &str = "169.254.169.254:80";

struct Opts {
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    duration: Option<Duration>,
    interval: Duration,
    timeout: Duration,
    port: u16,
    connect: bool,
    hdrincl: bool,
    until_eof: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        addr: IMDS.parse().expect("constant"),
        count: 1,
        concurrency: 1,
        duration: None,
        interval: Duration::ZERO,
        timeout: Duration::from_secs(5),
        port: 80,
        connect: false,
        hdrincl: false,
        until_eof: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: &String| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--addr" => o.addr = value()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--count" => o.count = num(value()?)? as usize,
            "--concurrency" => o.concurrency = (num(value()?)? as usize).max(1),
            "--duration-ms" => o.duration = Some(Duration::from_millis(num(value()?)?)),
            "--interval-ms" => o.interval = Duration::from_millis(num(value()?)?),
            "--timeout-ms" => o.timeout = Duration::from_millis(num(value()?)?),
            "--port" => o.port = num(value()?)? as u16,
            "--connect" => o.connect = true,
            "--hdrincl" => o.hdrincl = true,
            "--until-stdin-eof" => o.until_eof = true,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!("usage: nmi-probe http|connect|udp|v6mapped|raw|whoami [options]");
        return ExitCode::from(2);
    };
    let o = match parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("nmi-probe: {e}");
            return ExitCode::from(2);
        }
    };
    match mode.as_str() {
        "http" => http(&o),
        "connect" => emit(&connect("connect", o.addr, o.timeout)),
        "bind" => emit(&bind(o.addr)),
        "v6mapped" => {
            let addr = SocketAddr::new(
                Ipv4Addr::new(169, 254, 169, 254).to_ipv6_mapped().into(),
                o.port,
            );
            emit(&connect("v6mapped", addr, o.timeout))
        }
        "udp" => emit(&udp(o.addr, o.connect)),
        "raw" => emit(&raw(o.addr, o.hdrincl)),
        "whoami" => println!("{}", serde_json::to_string(&whoami()).expect("serialize")),
        _ => {
            eprintln!("nmi-probe: unknown mode {mode}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn emit(a: &Attempt) {
    let line = serde_json::to_string(a).expect("serialize");
    // One write per line under the stdout lock, so concurrent attempts never interleave.
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

fn attempt(mode: &str, addr: SocketAddr) -> Attempt {
    Attempt {
        mode: mode.into(),
        pid: std::process::id(),
        addr: addr.to_string(),
        ..Attempt::default()
    }
}

fn fail(a: &mut Attempt, stage: &str, e: &io::Error) {
    a.ok = false;
    a.stage = Some(stage.into());
    a.error = Some(format!("{:?}", e.kind()));
    a.errno = e.raw_os_error();
}

fn http(o: &Opts) {
    static STDIN_CLOSED: AtomicBool = AtomicBool::new(false);
    if o.until_eof {
        // Detached: it must not keep the scope below alive when the loop ends for another reason.
        thread::spawn(|| {
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            STDIN_CLOSED.store(true, Ordering::Relaxed);
        });
    }
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let failed_spawn = Mutex::new(None);
    thread::scope(|s| {
        for _ in 0..o.concurrency {
            let h = thread::Builder::new().spawn_scoped(s, || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let by_count = o.count > 0 && i >= o.count;
                    let by_time = o.duration.is_some_and(|d| start.elapsed() >= d);
                    if by_count || by_time || STDIN_CLOSED.load(Ordering::Relaxed) {
                        break;
                    }
                    emit(&http_once(o.addr, o.timeout));
                    thread::sleep(o.interval);
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

fn http_once(addr: SocketAddr, timeout: Duration) -> Attempt {
    let mut a = attempt("http", addr);
    let start = Instant::now();
    let result = (|| {
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
        a.local = s.local_addr().ok();
        a.peer = s.peer_addr().ok();
        s.write_all(REQUEST).map_err(|e| ("write", e))?;
        let deadline = start + timeout;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let read_result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let _ = s.set_read_timeout(Some(left));
            match s.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        // Whatever arrived before an error still says who answered.
        if !buf.is_empty() {
            let text = String::from_utf8_lossy(&buf);
            a.status = text.lines().next().map(str::to_string);
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                a.body = Some(body.chars().take(512).collect());
            }
        }
        read_result.map_err(|e| ("read", e))
    })();
    match result {
        Ok(()) => a.ok = true,
        Err((stage, e)) => fail(&mut a, stage, &e),
    }
    a.elapsed_us = start.elapsed().as_micros() as u64;
    a
}

fn connect(mode: &str, addr: SocketAddr, timeout: Duration) -> Attempt {
    let mut a = attempt(mode, addr);
    let start = Instant::now();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => {
            a.ok = true;
            a.local = s.local_addr().ok();
            a.peer = s.peer_addr().ok();
        }
        Err(e) => fail(&mut a, "connect", &e),
    }
    a.elapsed_us = start.elapsed().as_micros() as u64;
    a
}

/// Binds a TCP listener to `addr` (as something standing in for the agent would).
fn bind(addr: SocketAddr) -> Attempt {
    let mut a = attempt("bind", addr);
    let start = Instant::now();
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            a.ok = true;
            a.local = l.local_addr().ok();
        }
        Err(e) => fail(&mut a, "bind", &e),
    }
    a.elapsed_us = start.elapsed().as_micros() as u64;
    a
}

fn udp(addr: SocketAddr, use_connect: bool) -> Attempt {
    let mut a = attempt(if use_connect { "udp-connect" } else { "udp" }, addr);
    let start = Instant::now();
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("constant");
    let result = (|| {
        let s = UdpSocket::bind(bind).map_err(|e| ("socket", e))?;
        if use_connect {
            s.connect(addr).map_err(|e| ("connect", e))?;
            a.peer = s.peer_addr().ok();
            s.send(b"nmi-probe").map_err(|e| ("send", e))?;
        } else {
            s.send_to(b"nmi-probe", addr).map_err(|e| ("send", e))?;
        }
        a.local = s.local_addr().ok();
        Ok(())
    })();
    match result {
        Ok(()) => a.ok = true,
        Err((stage, e)) => fail(&mut a, stage, &e),
    }
    a.elapsed_us = start.elapsed().as_micros() as u64;
    a
}

/// One UDP datagram to `addr` through a raw socket: with `hdrincl`, IPPROTO_RAW and an IP header we build (the
/// kernel fills in source, id, length and checksum where we leave zeros); else IPPROTO_UDP, where the kernel builds
/// the IP header. Raw sockets bypass the connect/sendmsg hooks entirely; only an egress filter can stop them.
fn raw(addr: SocketAddr, hdrincl: bool) -> Attempt {
    let mut a = attempt(if hdrincl { "raw-hdrincl" } else { "raw" }, addr);
    let SocketAddr::V4(dst) = addr else {
        fail(
            &mut a,
            "socket",
            &io::Error::from(io::ErrorKind::InvalidInput),
        );
        return a;
    };
    let start = Instant::now();
    let payload = b"nmi-probe";
    let udp_len = (8 + payload.len()) as u16;
    let mut packet = Vec::new();
    if hdrincl {
        let total = 20 + udp_len;
        packet.extend_from_slice(&[0x45, 0]);
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
        packet.extend_from_slice(&[0, 0, 0, 0]);
        packet.extend_from_slice(&dst.ip().octets());
    }
    packet.extend_from_slice(&40000u16.to_be_bytes());
    packet.extend_from_slice(&dst.port().to_be_bytes());
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]); // no UDP checksum: allowed over IPv4
    packet.extend_from_slice(payload);
    match raw_send(
        dst,
        &packet,
        if hdrincl {
            libc::IPPROTO_RAW
        } else {
            libc::IPPROTO_UDP
        },
    ) {
        Ok(()) => a.ok = true,
        Err((stage, e)) => fail(&mut a, stage, &e),
    }
    a.elapsed_us = start.elapsed().as_micros() as u64;
    a
}

fn raw_send(dst: SocketAddrV4, packet: &[u8], proto: i32) -> Result<(), (&'static str, io::Error)> {
    // SAFETY: plain socket/sendto/close on a fd we own, with a correctly sized sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
        if fd < 0 {
            return Err(("socket", io::Error::last_os_error()));
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            // raw(7): ignored for sending, must be 0.
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 { Err(("send", err)) } else { Ok(()) }
    }
}

fn whoami() -> Whoami {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_default();
    let netns_inode = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    Whoami {
        pid: std::process::id(),
        cgroup,
        netns_inode,
    }
}
