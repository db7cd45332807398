//! Leaf minting cost: mints N distinct leaves with a fresh CA and prints the time per leaf
//! (key generation + signing), then the time of a cache hit.
//!
//!     cargo run --release --example mint_leaf -- 2000

use std::time::{Duration, Instant};

use veilgate::mitm::ca::{CertAuthority, init};

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("veilgate-mint-{}", std::process::id()));
    let (cert, key) = init(&dir).expect("CA");
    let ca = CertAuthority::load(&cert, &key, n + 1, Duration::from_secs(3600)).expect("load");
    let first = Instant::now();
    ca.leaf_for("warmup.example").expect("mint");
    let first = first.elapsed();
    let started = Instant::now();
    for i in 0..n {
        ca.leaf_for(&format!("host{i}.example")).expect("mint");
    }
    let per = started.elapsed() / n as u32;
    let hit = Instant::now();
    for i in 0..n {
        ca.leaf_for(&format!("host{i}.example")).expect("hit");
    }
    let per_hit = hit.elapsed() / n as u32;
    println!("first mint {first:?}; {n} mints: {per:?} per leaf; cache hit {per_hit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
