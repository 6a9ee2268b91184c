//! `syncctl`: the admin CLI (see `crates/syncctl`). Built here so that it ships with `syncd`.

fn main() -> std::process::ExitCode {
    syncd_syncctl::run()
}
