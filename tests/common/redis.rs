//! A real `redis-server` on a free loopback port, or a real three-master Redis Cluster, for
//! the cluster backend's tests. Never a stand-in: where a binary is missing,
//! [`RedisServer::start`] and [`RedisCluster::start`] say so loudly on stderr and return
//! `None`, and the test returns early (CI installs the Debian package, so there it always
//! runs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::eventually_blocking;

/// A running `redis-server` (no persistence), stopped by its PID when dropped.
pub struct RedisServer {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port of 127.0.0.1 and waits until it answers PING; `None` (after a
    /// loud message naming `test`) when `redis-server` is not installed.
    pub fn start(test: &str) -> Option<RedisServer> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            // Straight to the process's stderr: the test harness captures `eprintln!` of a test
            // that passes, and this must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: redis-server is not installed (apt-get install redis-server); \
                 the cluster backend was NOT tested against Redis"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer { addr: SocketAddr::from(([127, 0, 0, 1], port)), child: None };
        server.restart();
        Some(server)
    }

    /// The URL for `[cluster] redis_url`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Stops the server (SIGKILL: its data goes, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty, and waits until it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let addr = self.addr;
        eventually_blocking("redis-server answers PING", || ping(addr), |ok| *ok);
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the server's process: a Redis that stops
    /// answering without closing its connections, unlike [`RedisServer::stop`].
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        // SAFETY: kill(2) on the PID of our own child, which we have not reaped yet.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
    }

    /// Sends one command in the inline protocol and returns the raw reply.
    pub fn command(&self, line: &str) -> String {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).expect("redis answers");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).to_string()
    }
}

fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Says loudly that `test` did not run for want of `binary`; `true` when it is installed.
fn installed(binary: &str, test: &str) -> bool {
    if Command::new(binary).arg("--version").stdout(Stdio::null()).status().is_ok() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {binary} is not installed (apt-get install redis-server); \
         the cluster backend was NOT tested against a Redis Cluster"
    );
    false
}

/// Three `redis-server --cluster-enabled yes` masters on free loopback ports, joined by
/// `redis-cli --cluster create` (no replicas), each stopped by its PID when dropped.
pub struct RedisCluster {
    /// The masters' ports (each node's bus is on port + 10000).
    pub ports: Vec<u16>,
    dir: PathBuf,
    children: Vec<Child>,
}

impl RedisCluster {
    /// Starts and joins the three masters and waits (bounded) until every one says
    /// `cluster_state:ok`; `None` (after a loud message naming `test`) without the binaries.
    pub fn start(test: &str) -> Option<RedisCluster> {
        if !installed("redis-server", test) || !installed("redis-cli", test) {
            return None;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("vg-rcluster-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = RedisCluster { ports: free_cluster_ports(3, nanos), dir, children: Vec::new() };
        for port in cluster.ports.clone() {
            let p = port.to_string();
            let child = Command::new("redis-server")
                .args(["--port", &p, "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&cluster.dir)
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("redis-server starts");
            cluster.children.push(child);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            eventually_blocking("a cluster node answers PING", || ping(addr), |ok| *ok);
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create {nodes:?}: {created}");
        for port in cluster.ports.clone() {
            eventually_blocking(
                "cluster_state:ok",
                || cluster.command(port, "CLUSTER INFO").contains("cluster_state:ok"),
                |ok| *ok,
            );
        }
        Some(cluster)
    }

    /// The `[cluster] redis_cluster_nodes` list, as TOML.
    pub fn nodes_toml(&self) -> String {
        let urls: Vec<String> = self.ports.iter().map(|p| format!("\"redis://127.0.0.1:{p}\"")).collect();
        format!("[{}]", urls.join(", "))
    }

    /// Sends one inline command to the node on `port` and returns the raw reply.
    pub fn command(&self, port: u16, line: &str) -> String {
        command(SocketAddr::from(([127, 0, 0, 1], port)), line)
    }

    /// Sends a command on one key to the node that owns the key's slot (the others answer
    /// `-MOVED`), and returns its reply.
    pub fn command_on_owner(&self, line: &str) -> String {
        let replies: Vec<String> = self.ports.iter().map(|p| self.command(*p, line)).collect();
        replies.iter().find(|r| !r.starts_with("-MOVED")).cloned().unwrap_or_else(|| panic!("{line}: {replies:?}"))
    }

    /// Keys on each master (`DBSIZE`).
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|p| self.command(*p, "DBSIZE").trim().trim_start_matches(':').parse().unwrap_or(0))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` ports of 127.0.0.1 free now, each with its cluster bus port (+10000) free too: tried
/// in 20000..30000 from a start that differs between test processes, a bounded number of times.
fn free_cluster_ports(n: usize, seed: u32) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut candidate = 20000 + (seed % 10000) as u16;
    for _ in 0..2000 {
        candidate = 20000 + (candidate - 20000 + 7) % 10000;
        let both = (TcpListener::bind(("127.0.0.1", candidate)), TcpListener::bind(("127.0.0.1", candidate + 10000)));
        if let (Ok(_), Ok(_)) = both {
            ports.push(candidate);
            if ports.len() == n {
                return ports;
            }
        }
    }
    panic!("no {n} free port pairs for a Redis Cluster on 127.0.0.1");
}

fn command(addr: SocketAddr, line: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("redis answers");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).to_string()
}
