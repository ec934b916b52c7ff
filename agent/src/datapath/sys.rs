//! The two system calls the datapath needs besides aya's: the network namespace cookie of the token listener, and the
//! memlock limit older kernels charge BPF memory to.

use std::os::fd::{AsFd, AsRawFd};

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`, Linux >= 5.14), as
/// `bpf_get_netns_cookie` reports it in the kernel programs.
pub fn netns_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    // A raw getsockopt: neither rustix (its `net::sockopt` has `socket_cookie`, SO_COOKIE, but not SO_NETNS_COOKIE)
    // nor nix wraps this option, and rustix offers no generic getsockopt.
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let fd = socket.as_fd().as_raw_fd();
    // SAFETY: `fd` is an open socket borrowed for the call, and `cookie`/`len` describe a writable buffer of exactly
    // the size passed; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones use memcg and ignore it.
pub fn raise_memlock_limit() {
    let unlimited = rustix::process::Rlimit {
        current: None,
        maximum: None,
    };
    if rustix::process::setrlimit(rustix::process::Resource::Memlock, unlimited).is_err() {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_in_one_namespace_share_a_nonzero_cookie() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        match (netns_cookie(&a), netns_cookie(&b)) {
            (Ok(ca), Ok(cb)) => {
                assert_ne!(ca, 0, "the kernel never hands out cookie 0");
                assert_eq!(ca, cb, "two sockets of one namespace differ");
            }
            // Linux < 5.14: the option does not exist; the agent then runs without the bind guard.
            (Err(e), _) | (_, Err(e)) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOPROTOOPT), "{e}");
            }
        }
    }
}
