//! The real binary: SIGHUP reloads (and survives an invalid file), SIGTERM drains and exits 0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn series(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

struct Veilgate(Child);

impl Drop for Veilgate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn sighup_reloads_and_survives_an_invalid_file_then_sigterm_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("veilgate.toml");
    std::fs::write(&file, "[limits]\nmax_tunnels = 10\n").unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["run", "--config"])
        .arg(&file)
        .args(["--listen", &format!("127.0.0.1:{proxy}"), "--admin-listen", &admin_addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut vg = Veilgate(child);
    wait_for("health", || get(admin_addr, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    let scrape = || get(admin_addr, "/metrics").unwrap_or_default();
    assert_eq!(series(&scrape(), "veilgate_config_max_tunnels"), Some(10.0));

    std::fs::write(&file, "[limits]\nmax_tunnels = \"many\"\n").unwrap();
    signal(&vg.0, libc::SIGHUP);
    wait_for("a failed reload", || series(&scrape(), "veilgate_config_reloads_total{result=\"error\"}") == Some(1.0));
    assert_eq!(series(&scrape(), "veilgate_config_max_tunnels"), Some(10.0), "old config kept");
    assert!(get(admin_addr, "/readyz").unwrap().starts_with("HTTP/1.1 200"), "still serving");

    std::fs::write(&file, "[limits]\nmax_tunnels = 20\n").unwrap();
    signal(&vg.0, libc::SIGHUP);
    wait_for("a good reload", || series(&scrape(), "veilgate_config_max_tunnels") == Some(20.0));
    assert_eq!(series(&scrape(), "veilgate_config_reloads_total{result=\"ok\"}"), Some(1.0));

    signal(&vg.0, libc::SIGTERM);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = vg.0.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
