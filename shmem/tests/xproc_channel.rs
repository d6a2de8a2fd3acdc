//! The frame channel between processes: echo, backpressure, and peer death as an error.
#![cfg(not(loom))]

mod common;

use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use common::{expect_ok, fork_child, kill9, wait_child, wait_while_child_runs, within};
use context_shmem::{AtomicArray, Channel, ChannelError, Segment, Side};

#[test]
fn echo_across_processes_with_fd_passing() {
    // The child gets the channel by SCM_RIGHTS (as an unrelated process would), not by fork alone.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let ch = Channel::create(1024).unwrap();
    let child = fork_child(|| {
        let Ok(seg) = Segment::recv_fd(&b, Channel::type_id()) else {
            return 1;
        };
        let Ok(ch) = Channel::from_segment(std::sync::Arc::new(seg)) else {
            return 2;
        };
        let Ok(mut ep) = ch.endpoint(Side::B) else {
            return 3;
        };
        let mut buf = [0u8; 1024];
        loop {
            match ep.recv(&mut buf, within(20)) {
                Ok(n) => {
                    buf[..n].reverse();
                    if ep.send(&buf[..n], within(20)).is_err() {
                        return 4;
                    }
                }
                Err(ChannelError::Closed) => return 0,
                Err(_) => return 5,
            }
        }
    });
    ch.segment().send_fd(&a).unwrap();
    let mut ep = ch.endpoint(Side::A).unwrap();
    let mut buf = [0u8; 1024];
    for i in 0..3000usize {
        let msg: Vec<u8> = (0..(i % 700)).map(|x| (x % 256) as u8).collect();
        ep.send(&msg, within(20)).unwrap();
        let n = ep.recv(&mut buf, within(20)).unwrap();
        let mut want = msg.clone();
        want.reverse();
        assert_eq!(&buf[..n], &want[..]);
    }
    drop(ep);
    expect_ok(child, Duration::from_secs(30));
}

#[test]
fn receiver_learns_that_the_sender_died() {
    let ch = Channel::create(4096).unwrap();
    let child = fork_child(|| {
        let Ok(mut ep) = ch.endpoint(Side::B) else {
            return 1;
        };
        for i in 0..10u8 {
            if ep.send(&[i; 100], within(5)).is_err() {
                return 2;
            }
        }
        // Die without closing (no destructor runs).
        // SAFETY: ends the child abruptly, like a crash.
        unsafe { libc::_exit(0) }
    });
    let mut ep = ch.endpoint(Side::A).unwrap();
    let _ = wait_child(child, Duration::from_secs(10));
    // Frames sent before the death are delivered, then the death is an error, well before the
    // deadline.
    let mut buf = [0u8; 128];
    for i in 0..10u8 {
        assert_eq!(ep.recv(&mut buf, within(5)).unwrap(), 100);
        assert_eq!(buf[0], i);
    }
    // (A deadline, not a wall-clock assertion: if the death went unnoticed this is TimedOut.)
    match ep.recv(&mut buf, within(30)) {
        Err(ChannelError::PeerDead { pid }) => assert_eq!(pid as i32, child),
        other => panic!("expected PeerDead, got {other:?}"),
    }
}

#[test]
fn blocked_sender_learns_that_the_receiver_was_killed() {
    let ch = Channel::create(256).unwrap();
    let attached = AtomicArray::create(1).unwrap();
    let child = fork_child(|| {
        let Ok(_ep) = ch.endpoint(Side::B) else {
            return 1;
        };
        attached.get(0).unwrap().store(1, Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut ep = ch.endpoint(Side::A).unwrap();
    // Wait until the child attached, then fill the ring (backpressure), then kill the child.
    wait_while_child_runs(
        child,
        Duration::from_secs(20),
        "the child to attach",
        || attached.get(0).unwrap().load(Ordering::SeqCst) != 0,
    );
    let mut sent = 0;
    loop {
        match ep.send(&[1u8; 60], Some(Instant::now() + Duration::from_millis(50))) {
            Ok(()) => sent += 1,
            Err(ChannelError::TimedOut) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent >= 3);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        kill9(child);
    });
    let r = ep.send(&[1u8; 60], within(30));
    assert!(matches!(r, Err(ChannelError::PeerDead { .. })), "{r:?}");
    killer.join().unwrap();
    let _ = wait_child(child, Duration::from_secs(10));
}

#[test]
fn a_dead_peers_side_can_be_taken_over() {
    let ch = Channel::create(256).unwrap();
    let child = fork_child(|| match ch.endpoint(Side::B) {
        Ok(ep) => {
            std::mem::forget(ep);
            0
        }
        Err(_) => 1,
    });
    expect_ok(child, Duration::from_secs(10));
    // Side B's owner is dead: a new process (here: us) may attach it.
    let mut b = ch.endpoint(Side::B).unwrap();
    let mut a = ch.endpoint(Side::A).unwrap();
    a.send(b"again", within(5)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(b.recv(&mut buf, within(5)).unwrap(), 5);
}

#[test]
fn a_new_producer_continues_after_the_dead_ones_frames() {
    // The producer dies with unread frames in the ring; whoever takes over its side must append
    // after them (found by walking the committed headers), not overwrite them.
    let ch = Channel::create(1024).unwrap();
    let child = fork_child(|| {
        let Ok(mut b) = ch.endpoint(Side::B) else {
            return 1;
        };
        for i in 0..5u8 {
            if b.send(&[i; 33], within(5)).is_err() {
                return 2;
            }
        }
        std::mem::forget(b);
        0
    });
    expect_ok(child, Duration::from_secs(10));
    let mut a = ch.endpoint(Side::A).unwrap();
    let mut b = ch.endpoint(Side::B).unwrap();
    b.send(b"new producer", within(5)).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..5u8 {
        assert_eq!(a.recv(&mut buf, within(5)).unwrap(), 33);
        assert!(buf[..33].iter().all(|&x| x == i));
    }
    let n = a.recv(&mut buf, within(5)).unwrap();
    assert_eq!(&buf[..n], b"new producer");
}
