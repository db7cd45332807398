//! What the soak reads about the proxy from /proc: descriptors (sockets and pipes among them),
//! threads, RSS, and its TCP sockets' states and queues from /proc/PID/net/tcp (matched by
//! inode, since that table lists every socket of the network namespace).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// One TCP socket line of /proc/net/tcp.
#[derive(Clone, Copy, Debug)]
pub struct TcpLine {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub state: u8,
    pub tx_queue: u64,
    pub rx_queue: u64,
    pub inode: u64,
}

/// The kernel's TCP state numbers (include/net/tcp_states.h).
pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "OTHER",
    }
}

fn parse_addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    // The address is the in-memory (network order) word printed as a host-order number.
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

/// Every IPv4 TCP socket in `pid`'s network namespace.
pub fn tcp_table(pid: u32) -> Vec<TcpLine> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (tx, rx) = f.get(4)?.split_once(':')?;
            Some(TcpLine {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                tx_queue: u64::from_str_radix(tx, 16).ok()?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The proxy's descriptors: how many, and the inodes of its sockets.
pub struct Fds {
    pub total: u64,
    pub pipes: u64,
    pub sockets: HashSet<u64>,
}

pub fn fds(pid: u32) -> Option<Fds> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut f = Fds { total: 0, pipes: 0, sockets: HashSet::new() };
    for e in dir.flatten() {
        f.total += 1;
        // A descriptor closed between the listing and the readlink is simply not classified.
        let Ok(t) = std::fs::read_link(e.path()) else { continue };
        let t = t.to_string_lossy();
        if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            f.sockets.insert(ino.parse().unwrap_or(0));
        } else if t.starts_with("pipe:") {
            f.pipes += 1;
        }
    }
    Some(f)
}

/// VmRSS (KiB) and Threads from /proc/PID/status.
pub fn status(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut rss = None;
    let mut threads = None;
    for line in text.lines() {
        let val = || line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok());
        if line.starts_with("VmRSS:") {
            rss = val();
        } else if line.starts_with("Threads:") {
            threads = val();
        }
    }
    Some((rss?, threads?))
}

/// One look at the proxy.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub fds: u64,
    pub sockets: u64,
    pub pipes: u64,
    pub threads: u64,
    pub rss_kib: u64,
    /// The proxy's TCP sockets by state name.
    pub states: BTreeMap<&'static str, u64>,
    /// Bytes queued in all the proxy's TCP sockets (receive + send queues).
    pub queued: u64,
}

/// The namespace's TCP sockets by (local, remote) address.
pub type TcpTable = HashMap<(SocketAddrV4, SocketAddrV4), TcpLine>;

/// Samples the proxy; also returns the TCP table, for callers that look up particular
/// connections in it.
pub fn sample(pid: u32) -> Option<(Sample, TcpTable)> {
    let f = fds(pid)?;
    let (rss_kib, threads) = status(pid)?;
    let mut s =
        Sample { fds: f.total, sockets: f.sockets.len() as u64, pipes: f.pipes, threads, rss_kib, ..Sample::default() };
    let mut by_pair = HashMap::new();
    for l in tcp_table(pid) {
        if f.sockets.contains(&l.inode) {
            *s.states.entry(state_name(l.state)).or_default() += 1;
            s.queued += l.tx_queue + l.rx_queue;
        }
        by_pair.insert((l.local, l.remote), l);
    }
    Some((s, by_pair))
}

/// The IPv4 form of a socket address (the soak only uses IPv4 loopback).
pub fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tcp_line_address() {
        // 127.0.0.1:8080 as this little-endian kernel prints it.
        let a = parse_addr("0100007F:1F90").expect("parses");
        if cfg!(target_endian = "little") {
            assert_eq!(a, "127.0.0.1:8080".parse().expect("addr"));
        }
    }
}
