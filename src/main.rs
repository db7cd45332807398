//! The veilgate binary: parse the command line, set up logging, load the configuration,
//! bind, and run until a signal. Everything else is in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use veilgate::cli::{CaCommand, Cli, Command, ProbeArgs, RunArgs};
use veilgate::config::{DEFAULT_CONFIG, LogFormat};
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

fn probe(args: ProbeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veilgate: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(veilgate::probe::probe(&args.proxy, &args.origin, args.ca_file.as_ref())) {
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
    init_logging(config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veilgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("veilgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: veilgate::Config, args: RunArgs) -> anyhow::Result<()> {
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
    tokio::spawn(reload_on_hup(hup, controller, args));
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

/// SIGHUP: reload the same file with the same command-line overrides. An invalid file is
/// logged and counted, and the running configuration stays.
async fn reload_on_hup(mut hup: tokio::signal::unix::Signal, controller: Controller, args: RunArgs) {
    while hup.recv().await.is_some() {
        match args.load() {
            Ok(config) => match controller.reload(config) {
                Ok(()) => info!("SIGHUP: configuration reloaded"),
                Err(e) => {
                    error!(error = %e, "SIGHUP: reload failed; keeping the running configuration")
                }
            },
            Err(e) => {
                controller.reload_failed();
                error!(error = %e, "SIGHUP: invalid configuration; keeping the running one");
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("VEILGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
