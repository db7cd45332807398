//! A real `redis-server` on a free loopback port, for the cluster backend's tests. Never a
//! stand-in: where the binary is missing, [`RedisServer::start`] says so loudly on stderr and
//! returns `None`, and the test returns early (CI installs the Debian package, so there it
//! always runs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
