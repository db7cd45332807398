//! The veilgate process under test: its config, its start, its readiness, its end.
//!
//! The child is killed by PID when the [`Veilgate`] value is dropped, so a failing or
//! panicking soak never leaves it behind; and it gets SIGKILL from the kernel if vgbench
//! itself dies (PR_SET_PDEATHSIG), which a `timeout` in CI may cause.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::err;

pub struct Veilgate {
    child: Option<Child>,
    pub pid: u32,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

/// A temporary directory, removed on drop unless told to keep it.
pub struct TempDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl TempDir {
    pub fn new() -> io::Result<TempDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("vgbench-soak.{}.{nanos}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Two loopback ports free right now (bound together, so distinct; released on return).
pub fn free_ports() -> io::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// The soak's config: the origins reachable, a short head deadline, everything else default.
pub fn config(origin_ports: &[u16], header_timeout_s: u64) -> String {
    let ports: Vec<String> = origin_ports.iter().map(u16::to_string).collect();
    format!(
        "# vgbench soak: loopback origins reachable, a short head deadline for the slowloris checks.\n\
         [server]\n\
         header_timeout = \"{header_timeout_s}s\"\n\
         drain_timeout = \"2s\"\n\n\
         [policy]\n\
         deny_private = false\n\
         allowed_ports = [{}]\n",
        ports.join(", ")
    )
}

impl Veilgate {
    /// Starts `bin` with `config_file`, its log in `log`, and waits (at most 20 s) for /readyz.
    ///
    /// Must be called from the thread that runs the soak to its end (the runtime's
    /// `block_on` thread): PR_SET_PDEATHSIG fires when the spawning *thread* exits.
    pub fn start(bin: &Path, config_file: &Path, log: PathBuf) -> io::Result<Veilgate> {
        let (p_proxy, p_admin) = free_ports()?;
        let proxy: SocketAddr = ([127, 0, 0, 1], p_proxy).into();
        let admin: SocketAddr = ([127, 0, 0, 1], p_admin).into();
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(config_file)
            .arg("--listen")
            .arg(proxy.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| err(format!("cannot start {}: {e}", bin.display())))?;
        let mut vg = Veilgate { pid: child.id(), child: Some(child), proxy, admin, log };
        let t0 = Instant::now();
        loop {
            if matches!(http_get(admin, "/readyz"), Ok((200, _))) {
                return Ok(vg);
            }
            if let Some(Ok(Some(st))) = vg.child.as_mut().map(Child::try_wait) {
                vg.child = None;
                return Err(err(format!("veilgate exited at start ({st}): {}", vg.log_tail(5))));
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(err(format!("veilgate not ready within 20 s: {}", vg.log_tail(5))));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> String {
        let Some(mut c) = self.child.take() else { return "already gone".into() };
        if let Ok(Some(st)) = c.try_wait() {
            return format!("had exited: {st}");
        }
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet (so the
        // PID cannot have been reused).
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if let Ok(Some(st)) = c.try_wait() {
                return format!("exited after SIGTERM in {:.1} s: {st}", t0.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        format!("ignored SIGTERM for {:.0} s, killed", grace.as_secs_f64())
    }
}

impl Drop for Veilgate {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bounded HTTP/1.0 GET to the admin listener: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(64 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Sum of every sample of `metric` (all label sets) in a Prometheus text page.
pub fn metric_sum(page: &str, metric: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(metric).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Every sample of `metric` as (labels, value).
pub fn metric_samples(page: &str, metric: &str) -> Vec<(String, f64)> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?;
            let (labels, v) = rest.rsplit_once(' ')?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.trim().to_string(), v.parse().ok()?))
        })
        .collect()
}
