//! Memory under a flood of distinct clients: admits and releases one tunnel for each of N
//! distinct client addresses per round, sweeps, and prints the process RSS after each round.
//! Flat RSS across rounds means per-client state does not accumulate.
//!
//!     cargo run --release --example client_flood -- 1000000 5

use std::net::Ipv4Addr;

use veilgate::Config;
use veilgate::limits::{AdmitRequest, ClientKey, Governor};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let per_round: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let config = Config::from_toml(
        "[limits.per_client]\nmax_tunnels = 64\nnew_tunnels_per_second = 1000\nbandwidth_down = \"10 MiB/s\"",
        "flood",
    )
    .expect("valid");
    let g = Governor::new(&config);
    println!("start: rss {} KiB", rss_kib());
    for round in 0..rounds {
        let base = round.wrapping_mul(per_round);
        for i in 0..per_round {
            let client = ClientKey::V4(Ipv4Addr::from(base.wrapping_add(i)));
            drop(g.admit(AdmitRequest { client: &client, route: None }).await.expect("admitted"));
        }
        let peak = rss_kib();
        // Let every key become indistinguishable from fresh, then sweep as the task would.
        tokio::time::sleep(veilgate::limits::SWEEP_INTERVAL + std::time::Duration::from_millis(50)).await;
        let (clients, rate) = g.local().sweep();
        println!(
            "round {round}: {per_round} clients, rss at peak {peak} KiB, after sweep {} KiB, keys left {clients}+{rate}",
            rss_kib()
        );
    }
}
