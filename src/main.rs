//! The `reveille` binary: parses the command line, sets up logging and the runtime, and starts
//! the library's server. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use reveille::activate::{launch, process};
use reveille::config::{Config, ConfigError};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "reveille",
    version,
    about = "An HTTP activator for services scaled to zero"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum RolloutAction {
    Promote,
    Abort,
}

/// `reveille rollout promote|abort SERVICE`: one command to the admin API.
fn rollout_command(
    action: RolloutAction,
    service: &str,
    admin: std::net::SocketAddr,
    token_file: Option<PathBuf>,
) -> ExitCode {
    let token = match token_file {
        Some(f) => std::fs::read_to_string(&f)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("{}: {e}", f.display())),
        None => std::env::var("REVEILLE_ADMIN_TOKEN").map_err(|_| {
            "no token: pass --token-file FILE or set REVEILLE_ADMIN_TOKEN".to_string()
        }),
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            eprintln!("reveille rollout: {e}");
            return ExitCode::from(2);
        }
    };
    let action = match action {
        RolloutAction::Promote => "promote",
        RolloutAction::Abort => "abort",
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(reveille::admin::control::send(
        admin, service, action, &token,
    )) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("reveille rollout {action} {service}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the activating proxy.
    Serve {
        /// Config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Runtime worker threads (default: the CPU count); 1 runs everything on one thread.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a config file: exit 0, or print every problem and exit 2.
    Check {
        /// Config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the ReveilleService CustomResourceDefinition (deploy/base/crd.yaml).
    Crd,
    /// Promote or abort a rollout awaiting promotion (`promotion: manual`), through the admin
    /// API. The token comes from `--token-file` (or $REVEILLE_ADMIN_TOKEN_FILE), else from
    /// $REVEILLE_ADMIN_TOKEN; never from the command line.
    Rollout {
        /// `promote` or `abort`.
        #[arg(value_enum)]
        action: RolloutAction,
        /// The service's name.
        service: String,
        /// Reveille's admin address.
        #[arg(long, default_value = reveille::config::DEFAULT_ADMIN)]
        admin: std::net::SocketAddr,
        /// File holding the admin token.
        #[arg(long, env = "REVEILLE_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
    },
    /// Pre-warm windows: what is planned (see docs/prewarm.md).
    Prewarm {
        #[command(subcommand)]
        cmd: PrewarmCmd,
    },
    /// Run the built-in demo backend (used by examples/local.yaml and the tests).
    DemoBackend {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Wait this long before listening, like a slow-starting service (e.g. 2s).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        startup_delay: Duration,
        /// Name shown in answers.
        #[arg(long, default_value = "demo")]
        name: String,
    },
}

#[derive(Subcommand)]
enum PrewarmCmd {
    /// Print each pre-warmed service's windows of the next 7 days, with their source.
    Plan {
        /// Config file (YAML): the plan from it and the history file in its `state_dir`.
        #[arg(
            long,
            short,
            required_unless_present = "admin",
            conflicts_with = "admin"
        )]
        config: Option<PathBuf>,
        /// A running Reveille's admin address: its plan, from the live history (on Kubernetes
        /// the ConfigMap's) and the lead in force (`kubectl port-forward` to reach a pod's).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Seed a learning service's history (in state_dir) from a CSV of request timestamps.
    Import {
        /// Config file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// The service the requests were for (it must have `prewarm: { learn: true }`).
        #[arg(long)]
        service: String,
        /// CSV file: a timestamp per line in the first column (RFC 3339 or Unix seconds).
        file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let spec = std::env::var("REVEILLE_LOG").unwrap_or_else(|_| "info".into());
    // rustls warns once per handshake about what a client sent (an IP address as SNI, say):
    // a client could fill the log with them. Only its errors, unless asked for by name.
    let spec = if spec.contains("rustls") {
        spec
    } else {
        format!("{spec},rustls=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

fn report(path: &std::path::Path, e: &ConfigError) {
    eprintln!("{}: invalid configuration:", path.display());
    for p in &e.problems {
        eprintln!("  {p}");
    }
}

fn main() -> ExitCode {
    // A process backend being started (see `reveille::activate::launch`): nothing else to do.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == launch::SUBCOMMAND) {
        return launch::run(&args[2..]);
    }
    // Before anything else: `${REVEILLE_EXE}` must name the binary as it was at start, even
    // after an upgrade replaces the file (see `reveille_exe`).
    let _ = reveille::config::reveille_exe();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Rollout {
            action,
            service,
            admin,
            token_file,
        } => rollout_command(action, &service, admin, token_file),
        Cmd::Crd => {
            print!("{}", reveille::app::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Cmd::Prewarm { cmd } => prewarm(cmd),
        Cmd::Check { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} service{})",
                    config.display(),
                    c.services.len(),
                    if c.services.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&config, &e);
                ExitCode::from(2)
            }
        },
        Cmd::Serve { config, workers } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    report(&config, &e);
                    return ExitCode::from(2);
                }
            };
            // One worker: a current-thread runtime. Its run queue is plain FIFO; the
            // multi-thread scheduler's LIFO slot runs the task woken last first, which with one
            // worker leaves the oldest requests waiting (the long tail of HTTP/2 streams).
            let mut rt = match workers {
                Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
                _ => tokio::runtime::Builder::new_multi_thread(),
            };
            if let Some(n) = workers.filter(|n| *n > 1) {
                rt.worker_threads(n);
            }
            let rt = match rt.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Backends are started through this binary's launcher, so they die with it. As
            // `/proc/self/exe`: the image running now, even after an upgrade replaced the file.
            process::use_launcher("/proc/self/exe".into());
            rt.block_on(serve(cfg, config))
        }
        Cmd::DemoBackend {
            listen,
            startup_delay,
            name,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            match rt.block_on(reveille::demo::run(reveille::demo::DemoOptions {
                listen,
                startup_delay,
                name,
            })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo backend: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `reveille prewarm plan --admin ADDRESS`: a running Reveille's plan.
fn plan_from_admin(admin: std::net::SocketAddr, json: bool) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let body = match rt.block_on(reveille::admin::control::fetch(admin, "/api/prewarm")) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("reveille prewarm plan: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<reveille::prewarm::report::Plans>(&body) {
        Ok(plans) => {
            print!("{}", reveille::prewarm::report::plan_text(&plans.services));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("reveille prewarm plan: {admin} answered something else than a plan: {e}");
            ExitCode::FAILURE
        }
    }
}

fn prewarm(cmd: PrewarmCmd) -> ExitCode {
    match cmd {
        PrewarmCmd::Plan {
            admin: Some(admin),
            json,
            ..
        } => plan_from_admin(admin, json),
        PrewarmCmd::Plan {
            config: None,
            admin: None,
            ..
        } => {
            eprintln!("reveille prewarm plan: pass --config FILE or --admin ADDRESS");
            ExitCode::from(2)
        }
        PrewarmCmd::Plan {
            config: Some(config),
            json,
            ..
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    report(&config, &e);
                    return ExitCode::from(2);
                }
            };
            let history = match reveille::prewarm::store::Store::peek(&cfg.state_dir) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let plans =
                reveille::prewarm::report::plan_config(&cfg, jiff::Timestamp::now(), &history);
            if json {
                println!("{}", serde_json::json!({ "services": plans }));
            } else {
                print!("{}", reveille::prewarm::report::plan_text(&plans));
            }
            ExitCode::SUCCESS
        }
        PrewarmCmd::Import {
            config,
            service,
            file,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    report(&config, &e);
                    return ExitCode::from(2);
                }
            };
            match import(&cfg, &service, &file) {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn import(cfg: &Config, service: &str, file: &std::path::Path) -> Result<String, String> {
    use reveille::prewarm::{import, store::Store};
    let csv = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let store = Store::open(&cfg.state_dir).map_err(|e| e.to_string())?;
    let done = store
        .update(|h| import::import_csv(cfg, service, &csv, h))
        .map_err(|e| e.to_string())?;
    store
        .save()
        .map_err(|e| format!("{}: {e}", store.path().display()))?;
    Ok(format!(
        "{service}: {} requests imported ({} lines skipped) into {}",
        done.rows,
        done.skipped,
        store.path().display()
    ))
}

async fn serve(mut cfg: Config, path: PathBuf) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    // The config whose listeners and limits are in force, without the services: they live in
    // `running` (with thousands of services, a copy here would only cost memory; reloads
    // compare the other sections).
    let services = std::mem::take(&mut cfg.services);
    let running_cfg = cfg.clone();
    cfg.services = services;
    let running = match reveille::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut term, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(h)) => (t, h),
        (Err(e), _) | (_, Err(e)) => {
            error!("cannot watch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); break }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT received"); break }
            _ = hup.recv() => match Config::load(&path) {
                Ok(new) => {
                    let r = running.reload(&new, &running_cfg).await;
                    info!(changes = ?r.changes, "SIGHUP: configuration reloaded");
                    if !r.needs_restart.is_empty() {
                        warn!(sections = ?r.needs_restart, "SIGHUP: these changes take effect after a restart");
                    }
                }
                Err(e) => {
                    error!("SIGHUP: {} is invalid; keeping the running configuration", path.display());
                    for p in &e.problems {
                        error!("  {p}");
                    }
                }
            },
        }
    }
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}
