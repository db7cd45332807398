//! veilgate: a CONNECT-only forward proxy that hides client addresses from origins and holds
//! every client to connection and bandwidth limits.
//!
//! # Layout
//! One tunnel's life (DESIGN §1), each step in its own module:
//!
//! - [`server`]: listeners, accept loop, drain; [`Proxy`] is the entry point.
//! - [`front`]: how a connection arrives, through its CONNECT head (plain HTTP/1 today);
//!   yields the request, the client's identity and a connection that answers in its protocol.
//! - [`tunnel`]: sequences the phases for one connection and reports its outcome once.
//! - [`connect`]: the CONNECT head (size cap, deadline, `httparse`); [`target`]: `host:port`.
//! - [`auth`]: optional `Proxy-Authorization: Basic`.
//! - [`limits`]: the governor: tunnel caps, new-tunnel rate, byte budgets.
//! - [`policy`]: ports, host patterns, CIDRs, private ranges; the route table.
//! - [`dial`]: resolve at the proxy, check every address, happy-eyeballs connect.
//! - [`relay`]: the byte-copy hot path, which knows nothing of policy or metrics;
//!   `splice`: its zero-copy form for blind tunnels on Linux.
//! - [`mitm`]: per-route interception (CA, minted leaves, verified upstream TLS, observation);
//!   [`probe`]: the interception self-check.
//! - [`meter`]: the throttle and counters wrapped around each relay direction.
//! - [`metrics`], [`admin`]: Prometheus registry and the admin listener.
//! - [`logthrottle`]: the rate limit on refusal log lines.
//! - [`config`], [`cli`], [`context`], [`error`], [`reply`]: the rest.
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod connect;
pub mod context;
pub mod detail;
pub mod dial;
pub mod egress;
pub mod error;
pub mod front;
pub mod inspect;
pub mod io;
pub mod limits;
pub mod logthrottle;
pub mod meter;
pub mod metrics;
pub mod mitm;
pub mod pac;
pub mod policy;
pub mod probe;
pub mod relay;
pub mod reply;
pub mod server;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod target;
#[cfg(test)]
mod testlog;
pub mod top;
pub mod tunnel;

pub use config::Config;
pub use server::{Controller, Proxy, StartError};
