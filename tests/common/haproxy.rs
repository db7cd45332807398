//! A real `haproxy` on a free loopback port, started from a config the test writes and
//! stopped by its PID. Never a stand-in: where the binary is missing, [`Haproxy::start`] says
//! so loudly on stderr and returns `None`, and the test returns early (CI installs the Debian
//! package, so there it always runs).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{STEP, eventually_blocking};

/// The `haproxy` binary: on PATH, or where Debian puts it.
pub fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("haproxy")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/sbin/haproxy")]).find(|p| p.is_file())
}

/// A running `haproxy -db`, killed by its PID and reaped when dropped.
pub struct Haproxy {
    /// The frontend clients dial.
    pub front: SocketAddr,
    socket: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy with a `global` section holding a stats socket, then `body` (defaults,
    /// backends) with `{front}` replaced by a free loopback address, and waits until the
    /// frontend accepts. `None` (after a loud message naming `test`) when it is not installed.
    pub fn start(test: &str, body: &str) -> Option<Haproxy> {
        let Some(bin) = binary() else {
            // Straight to the process's stderr: the harness captures `eprintln!` of a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no haproxy on PATH or at /usr/sbin/haproxy (apt-get install haproxy; \
                 .ci/run installs it); veilgate was NOT tested behind HAProxy"
            );
            return None;
        };
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("haproxy.sock");
        let cfg = dir.path().join("haproxy.cfg");
        let text = format!(
            "global\n  maxconn 500\n  stats socket {}\n{}",
            socket.display(),
            body.replace("{front}", &front.to_string())
        );
        std::fs::write(&cfg, text).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("haproxy starts");
        let h = Haproxy { front, socket, child, _dir: dir };
        eventually_blocking(
            "haproxy accepts on its frontend",
            || std::net::TcpStream::connect(front).is_ok(),
            |ok| *ok,
        );
        Some(h)
    }

    /// `show stat` on the stats socket: one CSV row per proxy and server.
    pub fn stat(&self) -> String {
        stat(&self.socket)
    }

    /// The status column (`UP`, `DOWN`, `MAINT`, `UP 1/2`...) of each server of `backend`, by name.
    pub fn server_status(&self, backend: &str) -> Vec<(String, String)> {
        let stat = self.stat();
        stat.lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                (cols.len() > 17 && cols[0] == backend && cols[1] != "FRONTEND" && cols[1] != "BACKEND")
                    .then(|| (cols[1].to_string(), cols[17].to_string()))
            })
            .collect()
    }
}

fn stat(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).expect("haproxy stats socket");
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(b"show stat\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
