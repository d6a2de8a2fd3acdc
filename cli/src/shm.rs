//! `ctx shm`: the named shared-memory segments this library created on the machine.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use context_shmem::registry::{self, SegmentInfo};
use context_shmem::{Segment, TypeId};
use serde::Serialize;

/// One segment as `ctx shm ls --json` prints it.
#[derive(Debug, Serialize)]
pub struct Entry {
    pub name: String,
    pub size: Option<u64>,
    pub type_id: Option<String>,
    pub creator_pid: Option<u32>,
    pub creator_alive: bool,
    pub age_seconds: Option<u64>,
    /// Why the record could not be read, if it could not.
    pub error: Option<String>,
}

fn age(created_unix_ns: u64) -> Option<Duration> {
    let created = UNIX_EPOCH.checked_add(Duration::from_nanos(created_unix_ns))?;
    SystemTime::now().duration_since(created).ok()
}

fn entry(info: &SegmentInfo) -> Entry {
    match &info.record {
        Ok(r) => Entry {
            name: info.name.clone(),
            size: Some(r.total_size),
            type_id: Some(format!("{:#018x}", r.type_id.0)),
            creator_pid: Some(r.creator_pid),
            creator_alive: info.creator_alive,
            age_seconds: age(r.created_unix_ns).map(|d| d.as_secs()),
            error: None,
        },
        Err(e) => Entry {
            name: info.name.clone(),
            size: None,
            type_id: None,
            creator_pid: None,
            creator_alive: false,
            age_seconds: None,
            error: Some(e.clone()),
        },
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
        .map(|e| e.name.len())
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
                e.name,
                e.size.map(human_size).unwrap_or_default(),
                e.creator_pid.map(|p| p.to_string()).unwrap_or_default(),
                if e.creator_alive { "alive" } else { "dead" },
                e.age_seconds.map(human_age).unwrap_or_default(),
            )?,
            Some(err) => outln!("{:<w$}  unreadable record: {err}", e.name)?,
        }
    }
    let dead = entries
        .iter()
        .filter(|e| e.error.is_none() && !e.creator_alive)
        .count();
    if dead > 0 {
        outln!("\n{dead} segment(s) whose creator is dead: `ctx shm gc` removes them")?;
    }
    Ok(())
}

/// `ctx shm gc`.
pub fn gc(dry_run: bool) -> anyhow::Result<()> {
    if dry_run {
        let list = registry::list().context("listing named segments")?;
        let orphans: Vec<&SegmentInfo> = list
            .iter()
            .filter(|i| i.record.is_ok() && !i.creator_alive)
            .collect();
        for o in &orphans {
            outln!("would remove {}", o.name)?;
        }
        outln!("{} orphan(s); nothing removed (--dry-run)", orphans.len())?;
        return Ok(());
    }
    let removed = registry::gc().context("removing orphaned segments")?;
    for name in &removed {
        outln!("removed {name}")?;
    }
    outln!(
        "{} orphan(s) removed; segments of live processes are never touched",
        removed.len()
    )?;
    Ok(())
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
            if info.creator_alive { "alive" } else { "dead" }
        )?;
        if let Some(a) = e.age_seconds {
            outln!("age           {}", human_age(a))?;
        }
        if info.creator_alive {
            // Opening validates the header inside the segment (magic, layout version, size, type id).
            match Segment::open_named(name, TypeId(r.type_id.0)) {
                Ok(seg) => outln!(
                    "header        valid: {:?} segment, payload {} bytes",
                    seg.kind(),
                    seg.payload_len()
                )?,
                Err(err) => outln!("header        cannot be opened: {err}")?,
            }
        } else {
            outln!(
                "header        gone with its creator (named segments live in the creator's memfd)"
            )?;
        }
    }
    Ok(())
}
