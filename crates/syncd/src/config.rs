//! The node config file: TOML read into a table, then checked key by key so that one run
//! reports every problem with its key and reason, before anything is bound or written.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use syncd_fsops::{DriftPolicy, Excludes, FolderSpec, WSO2_DEFAULT_EXCLUDES};
use syncd_manager::AgentEntry;
use syncd_transport::NodeId;
use toml::{Table, Value};

/// Where the admin socket is when the config does not say.
pub const DEFAULT_ADMIN_SOCKET: &str = syncd_admin::DEFAULT_SOCKET;
/// Where state lives when the config does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/syncd";
/// The manager's port when an address omits it.
pub const DEFAULT_PORT: u16 = 7780;

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[node]`.
    pub node: NodeSection,
    /// `[manager]` or `[agent]`.
    pub role: Role,
    /// `[[folders]]`.
    pub folders: Vec<FolderSpec>,
    /// `[agent] max_backups` and `max_backup_mb` (in bytes): limits of the backups of local
    /// changes.
    pub backups: (usize, u64),
    /// `[metrics] listen`: where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// `[node]`.
#[derive(Debug, Clone)]
pub struct NodeSection {
    /// This node's name.
    pub name: String,
    /// Identity and state.
    pub state_dir: PathBuf,
    /// The admin socket's path.
    pub admin_socket: PathBuf,
    /// QUIC congestion control.
    pub congestion: syncd_transport::Congestion,
}

/// The role the config is for.
#[derive(Debug, Clone)]
pub enum Role {
    /// `[manager]`.
    Manager {
        /// UDP address to listen on.
        listen: SocketAddr,
        /// `[[manager.agents]]`: name, ID and the cap on what is sent to it (its own
        /// `max_rate`, else `[manager] max_rate`).
        agents: Vec<AgentEntry>,
    },
    /// `[agent]`.
    Agent {
        /// The manager's address.
        manager: SocketAddr,
        /// The manager's node ID.
        manager_id: NodeId,
    },
}

impl Role {
    /// `"manager"` or `"agent"`.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Manager { .. } => "manager",
            Role::Agent { .. } => "agent",
        }
    }
}

/// One problem in a config: the key it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `folders[1].path`.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem {
            key: path.display().to_string(),
            reason: format!("cannot read the config file: {e}"),
        }]
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    // Relative paths in the config are relative to the config file, made absolute now so that a
    // later change of working directory cannot move them.
    let base = if base.is_absolute() {
        base
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(&base))
            .unwrap_or(base)
    };
    parse(&text, &base)
}

/// Validates config text; relative paths are taken relative to `base` (the config's directory).
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let mut root: Table = text.parse().map_err(|e: toml::de::Error| {
        vec![Problem {
            key: "(file)".into(),
            reason: format!("not valid TOML: {}", e.to_string().trim()),
        }]
    })?;
    let mut p = Checker {
        problems: Vec::new(),
        base: base.to_owned(),
    };

    let mut node = p.table(&mut root, "", "node", true).unwrap_or_default();
    let name = p
        .string(&mut node, "node", "name", true)
        .unwrap_or_default();
    if !name.is_empty() {
        p.check_name("node.name", &name);
    }
    let state_dir = p
        .path(&mut node, "node", "state_dir")
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let admin_socket = p
        .path(&mut node, "node", "admin_socket")
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    let congestion = match p.string(&mut node, "node", "congestion", false).as_deref() {
        None | Some("cubic") => syncd_transport::Congestion::Cubic,
        Some("bbr") => syncd_transport::Congestion::Bbr,
        Some(other) => {
            p.problem(
                "node.congestion",
                &format!("{other:?} is not a congestion controller: use \"cubic\" or \"bbr\""),
            );
            syncd_transport::Congestion::Cubic
        }
    };
    p.unknown(&node, "node");

    let manager = p.table(&mut root, "", "manager", false);
    let agent = p.table(&mut root, "", "agent", false);
    let mut backups = (100usize, 1u64 << 30);
    let role = match (manager, agent) {
        (Some(_), Some(_)) => {
            p.problem(
                "manager",
                "a node config has either [manager] or [agent], not both",
            );
            None
        }
        (None, None) => {
            p.problem(
                "(file)",
                "missing [manager] or [agent]: say which role this node has",
            );
            None
        }
        (Some(mut m), None) => {
            let listen = p
                .string(&mut m, "manager", "listen", false)
                .map(|s| p.addr("manager.listen", &s, false))
                .unwrap_or_else(|| Some(SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))));
            let default_rate = p.rate(&mut m, "manager", "max_rate").flatten();
            let mut agents = Vec::new();
            let mut names = HashSet::new();
            let mut ids = HashSet::new();
            for (i, mut a) in p
                .array_of_tables(&mut m, "manager", "agents")
                .into_iter()
                .enumerate()
            {
                let key = format!("manager.agents[{i}]");
                let name = p.string(&mut a, &key, "name", true);
                let id = p.string(&mut a, &key, "id", true);
                let max_rate = p.rate(&mut a, &key, "max_rate").unwrap_or(default_rate);
                p.unknown(&a, &key);
                if let Some(name) = &name {
                    p.check_name(&format!("{key}.name"), name);
                    if !names.insert(name.clone()) {
                        p.problem(
                            &format!("{key}.name"),
                            &format!("agent name {name:?} is used twice"),
                        );
                    }
                }
                let id = id.and_then(|s| match s.parse::<NodeId>() {
                    Ok(id) => Some(id),
                    Err(e) => {
                        p.problem(&format!("{key}.id"), &e.to_string());
                        None
                    }
                });
                if let Some(id) = id
                    && !ids.insert(id)
                {
                    p.problem(&format!("{key}.id"), "this node ID is listed twice");
                }
                if let (Some(name), Some(id)) = (name, id) {
                    agents.push(AgentEntry { name, id, max_rate });
                }
            }
            p.unknown(&m, "manager");
            listen.map(|listen| Role::Manager { listen, agents })
        }
        (None, Some(mut a)) => {
            if let Some(n) = p.float(&mut a, "agent", "max_backups") {
                if n >= 1.0 && n.fract() == 0.0 {
                    backups.0 = n as usize;
                } else {
                    p.problem("agent.max_backups", "must be a whole number of at least 1");
                }
            }
            if let Some(mb) = p.float(&mut a, "agent", "max_backup_mb") {
                if mb >= 1.0 {
                    backups.1 = (mb * 1024.0 * 1024.0) as u64;
                } else {
                    p.problem("agent.max_backup_mb", "must be at least 1");
                }
            }
            let manager = p
                .string(&mut a, "agent", "manager", true)
                .and_then(|s| p.addr("agent.manager", &s, true));
            let manager_id = p
                .string(&mut a, "agent", "manager_id", true)
                .and_then(|s| match s.parse::<NodeId>() {
                    Ok(id) => Some(id),
                    Err(e) => {
                        p.problem("agent.manager_id", &e.to_string());
                        None
                    }
                });
            p.unknown(&a, "agent");
            match (manager, manager_id) {
                (Some(manager), Some(manager_id)) => Some(Role::Agent {
                    manager,
                    manager_id,
                }),
                _ => None,
            }
        }
    };

    let metrics = match p.table(&mut root, "", "metrics", false) {
        Some(mut m) => {
            // Localhost unless said otherwise: metrics are for the node's own scraper.
            let listen = p
                .string(&mut m, "metrics", "listen", false)
                .unwrap_or_else(|| "127.0.0.1:9780".to_owned());
            let listen = p.addr("metrics.listen", &listen, false);
            p.unknown(&m, "metrics");
            listen
        }
        None => None,
    };

    let mut folders = Vec::new();
    let folder_tables = p.array_of_tables(&mut root, "", "folders");
    if folder_tables.is_empty() && p.problems.iter().all(|x| x.key != "folders") {
        p.problem("folders", "no [[folders]]: nothing to sync");
    }
    let mut folder_names = HashSet::new();
    for (i, mut f) in folder_tables.into_iter().enumerate() {
        let key = format!("folders[{i}]");
        let name = p.string(&mut f, &key, "name", true);
        let path = p.path(&mut f, &key, "path");
        if path.is_none() && !f.contains_key("path") {
            p.problem(&format!("{key}.path"), "missing");
        }
        let mut patterns = p.string_array(&mut f, &key, "exclude");
        if p.boolean(&mut f, &key, "default_excludes").unwrap_or(true) {
            patterns.extend(WSO2_DEFAULT_EXCLUDES.iter().map(|s| (*s).to_owned()));
        }
        let drift = match p.string(&mut f, &key, "drift", false).as_deref() {
            None | Some("revert") => DriftPolicy::Revert,
            Some("report") => DriftPolicy::Report,
            Some(other) => {
                p.problem(
                    &format!("{key}.drift"),
                    &format!("{other:?} is not a drift policy: use \"revert\" or \"report\""),
                );
                DriftPolicy::Revert
            }
        };
        let guard_on = p.boolean(&mut f, &key, "delete_guard").unwrap_or(true);
        let share = p.float(&mut f, &key, "max_delete_share").unwrap_or(0.5);
        if !(0.0..=1.0).contains(&share) {
            p.problem(
                &format!("{key}.max_delete_share"),
                &format!("{share} is not a share between 0.0 and 1.0"),
            );
        }
        let delete_guard = guard_on.then_some(share);
        p.unknown(&f, &key);
        if let Some(name) = &name {
            p.check_name(&format!("{key}.name"), name);
            if !folder_names.insert(name.clone()) {
                p.problem(
                    &format!("{key}.name"),
                    &format!("folder name {name:?} is used twice"),
                );
            }
        }
        let excludes = match Excludes::new(&patterns) {
            Ok(e) => Some(e),
            Err(e) => {
                p.problem(&format!("{key}.exclude"), &e.to_string());
                None
            }
        };
        if let Some(path) = &path
            && matches!(role, Some(Role::Manager { .. }))
        {
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => p.problem(
                    &format!("{key}.path"),
                    &format!("{} is not a directory", path.display()),
                ),
                Err(e) => p.problem(&format!("{key}.path"), &format!("{}: {e}", path.display())),
            }
        }
        if let (Some(name), Some(path), Some(excludes)) = (name, path, excludes) {
            folders.push(FolderSpec {
                name,
                path,
                excludes,
                drift,
                delete_guard,
            });
        }
    }
    for (i, a) in folders.iter().enumerate() {
        for b in &folders[i + 1..] {
            if a.path.starts_with(&b.path) || b.path.starts_with(&a.path) {
                p.problem(
                    "folders",
                    &format!(
                        "folders {:?} and {:?} overlap ({} and {})",
                        a.name,
                        b.name,
                        a.path.display(),
                        b.path.display()
                    ),
                );
            }
        }
        if state_dir.starts_with(&a.path) || a.path.starts_with(&state_dir) {
            p.problem(
                "node.state_dir",
                &format!(
                    "{} overlaps folder {:?}: state must live outside synced folders",
                    state_dir.display(),
                    a.name
                ),
            );
        }
    }
    p.unknown(&root, "");

    match (p.problems.is_empty(), role) {
        (true, Some(role)) => Ok(Config {
            node: NodeSection {
                name,
                state_dir,
                admin_socket,
                congestion,
            },
            role,
            folders,
            backups,
            metrics,
        }),
        _ => Err(p.problems),
    }
}

/// The smallest cap accepted: below it one 64 KiB chunk takes seconds.
const MIN_RATE: u64 = 10_000;

/// Reads a byte rate: a number and a unit, `/s` optional (`"20MB/s"`, `"1.5MiB/s"`,
/// `"100Mbit/s"`), or `"unlimited"` (`None`). Units: `B`, `kB`, `MB`, `GB` (powers of 1000),
/// `KiB`, `MiB`, `GiB` (powers of 1024), `kbit`, `Mbit`, `Gbit` (bits).
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t == "unlimited" {
        return Ok(None);
    }
    let wrong = || {
        format!(
            "{text:?} is not a rate: use a number and a unit, e.g. \"20MB/s\", \"2MiB/s\" or \"100Mbit/s\" (or \"unlimited\")"
        )
    };
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(wrong)?;
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| wrong())?;
    let scale: f64 = match unit.trim() {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kbit" | "Kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        _ => return Err(wrong()),
    };
    let rate = number * scale;
    if !rate.is_finite() || rate > u64::MAX as f64 {
        return Err(wrong());
    }
    let rate = rate as u64;
    if rate < MIN_RATE {
        return Err(format!(
            "{text:?} is below the smallest cap, 10kB/s (a 64 KiB chunk would take seconds)"
        ));
    }
    Ok(Some(rate))
}

/// Collects problems while taking values out of tables (what is left at the end is unknown).
struct Checker {
    problems: Vec<Problem>,
    base: PathBuf,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Checker {
    /// A byte rate such as `"20MB/s"`: `Some(None)` for `"unlimited"`, `None` when absent or
    /// wrong (reported).
    fn rate(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<Option<u64>> {
        let s = self.string(t, prefix, key, false)?;
        match parse_rate(&s) {
            Ok(rate) => Some(rate),
            Err(reason) => {
                self.problem(&join(prefix, key), &reason);
                None
            }
        }
    }

    fn problem(&mut self, key: &str, reason: &str) {
        self.problems.push(Problem {
            key: key.to_owned(),
            reason: reason.to_owned(),
        });
    }

    fn take(&mut self, t: &mut Table, prefix: &str, key: &str, required: bool) -> Option<Value> {
        let v = t.remove(key);
        if v.is_none() && required {
            self.problem(&join(prefix, key), "missing");
        }
        v
    }

    fn table(&mut self, t: &mut Table, prefix: &str, key: &str, required: bool) -> Option<Table> {
        match self.take(t, prefix, key, required)? {
            Value::Table(t) => Some(t),
            other => {
                self.problem(
                    &join(prefix, key),
                    &format!("must be a table, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn array_of_tables(&mut self, t: &mut Table, prefix: &str, key: &str) -> Vec<Table> {
        match self.take(t, prefix, key, false) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::Table(t) => Some(t),
                    other => {
                        self.problem(
                            &format!("{}[{i}]", join(prefix, key)),
                            &format!("must be a table, not {}", other.type_str()),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.problem(
                    &join(prefix, key),
                    &format!(
                        "must be an array of tables ([[{}]]), not {}",
                        join(prefix, key),
                        other.type_str()
                    ),
                );
                Vec::new()
            }
        }
    }

    fn string(&mut self, t: &mut Table, prefix: &str, key: &str, required: bool) -> Option<String> {
        match self.take(t, prefix, key, required)? {
            Value::String(s) if !s.trim().is_empty() => Some(s),
            Value::String(_) => {
                self.problem(&join(prefix, key), "must not be empty");
                None
            }
            other => {
                self.problem(
                    &join(prefix, key),
                    &format!("must be a string, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<bool> {
        match self.take(t, prefix, key, false)? {
            Value::Boolean(b) => Some(b),
            other => {
                self.problem(
                    &join(prefix, key),
                    &format!("must be true or false, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn float(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<f64> {
        match self.take(t, prefix, key, false)? {
            Value::Float(f) => Some(f),
            Value::Integer(i) => Some(i as f64),
            other => {
                self.problem(
                    &join(prefix, key),
                    &format!("must be a number, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn string_array(&mut self, t: &mut Table, prefix: &str, key: &str) -> Vec<String> {
        match self.take(t, prefix, key, false) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::String(s) => Some(s),
                    other => {
                        self.problem(
                            &format!("{}[{i}]", join(prefix, key)),
                            &format!("must be a string, not {}", other.type_str()),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.problem(
                    &join(prefix, key),
                    &format!("must be an array of strings, not {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn path(&mut self, t: &mut Table, prefix: &str, key: &str) -> Option<PathBuf> {
        let s = self.string(t, prefix, key, false)?;
        let p = PathBuf::from(&s);
        Some(if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        })
    }

    fn addr(&mut self, key: &str, s: &str, resolve: bool) -> Option<SocketAddr> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Some(a);
        }
        if resolve {
            let with_port = if s
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                s.to_owned()
            } else {
                format!("{s}:{DEFAULT_PORT}")
            };
            match with_port.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => return Some(a),
                Ok(None) => self.problem(key, &format!("{s:?} resolves to no address")),
                Err(e) => self.problem(key, &format!("{s:?} is not an address (host:port): {e}")),
            }
        } else {
            self.problem(
                key,
                &format!("{s:?} is not an address such as 0.0.0.0:{DEFAULT_PORT}"),
            );
        }
        None
    }

    fn check_name(&mut self, key: &str, name: &str) {
        let ok = name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.problem(
                key,
                &format!("{name:?} must be at most 64 characters of A-Z a-z 0-9 . _ -"),
            );
        }
    }

    fn unknown(&mut self, t: &Table, prefix: &str) {
        for key in t.keys() {
            let full = join(prefix, key);
            self.problem(&full, "unknown key");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT_ID: &str = "AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA";

    #[test]
    fn a_manager_config_as_in_the_product_description() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[node]
name = "mgr-1"
state_dir = "/var/lib/syncd"

[manager]
listen = "0.0.0.0:7780"

[[manager.agents]]
name = "worker-1"
id = "{AGENT_ID}"

[[folders]]
name = "deployment"
path = "{}"
exclude = ["**/*.back", "work/**"]
"#,
            dir.path().display()
        );
        let c = parse(&text, Path::new("/etc/syncd")).unwrap();
        assert_eq!(c.node.name, "mgr-1");
        assert!(matches!(&c.role, Role::Manager { agents, .. } if agents.len() == 1));
        assert_eq!(c.folders[0].name, "deployment");
        assert_eq!(c.node.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn rates_take_units_of_bytes_or_bits() {
        assert_eq!(parse_rate("20MB/s"), Ok(Some(20_000_000)));
        assert_eq!(parse_rate("20MB"), Ok(Some(20_000_000)));
        assert_eq!(parse_rate("1.5MiB/s"), Ok(Some(1_572_864)));
        assert_eq!(parse_rate("100Mbit/s"), Ok(Some(12_500_000)));
        assert_eq!(parse_rate("64 KiB/s"), Ok(Some(65_536)));
        assert_eq!(parse_rate("1GB/s"), Ok(Some(1_000_000_000)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        for wrong in [
            "20", "20mb/s", "MB/s", "fast", "1e9B/s", "-5MB/s", "2..5MB/s", "",
        ] {
            let e = parse_rate(wrong).unwrap_err();
            assert!(e.contains("is not a rate"), "{wrong:?}: {e}");
        }
        assert!(
            parse_rate("9kB/s")
                .unwrap_err()
                .contains("below the smallest cap")
        );
    }

    #[test]
    fn an_agent_takes_the_managers_rate_unless_it_names_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let other = format!("B{}", &AGENT_ID[1..]);
        let third = format!("C{}", &AGENT_ID[1..]);
        let text = format!(
            "[node]\nname = \"m\"\n[manager]\nmax_rate = \"4MB/s\"\n\
             [[manager.agents]]\nname = \"lan\"\nid = \"{AGENT_ID}\"\nmax_rate = \"unlimited\"\n\
             [[manager.agents]]\nname = \"dr\"\nid = \"{other}\"\nmax_rate = \"100Mbit/s\"\n\
             [[manager.agents]]\nname = \"w3\"\nid = \"{third}\"\n\
             [[folders]]\nname = \"d\"\npath = \"{}\"\n",
            dir.path().display()
        );
        let c = parse(&text, Path::new("/etc/syncd")).unwrap();
        let Role::Manager { agents, .. } = c.role else {
            panic!("a manager config")
        };
        let rates: Vec<_> = agents
            .iter()
            .map(|a| (a.name.as_str(), a.max_rate))
            .collect();
        assert_eq!(
            rates,
            [
                ("lan", None),
                ("dr", Some(12_500_000)),
                ("w3", Some(4_000_000))
            ]
        );

        let bad = text.replace("100Mbit/s", "100 megabits");
        let problems = parse(&bad, Path::new("/etc/syncd")).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "manager.agents[1].max_rate");
        assert!(problems[0].reason.contains("is not a rate"), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[node]
name = "bad name!"
colour = "blue"

[agent]
manager = "not an address at all::"
manager_id = "XYZ"

[[folders]]
name = "a"
path = "/srv/a"
exclude = ["a[b"]

[[folders]]
name = "a"
path = "/srv/a/inner"
"#;
        let problems = parse(text, Path::new("/")).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "node.name",
            "node.colour",
            "agent.manager",
            "agent.manager_id",
            "folders[0].exclude",
            "folders[1].name",
        ] {
            assert!(keys.contains(&want), "{want} missing from {problems:#?}");
        }
    }

    #[test]
    fn a_config_without_a_role_or_folders_says_so() {
        let problems = parse("[node]\nname = \"x\"\n", Path::new("/")).unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|t| t.contains("[manager] or [agent]")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.starts_with("folders:")), "{text:?}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let text = format!(
            "[node]\nname = \"w\"\nstate_dir = \"state\"\n[agent]\nmanager = \"127.0.0.1:7780\"\nmanager_id = \"{AGENT_ID}\"\n[[folders]]\nname = \"d\"\npath = \"data\"\n"
        );
        let c = parse(&text, Path::new("/etc/syncd")).unwrap();
        assert_eq!(c.node.state_dir, PathBuf::from("/etc/syncd/state"));
        assert_eq!(c.folders[0].path, PathBuf::from("/etc/syncd/data"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let problems = parse("[node\nname = 1", Path::new("/")).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].reason.contains("line 1"),
            "{}",
            problems[0].reason
        );
    }
}
