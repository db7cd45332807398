//! `table`: the markdown tables run.sh prints, from the JSON lines of one or more runs (one
//! file per run). Each figure is the median over runs; each ratio is taken inside a run first
//! (so both sides were measured minutes apart on the same machine), then its median.
//! `free-ports`: loopback ports that were free a moment ago, for scripts.

use crate::common::{Json, err};
use clap::Args;
use serde_json::Value;
use std::io;
use std::path::PathBuf;

#[derive(Args)]
pub struct TableArgs {
    /// The TLS / MITM table (labels direct, tunnel, mitm) instead of the blind-tunnel one
    /// (labels direct, veilgate).
    #[arg(long)]
    pub mitm: bool,
    /// JSON-lines files, one per run.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct FreePortsArgs {
    /// How many distinct ports.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

pub fn free_ports(a: FreePortsArgs) -> io::Result<()> {
    // All bound at once, so they are distinct; released on return.
    let ls: Vec<std::net::TcpListener> =
        (0..a.count.min(64)).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let ports: Vec<String> =
        ls.iter().map(|l| l.local_addr().map(|a| a.port().to_string())).collect::<Result<_, _>>()?;
    println!("{}", ports.join(" "));
    Ok(())
}

type Run = Vec<Json>;

fn load(p: &PathBuf) -> io::Result<Run> {
    let text = std::fs::read_to_string(p).map_err(|e| err(format!("{}: {e}", p.display())))?;
    Ok(text
        .lines()
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        })
        .collect())
}

/// Which measurement a figure comes from.
#[derive(Clone, Copy)]
struct Sel {
    test: &'static str,
    dir: Option<&'static str>,
    key: &'static str,
}

const fn sel(test: &'static str, dir: Option<&'static str>, key: &'static str) -> Sel {
    Sel { test, dir, key }
}

fn rows<'a>(run: &'a Run, label: &'a str, s: Sel) -> impl Iterator<Item = &'a Json> + 'a {
    run.iter().filter(move |r| {
        r.get("label").and_then(Value::as_str) == Some(label)
            && r.get("test").and_then(Value::as_str) == Some(s.test)
            && s.dir.is_none_or(|d| r.get("dir").and_then(Value::as_str) == Some(d))
            && !r.contains_key("error")
    })
}

/// The figure from the first matching line of a run.
fn get(run: &Run, label: &str, s: Sel) -> Option<f64> {
    rows(run, label, s).next().and_then(|r| r.get(s.key)).and_then(Value::as_f64)
}

