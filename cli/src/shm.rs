//! `ctx shm`: the named shared-memory segments this library created on the machine.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use context_shmem::registry::{self, CreatorState, SegmentInfo};
use context_shmem::{Segment, TypeId};
use serde::Serialize;

/// One segment as `ctx shm ls --json` prints it.
#[derive(Debug, Serialize)]
pub struct Entry {
    pub name: String,
    pub size: Option<u64>,
    pub type_id: Option<String>,
    pub creator_pid: Option<u32>,
    /// `true` alive, `false` dead, `null` when it cannot be told (a record from another PID
    /// namespace) or the record is unreadable.
    pub creator_alive: Option<bool>,
    /// `"alive"`, `"dead"`, `"stale"` (alive, but no longer holding the segment) or `"unknown"`
    /// (`null` for an unreadable record).
    pub creator_state: Option<&'static str>,
    pub age_seconds: Option<u64>,
    /// Why the record could not be read, if it could not.
    pub error: Option<String>,
}

fn age(created_unix_ns: u64) -> Option<Duration> {
    let created = UNIX_EPOCH.checked_add(Duration::from_nanos(created_unix_ns))?;
    SystemTime::now().duration_since(created).ok()
}

fn entry(info: &SegmentInfo) -> Entry {
    let alive = match info.creator {
        Some(CreatorState::Alive | CreatorState::Stale) => Some(true),
        Some(CreatorState::Dead) => Some(false),
        Some(CreatorState::Unknown) | None => None,
    };
    match &info.record {
        Ok(r) => Entry {
            name: info.name.clone(),
            size: Some(r.total_size),
            type_id: Some(format!("{:#018x}", r.type_id.0)),
            creator_pid: Some(r.creator_pid),
            creator_alive: alive,
            creator_state: info.creator.map(CreatorState::as_str),
            age_seconds: age(r.created_unix_ns).map(|d| d.as_secs()),
            error: None,
        },
        Err(e) => Entry {
            name: info.name.clone(),
            size: None,
            type_id: None,
            creator_pid: None,
            creator_alive: None,
            creator_state: None,
            age_seconds: None,
            error: Some(e.clone()),
        },
    }
}

