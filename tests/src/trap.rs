//! The stand-in for the real IMDS: 169.254.169.254 on the node namespace's `lo`, with an nftables counter of every
//! packet addressed to it, and optionally a TCP listener on :80. Any packet the counter sees is a leak: a request
//! that reached "IMDS" without going through the agent.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nmi_testkit::wait::poll;

use crate::netns::Netns;
use crate::process;

pub const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const IMDS: SocketAddrV4 = SocketAddrV4::new(IMDS_IP, 80);
/// The status line the trap listener answers with, so a probe's report shows who answered.
pub const TRAP_STATUS: &str = "HTTP/1.1 418 I'm a teapot";

const TABLE: &str = "nmie2e";
const COUNTER: &str = "trap";

/// The trap in one topology's node namespace.
#[derive(Clone, Debug)]
pub struct Trap {
    node: Netns,
}

impl Trap {
    /// Puts 169.254.169.254/32 on the node namespace's `lo` (this kernel has no dummy links) and installs the
    /// counter. The rule sits in *prerouting*, not input: a packet that reached the node namespace has left its pod
    /// even if routing would drop it later, and locally generated packets (hostNetwork pods, raw sockets) pass
    /// prerouting too when `lo` loops them back. The table dies with the namespace.
    pub fn install(node: &Netns) -> Trap {
        Trap::install_except(node, None)
    }

    /// [`Trap::install`] in `netns`, not counting packets from `except` (the one source allowed to reach it: the
    /// agent's own address, where "IMDS" is the agent's upstream too).
    pub fn install_except(netns: &Netns, except: Option<Ipv4Addr>) -> Trap {
        let node = netns;
        node.ip(&["link", "set", "lo", "up"]);
        node.ip(&["addr", "add", &format!("{IMDS_IP}/32"), "dev", "lo"]);
        let except = except.map_or(String::new(), |ip| format!("ip saddr != {ip} "));
        let ruleset = format!(
            "table ip {TABLE} {{\n\
               counter {COUNTER} {{ }}\n\
               chain prerouting {{\n\
                 type filter hook prerouting priority raw; policy accept;\n\
                 ip daddr {IMDS_IP} {except}counter name \"{COUNTER}\"\n\
               }}\n\
             }}\n"
        );
        let mut cmd = node.command("nft");
        cmd.args(["-f", "-"]);
        process::run_ok_with_stdin(&mut cmd, &ruleset);
        Trap { node: node.clone() }
    }

    /// Packets addressed to 169.254.169.254 that reached the node namespace so far.
    pub fn packets(&self) -> u64 {
        let mut cmd = self.node.command("nft");
        cmd.args(["-j", "list", "counter", "ip", TABLE, COUNTER]);
        parse_packets(&process::run_ok(&mut cmd).stdout)
    }

    /// Waits up to `timeout` for the counter to exceed `than` (packets sent by another process may still be in
    /// flight when it exits) and returns the last value read.
    pub fn wait_above(&self, than: u64, timeout: Duration) -> u64 {
        poll(timeout, Duration::from_millis(20), || {
            Some(self.packets()).filter(|n| *n > than)
        })
        .unwrap_or_else(|| self.packets())
    }

    /// A TCP listener on 169.254.169.254:`port` in the node namespace, owned by the test process.
    pub fn listen_tcp(&self, port: u16) -> TrapListener {
        TrapListener::bind(&self.node, SocketAddrV4::new(IMDS_IP, port))
    }
}

fn parse_packets(json: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(json).expect("nft -j output is JSON");
    v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("no counter in nft output: {v}"))
}

/// A TCP listener that records who connected and answers any request with [`TRAP_STATUS`].
pub struct TrapListener {
    pub addr: SocketAddrV4,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TrapListener {
    pub fn bind(netns: &Netns, addr: SocketAddrV4) -> TrapListener {
        let listener = netns
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        // Non-blocking so the thread can notice `stop`; the tests make a handful of connections, so polling is fine.
        listener.set_nonblocking(true).expect("set_nonblocking");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            accepted.lock().unwrap().push(peer);
                            answer(conn);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        TrapListener {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Peers of all connections accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().unwrap().clone()
    }
}

/// Reads the request head (so closing does not turn into a reset that hides the answer), then answers.
fn answer(mut conn: std::net::TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = conn.write_all(
        format!("{TRAP_STATUS}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    );
}

impl Drop for TrapListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
