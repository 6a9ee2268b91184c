//! Man pages and shell completions, generated from the clap definitions so they never disagree
//! with `--help`. Packaging calls `syncd generate-assets DIR`.

use std::path::Path;

/// Writes `man/syncd.1`, `man/syncctl.1` and completions for bash, zsh and fish into `dir`.
pub fn generate(dir: &Path, syncd: clap::Command) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    for mut cmd in [syncd, syncd_syncctl::command()] {
        let name = cmd.get_name().to_owned();
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(man.join(format!("{name}.1")), page)?;
        for (shell, file) in [
            (clap_complete::Shell::Bash, name.clone()),
            (clap_complete::Shell::Zsh, format!("_{name}")),
            (clap_complete::Shell::Fish, format!("{name}.fish")),
        ] {
            let sub = completions.join(shell.to_string());
            std::fs::create_dir_all(&sub)?;
            let mut out = std::fs::File::create(sub.join(file))?;
            clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
        }
    }
    Ok(())
}
