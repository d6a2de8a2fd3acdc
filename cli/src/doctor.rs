//! `ctx doctor`: what this machine offers the library, exercised rather than looked up.

use std::fmt::Write as _;

use context_core::os::probe;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What does not work (or may not) if this check is not OK.
    pub consequence: &'static str,
}

fn from_probe(name: &'static str, r: std::io::Result<String>, consequence: &'static str) -> Check {
    match r {
        Ok(detail) => Check {
            name,
            status: Status::Ok,
            detail,
            consequence,
        },
        Err(e) => Check {
            name,
            status: Status::Fail,
            detail: e.to_string(),
            consequence,
        },
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Runs every check.
pub fn run_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".to_owned());
    checks.push(Check {
        name: "kernel",
        status: if cfg!(target_os = "linux") {
            Status::Ok
        } else {
            Status::Fail
        },
        detail: format!("Linux {kernel}"),
        consequence: "the workspace targets Linux only (futex, memfd, pidfd)",
    });
    checks.push(from_probe(
        "memfd + seals",
        probe::memfd_seals(),
        "no shared-memory segment can be created: anonymous and named segments are both sealed memfds (file-backed segments still work)",
    ));
    checks.push(from_probe(
        "MAP_FIXED_NOREPLACE",
        probe::map_fixed_noreplace(),
        "the fork pool cannot map regions at fixed addresses safely (needs Linux 4.17+)",
    ));
    checks.push(from_probe(
        "futex (shared)",
        probe::futex_shared(),
        "no process-shared lock or channel: cross-process features do not work",
    ));
    checks.push(from_probe(
        "pidfd_open",
        probe::pidfd(),
        "the fork pool waits for a killed worker with short sleeps instead of polling a pidfd (needs Linux 5.3+); liveness checks use pid + start time either way",
    ));

    // /dev/shm: where the name records of named segments live (their data is in memfds).
    match nix::sys::statvfs::statvfs("/dev/shm") {
        Ok(st) => {
            let frag = st.fragment_size();
            let total = st.blocks() * frag;
            let free = st.blocks_available() * frag;
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            checks.push(Check {
                name: "/dev/shm",
                status: if free < 1 << 20 { Status::Warn } else { Status::Ok },
                detail: format!("{:.1} GiB total, {:.1} GiB free", gib(total), gib(free)),
                consequence: "each named segment needs an 80-byte name record here; its data lives in a memfd, which this file system's size limit does not cover",
            });
        }
        Err(e) => checks.push(Check {
            name: "/dev/shm",
            status: Status::Warn,
            detail: format!("not available: {e}"),
            consequence: "named segments cannot be created (no place for their name records); sealed memfd segments still work",
        }),
    }

    match read_trimmed("/proc/sys/vm/overcommit_memory").as_deref() {
        Some(mode @ ("0" | "1")) => checks.push(Check {
            name: "overcommit",
            status: Status::Ok,
            detail: format!("vm.overcommit_memory = {mode}"),
            consequence: "",
        }),
        Some(mode) => checks.push(Check {
            name: "overcommit",
            status: Status::Warn,
            detail: format!("vm.overcommit_memory = {mode} (strict accounting)"),
            consequence: "large sparse fork-pool regions are charged in full and may be refused; use smaller regions",
        }),
        None => checks.push(Check {
            name: "overcommit",
            status: Status::Warn,
            detail: "unreadable".to_owned(),
            consequence: "cannot tell whether large sparse regions will be allowed",
        }),
    }

    match read_trimmed("/proc/sys/vm/max_map_count").and_then(|s| s.parse::<u64>().ok()) {
        Some(n) => checks.push(Check {
            name: "max_map_count",
            status: if n < 16_384 { Status::Warn } else { Status::Ok },
            detail: format!("vm.max_map_count = {n}"),
            consequence: "each segment and region is a mapping; many small ones may hit this limit (ENOMEM)",
        }),
        None => checks.push(Check {
            name: "max_map_count",
            status: Status::Warn,
            detail: "unreadable".to_owned(),
            consequence: "cannot tell how many mappings a process may have",
        }),
    }
    checks
}

/// The printed report.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "{tag}  {:<w$}  {}", c.name, c.detail);
        if c.status != Status::Ok && !c.consequence.is_empty() {
            let _ = writeln!(out, "      {:<w$}  -> {}", "", c.consequence);
        }
    }
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    let _ = writeln!(
        out,
        "\n{} checks: {} ok, {warns} warning(s), {fails} failure(s)",
        checks.len(),
        checks.len() - fails - warns
    );
    out
}
