//! The real binary: SIGHUP reloads (and survives an invalid file), SIGTERM drains and exits 0;
//! check-config, start-up and reload refuse the same files with the same words.

mod common;

use common::child::{Veilgate, free_port, series};
use common::{FAST_COST, eventually_blocking};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
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
    eventually_blocking(
        "health",
        || get(admin_addr, "/healthz"),
        |r| r.as_ref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
    );
    let scrape = || get(admin_addr, "/metrics").unwrap_or_default();
    assert_eq!(series(&scrape(), "veilgate_config_max_tunnels"), Some(10.0));

    std::fs::write(&file, "[limits]\nmax_tunnels = \"many\"\n").unwrap();
    signal(&vg.0, libc::SIGHUP);
    eventually_blocking(
        "a failed reload",
        || series(&scrape(), "veilgate_config_reloads_total{result=\"error\"}"),
        |n| *n == Some(1.0),
    );
    assert_eq!(series(&scrape(), "veilgate_config_max_tunnels"), Some(10.0), "old config kept");
    assert!(get(admin_addr, "/readyz").unwrap().starts_with("HTTP/1.1 200"), "still serving");

    std::fs::write(&file, "[limits]\nmax_tunnels = 20\n").unwrap();
    signal(&vg.0, libc::SIGHUP);
    eventually_blocking("a good reload", || series(&scrape(), "veilgate_config_max_tunnels"), |n| *n == Some(20.0));
    assert_eq!(series(&scrape(), "veilgate_config_reloads_total{result=\"ok\"}"), Some(1.0));

    signal(&vg.0, libc::SIGTERM);
    let status = eventually_blocking("exit after SIGTERM", || vg.0.try_wait().unwrap(), Option::is_some);
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// Runs the binary to its end with `cwd` as working directory: (exit code, stdout, stderr).
/// Bounded: a process still running after the wait is killed and fails the test.
fn run_to_end(args: &[&str], cwd: &Path) -> (Option<i32>, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(args)
        .current_dir(cwd)
        .env_remove("VEILGATE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vg = Veilgate(child);
    let status =
        eventually_blocking(&format!("veilgate {args:?} to exit"), || vg.0.try_wait().unwrap(), Option::is_some);
    let code = status.and_then(|s| s.code());
    let (mut out, mut err) = (String::new(), String::new());
    vg.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    vg.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (code, out, err)
}

/// A CA made by the library's `ca init`, in DIR/ca.
fn make_ca(dir: &Path) {
    veilgate::mitm::ca::init(&dir.join("ca")).unwrap();
}

/// Each file `run` would refuse is refused by `check-config` too, with the same message, and
/// neither starts. Paths in the files are relative: they resolve against the file's folder,
/// whatever the working directory (here `/`).
#[test]
fn check_config_refuses_every_file_run_refuses_with_the_same_message() {
    use std::os::unix::fs::PermissionsExt;
    type Setup = fn(&Path) -> String;
    let cases: [(&str, Setup, &[&str]); 5] = [
        (
            "missing credentials file",
            |_| "[auth]\ncredentials_file = \"nobody.htpasswd\"\n".into(),
            &["auth.credentials_file", "nobody.htpasswd"],
        ),
        (
            "a line that is not bcrypt",
            |d| {
                let lines = common::htpasswd_line("alice", "a", FAST_COST) + "bob:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n";
                std::fs::write(d.join("users.htpasswd"), lines).unwrap();
                "[auth]\ncredentials_file = \"users.htpasswd\"\n".into()
            },
            &["auth.credentials_file", "users.htpasswd", "line 2", "bcrypt"],
        ),
        (
            "missing CA key",
            |d| {
                make_ca(d);
                "[mitm]\nca_cert = \"ca/veilgate-ca.pem\"\nca_key = \"ca/other.key\"\n".into()
            },
            &["mitm", "other.key", "No such file"],
        ),
        (
            "group-readable CA key",
            |d| {
                make_ca(d);
                std::fs::set_permissions(d.join("ca/veilgate-ca.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
                "[mitm]\nca_cert = \"ca/veilgate-ca.pem\"\nca_key = \"ca/veilgate-ca.key\"\n".into()
            },
            &["mitm", "veilgate-ca.key", "readable by group"],
        ),
        (
            "missing upstream_roots bundle",
            |d| {
                make_ca(d);
                "[mitm]\nca_cert = \"ca/veilgate-ca.pem\"\nca_key = \"ca/veilgate-ca.key\"\nupstream_roots = \"roots.pem\"\n"
                    .into()
            },
            &["mitm", "roots.pem"],
        ),
    ];
    for (case, setup, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("veilgate.toml");
        std::fs::write(&file, setup(dir.path())).unwrap();
        let file = file.to_str().unwrap();
        let (code, _, checked) = run_to_end(&["check-config", "-c", file], Path::new("/"));
        assert_eq!(code, Some(1), "{case}: check-config must refuse it: {checked}");
        for word in expected {
            assert!(checked.contains(word), "{case}: `{word}` not in: {checked}");
        }
        let listen = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        let (code, _, ran) = run_to_end(&[&["run", "-c", file][..], &listen].concat(), Path::new("/"));
        assert_eq!(code, Some(1), "{case}: run refuses it");
        assert_eq!(ran, checked, "{case}: the same words from both");
    }
}

/// CONNECT through the proxy with `user:password`; the reply's status.
fn connect_status(proxy: SocketAddr, credentials: &str) -> u16 {
    use base64::Engine;
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(credentials);
    // Port 1 is not allowed: a 403 means the credentials passed, a 407 that they did not.
    write!(s, "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nProxy-Authorization: Basic {b64}\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

/// Relative paths work from another working directory, for check-config, run and reload; a
/// reload whose credentials file went bad fails and keeps the running configuration.
#[test]
fn relative_paths_follow_the_config_file_and_a_bad_file_on_reload_keeps_the_running_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("veilgate.toml");
    let users = dir.path().join("users.htpasswd");
    std::fs::write(&users, common::htpasswd_line("alice", "wonderland", FAST_COST)).unwrap();
    make_ca(dir.path());
    let config = |cap: u32| {
        format!(
            "[limits]\nmax_tunnels = {cap}\n[auth]\ncredentials_file = \"users.htpasswd\"\n[mitm]\nca_cert = \"ca/veilgate-ca.pem\"\nca_key = \"ca/veilgate-ca.key\"\nupstream_roots = \"ca/veilgate-ca.pem\"\n"
        )
    };
    std::fs::write(&file, config(10)).unwrap();

    // check-config with a relative config path, from the folder above.
    let parent = dir.path().parent().unwrap();
    let relative = dir.path().file_name().unwrap().to_str().unwrap().to_string() + "/veilgate.toml";
    let (code, printed, err) = run_to_end(&["check-config", "-c", &relative], parent);
    assert_eq!(code, Some(0), "{err}");
    assert!(printed.contains(&format!("credentials_file = \"{}\"", users.display())), "{printed}");

    let (proxy, admin) = (free_port(), free_port());
    let proxy_addr: SocketAddr = format!("127.0.0.1:{proxy}").parse().unwrap();
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["run", "--config"])
        .arg(&file)
        .args(["--listen", &proxy_addr.to_string(), "--admin-listen", &admin_addr.to_string()])
        .current_dir("/")
        .env_remove("VEILGATE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let vg = Veilgate(child);
    eventually_blocking(
        "health",
        || get(admin_addr, "/healthz"),
        |r| r.as_ref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
    );
    assert_eq!(connect_status(proxy_addr, "alice:wonderland"), 403, "credentials read from the relative file");
    assert_eq!(connect_status(proxy_addr, "alice:wrong"), 407);

    let scrape = || get(admin_addr, "/metrics").unwrap_or_default();
    std::fs::write(&users, common::htpasswd_line("alice", "changed", FAST_COST) + "bob:plaintext\n").unwrap();
    std::fs::write(&file, config(20)).unwrap();
    signal(&vg.0, libc::SIGHUP);
    eventually_blocking(
        "a failed reload",
        || series(&scrape(), "veilgate_config_reloads_total{result=\"error\"}"),
        |n| *n == Some(1.0),
    );
    assert_eq!(series(&scrape(), "veilgate_config_max_tunnels"), Some(10.0), "the whole old config kept");
    assert_eq!(connect_status(proxy_addr, "alice:wonderland"), 403, "and its credentials");

    std::fs::write(&users, common::htpasswd_line("alice", "changed", FAST_COST)).unwrap();
    signal(&vg.0, libc::SIGHUP);
    eventually_blocking("a good reload", || series(&scrape(), "veilgate_config_max_tunnels"), |n| *n == Some(20.0));
    assert_eq!(connect_status(proxy_addr, "alice:changed"), 403);
    assert_eq!(connect_status(proxy_addr, "alice:wonderland"), 407);
}

#[test]
fn sighup_applies_log_format_and_level_and_says_what_changed_in_one_line() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("veilgate.toml");
    let (proxy, admin) = (free_port(), free_port());
    let proxy_addr: SocketAddr = format!("127.0.0.1:{proxy}").parse().unwrap();
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let server =
        |listen: u16| format!("[server]\nlisten = [\"127.0.0.1:{listen}\"]\nadmin_listen = \"{admin_addr}\"\n");
    std::fs::write(&file, format!("{}[log]\nformat = \"text\"\n", server(proxy))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["run", "--config"])
        .arg(&file)
        .env_remove("VEILGATE_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut vg = Veilgate(child);
    let (log, reader) = vg.gather_log();
    eventually_blocking(
        "health",
        || get(admin_addr, "/healthz"),
        |r| r.as_ref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
    );
    let find = |what: &str| {
        let log = Arc::clone(&log);
        let what = what.to_string();
        eventually_blocking(
            &what.clone(),
            move || log.lock().unwrap().iter().position(|l| l.contains(&what)),
            Option::is_some,
        )
        .unwrap()
    };

    // Format, level and a limit change together; all are applied, and one line says so.
    std::fs::write(
        &file,
        format!("{}[limits]\nmax_tunnels = 20\n[log]\nformat = \"json\"\nlevel = \"debug\"\n", server(proxy)),
    )
    .unwrap();
    signal(&vg.0, libc::SIGHUP);
    let at = find("SIGHUP: configuration reloaded");
    let line = log.lock().unwrap()[at].clone();
    assert!(line.starts_with('{'), "the reload line is already JSON: {line}");
    assert!(line.contains(r#""changed":"limits.max_tunnels, log.format, log.level""#), "{line}");
    assert_eq!(log.lock().unwrap().iter().filter(|l| l.contains("SIGHUP")).count(), 1, "one line per reload");
    // A debug event (a client that leaves before its head) is now logged, as JSON.
    drop(TcpStream::connect_timeout(&proxy_addr, Duration::from_secs(1)).unwrap());
    let debug = find("client closed before a complete head");
    let line = log.lock().unwrap()[debug].clone();
    assert!(line.starts_with('{') && line.contains(r#""level":"DEBUG""#), "{line}");

    // A listener change is not applied, and the line says it needs a restart.
    let moved = free_port();
    std::fs::write(
        &file,
        format!("{}[limits]\nmax_tunnels = 20\n[log]\nformat = \"json\"\nlevel = \"debug\"\n", server(moved)),
    )
    .unwrap();
    signal(&vg.0, libc::SIGHUP);
    let at = find("needs_restart");
    let line = log.lock().unwrap()[at].clone();
    assert!(line.contains(r#""needs_restart":"server.listen""#) && line.contains(r#""level":"WARN""#), "{line}");
    assert!(get(admin_addr, "/readyz").unwrap().starts_with("HTTP/1.1 200"), "still serving");

    let _ = vg.0.kill();
    let _ = vg.0.wait();
    let _ = reader.join();
}
