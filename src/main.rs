//! The veilgate binary: parse the command line, set up logging, load the configuration,
//! bind, and run until a signal. Everything else is in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};
use veilgate::cli::{CaCommand, Cli, Command, ProbeArgs, RunArgs, TopArgs};
use veilgate::config::diff::Changes;
use veilgate::config::{DEFAULT_CONFIG, LogConfig, LogFormat};
use veilgate::context::Shared;
use veilgate::{Controller, Proxy, StartError};

/// jemalloc instead of glibc's malloc, because a proxy's memory comes in bursts. After 5,000
/// tunnels had opened and closed again, glibc kept the process at the burst's high-water mark
/// (7.2 MiB at rest, 31.5 MiB held for good); jemalloc with the options below is back at
/// 11.8 MiB within 5 s, at no throughput or tunnels-per-second cost that interleaved
/// measurements could see (mimalloc kept 51 MiB). Figures: bench/README.md, "Allocator".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, under the prefixed name tikv-jemalloc-sys builds
/// with), read once at start: one background thread (not one per CPU and more) returns freed
/// pages to the system after 1 s unused. Without it the default 10 s decay purges only when
/// some thread allocates again, so an idle proxy kept the burst's memory. The
/// `_RJEM_MALLOC_CONF` environment variable still adds to or overrides these.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &u8 = &b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000\0"[0];

