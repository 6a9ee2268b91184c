//! `syncctl`: the operator's command line for a running syncd, over its admin socket.
//!
//! The binary itself is built by the `syncd` package (`crates/syncd/src/bin/syncctl.rs`), so
//! both ship together and its end-to-end tests can run it.

mod duration;
mod render;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use syncd_admin::{ClientError, ErrorKind, Request, Response};

pub use duration::parse_duration;

/// Exit codes, documented in the README and in `--help`.
pub mod exit {
    /// The daemon could not do what was asked.
    pub const FAILED: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// `wait` timed out: some agents had not applied the generation.
    pub const WAIT_TIMEOUT: u8 = 3;
    /// The daemon could not be reached (not running, wrong socket).
    pub const UNREACHABLE: u8 = 4;
    /// The caller may not use the admin socket (not root, not in the service's group).
    pub const PERMISSION: u8 = 5;
    /// No such node, or a request that does not apply to this daemon's role.
    pub const NOT_APPLICABLE: u8 = 6;
}

#[derive(Parser, Debug)]
#[command(
    name = "syncctl",
    version,
    about = "Control a running syncd: status, pause, resume, wait",
    long_about = "Control a running syncd (manager or agent) through its admin socket.\n\n\
        On the manager, `pause` with no NODE holds publication (the manager's folders may change, \
        nothing is sent) and `resume` publishes everything since as one generation; with NODE they \
        pause and resume that agent. On an agent they pause and resume that agent: while paused it \
        changes nothing in its folders, and on resume its local changes are backed up.\n\n\
        Exit codes: 0 ok, 1 the daemon could not do it, 2 bad command line, 3 wait timed out, \
        4 daemon unreachable, 5 permission denied, 6 unknown node or not applicable to this role."
)]
struct Cli {
    /// The daemon's admin socket [default: $SYNCD_SOCKET, else /run/syncd/admin.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show every node's state (on the manager), or this node's (on an agent).
    Status {
        /// Print JSON (a stable format, see the README) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause an agent, or (on the manager, without NODE) hold publication.
    Pause {
        /// The agent to pause (on the manager).
        node: Option<String>,
        /// End the pause by itself after this long (e.g. 90s, 30m, 2h, 1h30m).
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        for_: Option<Duration>,
    },
    /// Resume what `pause` paused.
    Resume {
        /// The agent to resume (on the manager).
        node: Option<String>,
    },
    /// Block until every connected, unpaused agent applied a generation (the latest by default).
    Wait {
        /// The generation to wait for.
        #[arg(long)]
        generation: Option<u64>,
        /// Give up after this long (exit 3, naming the laggards).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
        timeout: Duration,
        /// Wait for offline and paused agents too.
        #[arg(long)]
        all: bool,
    },
    /// List what changed locally on an agent since syncd last applied (e.g. during a pause):
    /// on the agent, its own; on the manager, NODE's as it last reported them.
    Changes {
        /// The agent (on the manager).
        node: Option<String>,
    },
    /// On the manager: publish what the delete guard holds back (a folder emptied, removed,
    /// unmounted, or losing more than its allowed share of files).
    Confirm {
        /// The folder (every guarded folder if absent).
        folder: Option<String>,
    },
    /// On an agent: list the backups of local changes it overwrote or found on resume.
    Backups,
}

/// The command-line definition, for man pages and completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Runs `syncctl` with the process's arguments.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .or_else(|| std::env::var_os("SYNCD_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(syncd_admin::DEFAULT_SOCKET));
    let (request, timeout, json) = match cli.command {
        Command::Status { json } => (Request::Status, Duration::from_secs(30), json),
        Command::Pause { node, for_ } => (
            Request::Pause {
                node,
                for_secs: for_.map(|d| d.as_secs().max(1)),
            },
            Duration::from_secs(600),
            false,
        ),
        Command::Resume { node } => (Request::Resume { node }, Duration::from_secs(600), false),
        Command::Wait {
            generation,
            timeout,
            all,
        } => (
            Request::Wait {
                generation,
                timeout_secs: timeout.as_secs_f64(),
                all,
            },
            timeout + Duration::from_secs(30),
            false,
        ),
        Command::Changes { node } => (Request::Changes { node }, Duration::from_secs(600), false),
        Command::Confirm { folder } => {
            (Request::Confirm { folder }, Duration::from_secs(600), false)
        }
        Command::Backups => (Request::Backups, Duration::from_secs(60), false),
    };
    let response = match syncd_admin::call(&socket, &request, timeout) {
        Ok(r) => r,
        Err(e @ ClientError::Connect { .. }) => {
            eprintln!("syncctl: {e}");
            return ExitCode::from(exit::UNREACHABLE);
        }
        Err(e) => {
            eprintln!("syncctl: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    // Written at once at the end: a reader that stops early (`| head`) ends the output, not
    // the command, whose effect stands (its exit code too).
    let mut out = String::new();
    let code = match response {
        Response::Status(s) => {
            if json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&s).expect("status serializes")
                );
            } else {
                out.push_str(&render::status(&s, now_secs()));
            }
            ExitCode::SUCCESS
        }
        Response::Done {
            message,
            generation,
            changes,
            backup,
        } => {
            let _ = writeln!(out, "{message}");
            if let Some(g) = generation {
                let _ = writeln!(out, "generation {g}");
            }
            for c in &changes {
                let _ = writeln!(out, "  {:<9} {}/{}", c.change, c.folder, c.path);
            }
            if let Some(b) = backup {
                let _ = writeln!(out, "local changes backed up in {b}");
            }
            ExitCode::SUCCESS
        }
        Response::Wait(w) => {
            out.push_str(&render::wait(&w));
            if w.reached {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::WAIT_TIMEOUT)
            }
        }
        Response::Backups { backups } => {
            if backups.is_empty() {
                let _ = writeln!(out, "no backups");
            }
            for b in &backups {
                let _ = writeln!(out, "{}  ({})", b.name, render::human_bytes(b.bytes));
                for line in b.changes.iter().take(20) {
                    let _ = writeln!(out, "  {line}");
                }
                if b.changes.len() > 20 {
                    let _ = writeln!(out, "  ... and {} more", b.changes.len() - 20);
                }
            }
            ExitCode::SUCCESS
        }
        Response::Changes { changes, note } => {
            if let Some(note) = note {
                let _ = writeln!(out, "{note}");
            }
            if changes.is_empty() {
                let _ = writeln!(out, "no local changes");
            }
            for c in &changes {
                let action = c.action.as_ref().map(|a| format!(" ({a})"));
                let _ = writeln!(
                    out,
                    "{:<9} {}/{}{}",
                    c.change,
                    c.folder,
                    c.path,
                    action.unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Response::Error { kind, message } => {
            eprintln!("syncctl: {message}");
            ExitCode::from(match kind {
                ErrorKind::PermissionDenied => exit::PERMISSION,
                ErrorKind::UnknownNode | ErrorKind::WrongRole => exit::NOT_APPLICABLE,
                ErrorKind::BadRequest | ErrorKind::Failed => exit::FAILED,
            })
        }
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => {
            eprintln!("syncctl: cannot write the output: {e}");
            ExitCode::from(exit::FAILED)
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
