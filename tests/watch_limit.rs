//! The inotify watch limit reached: the manager says so, walks the folder periodically instead,
//! and changes still converge. A test binary of its own: it lowers a per-user kernel limit, which
//! would disturb other tests running beside it.

mod support;

use std::fs;
use std::time::Duration;

use support::*;

const SYSCTL: &str = "/proc/sys/fs/inotify/max_user_watches";

/// Restores the limit however the test ends.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = fs::write(SYSCTL, self.0.trim());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_converge_when_the_folder_cannot_be_watched() {
    let Ok(old) = fs::read_to_string(SYSCTL) else {
        eprintln!("skipping: {SYSCTL} is not readable");
        return;
    };
    let mdirs = NodeDirs::new();
    for i in 0..50 {
        fs::create_dir_all(mdirs.data.join(format!("tenants/{i}/synapse-configs"))).unwrap();
    }
    let adirs = NodeDirs::new();
    if fs::write(SYSCTL, "8").is_err() {
        eprintln!("skipping: cannot lower {SYSCTL} (not root?)");
        return;
    }
    let restore = Restore(old);
    let manager = TestManager::start(mdirs, &[("worker-1", adirs.identity().id())]).await;
    let agent = TestAgent::start("worker-1", adirs, &manager).await;
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(20),
    )
    .await;

    // No watch: a deploy still arrives, through the periodic walk (every 5 s).
    fs::write(
        manager.dirs.data.join("tenants/7/synapse-configs/api.xml"),
        b"<api/>",
    )
    .unwrap();
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(20),
    )
    .await;

    // The limit is raised again: the folder is watched again and deploys converge as before.
    drop(restore);
    tokio::time::sleep(Duration::from_secs(6)).await;
    fs::write(
        manager.dirs.data.join("tenants/8/synapse-configs/api.xml"),
        b"<api/>",
    )
    .unwrap();
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(20),
    )
    .await;
    agent.stop().await;
    manager.stop().await;
}
