//! Text output for people: a status table that fits an 80-column terminal, and wait results.

use std::fmt::Write;

use syncd_admin::{NodeView, Status, WaitReport};

/// The status as text. `now` (seconds since the epoch) makes relative times.
pub fn status(s: &Status, now: u64) -> String {
    let mut out = String::new();
    let what = if s.role == "manager" {
        format!("generation {}", s.generation)
    } else {
        format!("applied generation {}", s.generation)
    };
    let _ = writeln!(out, "{} ({}): {what}", s.node, s.role);
    if let Some(h) = &s.hold {
        let until = h
            .until
            .map(|u| format!(", ends in {}", human_secs(u.saturating_sub(now))))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "HOLDING publication for {}{until}: {} change(s) pending (`syncctl resume` publishes them)",
            human_secs(now.saturating_sub(h.since)),
            s.pending_total
        );
        for p in &s.pending {
            let _ = writeln!(out, "  {:<9} {}/{}", p.change, p.folder, p.path);
        }
        if s.pending_total > s.pending.len() {
            let _ = writeln!(out, "  ... and {} more", s.pending_total - s.pending.len());
        }
    }
    for g in &s.guarded {
        let _ = writeln!(
            out,
            "DELETE GUARD on folder {}: {} (for {}); nothing published for it until `syncctl confirm {}`",
            g.folder,
            g.reason,
            human_secs(now.saturating_sub(g.since)),
            g.folder
        );
    }
    if !s.held_files.is_empty() {
        let _ = writeln!(out, "not published yet:");
        for h in &s.held_files {
            let _ = writeln!(
                out,
                "  {}/{}: {} (for {})",
                h.folder,
                h.path,
                h.reason,
                human_secs(now.saturating_sub(h.since))
            );
        }
    }
    if s.skipped_total > 0 {
        let _ = writeln!(
            out,
            "not synced ({} entries; workers do not get them):",
            s.skipped_total
        );
        for e in &s.skipped {
            let _ = writeln!(out, "  {}/{}: {}", e.folder, e.path, e.reason);
        }
        if s.skipped_total > s.skipped.len() {
            let _ = writeln!(out, "  ... and {} more", s.skipped_total - s.skipped.len());
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:>7}  {:<16} {:<9} ADDRESS",
        "NODE", "STATE", "APPLIED", "BEHIND", "LAST SEEN"
    );
    for n in &s.nodes {
        row(&mut out, n, now);
    }
    out
}

fn row(out: &mut String, n: &NodeView, now: u64) {
    let behind = if n.behind_generations == 0 && n.behind_bytes == 0 {
        "-".to_owned()
    } else {
        format!(
            "{} gen, {}",
            n.behind_generations,
            human_bytes(n.behind_bytes)
        )
    };
    let seen = match n.last_seen {
        Some(t) if now.saturating_sub(t) < 2 => "now".to_owned(),
        Some(t) => format!("{} ago", human_secs(now.saturating_sub(t))),
        None => "never".to_owned(),
    };
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:>7}  {:<16} {:<9} {}",
        clip(&n.name, 12),
        n.state,
        n.applied,
        clip(&behind, 16),
        clip(&seen, 9),
        n.address.as_deref().unwrap_or("-")
    );
    if let Some(by) = &n.paused_by {
        let until = match n.paused_until {
            Some(u) => format!("ends in {}", human_secs(u.saturating_sub(now))),
            None => "no time limit".to_owned(),
        };
        let _ = writeln!(out, "{:<12} paused by {by}, {until}", "");
    }
    if let Some(e) = &n.last_error {
        let _ = writeln!(out, "{:<12} last error: {}", "", clip(e, 54));
    }
    // Whole names, even if the line wraps: the operator adds them to a config.
    if !n.folders_not_taken.is_empty() {
        let _ = writeln!(
            out,
            "{:<12} does not sync folder(s) {} (not in its config)",
            "",
            n.folders_not_taken.join(", ")
        );
    }
    if !n.folders_not_published.is_empty() {
        let _ = writeln!(
            out,
            "{:<12} its folder(s) {} are not published by the manager (not synced)",
            "",
            n.folders_not_published.join(", ")
        );
    }
    // Paths are shown whole, even if the line wraps: an operator needs the exact path.
    for d in n.drift.iter().take(5) {
        let _ = writeln!(
            out,
            "{:<12} drift: {} {}/{} ({})",
            "", d.change, d.folder, d.path, d.action
        );
    }
    if n.drift_cut {
        let _ = writeln!(
            out,
            "{:<12} drift: ... and more than {} more (`syncctl changes` on {} lists all)",
            "",
            n.drift.len().saturating_sub(5),
            n.name
        );
    } else if n.drift.len() > 5 {
        let _ = writeln!(out, "{:<12} drift: ... and {} more", "", n.drift.len() - 5);
    }
    if n.drift_reverted > 0 {
        let _ = writeln!(
            out,
            "{:<12} {} local change(s) reverted since start",
            "", n.drift_reverted
        );
    }
    if let Some(rate) = n.max_rate {
        let _ = writeln!(
            out,
            "{:<12} sending capped at {}/s (max_rate)",
            "",
            human_bytes(rate)
        );
    }
}

