//! Live sync: what is deployed on the manager reaches the agent by itself, and never half-written.

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;
use syncd_devtools::{Archive, Rng, Scale, write_archive};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_written_file_is_never_visible_on_the_agent_half_written() {
    let (manager, agent) = pair(Scale::SMALL, 21).await;
    let path = "webapps/slow-upload.bin";
    let src = manager.dirs.data.join(path);
    let dst = agent.dirs.data.join(path);
    let mut content = vec![0u8; 30 << 20];
    Rng::new(5).fill(&mut content);
    let content = Arc::new(content);
    let full_hash = syncd_manifest::ChunkHash::of(&content);

    // The agent's copy is watched from another thread while the manager's is written.
    let done = Arc::new(AtomicBool::new(false));
    let seen_partial = Arc::new(AtomicUsize::new(0));
    let seen_complete = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (done, partial, complete, dst) = (
            done.clone(),
            seen_partial.clone(),
            seen_complete.clone(),
            dst.clone(),
        );
        let want = content.len() as u64;
        std::thread::spawn(move || {
            let mut last = None;
            while !done.load(Ordering::Acquire) {
                if let Ok(meta) = fs::metadata(&dst) {
                    use std::os::unix::fs::MetadataExt;
                    let id = (meta.ino(), meta.size());
                    if last != Some(id) {
                        last = Some(id);
                        let ok = meta.size() == want
                            && fs::read(&dst)
                                .is_ok_and(|b| syncd_manifest::ChunkHash::of(&b) == full_hash);
                        if ok {
                            complete.fetch_add(1, Ordering::Relaxed);
                        } else {
                            partial.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // 1 MiB appends every 100 ms for 3 s, on one open file, like a slow copy.
    let writer = {
        let (src, content) = (src.clone(), content.clone());
        std::thread::spawn(move || {
            let mut f = fs::File::create(&src).unwrap();
            for piece in content.chunks(1 << 20) {
                f.write_all(piece).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Meanwhile the manager shows it as held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = manager.status.borrow().held.clone();
    assert!(
        held.iter()
            .any(|h| h.path == path && h.reason.contains("being written")),
        "{held:?}"
    );
    assert!(!dst.exists(), "published while being written");
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    done.store(true, Ordering::Release);
    tokio::task::spawn_blocking(move || watcher.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        seen_partial.load(Ordering::Relaxed),
        0,
        "the agent exposed a partial file"
    );
    assert_eq!(seen_complete.load(Ordering::Relaxed), 1);
    assert!(manager.status.borrow().held.is_empty());
    agent.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_archive_is_held_until_complete_without_delaying_others() {
    let (manager, agent) = pair(Scale::SMALL, 22).await;
    let tmp = manager.dirs.tmp.path().join("whole.car");
    write_archive(&tmp, Archive::Car, 2_000_000, &mut Rng::new(3), 1).unwrap();
    let whole = fs::read(&tmp).unwrap();
    let car = manager.dirs.data.join("carbonapps/orders_1.0.0.car");
    // Written and closed, but cut short: a copy that failed half-way, or one still to be resumed.
    fs::write(&car, &whole[..whole.len() / 2]).unwrap();
    // Another artifact deployed meanwhile is not delayed.
    fs::write(
        manager
            .dirs
            .data
            .join("synapse-configs/default/api/new-api.xml"),
        b"<api name=\"new\"/>",
    )
    .unwrap();
    let xml_on_agent = agent
        .dirs
        .data
        .join("synapse-configs/default/api/new-api.xml");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !xml_on_agent.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the XML was delayed by the held archive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !agent.dirs.data.join("carbonapps/orders_1.0.0.car").exists(),
        "an incomplete archive was published"
    );
    let held = manager.status.borrow().held.clone();
    assert!(
        held.iter()
            .any(|h| h.path == "carbonapps/orders_1.0.0.car"
                && h.reason.contains("incomplete archive")),
        "{held:?}"
    );

    // The rest arrives (appended in a second session): now it is published.
    fs::OpenOptions::new()
        .append(true)
        .open(&car)
        .unwrap()
        .write_all(&whole[whole.len() / 2..])
        .unwrap();
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(10),
    )
    .await;
    assert!(manager.status.borrow().held.is_empty());
    agent.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_modifies_renames_and_deletes_of_files_and_trees_converge() {
    let (manager, agent) = pair(Scale::SMALL, 23).await;
    let d = manager.dirs.data.clone();
    let outside = manager.dirs.tmp.path().join("staging-area");
    fs::create_dir_all(outside.join("newapp/WEB-INF/lib")).unwrap();
    fs::write(outside.join("newapp/index.html"), b"<html/>").unwrap();
    write_archive(
        &outside.join("newapp/WEB-INF/lib/x.jar"),
        Archive::Car,
        30_000,
        &mut Rng::new(1),
        1,
    )
    .unwrap();

    type Step<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step> = vec![
        (
            "create",
            Box::new(|| fs::write(d.join("synapse-configs/default/api/a.xml"), b"<a/>").unwrap()),
        ),
        (
            "modify in place",
            Box::new(|| {
                fs::write(
                    d.join("synapse-configs/default/api/a.xml"),
                    b"<a version=\"2\"/>",
                )
                .unwrap()
            }),
        ),
        (
            "rename a file",
            Box::new(|| {
                fs::rename(
                    d.join("synapse-configs/default/api/a.xml"),
                    d.join("synapse-configs/default/api/b.xml"),
                )
                .unwrap()
            }),
        ),
        (
            "move a whole tree in",
            Box::new(|| fs::rename(outside.join("newapp"), d.join("webapps/newapp")).unwrap()),
        ),
        (
            "rename a directory",
            Box::new(|| fs::rename(d.join("webapps/newapp"), d.join("webapps/renamed")).unwrap()),
        ),
        (
            "chmod and symlink",
            Box::new(|| {
                fs::set_permissions(
                    d.join("webapps/renamed/index.html"),
                    fs::Permissions::from_mode(0o600),
                )
                .unwrap();
                symlink("renamed/index.html", d.join("webapps/home.html")).unwrap();
            }),
        ),
        (
            "mkdir -p and copy into it",
            Box::new(|| {
                fs::create_dir_all(d.join("tenants/7/synapse-configs/default/api")).unwrap();
                fs::copy(
                    d.join("synapse-configs/default/api/b.xml"),
                    d.join("tenants/7/synapse-configs/default/api/t.xml"),
                )
                .unwrap();
            }),
        ),
        (
            "delete a tree",
            Box::new(|| fs::remove_dir_all(d.join("webapps/renamed")).unwrap()),
        ),
        (
            "move a tree out",
            Box::new(|| {
                fs::rename(
                    d.join("tenants"),
                    manager.dirs.tmp.path().join("tenants-out"),
                )
                .unwrap()
            }),
        ),
    ];
    for (desc, change) in steps {
        change();
        eprintln!("step: {desc}");
        converge(&d, &agent.dirs.data, Duration::from_secs(10)).await;
    }
    agent.stop().await;
    manager.stop().await;
}

/// Sets an inotify sysctl, returning the old value.
fn set_sysctl(name: &str, value: &str) -> Option<String> {
    let path = format!("/proc/sys/fs/inotify/{name}");
    let old = fs::read_to_string(&path).ok()?;
    fs::write(&path, value).ok()?;
    Some(old)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_events_at_once_overflow_the_queue_and_still_converge() {
    let mdirs = NodeDirs::new();
    fs::create_dir_all(mdirs.data.join("synapse-configs")).unwrap();
    let adirs = NodeDirs::new();
    // A tiny event queue for the manager's inotify instance (read when the instance is created),
    // so the burst below overflows it for certain.
    let old = set_sysctl("max_queued_events", "64");
    if old.is_none() {
        eprintln!("skipping the forced overflow: cannot write /proc/sys/fs/inotify (not root?)");
    }
    let manager = TestManager::start(mdirs, &[("worker-1", adirs.identity().id())]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(old) = &old {
        set_sysctl("max_queued_events", old.trim());
    }
    let mut agent = TestAgent::start("worker-1", adirs, &manager).await;
    agent.wait_applied(manager.generation()).await;

    let d = manager.dirs.data.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..20_000 {
            let dir = d.join(format!("synapse-configs/group-{:03}", i / 200));
            if i % 200 == 0 {
                fs::create_dir_all(&dir).unwrap();
            }
            fs::write(
                dir.join(format!("api-{i:05}.xml")),
                format!("<api n=\"{i}\"/>"),
            )
            .unwrap();
        }
        for i in (0..20_000).step_by(7) {
            let _ = fs::remove_file(d.join(format!(
                "synapse-configs/group-{:03}/api-{i:05}.xml",
                i / 200
            )));
        }
    })
    .await
    .unwrap();
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(120),
    )
    .await;
    if old.is_some() {
        assert!(
            manager.status.borrow().forced_rescans >= 1,
            "the queue never overflowed"
        );
    }
    agent.stop().await;
    manager.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_manager_was_down_converge_sending_only_them() {
    let (manager, mut agent) = pair(Scale::SMALL, 24).await;
    let before = agent.stats().bytes_fetched;
    let addr = manager.addr;
    let agent_id = agent.dirs.identity().id();
    let mdirs = manager.stop().await;
    let xml = mdirs
        .data
        .join("synapse-configs/default/api/service-0003.xml");
    let text = fs::read_to_string(&xml).unwrap().replacen("GET", "PUT", 1);
    fs::write(&xml, &text).unwrap();
    let manager = TestManager::start_on(mdirs, &[("worker-1", agent_id)], addr).await;
    agent.wait_applied(manager.generation()).await;
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        agent.stats().bytes_fetched - before,
        text.len() as u64,
        "only the edited XML crossed"
    );

    // And the agent restarted while the manager changes something: only that crosses.
    let adirs = agent.stop().await;
    fs::write(
        manager.dirs.data.join("jaggeryapps/app.js"),
        b"print('hi');",
    )
    .unwrap();
    let mut agent = TestAgent::start("worker-1", adirs, &manager).await;
    converge(
        &manager.dirs.data,
        &agent.dirs.data,
        Duration::from_secs(10),
    )
    .await;
    agent.wait_applied(manager.generation()).await;
    assert_eq!(agent.stats().bytes_fetched, 12);
    agent.stop().await;
    manager.stop().await;
}

/// A file renamed into a directory also changes the directory's mtime; the directory settles at
/// once, the file a few milliseconds later. Published apart, every agent would apply two
/// generations (two round trips) for one deploy; the manager waits for the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_into_a_directory_is_published_with_its_mtime_as_one_generation() {
    let mdirs = NodeDirs::new();
    let api = mdirs.data.join("synapse-configs/default/api");
    fs::create_dir_all(&api).unwrap();
    fs::write(api.join("a.xml"), "<a/>").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let manager = TestManager::start(mdirs, &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..5 {
        let before = manager.generation();
        let tmp = scratch.path().join("next.xml");
        fs::write(&tmp, format!("<api round=\"{round}\"/>")).unwrap();
        fs::rename(&tmp, api.join(format!("deployed-{round}.xml"))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while manager.generation() == before {
            assert!(
                Instant::now() < deadline,
                "round {round}: nothing published"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Whatever else would come has come by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            manager.generation(),
            before + 1,
            "round {round}: the directory's mtime and the file were published apart"
        );
    }
}