fn get_str(run: &Run, label: &str, s: Sel) -> Option<String> {
    rows(run, label, s).next().and_then(|r| r.get(s.key)).map(|v| match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt(x: Option<f64>, nd: usize) -> String {
    match x {
        None => "–".into(),
        Some(x) if nd == 0 => format!("{x:.0}"),
        Some(x) => format!("{x:.nd$}"),
    }
}

/// One table line: a figure for each label (median over runs) and ratios label[b]/label[a].
fn line(runs: &[Run], title: &str, labels: &[&str], s: Sel, nd: usize, ratios: &[(usize, usize)]) -> String {
    let mut cells = vec![title.to_string()];
    for l in labels {
        cells.push(fmt(median(runs.iter().filter_map(|r| get(r, l, s)).collect()), nd));
    }
    for (a, b) in ratios {
        let per_run: Vec<f64> =
            runs.iter().filter_map(|r| Some(get(r, labels[*b], s)? / get(r, labels[*a], s)?)).collect();
        cells.push(fmt(median(per_run), 2));
    }
    format!("| {} |", cells.join(" | "))
}

fn header(first: &str, cols: &[&str]) -> String {
    let mut h = format!("| {first} | {} |\n|---", cols.join(" | "));
    h += &"|---:".repeat(cols.len());
    h + "|"
}

pub fn table(a: TableArgs) -> io::Result<()> {
    let runs: Vec<Run> = a.files.iter().map(load).collect::<Result<_, _>>()?;
    let out = if a.mitm { mitm_table(&runs) } else { tunnel_table(&runs) };
    println!("{}", pad(&out));
    Ok(())
}

/// Give every table row as many cells as the header has (blank ones at the end).
fn pad(table: &str) -> String {
    let cells = |l: &str| l.matches('|').count().saturating_sub(1);
    let width = table.lines().next().map(cells).unwrap_or(0);
    table
        .lines()
        .map(|l| {
            let n = cells(l);
            if l.starts_with('|') && n < width { format!("{l}{}", "  |".repeat(width - n)) } else { l.to_string() }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tunnel_table(runs: &[Run]) -> String {
    // A second build (run.sh with VEILGATE_BIN_B) adds its column and B / A, each ratio taken
    // inside a run: the two builds ran minutes apart, interleaved.
    let with_b = runs.iter().flatten().any(|m| m.get("label").and_then(Value::as_str) == Some("veilgate-B"));
    let (labels, cols, vs_direct, b_over_a): (&[&str], &[&str], &[(usize, usize)], &[(usize, usize)]) = if with_b {
        (
            &["direct", "veilgate", "veilgate-B"],
            &["direct", "A", "B", "A / direct", "B / direct", "B / A"],
            &[(0, 1), (0, 2), (1, 2)],
            &[(1, 2)],
        )
    } else {
        (&["direct", "veilgate"], &["direct", "veilgate", "veilgate / direct"], &[(0, 1)], &[])
    };
    let r = vs_direct;
    let mut t = vec![header("figure", cols)];
    let conns = runs.first().and_then(|r| get(r, "direct", sel("throughput", Some("up"), "conns"))).unwrap_or(0.0);
    // Rows without a ratio to direct (direct has no proxy) still get B / A, in its column.
    let own = |title: &str, s: Sel, nd: usize| {
        let row = line(runs, title, labels, s, nd, &[]);
        if !with_b {
            return row;
        }
        let ratio = line(runs, "", labels, s, nd, b_over_a);
        let b_a = ratio.rsplit('|').nth(1).unwrap_or(" – ").to_string();
        format!("{row}  |  |{b_a}|")
    };
    t.push(line(
        runs,
        &format!("throughput up, MB/s ({conns:.0} tunnels)"),
        labels,
        sel("throughput", Some("up"), "mbyte_per_s"),
        0,
        r,
    ));
    t.push(line(runs, "throughput down, MB/s", labels, sel("throughput", Some("down"), "mbyte_per_s"), 0, r));
    t.push(own("proxy CPU-s per GB, up", sel("throughput", Some("up"), "proxy_cpu_s_per_gb"), 2));
    t.push(own("proxy CPU-s per GB, down", sel("throughput", Some("down"), "proxy_cpu_s_per_gb"), 2));
    t.push(line(runs, "connrate, tunnels/s", labels, sel("connrate", None, "tunnels_per_s"), 0, r));
    t.push(line(runs, "tunnel setup p50, µs", labels, sel("connrate", None, "p50_us"), 0, r));
    t.push(line(runs, "tunnel setup p99, µs", labels, sel("connrate", None, "p99_us"), 0, r));
    t.push(own("proxy CPU µs per tunnel", sel("connrate", None, "proxy_cpu_us_per_tunnel"), 0));
    t.push(line(runs, "latency p50, µs (64 B round trip)", labels, sel("latency", None, "p50_us"), 1, r));
    t.push(line(runs, "latency p90, µs", labels, sel("latency", None, "p90_us"), 1, r));
    t.push(line(runs, "latency p99, µs", labels, sel("latency", None, "p99_us"), 1, r));
    t.push(own("idle tunnels opened", sel("idle", None, "opened"), 0));
    t.push(own("idle tunnels alive after hold", sel("idle", None, "alive_after_hold"), 0));
    t.push(own("proxy KiB per idle tunnel", sel("idle", None, "kib_per_idle_tunnel"), 1));
    t.push(own("proxy RSS holding them, KiB", sel("idle", None, "proxy_rss_holding_kib"), 0));
    let errs: f64 = runs
        .iter()
        .flat_map(|r| r.iter())
        .map(|m| {
            m.get("errors").and_then(Value::as_f64).unwrap_or(0.0)
                + m.get("open_errors").and_then(Value::as_f64).unwrap_or(0.0)
        })
        .sum();
    let failed = runs.iter().flat_map(|r| r.iter()).filter(|m| m.contains_key("error")).count();
    t.push(String::new());
    t.push(format!("{} run(s); errors counted by the tests: {errs:.0}; tests that failed: {failed}", runs.len()));
    t.join("\n")
}

fn mitm_table(runs: &[Run]) -> String {
    let labels = ["direct", "tunnel", "mitm"];
    let r = &[(0usize, 1usize), (1, 2)][..];
    let mut t = vec![header("figure", &["direct", "tunnel", "mitm", "tunnel / direct", "mitm / tunnel"])];
    // Cold: the first handshake through each fresh veilgate process (all of them, every run).
    let cold = |label: &str| -> Option<f64> {
        let cold_label = format!("{label}-cold");
        median(
            runs.iter()
                .flat_map(|run| run.iter())
                .filter(|m| {
                    let l = m.get("label").and_then(Value::as_str).unwrap_or("");
                    m.get("test").and_then(Value::as_str) == Some("tls-handshake") && (l == label || l == cold_label)
                })
                .filter_map(|m| m.get("first_handshake_us").and_then(Value::as_f64))
                .collect(),
        )
    };
    let n_cold = runs
        .iter()
        .flat_map(|run| run.iter())
        .filter(|m| {
            m.get("test").and_then(Value::as_str) == Some("tls-handshake")
                && m.get("label").and_then(Value::as_str).is_some_and(|l| l.starts_with("mitm"))
        })
        .count();
    let (ct, cm) = (cold("tunnel"), cold("mitm"));
    t.push(format!(
        "| TLS handshake, cold: first per fresh veilgate (median of {n_cold}), µs | – | {} | {} | – | {} |",
        fmt(ct, 0),
        fmt(cm, 0),
        fmt(cm.zip(ct).map(|(m, t)| m / t), 2)
    ));
    t.push(line(
        runs,
        "TLS handshake, warm p50, µs (200 → done)",
        &labels,
        sel("tls-handshake", None, "handshake_p50_us"),
        0,
        r,
    ));
    t.push(line(runs, "TLS handshake, warm p99, µs", &labels, sel("tls-handshake", None, "handshake_p99_us"), 0, r));
    t.push(line(runs, "CONNECT + handshake, warm p50, µs", &labels, sel("tls-handshake", None, "total_p50_us"), 0, r));
    t.push(line(
        runs,
        "proxy CPU µs per TLS connection",
        &labels,
        sel("tls-handshake", None, "proxy_cpu_us_per_handshake"),
        0,
        &[(1, 2)],
    ));
    let conns = runs.first().and_then(|r| get(r, "direct", sel("tls-throughput", Some("up"), "conns"))).unwrap_or(0.0);
    t.push(line(
        runs,
        &format!("TLS throughput up, MB/s ({conns:.0} conns)"),
        &labels,
        sel("tls-throughput", Some("up"), "mbyte_per_s"),
        0,
        r,
    ));
    t.push(line(runs, "TLS throughput down, MB/s", &labels, sel("tls-throughput", Some("down"), "mbyte_per_s"), 0, r));
    t.push(line(
        runs,
        "proxy CPU-s per GB, up",
        &labels,
        sel("tls-throughput", Some("up"), "proxy_cpu_s_per_gb"),
        2,
        &[(1, 2)],
    ));
    t.push(line(
        runs,
        "proxy CPU-s per GB, down",
        &labels,
        sel("tls-throughput", Some("down"), "proxy_cpu_s_per_gb"),
        2,
        &[(1, 2)],
    ));
    t.push(line(runs, "idle TLS tunnels alive after hold", &labels, sel("tls-idle", None, "alive_after_hold"), 0, &[]));
    t.push(line(
        runs,
        "proxy KiB per idle TLS tunnel",
        &labels,
        sel("tls-idle", None, "kib_per_idle_tunnel"),
        1,
        &[(1, 2)],
    ));
    let Some(first) = runs.first() else { return t.join("\n") };
    let strs = |s: Sel| -> Vec<String> {
        labels.iter().map(|l| get_str(first, l, s).unwrap_or_else(|| "–".into())).collect()
    };
    let fps = strs(sel("tls-hellos", None, "fingerprints"));
    t.push(format!(
        "| ClientHello fingerprint(s) the origin saw | {} | {} | {} | {} | {} |",
        fps[0],
        fps[1],
        fps[2],
        if fps[1] == fps[0] { "same" } else { "differs" },
        if fps[2] == fps[1] { "same" } else { "differs" }
    ));
    let sni: Vec<String> = labels
        .iter()
        .map(|l| {
            rows(first, l, sel("tls-hellos", None, ""))
                .next()
                .and_then(|r| r.get("groups")?.as_array()?.first()?.get("sni")?.as_object().cloned())
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| "–".into())
        })
        .collect();
    t.push(format!("| SNI the origin saw | {} | {} | {} | | |", sni[0], sni[1], sni[2]));
    let iss = strs(sel("tls-handshake", None, "leaf_issuer"));
    t.push(format!("| leaf issuer the client saw | {} | {} | {} | | |", iss[0], iss[1], iss[2]));
    let errs: f64 =
        runs.iter().flat_map(|r| r.iter()).map(|m| m.get("errors").and_then(Value::as_f64).unwrap_or(0.0)).sum();
    let failed = runs.iter().flat_map(|r| r.iter()).filter(|m| m.contains_key("error")).count();
    t.push(String::new());
    t.push(format!("{} run(s); errors counted by the tests: {errs:.0}; tests that failed: {failed}", runs.len()));
    t.join("\n")
}
