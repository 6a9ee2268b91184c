//! `syncd config`: writes a node's config from its `CARBON_HOME`, with the folders its WSO2
//! product keeps artifacts in and the excludes that product needs, plus the systemd drop-in
//! that lets the hardened service write those folders.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeRole {
    /// The node where artifacts are deployed.
    Manager,
    /// A worker.
    Agent,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The product's home directory (it holds repository/deployment/server).
    #[arg(long, value_name = "DIR")]
    carbon_home: PathBuf,
    /// This node's role.
    #[arg(long, value_enum)]
    role: NodeRole,
    /// This node's name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// State directory.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/syncd")]
    state_dir: PathBuf,
    /// Manager: UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7780")]
    listen: String,
    /// Manager: an agent, as NAME=NODE_ID (repeat for each worker).
    #[arg(long = "agent", value_name = "NAME=ID")]
    agents: Vec<String>,
    /// Agent: the manager's address (host:port).
    #[arg(long, value_name = "ADDR")]
    manager: Option<String>,
    /// Agent: the manager's node ID (`syncd id` on the manager).
    #[arg(long, value_name = "ID")]
    manager_id: Option<String>,
    /// Write the config here instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// What was found under a `CARBON_HOME`.
#[derive(Debug, PartialEq, Eq)]
pub struct Product {
    /// Its name, for comments and logs.
    pub name: &'static str,
    /// Folders to sync: (name, path relative to CARBON_HOME, extra excludes).
    pub folders: Vec<(&'static str, &'static str, Vec<&'static str>)>,
}

/// Recognises the product from its start script and lists its folders.
pub fn detect(home: &Path) -> Result<Product, String> {
    let deployment = home.join("repository/deployment/server");
    if !deployment.is_dir() {
        return Err(format!(
            "{} has no repository/deployment/server: is it a WSO2 CARBON_HOME?",
            home.display()
        ));
    }
    let bin = |script: &str| home.join("bin").join(script).exists();
    let name = if bin("api-manager.sh") {
        "WSO2 API Manager"
    } else if bin("micro-integrator.sh") {
        "WSO2 Micro Integrator"
    } else if home.join("repository/conf/identity").is_dir() {
        "WSO2 Identity Server"
    } else if bin("integrator.sh") {
        "WSO2 Enterprise Integrator"
    } else {
        "a WSO2 Carbon product"
    };
    // Web applications that Tomcat explodes from their .war on every node are runtime output:
    // syncing the .war is enough, and the exploded copy is each node's own.
    let exploded = vec!["webapps/*/**"];
    let mut folders = vec![(
        "deployment",
        "repository/deployment/server",
        if name == "WSO2 Micro Integrator" {
            vec![]
        } else {
            exploded
        },
    )];
    if home.join("repository/tenants").is_dir() {
        folders.push(("tenants", "repository/tenants", vec![]));
    }
    Ok(Product { name, folders })
}

pub fn run(args: ConfigArgs) -> ExitCode {
    match render(&args) {
        Ok((text, read_write)) => {
            match &args.out {
                Some(path) => {
                    if let Err(e) = std::fs::write(path, &text) {
                        eprintln!("syncd: cannot write {}: {e}", path.display());
                        return ExitCode::from(1);
                    }
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
            let unit = match args.role {
                NodeRole::Manager => "syncd-manager",
                NodeRole::Agent => "syncd-agent",
            };
            eprintln!(
                "\nThe service may write only what systemd allows. Create\n  /etc/systemd/system/{unit}.service.d/folders.conf\nwith:\n  [Service]\n  ReadWritePaths={read_write}\nthen: systemctl daemon-reload && syncd check-config --config <this file>"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("syncd: {e}");
            ExitCode::from(3)
        }
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// The config text, and the paths the service must be allowed to write.
pub fn render(args: &ConfigArgs) -> Result<(String, String), String> {
    let home = std::fs::canonicalize(&args.carbon_home)
        .map_err(|e| format!("{}: {e}", args.carbon_home.display()))?;
    let product = detect(&home)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "node".into()),
    };
    let mut out = format!(
        "# syncd config for {} at {}, written by `syncd config`.\n\n[node]\nname = {}\nstate_dir = {}\nadmin_socket = \"/run/syncd/admin.sock\"\n\n",
        product.name,
        home.display(),
        quote(&name),
        quote(&args.state_dir.display().to_string()),
    );
    match args.role {
        NodeRole::Manager => {
            out.push_str(&format!("[manager]\nlisten = {}\n", quote(&args.listen)));
            if args.agents.is_empty() {
                out.push_str("\n# Add one block per worker (its ID: `syncd id` on the worker):\n# [[manager.agents]]\n# name = \"worker-1\"\n# id = \"...\"\n");
            }
            for a in &args.agents {
                let (n, id) = a
                    .split_once('=')
                    .ok_or_else(|| format!("--agent {a:?}: expected NAME=NODE_ID"))?;
                out.push_str(&format!(
                    "\n[[manager.agents]]\nname = {}\nid = {}\n",
                    quote(n),
                    quote(id)
                ));
            }
        }
        NodeRole::Agent => {
            let manager = args
                .manager
                .as_deref()
                .ok_or("an agent needs --manager HOST:PORT")?;
            let id = args
                .manager_id
                .as_deref()
                .ok_or("an agent needs --manager-id (`syncd id` on the manager)")?;
            out.push_str(&format!(
                "[agent]\nmanager = {}\nmanager_id = {}\n",
                quote(manager),
                quote(id)
            ));
        }
    }
    let mut read_write = vec![args.state_dir.display().to_string()];
    for (folder, rel, excludes) in &product.folders {
        let path = home.join(rel);
        read_write.push(path.display().to_string());
        out.push_str(&format!(
            "\n[[folders]]\nname = {}\npath = {}\n",
            quote(folder),
            quote(&path.display().to_string())
        ));
        if !excludes.is_empty() {
            let list: Vec<String> = excludes.iter().map(|e| quote(e)).collect();
            out.push_str(&format!(
                "# Exploded web applications are each node's own runtime output.\nexclude = [{}]\n",
                list.join(", ")
            ));
        }
    }
    Ok((out, read_write.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(script: &str, tenants: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("repository/deployment/server")).unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin").join(script), b"#!/bin/sh\n").unwrap();
        if tenants {
            std::fs::create_dir_all(d.path().join("repository/tenants")).unwrap();
        }
        d
    }

    #[test]
    fn products_are_recognised_with_their_folders() {
        let apim = home("api-manager.sh", true);
        let p = detect(apim.path()).unwrap();
        assert_eq!(p.name, "WSO2 API Manager");
        assert_eq!(p.folders.len(), 2);
        let mi = home("micro-integrator.sh", false);
        let p = detect(mi.path()).unwrap();
        assert_eq!(p.name, "WSO2 Micro Integrator");
        assert_eq!(
            p.folders,
            vec![("deployment", "repository/deployment/server", vec![])]
        );
        let not = tempfile::tempdir().unwrap();
        assert!(detect(not.path()).unwrap_err().contains("CARBON_HOME"));
    }

    #[test]
    fn a_written_manager_config_passes_check_config() {
        let apim = home("api-manager.sh", true);
        let args = ConfigArgs {
            carbon_home: apim.path().to_owned(),
            role: NodeRole::Manager,
            name: Some("mgr-1".into()),
            state_dir: "/var/lib/syncd".into(),
            listen: "0.0.0.0:7780".into(),
            agents: vec!["worker-1=AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA-AAAAAAAAAAAAA".into()],
            manager: None,
            manager_id: None,
            out: None,
        };
        let (text, rw) = render(&args).unwrap();
        let config =
            crate::config::parse(&text, Path::new("/")).unwrap_or_else(|p| panic!("{p:?}\n{text}"));
        assert_eq!(config.folders.len(), 2);
        assert!(rw.contains("repository/deployment/server") && rw.contains("/var/lib/syncd"));
        let webapp = syncd_manifest::RelPath::new("webapps/am#sample").unwrap();
        assert!(config.folders[0].excludes.is_excluded(&webapp, true));
        let war = syncd_manifest::RelPath::new("webapps/am#sample.war").unwrap();
        assert!(!config.folders[0].excludes.is_excluded(&war, false));
    }
}
