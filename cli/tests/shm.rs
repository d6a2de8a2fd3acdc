//! `ctx shm` against real processes: an orphan left by a SIGKILLed creator is removed by `gc`, a
//! live creator's segment is kept.
//!
//! The creators are this test binary run again (the ipc-channel way): `shm_child_entry` does
//! nothing unless the environment names it the child.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::Duration;

use assert_cmd::Command;
use context_shmem::{Segment, TypeId};

const CHILD_ENV: &str = "CTX_SHM_TEST_CHILD_TAG";

/// The child's entry point: create a named segment, report its name, wait to be killed. Ignored,
/// so that it is not counted as a test that passes by doing nothing: the parent runs it with
/// `--ignored`.
#[test]
#[ignore = "the creator child of the tests below; they run it themselves"]
fn shm_child_entry() {
    let Ok(tag) = std::env::var(CHILD_ENV) else {
        return;
    };
    let seg = Segment::create_named(&tag, 4096, TypeId(0x5eed)).expect("create named segment");
    println!("SEGMENT={}", seg.name().expect("named"));
    // Bounded: the parent kills us long before this.
    std::thread::sleep(Duration::from_secs(120));
}

struct Creator {
    child: Child,
    name: String,
}

impl Creator {
    fn spawn(tag: &str) -> Self {
        let mut child = StdCommand::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "shm_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, tag)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut name = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // The harness may print "test shm_child_entry ... " on the same line first.
            if let Some((_, n)) = line.split_once("SEGMENT=") {
                name = Some(n.trim().to_owned());
                break;
            }
        }
        Self {
            child,
            name: name.expect("child reported its segment"),
        }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Creator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ls() -> Vec<serde_json::Value> {
    let out = Command::cargo_bin("ctx")
        .unwrap()
        .args(["shm", "ls", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn find<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|e| e["name"] == name)
}

#[test]
fn gc_removes_the_orphan_of_a_killed_creator_and_keeps_a_live_one() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let mut dead = Creator::spawn("clitest_dead");
    let mut live = Creator::spawn("clitest_live");
    dead.kill();

    let list = ls();
    let d = find(&list, &dead.name).expect("killed creator's segment is listed");
    let l = find(&list, &live.name).expect("live creator's segment is listed");
    assert_eq!(d["creator_alive"], false);
    assert_eq!(l["creator_alive"], true);
    assert_eq!(l["creator_pid"], live.child.id());

    let out = Command::cargo_bin("ctx")
        .unwrap()
        .args(["shm", "gc"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("removed {}", dead.name)),
        "gc output: {text}"
    );
    assert!(
        !text.contains(&live.name),
        "gc must not touch a live creator's segment: {text}"
    );

    let list = ls();
    assert!(find(&list, &dead.name).is_none(), "the orphan is gone");
    assert!(find(&list, &live.name).is_some(), "the live segment stays");

    // Inspect shows the live one's header through the creator's memfd.
    let out = Command::cargo_bin("ctx")
        .unwrap()
        .args(["shm", "inspect", &live.name])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("header        valid"));

    live.kill();
    let out = Command::cargo_bin("ctx")
        .unwrap()
        .args(["shm", "gc"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("removed {}", live.name)));
}

#[test]
fn inspect_refuses_bad_names_clearly() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let out = Command::cargo_bin("ctx")
        .unwrap()
        .args(["shm", "inspect", "../etc/passwd"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a context-shmem segment name"));
}

/// Review of 2026-12-04: `inspect` printed "cannot be opened" and exited 0 when a live creator's
/// header could not be opened, so `ctx shm inspect X && use X` went on.
#[test]
fn inspect_fails_when_a_live_segment_cannot_be_opened() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let real = Segment::create_named("clitest_forge", 4096, TypeId(0x5eed)).unwrap();
    let rec = context_shmem::registry::inspect(real.name().unwrap())
        .unwrap()
        .record
        .unwrap();
    // A record of this (live) process naming the real segment under another type id.
    let forged = format!(
        "ctxshm-clitest_forged-{:032x}",
        u128::from(std::process::id())
    );
    let path = std::path::Path::new(context_shmem::registry::SHM_DIR).join(&forged);
    let wrong_type = context_shmem::registry::NameRecord {
        type_id: TypeId(0xbad),
        ..rec
    };
    std::fs::write(&path, wrong_type.encode()).unwrap();
    let out = Command::cargo_bin("ctx")
        .unwrap()
        .args(["shm", "inspect", &forged])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success(), "inspect exited 0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be opened") && err.contains("type"),
        "{err}"
    );
}
