//! The veilgate binary as a child process, for tests of what only the whole program shows
//! (exit codes, signals, its log). Waits on it use [`super::eventually_blocking`].

use std::process::Child;

/// One series' value in a Prometheus scrape, by its name with labels as rendered.
pub fn series(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// A running veilgate, killed and reaped when dropped.
pub struct Veilgate(pub Child);

impl Drop for Veilgate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's stdout, gathered by a thread as they are written.
pub type LogLines = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

impl Veilgate {
    /// `veilgate run` with `config` (none: the embedded defaults) on free loopback proxy and
    /// admin ports, logging at `info` to a piped stdout (see [`Veilgate::gather_log`]), healthy
    /// (its `/healthz` answers 200) when this returns: the child, its proxy and admin addresses.
    pub fn run_logged(config: Option<&std::path::Path>) -> (Veilgate, std::net::SocketAddr, std::net::SocketAddr) {
        let proxy: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_veilgate"));
        cmd.arg("run");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .args(["--listen", &proxy.to_string(), "--admin-listen", &admin.to_string()])
            .env("VEILGATE_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let vg = Veilgate(child);
        super::eventually_blocking(
            "health",
            || exchange(admin, b"GET /healthz HTTP/1.1\r\n\r\n"),
            |r| r.as_ref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        );
        (vg, proxy, admin)
    }

    /// Takes the child's piped stdout and gathers its lines on a thread; join the handle
    /// after the child has exited to have every line.
    pub fn gather_log(&mut self) -> (LogLines, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, BufReader};
        let log = LogLines::default();
        let out = self.0.stdout.take().expect("stdout piped");
        let lines = std::sync::Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        (log, reader)
    }
}

/// A loopback port free a moment ago, for a child given its ports on the command line.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One blocking request to `addr` and the whole answer (the server closes), or `None`.
pub fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    s.write_all(request).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
