//! A real browser through the TLS listener: headless Chromium (the Debian package), pointed at
//! veilgate by the `/proxy.pac` the admin listener serves, loads a page from an HTTPS origin,
//! speaking HTTP/2 to the proxy; and the same with `--proxy-server=https://…` and HTTP/1.1.
//!
//! Chromium never sends loopback names to a proxy chosen by PAC, so the origin is known to the
//! browser as `origin.test` (RFC 6761), which veilgate alone maps to 127.0.0.1 by `[dns] hosts`.
//! Chromium itself resolves nothing (`--host-resolver-rules` maps every name to NOTFOUND), and
//! veilgate's policy admits only that one name, so the browser's own background requests are
//! refused before any DNS query: no packet and no query leaves the machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::tls::{TestPki, TlsOrigin};
use common::*;

const PAGE: &str = "<html><body><p id=\"v\">through veilgate</p></body></html>";
const ORIGIN_NAME: &str = "origin.test";

/// The Chromium binary and `certutil` (to trust the test CA in the browser's NSS database),
/// or why the test cannot run.
fn tools() -> Result<PathBuf, String> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("chromium is not installed (Debian package `chromium`; .ci/run installs it)")?;
    if std::process::Command::new("certutil").arg("-H").output().is_err() {
        return Err("certutil is not installed (Debian package `libnss3-tools`)".into());
    }
    Ok(chromium)
}

/// [`tools`], or None after saying loudly that `test` is skipped and why.
fn tools_for(test: &str) -> Option<PathBuf> {
    tools().map_err(|why| eprintln!("\n*** SKIPPED {test}: {why} ***\n")).ok()
}

/// A home directory whose NSS database trusts `ca_pem` for servers: Chromium on Linux reads
/// `$HOME/.pki/nssdb`, so the test CA is trusted by this browser run and nothing else.
fn home_trusting(dir: &Path, ca_pem: &str) -> PathBuf {
    let home = dir.join("home");
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let db_arg = format!("sql:{}", db.display());
    let run = |args: &[&str]| {
        let out = std::process::Command::new("certutil").args(args).output().unwrap();
        assert!(out.status.success(), "certutil {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["-N", "-d", &db_arg, "--empty-password"]);
    run(&["-A", "-d", &db_arg, "-n", "veilgate-test-ca", "-t", "C,,", "-i", ca.to_str().unwrap()]);
    home
}

/// Runs headless Chromium on `url` with `proxy_args` and returns the page's DOM as printed by
/// `--dump-dom`, or the browser's stderr when it failed.
async fn chromium_dump(chromium: &Path, home: &Path, proxy_args: &[String], url: &str) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.env("HOME", home)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--metrics-recording-only",
            // The browser resolves nothing itself: every name goes to the proxy unresolved,
            // and 127.0.0.1 (the PAC URL and the proxy) is a literal.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", home.join("profile").display()))
        .args(proxy_args)
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| "chromium did not finish in 60 s".to_string())?
        .map_err(|e| format!("cannot run chromium: {e}"))?;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && dom.contains("through veilgate") {
        Ok(dom)
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        // Headless Chromium complains about the missing session bus on every start; noise.
        let tail: Vec<&str> = err.lines().rev().filter(|l| !l.contains("dbus")).take(30).collect();
        Err(format!("status {:?}, dom {dom:?}, stderr (last lines, newest first):\n{}", out.status, tail.join("\n")))
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    home: PathBuf,
    origin: TlsOrigin,
    proxy: TestProxy,
}

impl Setup {
    /// The page, or a failure that says what veilgate refused (its counters) and what the
    /// browser said.
    async fn loaded(&self, dom: Result<String, String>) -> String {
        match dom {
            Ok(dom) => dom,
            Err(e) => {
                let (_, metrics) = self.proxy.admin_get("/metrics").await;
                let refusals: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.starts_with("veilgate_refusals_total") && !l.ends_with(" 0"))
                    .collect();
                panic!("Chromium did not load the page through veilgate: {e}\nveilgate refused: {refusals:?}")
            }
        }
    }
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = TlsOrigin::start_with(pki.server_config_for(&[ORIGIN_NAME]), PAGE).await;
    let extra = format!(
        "[dns]\nhosts = {{ \"{ORIGIN_NAME}\" = \"127.0.0.1\" }}\n[pac]\nenabled = true\n[admin]\ninspect = true\n"
    );
    let mut config = pki.listener_config(dir.path(), origin.addr.port(), &extra);
    // The browser's own requests (updates, safe browsing) name other hosts: refused before DNS.
    config = config.replace("[policy]\n", &format!("[policy]\nallow_hosts = [\"{ORIGIN_NAME}\"]\n"));
    let proxy = TestProxy::start(&config).await;
    let home = home_trusting(dir.path(), &pki.ca_pem);
    Setup { _dir: dir, home, origin, proxy }
}

#[tokio::test]
async fn chromium_loads_a_page_through_the_pac_file_over_http2_to_the_proxy() {
    let Some(chromium) = tools_for("chromium_loads_a_page_through_the_pac_file_over_http2_to_the_proxy") else {
        return;
    };
    let s = setup().await;
    let (status, pac) = s.proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    assert!(pac.contains(&format!("return \"HTTPS {}\";", s.proxy.tls[0])), "{pac}");
    let pac_url = format!("http://{}/proxy.pac", s.proxy.admin.unwrap());
    let url = format!("https://{ORIGIN_NAME}:{}/", s.origin.addr.port());
    let dom = chromium_dump(&chromium, &s.home, &[format!("--proxy-pac-url={pac_url}")], &url).await;
    let dom = s.loaded(dom).await;
    assert!(dom.contains("<p id=\"v\">through veilgate</p>"), "{dom}");
    assert!(s.proxy.metric("veilgate_tls_sessions_total{protocol=\"h2\"}").await >= 1.0, "Chromium spoke HTTP/2");
    assert_eq!(s.proxy.metric("veilgate_tls_sessions_total{protocol=\"http/1.1\"}").await, 0.0);
    // The browser has exited, so its tunnel ends and is counted.
    let ended = async || {
        let (_, m) = s.proxy.admin_get("/metrics").await;
        m.lines()
            .filter(|l| l.starts_with("veilgate_tunnels_total") && !l.ends_with(" 0"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let seen = eventually("the browser's tunnel counted", ended, |v| !v.is_empty()).await;
    // Chromium ends its streams with CANCEL when it is done: a normal end, not a failure.
    assert!(
        seen.iter().all(|l| l.starts_with("veilgate_tunnels_total{mode=\"tunnel\",outcome=\"closed\"}")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn chromium_loads_a_page_through_the_https_proxy_over_http1() {
    let Some(chromium) = tools_for("chromium_loads_a_page_through_the_https_proxy_over_http1") else { return };
    let s = setup().await;
    let proxy = format!("--proxy-server=https://127.0.0.1:{}", s.proxy.tls[0].port());
    let url = format!("https://{ORIGIN_NAME}:{}/", s.origin.addr.port());
    let args = [proxy, "--disable-http2".to_string()];
    let dom = chromium_dump(&chromium, &s.home, &args, &url).await;
    let dom = s.loaded(dom).await;
    assert!(dom.contains("<p id=\"v\">through veilgate</p>"), "{dom}");
    assert!(s.proxy.metric("veilgate_tls_sessions_total{protocol=\"http/1.1\"}").await >= 1.0);
    assert_eq!(s.proxy.metric("veilgate_tls_sessions_total{protocol=\"h2\"}").await, 0.0);
}