fn main() -> ExitCode {
    // One TLS provider for the whole process, chosen before anything builds a config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ca(CaCommand::Init { dir })) => match veilgate::mitm::ca::init(&dir) {
            Ok((cert, key)) => {
                println!("CA certificate: {}\nCA key:         {} (mode 0600)", cert.display(), key.display());
                println!(
                    "Trust the certificate in clients whose traffic veilgate may intercept, and set [mitm] ca_cert / ca_key."
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("veilgate: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Probe(args)) => probe(args),
        Some(Command::Top(args)) => top(args),
        Some(Command::PrintDefaultConfig) => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig(arg)) => {
            let args = RunArgs { config: arg, listen: vec![], admin_listen: None, log_format: None };
            // The files too, through the same build start-up and reload use.
            let checked = args.load().map_err(anyhow::Error::from).and_then(|config| {
                Shared::check(&config)?;
                Ok(config)
            });
            match checked {
                Ok(config) => {
                    print!("{}", config.to_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("veilgate: invalid configuration: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn top(args: TopArgs) -> ExitCode {
    use std::io::IsTerminal;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veilgate: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let tty = std::io::stdout().is_terminal();
    let path = format!("/clients?limit={}", args.limit.clamp(1, veilgate::inspect::MAX_LIMIT));
    runtime.block_on(async {
        let mut drawn = 0u64;
        loop {
            match veilgate::top::fetch(&args.admin, &path).await.and_then(|b| veilgate::top::render(&b)) {
                // On a terminal each view replaces the last; piped, views follow each other.
                Ok(view) if tty => print!("\x1b[H\x1b[2J{view}"),
                Ok(view) => println!("{view}"),
                Err(e) => {
                    eprintln!("veilgate top: {e}");
                    return ExitCode::from(2);
                }
            }
            drawn += 1;
            if args.count.is_some_and(|c| drawn >= c) {
                return ExitCode::SUCCESS;
            }
            tokio::time::sleep(std::time::Duration::from_secs(args.interval.max(1))).await;
        }
    })
}

fn probe(args: ProbeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veilgate: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let dns = match &args.config {
        Some(path) => match veilgate::Config::load(path) {
            Ok(config) => Some(config.dns),
            Err(e) => {
                eprintln!("veilgate probe: invalid configuration: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let opts =
        veilgate::probe::Options { proxy_user: args.proxy_user.clone(), dns, proxy_ca: args.proxy_ca_file.clone() };
    match runtime.block_on(veilgate::probe::probe_with(&args.proxy, &args.origin, args.ca_file.as_ref(), &opts)) {
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::from(report.verdict().exit_code())
        }
        Err(e) => {
            eprintln!("veilgate probe: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("veilgate: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logging = Logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veilgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, args, logging)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("veilgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: veilgate::Config, args: RunArgs, logging: Logging) -> anyhow::Result<()> {
    let proxy = match Proxy::bind(config).await {
        Ok(p) => p,
        // Worded as check-config words it: the same files failed the same build.
        Err(StartError::Load(e)) => anyhow::bail!("invalid configuration: {e}"),
        Err(e) => return Err(e).context("starting veilgate"),
    };
    info!(version = env!("CARGO_PKG_VERSION"), listen = ?proxy.proxy_addrs(), admin = ?proxy.admin_addr(), "veilgate started");
    let controller = proxy.controller();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(reload_on_hup(hup, controller, args, logging));
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = int.recv() => info!("SIGINT: draining"),
        }
        // A second signal means "now": exit without waiting for the drain.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            warn!("second signal: exiting without finishing the drain");
            std::process::exit(1);
        });
    };
    proxy.run(shutdown).await;
    Ok(())
}

/// SIGHUP: reload the same file with the same command-line overrides, apply what the log
/// layer owns (format, level), and say in one line which keys changed and which of them need
/// a restart. An invalid file is logged and counted, and the running configuration stays.
async fn reload_on_hup(mut hup: tokio::signal::unix::Signal, controller: Controller, args: RunArgs, logging: Logging) {
    while hup.recv().await.is_some() {
        match args.load() {
            Ok(config) => {
                let log = config.log.clone();
                match controller.reload(config) {
                    Ok(changes) => {
                        logging.apply(&log, &changes);
                        log_reload(&changes);
                    }
                    Err(e) => {
                        error!(error = %e, "SIGHUP: reload failed; keeping the running configuration")
                    }
                }
            }
            Err(e) => {
                controller.reload_failed();
                error!(error = %e, "SIGHUP: invalid configuration; keeping the running one");
            }
        }
    }
}

/// The reload's one line: the keys applied, and (as a warning) those that wait for a restart.
fn log_reload(changes: &Changes) {
    let applied = changes.applied().join(", ");
    let applied = (!applied.is_empty()).then_some(applied.as_str());
    let restart = changes.need_restart();
    if changes.is_empty() {
        info!("SIGHUP: configuration reloaded; nothing changed");
    } else if restart.is_empty() {
        info!(changed = applied, "SIGHUP: configuration reloaded");
    } else {
        warn!(
            changed = applied,
            needs_restart = restart.join(", "),
            "SIGHUP: configuration reloaded; listener changes take effect only after a restart"
        );
    }
}

/// The line formatter, behind a reload layer so SIGHUP can swap text for JSON.
type FmtLayer = Box<dyn Layer<Filtered> + Send + Sync>;
/// The registry under the level filter, which is what the formatter sits on.
type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// The log's two reloadable parts: which events pass (level) and how lines look (format).
struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FmtLayer, Filtered>,
}

impl Logging {
    fn init(log: &LogConfig) -> Logging {
        let (filter, filter_handle) = reload::Layer::new(level_filter(log.level.as_deref()));
        let (format, format_handle) = reload::Layer::new(fmt_layer(log.format));
        tracing_subscriber::registry().with(filter).with(format).init();
        Logging { filter: filter_handle, format: format_handle }
    }

    /// Applies a reloaded `[log]`: the format and the level, when they changed.
    fn apply(&self, log: &LogConfig, changes: &Changes) {
        if changes.contains("log.format") {
            if let Err(e) = self.format.reload(fmt_layer(log.format)) {
                error!(error = %e, "SIGHUP: cannot change log.format");
            }
        }
        if changes.contains("log.level") {
            if let Err(e) = self.filter.reload(level_filter(log.level.as_deref())) {
                error!(error = %e, "SIGHUP: cannot change log.level");
            }
        }
    }
}

/// `log.level` when set (validated with the config), else `VEILGATE_LOG`, else `info`.
fn level_filter(level: Option<&str>) -> EnvFilter {
    level
        .and_then(|l| EnvFilter::builder().parse(l).ok())
        .or_else(|| EnvFilter::try_from_env("VEILGATE_LOG").ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

fn fmt_layer(format: LogFormat) -> FmtLayer {
    use std::io::IsTerminal;
    let layer = tracing_subscriber::fmt::layer().with_target(false).with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
        LogFormat::Text => layer.boxed(),
    }
}
