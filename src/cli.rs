//! Command line (DESIGN §3). `veilgate` alone is `veilgate run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat};

/// veilgate: a CONNECT-only forward proxy that hides client addresses and enforces limits.
///
/// Each subcommand takes only the options it uses (`-c` on `run`, `check-config` and
/// `probe`). The top-level options are `run`'s, for `veilgate` alone; they cannot be given
/// before a subcommand, where they would be silently ignored.
#[derive(Debug, Parser)]
#[command(name = "veilgate", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options for `run` when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run(RunArgs),
    /// Check a configuration and every file it names, as `run` and a reload load them: print the
    /// effective config and exit 0, or name the problem and exit 1.
    CheckConfig(ConfigArg),
    /// Print the documented default configuration.
    PrintDefaultConfig,
    /// Manage the MITM certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Interception self-check: compare the certificate an origin presents directly and through
    /// a proxy. Exit 0: not intercepted; 3: intercepted; 2: error.
    Probe(ProbeArgs),
    /// Watch who uses the proxy: the admin listener's /clients (needs admin.inspect = true),
    /// redrawn every interval, fastest clients first.
    Top(TopArgs),
}

/// `veilgate top`
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The admin listener, as http://HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// Seconds between redraws (rates are measured over the same interval).
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
    /// Clients shown (the fastest).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Redraws before exiting; without it, until interrupted.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `veilgate ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new ECDSA P-256 CA: DIR/veilgate-ca.pem and DIR/veilgate-ca.key (mode 0600).
    Init {
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `veilgate probe`
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The proxy, as http://HOST:PORT or http://USER:PASSWORD@HOST:PORT (userinfo
    /// percent-encoded: `@` is %40, `:` is %3A); https://... for a TLS listener.
    #[arg(long)]
    pub proxy: String,
    /// Credentials for the proxy, as USER:PASSWORD (instead of putting them in --proxy).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub proxy_user: Option<String>,
    /// A configuration whose [dns] (static hosts, servers) resolves the origin for the
    /// direct path, as the proxy resolves it; without one, the system's resolver.
    #[arg(short, long, env = "VEILGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The origin, as https://HOST[:PORT].
    pub origin: String,
    /// Roots to verify against (PEM); default: the system's.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Roots the proxy's certificate must chain to, for an https:// proxy (PEM); default: the
    /// system's.
    #[arg(long)]
    pub proxy_ca_file: Option<PathBuf>,
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// Configuration file (TOML). Without one, the embedded defaults.
    #[arg(short, long, env = "VEILGATE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Proxy listen address, replacing `server.listen` (repeat for several).
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Admin listen address, replacing `server.admin_listen`.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format, replacing `log.format`.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

impl RunArgs {
    /// Loads the file (or the embedded defaults), applies the command-line overrides and
    /// validates the result.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config.config {
            Some(path) => Config::load(path)?,
            None => Config::embedded(),
        };
        if !self.listen.is_empty() {
            config.server.listen = self.listen.clone();
        }
        if let Some(a) = self.admin_listen {
            config.server.admin_listen = Some(a);
        }
        if let Some(f) = self.log_format {
            config.log.format = f;
        }
        config.validate("command line")?;
        Ok(config)
    }
}
