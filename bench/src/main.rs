//! vgbench: veilgate's benchmark, run from the repository (see bench/README.md).
//!
//! Every measuring subcommand prints exactly one JSON line on stdout and one human line on
//! stderr (`table` prints markdown, `free-ports` a list of ports).
//! Every address must be loopback (127.0.0.0/8, ::1, localhost); names are never resolved.
//! Every load loop is bounded by a count and by wall-clock time.

mod common;
mod floor;
mod front;
mod load;
mod origin;
mod pki;
mod report;
mod servers;
mod soak;
mod tlsclient;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vgbench", version, about = "Loopback benchmark for veilgate and other CONNECT proxies")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Plain TCP servers for tunnels to end at: sink, source, echo (tunnelbench's protocol).
    Serve(servers::ServeArgs),
    /// Bulk MB/s through N parallel tunnels (up = into a sink, down = from a source).
    Throughput(load::ThroughputArgs),
    /// New tunnels per second: CONNECT, 200, one byte echoed, close.
    Connrate(load::ConnrateArgs),
    /// Round-trip latency of small messages inside one tunnel.
    Latency(load::LatencyArgs),
    /// Open N tunnels, hold them idle, sample the proxy's RSS, check they still relay.
    Idle(load::IdleArgs),
    /// TLS origin for the MITM comparison; records every ClientHello it receives.
    TlsOrigin(origin::OriginArgs),
    /// N sequential CONNECT + TLS handshakes: handshake time after the 200, and in total.
    TlsHandshake(tlsclient::HandshakeArgs),
    /// Bulk MB/s inside TLS through N tunnels (to a tls-origin).
    TlsThroughput(tlsclient::TlsThroughputArgs),
    /// Like idle, with a TLS session in every tunnel.
    TlsIdle(tlsclient::TlsIdleArgs),
    /// Summarise a tls-origin's clienthellos.jsonl by fingerprint.
    TlsHellos(origin::HellosArgs),
    /// Markdown table from run files (one JSON-lines file per run), as run.sh prints it.
    Table(report::TableArgs),
    /// Print loopback ports that are free right now (for scripts).
    FreePorts(report::FreePortsArgs),
    /// The floor: a minimal blocking splice relay to one fixed target, no CONNECT, as a yardstick.
    Floor(floor::FloorArgs),
    /// Bulk MB/s through N tunnels over a front: plain, TLS to the proxy, or HTTP/2 CONNECT.
    FrontThroughput(front::FrontThroughputArgs),
    /// New tunnels per second over a front (plain, tls, h2).
    FrontConnrate(front::FrontConnrateArgs),
    /// Idle tunnels over a front (plain, tls, h2): the proxy's RSS per tunnel.
    FrontIdle(front::FrontIdleArgs),
    /// Soak and chaos: start veilgate, run every kind of load at once, check it gives all back.
    Soak(soak::SoakArgs),
}

fn main() {
    common::raise_nofile();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => servers::serve(a).await,
            Cmd::Throughput(a) => load::throughput(a).await,
            Cmd::FrontThroughput(a) => front::throughput(a).await,
            Cmd::FrontConnrate(a) => front::connrate(a).await,
            Cmd::FrontIdle(a) => front::idle(a).await,
            Cmd::Connrate(a) => load::connrate(a).await,
            Cmd::Latency(a) => load::latency(a).await,
            Cmd::Idle(a) => load::idle(a).await,
            Cmd::TlsOrigin(a) => origin::tls_origin(a).await,
            Cmd::TlsHandshake(a) => tlsclient::tls_handshake(a).await,
            Cmd::TlsThroughput(a) => tlsclient::tls_throughput(a).await,
            Cmd::TlsIdle(a) => tlsclient::tls_idle(a).await,
            Cmd::TlsHellos(a) => origin::tls_hellos(a),
            Cmd::Table(a) => report::table(a),
            Cmd::FreePorts(a) => report::free_ports(a),
            Cmd::Floor(a) => floor::floor(a),
            Cmd::Soak(a) => soak::soak(a).await,
        }
    });
    // Servers' and clients' tasks may still hold sockets: leave at once either way.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    if let Err(e) = r {
        if e.get_ref().is_some_and(|e| e.is::<soak::Reported>()) {
            std::process::exit(1);
        }
        println!("{}", serde_json::json!({"tool": "vgbench", "error": e.to_string()}));
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
