//! A cluster of real `syncd` processes on loopback, driven the way an operator drives one:
//! config files, `syncd init`, starting and stopping daemons, and `syncctl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SYNCD: &str = env!("CARGO_BIN_EXE_syncd");
pub const SYNCCTL: &str = env!("CARGO_BIN_EXE_syncctl");
pub const MANAGER: &str = "mgr";

/// A manager (`mgr`) and named agents, each in its own directory under `root`.
pub struct Cluster {
    pub root: tempfile::TempDir,
    port: u16,
    ids: BTreeMap<String, String>,
    agents: Vec<String>,
    /// Extra folders: (name, directory under each node).
    folders: Vec<(String, String)>,
    /// Folders configured on some nodes only: folder name -> those nodes.
    folder_nodes: BTreeMap<String, Vec<String>>,
    /// Extra lines in every `[[folders]]` table, per node.
    folder_options: BTreeMap<String, Vec<String>>,
    /// The manager's listen address, and the address agents connect to (loopback by default).
    listen: Option<String>,
    connect: Option<String>,
    /// A command a node's daemon runs under (e.g. `ip netns exec NS`).
    wrap: BTreeMap<String, Vec<String>>,
    /// Extra lines in every `[node]` table.
    node_options: Vec<String>,
    /// Extra lines in the manager's `[manager]` table, and in an agent's `[[manager.agents]]`.
    manager_options: Vec<String>,
    /// Extra lines in every agent's `[agent]` table.
    agent_options: Vec<String>,
    agent_entry_options: BTreeMap<String, Vec<String>>,
    procs: BTreeMap<String, Child>,
}

