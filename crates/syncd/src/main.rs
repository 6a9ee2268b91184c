//! `syncd`: the daemon (manager or agent role) and its set-up commands.

mod admin;
mod assets;
mod config;
mod metrics;
mod sdnotify;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use syncd_agent::{Agent, AgentConfig};
use syncd_manager::{Manager, ManagerConfig};
use syncd_transport::{Identity, IdentityError};
use tokio::sync::watch;

use crate::config::{Config, Role};

/// Exit codes, documented in the README.
mod exit {
    /// A runtime failure after start-up.
    pub const RUNTIME: u8 = 1;
    /// Bad command line (clap's own code).
    #[allow(dead_code, reason = "documents clap's code; clap exits with it itself")]
    pub const USAGE: u8 = 2;
    /// The config file is invalid.
    pub const CONFIG: u8 = 3;
    /// No usable node identity in the state directory.
    pub const IDENTITY: u8 = 4;
    /// Could not start: address in use, folder or state directory unusable.
    pub const START: u8 = 5;
}

#[derive(Parser, Debug)]
#[command(
    name = "syncd",
    version,
    about = "Keeps the deployment folders of a WSO2 cluster identical, from a manager node to its workers",
    long_about = "Keeps the deployment folders of a WSO2 cluster identical, from a manager node to its workers.\n\n\
        Run `syncd manager` on the node where artifacts are deployed and `syncd agent` on every worker. \
        Each node first needs an identity (`syncd init`); each config names the peers' node IDs.\n\n\
        Exit codes: 0 ok, 1 runtime failure, 2 bad command line, 3 invalid config, \
        4 missing or invalid identity, 5 could not start (address in use, folder unusable).\n\n\
        Logging: set SYNCD_LOG (or RUST_LOG), e.g. SYNCD_LOG=debug or SYNCD_LOG=syncd_agent=debug."
)]
struct Cli {
    /// Log format: `human` (default) or `json` (one object per line) [env: SYNCD_LOG_FORMAT].
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create this node's identity (key pair and certificate) if absent, and print its node ID.
    Init {
        /// State directory to hold the identity (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Print this node's ID.
    Id {
        /// State directory holding the identity.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Validate a config file, listing every problem; exit 3 if there is any.
    CheckConfig {
        /// The config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the manager role: publish the configured folders to the configured agents.
    Manager {
        /// The config file (must have a [manager] section).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the agent role: keep the configured folders equal to the manager's.
    Agent {
        /// The config file (must have an [agent] section).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Write a config for a WSO2 node, with the folders its product needs (found under
    /// CARBON_HOME) and WSO2's excludes.
    Config(setup::ConfigArgs),
    /// Write man pages and shell completions for syncd and syncctl into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli
        .log_format
        .or_else(|| std::env::var("SYNCD_LOG_FORMAT").ok())
        .unwrap_or_else(|| "human".into());
    if format != "human" && format != "json" {
        eprintln!("syncd: --log-format must be `human` or `json`, not {format:?}");
        return ExitCode::from(2);
    }
    init_logging(format == "json");
    match cli.command {
        Command::Init { state_dir } => init(&state_dir),
        Command::Id { state_dir } => match Identity::load(&state_dir) {
            Ok(id) => {
                println!("{}", id.id());
                ExitCode::SUCCESS
            }
            Err(e) => identity_error(e),
        },
        Command::CheckConfig { config } => check_config(&config),
        Command::Manager { config } => run_role(&config, "manager"),
        Command::Agent { config } => run_role(&config, "agent"),
        Command::Config(args) => setup::run(args),
        Command::GenerateAssets { dir } => match assets::generate(&dir, Cli::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("syncd: {e}");
                ExitCode::from(exit::RUNTIME)
            }
        },
    }
}

fn init_logging(json: bool) {
    let filter = std::env::var("SYNCD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,quinn=warn,rustls=warn,notify=warn".to_owned());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn init(state_dir: &Path) -> ExitCode {
    match Identity::load_or_create(state_dir) {
        Ok((id, created)) => {
            if created {
                eprintln!("created a new identity in {}", state_dir.display());
            } else {
                eprintln!(
                    "an identity already exists in {}; keeping it",
                    state_dir.display()
                );
            }
            println!("{}", id.id());
            ExitCode::SUCCESS
        }
        Err(e) => identity_error(e),
    }
}

fn identity_error(e: IdentityError) -> ExitCode {
    eprintln!("syncd: {e}");
    ExitCode::from(exit::IDENTITY)
}

fn report_problems(path: &Path, problems: &[config::Problem]) {
    eprintln!(
        "syncd: {} has {} problem(s):",
        path.display(),
        problems.len()
    );
    for p in problems {
        eprintln!("  {p}");
    }
}

fn check_config(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(c) => {
            let peers = match &c.role {
                Role::Manager { agents, listen } => {
                    let capped = agents.iter().filter(|a| a.max_rate.is_some()).count();
                    let capped = match capped {
                        0 => String::new(),
                        n => format!(" ({n} with a max_rate)"),
                    };
                    format!("listens on {listen}, {} agent(s){capped}", agents.len())
                }
                Role::Agent { manager, .. } => format!("manager at {manager}"),
            };
            println!(
                "{}: ok ({} {:?}, {peers}, {} folder(s))",
                path.display(),
                c.role.name(),
                c.node.name,
                c.folders.len()
            );
            if let Err(e) = Identity::load(&c.node.state_dir) {
                println!("note: {e}");
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            report_problems(path, &problems);
            ExitCode::from(exit::CONFIG)
        }
    }
}

fn run_role(path: &Path, role: &str) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(problems) => {
            report_problems(path, &problems);
            return ExitCode::from(exit::CONFIG);
        }
    };
    if config.role.name() != role {
        eprintln!(
            "syncd: {} is a config for the {} role, not the {role} role",
            path.display(),
            config.role.name()
        );
        return ExitCode::from(exit::CONFIG);
    }
    let identity = match Identity::load(&config.node.state_dir) {
        Ok(i) => i,
        Err(e) => return identity_error(e),
    };
    // Both roles hold manifests for their lifetime beside short-lived buffers (see the function).
    syncd_fsops::tune_allocator();
    raise_open_files_limit();
    // Every log line of the daemon carries the node's name (in its span).
    let span = tracing::info_span!("syncd", node = %config.node.name);
    let thread_span = span.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .on_thread_start(move || std::mem::forget(thread_span.clone().entered()))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("syncd: cannot start the async runtime: {e}");
            return ExitCode::from(exit::START);
        }
    };
    let _entered = span.entered();
    runtime.block_on(run(config, identity))
}

/// Raises the soft limit on open files to the hard one. An agent's apply keeps up to three
/// batches of 128 staged files open (two descriptors each for large files) and the sources of
/// their local copies, a manager a file per fetch being served: a shell's soft limit of 1,024 is
/// within reach; the systemd units set 65,536 themselves. Failing to raise it is not an error.
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raise = match (limit.current, limit.maximum) {
        (Some(current), Some(max)) => current < max,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if raise {
        // An unlimited hard limit: a generous, finite soft one (the kernel's nr_open bounds it).
        let to = limit.maximum.unwrap_or(1 << 20);
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(to),
                maximum: limit.maximum,
            },
        );
    }
}