/// How a wait ended, as text.
pub fn wait(w: &WaitReport) -> String {
    let mut out = String::new();
    if w.reached {
        let _ = writeln!(
            out,
            "generation {} applied by every agent waited for",
            w.generation
        );
    } else {
        let _ = writeln!(out, "timed out waiting for generation {}", w.generation);
    }
    for l in &w.laggards {
        let note = if l.counted { "" } else { " (not waited for)" };
        let err = l
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}: {}, applied {}{note}{err}",
            l.name, l.state, l.applied
        );
    }
    out
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(width.saturating_sub(1)).collect();
        c.push('…');
        c
    }
}

/// `42s`, `3m`, `2h05m`, `3d04h`.
pub fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `512 B`, `1.2 MB`, `3.4 GB` (decimal units).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use syncd_admin::HoldView;

    use super::*;

    fn node(name: &str, state: &str) -> NodeView {
        NodeView {
            name: name.into(),
            address: Some("10.20.30.40:45012".into()),
            state: state.into(),
            connected: true,
            applied: 40,
            behind_generations: 2,
            behind_bytes: 123_456_789,
            last_seen: Some(1_000),
            last_error: Some(
                "connection lost: timed out after a very long time and more text beyond".into(),
            ),
            paused_until: Some(8_000),
            paused_by: Some("manager".into()),
            bytes_transferred: 0,
            bytes_reused: 0,
            drift: vec![],
            drift_cut: false,
            drift_reverted: 0,
            max_rate: Some(2_500_000),
            folders_not_taken: vec![],
            folders_not_published: vec![],
        }
    }

    #[test]
    fn the_table_fits_80_columns() {
        let s = Status {
            role: "manager".into(),
            node: "mgr-1".into(),
            generation: 42,
            hold: Some(HoldView {
                since: 900,
                until: None,
            }),
            pending: vec![],
            pending_total: 0,
            guarded: vec![],
            held_files: vec![],
            skipped: vec![],
            skipped_total: 0,
            nodes: vec![
                node("worker-with-a-very-long-name", "paused"),
                node("w2", "in sync"),
            ],
        };
        let text = status(&s, 1_000);
        for line in text.lines().filter(|l| !l.starts_with("HOLDING")) {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(text.contains("paused by manager, ends in 1h56m"), "{text}");
        assert!(text.contains("2 gen, 123.5 MB"), "{text}");
        assert!(
            text.contains("sending capped at 2.5 MB/s (max_rate)"),
            "{text}"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(7_260), "2h01m");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_200_000), "1.2 MB");
    }
}