/// A name as `ls` prints it: as it is when it is plain printable text, else escaped and quoted
/// (anyone may create files in `/dev/shm`, and a name with a newline or a terminal escape
/// sequence must not forge rows or recolour the terminal).
fn shown(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_graphic()) {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `ctx shm ls`.
pub fn ls(json: bool) -> anyhow::Result<()> {
    let list = registry::list().context("listing named segments")?;
    let entries: Vec<Entry> = list.iter().map(entry).collect();
    if json {
        outln!("{}", serde_json::to_string_pretty(&entries)?)?;
        return Ok(());
    }
    if entries.is_empty() {
        outln!("no named segments (looked in {})", registry::SHM_DIR)?;
        return Ok(());
    }
    let w = entries
        .iter()
        .map(|e| shown(&e.name).len())
        .max()
        .unwrap_or(4)
        .max(4);
    outln!(
        "{:<w$}  {:>10}  {:>8}  {:<6}  {:>5}",
        "NAME",
        "SIZE",
        "PID",
        "STATE",
        "AGE"
    )?;
    for e in &entries {
        match &e.error {
            None => outln!(
                "{:<w$}  {:>10}  {:>8}  {:<6}  {:>5}",
                shown(&e.name),
                e.size.map(human_size).unwrap_or_default(),
                e.creator_pid.map(|p| p.to_string()).unwrap_or_default(),
                e.creator_state.unwrap_or("?"),
                e.age_seconds.map(human_age).unwrap_or_default(),
            )?,
            Some(err) => outln!("{:<w$}  unreadable record: {err}", shown(&e.name))?,
        }
    }
    let dead = entries
        .iter()
        .filter(|e| matches!(e.creator_state, Some("dead" | "stale")))
        .count();
    if dead > 0 {
        outln!(
            "\n{dead} record(s) whose creator is dead or no longer holds the segment (`stale`: it \
             exec'd or closed it): `ctx shm gc` removes them"
        )?;
    }
    if entries.iter().any(|e| e.creator_state == Some("unknown")) {
        outln!(
            "\n`unknown`: made in another PID namespace (another container sharing {}), whose \
             process ids cannot be checked from here; `ctx shm gc` leaves them alone",
            registry::SHM_DIR
        )?;
    }
    Ok(())
}

/// `ctx shm gc`: exits 1 if a dead creator's record could not be removed.
pub fn gc(dry_run: bool) -> anyhow::Result<ExitCode> {
    if dry_run {
        let list = registry::list().context("listing named segments")?;
        let orphans: Vec<&SegmentInfo> = list
            .iter()
            .filter(|i| matches!(i.creator, Some(CreatorState::Dead | CreatorState::Stale)))
            .collect();
        for o in &orphans {
            outln!("would remove {}", shown(&o.name))?;
        }
        outln!("{} orphan(s); nothing removed (--dry-run)", orphans.len())?;
        return Ok(ExitCode::SUCCESS);
    }
    let done = registry::gc().context("removing orphaned segments")?;
    for name in &done.removed {
        outln!("removed {}", shown(name))?;
    }
    for (name, why) in &done.failed {
        eprintln!("ctx: could not remove {}: {why}", shown(name));
    }
    outln!(
        "{} orphan(s) removed{}; segments of live processes are never touched",
        done.removed.len(),
        if done.failed.is_empty() {
            String::new()
        } else {
            format!(", {} could not be", done.failed.len())
        }
    )?;
    Ok(if done.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `ctx shm inspect NAME`.
pub fn inspect(name: &str) -> anyhow::Result<()> {
    let info =
        registry::inspect(name).with_context(|| format!("no readable segment named {name:?}"))?;
    let e = entry(&info);
    outln!("name          {}", e.name)?;
    outln!("record        {}", info.path.display())?;
    if let Ok(r) = &info.record {
        outln!(
            "size          {} ({} bytes, header included)",
            human_size(r.total_size),
            r.total_size
        )?;
        outln!("type id       {:#018x}", r.type_id.0)?;
        outln!(
            "creator       pid {} ({})",
            r.creator_pid,
            e.creator_state.unwrap_or("?")
        )?;
        if let Some(a) = e.age_seconds {
            outln!("age           {}", human_age(a))?;
        }
        match info.creator {
            Some(CreatorState::Alive) => {
                // Opening validates the header inside the segment (magic, layout version, size,
                // type id) and that the record and the segment belong together.
                let seg = Segment::open_named(name, TypeId(r.type_id.0)).with_context(|| {
                    format!("the header of live segment {name} cannot be opened")
                })?;
                outln!(
                    "header        valid: {:?} segment, payload {} bytes",
                    seg.kind(),
                    seg.payload_len()
                )?;
            }
            Some(CreatorState::Unknown) => {
                outln!("header        not opened: the record was made in another PID namespace")?
            }
            Some(CreatorState::Stale) => outln!(
                "header        gone: the creator no longer holds the segment (it exec'd or closed it)"
            )?,
            Some(CreatorState::Dead) | None => outln!(
                "header        gone with its creator (named segments live in the creator's memfd)"
            )?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn names_that_could_forge_rows_or_escape_the_terminal_are_quoted() {
        assert_eq!(shown("ctxshm-a-00"), "ctxshm-a-00");
        assert_eq!(shown("ctxshm-x\n0 B 1 alive"), "\"ctxshm-x\\n0 B 1 alive\"");
        assert_eq!(shown("ctxshm-\u{1b}[31mred"), "\"ctxshm-\\u{1b}[31mred\"");
        assert_eq!(shown("ctxshm- space"), "\"ctxshm- space\"");
    }
}