async fn run(config: Config, identity: Identity) -> ExitCode {
    syncd_transport::install_crypto_provider();
    syncd_transport::set_congestion(config.node.congestion);
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        sdnotify::notify("STOPPING=1");
        let _ = shutdown_tx.send(true);
    });
    let socket = match admin::bind(&config.node.admin_socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot open the admin socket: {e}");
            return ExitCode::from(exit::START);
        }
    };
    let metrics = match config.metrics {
        Some(addr) => match metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(exit::START);
            }
        },
        None => None,
    };
    sdnotify::spawn_watchdog();
    tracing::info!(node = %config.node.name, id = %identity.id(), role = config.role.name(), "starting");
    match config.role {
        Role::Manager { listen, agents } => {
            let mc = ManagerConfig {
                node_name: config.node.name,
                state_dir: config.node.state_dir,
                listen,
                agents,
                folders: config.folders,
            };
            let manager = match Manager::open(mc, identity).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the manager");
                    return ExitCode::from(exit::START);
                }
            };
            let role = admin::Role::Manager(manager.handle());
            tokio::spawn(admin::serve(socket, role.clone(), shutdown.clone()));
            if let Some(l) = metrics {
                tokio::spawn(metrics::serve(l, role, shutdown.clone()));
            }
            sdnotify::notify(&format!(
                "READY=1\nSTATUS=manager: generation {}, listening on {}",
                manager.handle().status().borrow().generation,
                manager.local_addr()
            ));
            match manager.run(shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "manager failed");
                    ExitCode::from(exit::RUNTIME)
                }
            }
        }
        Role::Agent {
            manager,
            manager_id,
        } => {
            let name = config.node.name.clone();
            let ac = AgentConfig {
                node_name: config.node.name,
                state_dir: config.node.state_dir,
                manager_addr: manager,
                manager_id,
                folders: config.folders,
                max_backups: config.backups.0,
                max_backup_bytes: config.backups.1,
            };
            let agent = match tokio::task::spawn_blocking(move || Agent::open(ac, identity)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot start the agent");
                    return ExitCode::from(exit::START);
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            let role = admin::Role::Agent {
                handle: agent.handle(),
                name,
                manager,
            };
            tokio::spawn(admin::serve(socket, role.clone(), shutdown.clone()));
            if let Some(l) = metrics {
                tokio::spawn(metrics::serve(l, role, shutdown.clone()));
            }
            sdnotify::notify("READY=1\nSTATUS=agent: folders scanned, connecting to the manager");
            match agent.run(shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "agent failed");
                    ExitCode::from(exit::START)
                }
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler works");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler works");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