impl Cluster {
    /// Creates identities and configs for a manager and `agents` (all listed in the manager's
    /// config); starts nothing.
    pub fn new(agents: &[&str]) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let port = super::free_udp_port();
        let mut ids = BTreeMap::new();
        for node in std::iter::once(MANAGER).chain(agents.iter().copied()) {
            std::fs::create_dir_all(root.path().join(node).join("data")).unwrap();
            let out = Command::new(SYNCD)
                .args(["init", "--state-dir"])
                .arg(root.path().join(node).join("state"))
                .output()
                .unwrap();
            assert!(out.status.success());
            let id = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .last()
                .unwrap()
                .to_owned();
            ids.insert(node.to_owned(), id);
        }
        let c = Cluster {
            root,
            port,
            ids,
            agents: agents.iter().map(|a| (*a).to_owned()).collect(),
            folders: vec![("deployment".into(), "data".into())],
            folder_nodes: BTreeMap::new(),
            folder_options: BTreeMap::new(),
            listen: None,
            connect: None,
            wrap: BTreeMap::new(),
            node_options: Vec::new(),
            manager_options: Vec::new(),
            agent_options: Vec::new(),
            agent_entry_options: BTreeMap::new(),
            procs: BTreeMap::new(),
        };
        c.write_configs();
        c
    }

    /// Adds a folder (synced under `name`, at `dir` in every node's directory) to every config.
    pub fn add_folder(&mut self, name: &str, dir: &str) {
        for node in std::iter::once(MANAGER.to_owned()).chain(self.agents.clone()) {
            std::fs::create_dir_all(self.root.path().join(&node).join(dir)).unwrap();
        }
        self.folders.push((name.into(), dir.into()));
        self.write_configs();
    }

    /// Adds a folder (synced under `name`, at `dir`) to the configs of `nodes` only.
    pub fn add_folder_on(&mut self, nodes: &[&str], name: &str, dir: &str) {
        for node in nodes {
            std::fs::create_dir_all(self.root.path().join(node).join(dir)).unwrap();
        }
        self.folder_nodes
            .insert(name.into(), nodes.iter().map(|n| (*n).to_owned()).collect());
        self.folders.push((name.into(), dir.into()));
        self.write_configs();
    }

    /// Adds `line` (e.g. `drift = "report"`) to every folder of `node`'s config.
    pub fn folder_option(&mut self, node: &str, line: &str) {
        self.folder_options
            .entry(node.to_owned())
            .or_default()
            .push(line.to_owned());
        self.write_configs();
    }

    /// The manager's UDP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the manager listens and where agents connect (e.g. across network namespaces).
    pub fn addresses(&mut self, listen: &str, connect: &str) {
        self.listen = Some(listen.to_owned());
        self.connect = Some(connect.to_owned());
        self.write_configs();
    }

    /// Adds `line` (e.g. `congestion = "bbr"`) to the `[node]` table of every config.
    pub fn node_option(&mut self, line: &str) {
        self.node_options.push(line.to_owned());
        self.write_configs();
    }

    /// Adds `line` (e.g. `max_rate = "20MB/s"`) to the manager's `[manager]` table.
    pub fn manager_option(&mut self, line: &str) {
        self.manager_options.push(line.to_owned());
        self.write_configs();
    }

    /// Adds `line` (e.g. `max_backup_mb = 1`) to every agent's `[agent]` table.
    pub fn agent_option(&mut self, line: &str) {
        self.agent_options.push(line.to_owned());
        self.write_configs();
    }

    /// Adds `line` (e.g. `max_rate = "1MiB/s"`) to `agent`'s entry in the manager's config.
    pub fn agent_entry_option(&mut self, agent: &str, line: &str) {
        self.agent_entry_options
            .entry(agent.to_owned())
            .or_default()
            .push(line.to_owned());
        self.write_configs();
    }

    /// Runs `node`'s daemon as the unprivileged user `nobody`, as the systemd units run syncd
    /// as `syncd`: it owns its directory and state; its folder's entries are `nobody`'s too when
    /// `owns_folder` (an agent writes them), else they stay root's (a manager only reads).
    /// Needs root.
    pub fn run_as_nobody(&mut self, node: &str, owns_folder: bool) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = self.root.path().join(node);
        let mut owned = vec![(false, dir.clone()), (true, dir.join("state"))];
        if owns_folder {
            owned.push((true, dir.join("data")));
        }
        for (recursive, path) in owned {
            let status = Command::new("chown")
                .args(if recursive { &["-R"][..] } else { &[] })
                .arg("65534:65534")
                .arg(path)
                .status()
                .unwrap();
            assert!(status.success());
        }
        self.wrap(
            node,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ],
        );
    }

    /// Runs `node`'s daemon under `prefix` (e.g. `["ip", "netns", "exec", "ns1"]`).
    pub fn wrap(&mut self, node: &str, prefix: &[&str]) {
        self.wrap.insert(
            node.to_owned(),
            prefix.iter().map(|s| (*s).to_owned()).collect(),
        );
    }

    fn write_configs(&self) {
        let folders = |node: &str| {
            let extra: String = self
                .folder_options
                .get(node)
                .map(|lines| lines.iter().map(|l| format!("{l}\n")).collect())
                .unwrap_or_default();
            self.folders
                .iter()
                .filter(|(name, _)| {
                    self.folder_nodes
                        .get(name)
                        .is_none_or(|nodes| nodes.iter().any(|n| n == node))
                })
                .map(|(name, dir)| {
                    format!("[[folders]]\nname = \"{name}\"\npath = \"{node}/{dir}\"\n{extra}")
                })
                .collect::<String>()
        };
        let listen = self
            .listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.port));
        let connect = self
            .connect
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.port));
        let lines = |lines: Option<&Vec<String>>| -> String {
            lines
                .into_iter()
                .flatten()
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let node_extra = lines(Some(&self.node_options));
        let manager_extra = lines(Some(&self.manager_options));
        let mut m = format!(
            "[node]\nname = \"mgr\"\nstate_dir = \"mgr/state\"\nadmin_socket = \"mgr/admin.sock\"\n{node_extra}\
             [manager]\nlisten = \"{listen}\"\n{manager_extra}"
        );
        for a in &self.agents {
            m.push_str(&format!(
                "[[manager.agents]]\nname = \"{a}\"\nid = \"{}\"\n{}",
                self.ids[a],
                lines(self.agent_entry_options.get(a))
            ));
        }
        m.push_str(&folders(MANAGER));
        std::fs::write(self.root.path().join("mgr.toml"), m).unwrap();
        for a in &self.agents {
            let text = format!(
                "[node]\nname = \"{a}\"\nstate_dir = \"{a}/state\"\nadmin_socket = \"{a}/admin.sock\"\n{node_extra}\
                 [agent]\nmanager = \"{connect}\"\nmanager_id = \"{}\"\n{}{}",
                self.ids[MANAGER],
                lines(Some(&self.agent_options)),
                folders(a)
            );
            std::fs::write(self.root.path().join(format!("{a}.toml")), text).unwrap();
        }
    }

    /// The directory of a folder on a node (`data` is the `deployment` folder).
    pub fn dir(&self, node: &str, dir: &str) -> PathBuf {
        self.root.path().join(node).join(dir)
    }

    /// The `deployment` folder of a node.
    pub fn data(&self, node: &str) -> PathBuf {
        self.dir(node, "data")
    }

    /// Starts a node's daemon and waits until its admin socket answers.
    pub fn start(&mut self, node: &str) {
        let role = if node == MANAGER { "manager" } else { "agent" };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("{node}.log")))
            .unwrap();
        let mut command = match self.wrap.get(node) {
            Some(prefix) => {
                let mut c = Command::new(&prefix[0]);
                c.args(&prefix[1..]).arg(SYNCD);
                c
            }
            None => Command::new(SYNCD),
        };
        let child = command
            .arg(role)
            .arg("--config")
            .arg(self.root.path().join(format!("{node}.toml")))
            .env(
                "SYNCD_LOG",
                std::env::var("SYNCD_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.insert(node.to_owned(), child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.syncctl(node, &["status"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "{node} did not start; see {}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // An agent is started once it is connected, if its manager runs.
        if node != MANAGER && self.procs.contains_key(MANAGER) {
            while !self.status(node).nodes[0].connected {
                assert!(
                    Instant::now() < deadline,
                    "{node} did not connect; see {}",
                    self.log(node)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops a node's daemon with SIGTERM and waits for it.
    pub fn stop(&mut self, node: &str) {
        if let Some(mut c) = self.procs.remove(node) {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "{node} exited with {status}; see {}",
                self.log(node)
            );
        }
    }

    /// Kills a node's daemon with SIGKILL.
    pub fn kill(&mut self, node: &str) {
        if let Some(mut c) = self.procs.remove(node) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process ID of a node's running daemon.
    pub fn pid(&self, node: &str) -> u32 {
        self.procs[node].id()
    }

    /// The log of a node, for failure messages.
    pub fn log(&self, node: &str) -> String {
        self.root
            .path()
            .join(format!("{node}.log"))
            .display()
            .to_string()
    }

    /// Runs syncctl against a node's admin socket.
    pub fn syncctl(&self, node: &str, args: &[&str]) -> Output {
        Command::new(SYNCCTL)
            .arg("--socket")
            .arg(self.socket(node))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs syncctl and asserts it succeeded; returns its stdout.
    pub fn ctl(&self, node: &str, args: &[&str]) -> String {
        let out = self.syncctl(node, args);
        assert!(
            out.status.success(),
            "syncctl {args:?} on {node}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.root.path().join(node).join("admin.sock")
    }

    /// `syncctl status --json`, parsed.
    pub fn status(&self, node: &str) -> syncd_admin::Status {
        serde_json::from_str(&self.ctl(node, &["status", "--json"])).unwrap()
    }

    /// One node's row in the manager's status.
    pub fn row(&self, agent: &str) -> syncd_admin::NodeView {
        self.status(MANAGER)
            .nodes
            .into_iter()
            .find(|n| n.name == agent)
            .unwrap()
    }

    /// Waits until `pred` holds for the manager's row of `agent`.
    pub fn wait_row(
        &self,
        agent: &str,
        timeout: Duration,
        pred: impl Fn(&syncd_admin::NodeView) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.row(agent);
            if pred(&row) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{agent}: condition not reached: {row:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test shows what the daemons said (all of it is kept in the directory
        // `SYNCD_TEST_LOGS` names, if set).
        if std::thread::panicking() {
            if let Some(dir) = std::env::var_os("SYNCD_TEST_LOGS") {
                let dir = Path::new(&dir);
                let _ = std::fs::create_dir_all(dir);
                for node in std::iter::once(MANAGER.to_owned()).chain(self.agents.clone()) {
                    let _ = std::fs::copy(self.log(&node), dir.join(format!("{node}.log")));
                }
            }
            for node in std::iter::once(MANAGER.to_owned()).chain(self.agents.clone()) {
                let log = std::fs::read_to_string(self.log(&node)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("--- last lines of {node}.log:");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Copies a tree as `cp -a` does.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}
