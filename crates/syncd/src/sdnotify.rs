//! systemd's notification protocol (`Type=notify`): `READY=1` once the daemon serves, `STATUS=`
//! lines, and `WATCHDOG=1` at half the interval systemd asks for. Without `NOTIFY_SOCKET` (not
//! started by systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        // An abstract socket.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// The watchdog interval systemd asks for, if it asks this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Pets the watchdog at half its interval while the runtime is alive (a hung runtime stops
/// petting, and systemd restarts the service).
pub fn spawn_watchdog() {
    if let Some(interval) = watchdog_interval() {
        tracing::debug!(?interval, "systemd watchdog enabled");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                notify("WATCHDOG=1");
            }
        });
    }
}
