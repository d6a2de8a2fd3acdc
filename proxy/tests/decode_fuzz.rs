//! Property tests of every decoder: arbitrary bytes and length-prefix bombs give an error, never a
//! panic, an abort or an allocation beyond the limit. Also, with the same counting allocator: a warm
//! small call allocates nothing on the calling thread.
//!
//! The properties run in a child process (this test binary re-executed with one ignored test
//! selected), under a watchdog, so that an abort (e.g. a failed allocation) is seen as a failure of
//! the parent test rather than killing the harness. A counting global allocator measures the peak
//! bytes allocated by the decoding thread during each decode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use context_core::Context;
use context_proxy::{
    Bincode, BufferRequest, BufferResponse, BufferService, Codec, Exports, FrameKind, Postcard,
    frame,
};
use proptest::prelude::*;

// ----- counting allocator (per thread, so other threads' allocations do not count) -----

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    let _ = LIVE.try_with(|l| {
        let n = l.get() + size;
        l.set(n);
        let _ = PEAK.try_with(|p| p.set(p.get().max(n)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are ours; the bookkeeping touches only const-initialised thread-locals without
// destructors (no allocation, no re-entrancy into the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` came from this allocator (i.e. from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated (above what was live at the start) while running `f`.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get) - base)
}

// ----- what is decoded -----

/// The codec limit under test: above the 2 MiB that serde's cautious pre-allocation can reach for the
/// nested sequences below, so the property is the literal one: peak allocation <= the limit.
const LIMIT: usize = 4 << 20;
type Small = Bincode<LIMIT>;
type SmallPostcard = Postcard<LIMIT>;

/// A service with the argument shapes worth attacking.
#[context_proxy::service]
pub trait Sample {
    /// A small call: a u64 and a string.
    fn small(&mut self, n: u64, tag: &str) -> u64;
    /// Owned containers of several shapes.
    fn owned(
        &mut self,
        s: String,
        v: Vec<u64>,
        nested: Vec<Vec<u8>>,
        o: Option<(u8, i128)>,
    ) -> Vec<String>;
    /// Borrowed bytes.
    fn bytes(&mut self, b: &[u8]) -> usize;
}

struct Sampler;
impl Sample for Sampler {
    fn small(&mut self, n: u64, _tag: &str) -> u64 {
        n
    }
    fn owned(
        &mut self,
        s: String,
        _v: Vec<u64>,
        _n: Vec<Vec<u8>>,
        _o: Option<(u8, i128)>,
    ) -> Vec<String> {
        vec![s]
    }
    fn bytes(&mut self, b: &[u8]) -> usize {
        b.len()
    }
}

/// Decodes `bytes` as every body type, with both codecs; returns the largest allocation peak.
fn decode_all(bytes: &[u8]) -> usize {
    let mut worst = 0;
    macro_rules! try_decode {
        ($($t:ty),*) => {$(
            let (_, p) = peak_during(|| Small::decode::<$t>(bytes).is_ok());
            worst = worst.max(p);
            let (_, p) = peak_during(|| SmallPostcard::decode::<$t>(bytes).is_ok());
            worst = worst.max(p);
        )*};
    }
    try_decode!(
        SampleRequest<'_>,
        SampleResponse,
        BufferRequest<'_>,
        BufferResponse,
        String,
        Vec<u64>,
        Vec<String>,
        (u64, &str)
    );
    let (_, p) = peak_during(|| frame::parse(bytes, LIMIT).is_ok());
    worst.max(p)
}

/// A length prefix as the bincode codec reads it (fixed-width u64), or as a varint-configured
/// bincode would (0xFD marks a u64), which the fixed reader sees as another huge number.
fn bincode_len(len: u64, varint: bool) -> Vec<u8> {
    let mut v = if varint { vec![0xFD] } else { Vec::new() };
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// A postcard (LEB128) length prefix.
fn postcard_len(mut len: u64) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let b = (len & 0x7F) as u8;
        len >>= 7;
        if len == 0 {
            v.push(b);
            return v;
        }
        v.push(b | 0x80);
    }
}

fn bound() -> usize {
    LIMIT
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    #[ignore = "run in a child process by decoders_never_panic_abort_or_overallocate"]
    fn child_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let peak = decode_all(&bytes);
        prop_assert!(peak <= bound(), "peak {peak}");
    }

    #[test]
    #[ignore = "run in a child process by decoders_never_panic_abort_or_overallocate"]
    fn child_length_prefix_bombs(
        variant in 0u8..4,
        len in prop_oneof![Just(u64::MAX), Just(u64::from(u32::MAX)), Just(1u64 << 40), 1u64..10_000_000],
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        postcard in any::<bool>(),
        varint in any::<bool>(),
    ) {
        // A variant tag, then a huge length where a string, byte string or sequence begins.
        // (The tag is one byte for postcard and varint bincode, a u32 for fixed-width bincode.)
        let mut bytes = if postcard || varint { vec![variant] } else { u32::from(variant).to_le_bytes().to_vec() };
        bytes.extend(if postcard { postcard_len(len) } else { bincode_len(len, varint) });
        bytes.extend_from_slice(&tail);
        let peak = decode_all(&bytes);
        prop_assert!(peak <= bound(), "peak {peak} for len {len}");
    }

    #[test]
    #[ignore = "run in a child process by decoders_never_panic_abort_or_overallocate"]
    fn child_whole_frames_into_a_server(
        mangle_at in 0usize..96,
        mangle_to in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        header_len in prop_oneof![Just(None), Just(Some(u32::MAX)), (0u32..200).prop_map(Some)],
    ) {
        thread_local! {
            static TARGET: (Context, Exports<Small>, context_proxy::ObjectId) = {
                let ctx = Context::new("fuzz");
                let h = ctx.enter(|cx| cx.adopt(Sampler)).expect("enter").expect("adopt");
                let b = ctx.enter(|cx| cx.adopt(context_proxy::Buffer::<u8>::zeroed(16))).expect("enter").expect("adopt");
                let mut ex = Exports::new();
                let id = ex.export::<SampleService, Sampler>(h);
                ex.export::<BufferService<u8>, context_proxy::Buffer<u8>>(b);
                (ctx, ex, id)
            };
        }
        TARGET.with(|(ctx, ex, id)| {
            // A valid frame, then damaged: one byte changed, the body replaced, the length forged.
            let mut f = Vec::new();
            let req = SampleRequest::Small { n: 1, tag: "sixteen-byte-tag" };
            frame::encode::<Small, _>(&mut f, FrameKind::Request, <SampleService as context_proxy::Service>::ID, *id, &req)
                .expect("encode");
            f.truncate(frame::HEADER_LEN);
            f.extend_from_slice(&body);
            let n = f.len();
            if let Some(l) = header_len { f[4..8].copy_from_slice(&l.to_le_bytes()); }
            if mangle_at < n { f[mangle_at] = mangle_to; }
            let mut reply = Vec::new();
            let (r, peak) = peak_during(|| ctx.enter(|cx| ex.serve(cx, &f, &mut reply)));
            prop_assert!(r.is_ok(), "serving must not panic: {r:?}");
            prop_assert!(peak <= bound(), "peak {peak}");
            let (h, _) = frame::parse(&reply, LIMIT).expect("the server always answers with a valid frame");
            prop_assert!(matches!(h.kind, FrameKind::Reply | FrameKind::Error));
            Ok(())
        })?;
    }
}

/// Allocations made by the calling thread while running `f`.
fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = COUNT.with(Cell::get);
    f();
    COUNT.with(Cell::get) - before
}

#[test]
fn warm_small_calls_allocate_nothing() {
    let ctx = Context::new("warm");
    let p: context_proxy::Proxy<SampleService> =
        context_proxy::Proxy::adopt(&ctx, Sampler).expect("adopt");
    let moving = p
        .clone()
        .with_mode(context_proxy::Mode::Move)
        .expect("move");
    let post: context_proxy::Proxy<SampleService, Postcard> =
        context_proxy::Proxy::new(&ctx, p.handle::<Sampler>().expect("handle")).expect("proxy");
    let outer = Context::new("outer");
    // Warm up: the first call fills the thread's buffer pool.
    p.small(1, "sixteen-byte-tag").expect("call");
    post.small(1, "sixteen-byte-tag").expect("call");
    let n = allocations_during(|| {
        for i in 0..1000 {
            assert_eq!(p.small(i, "sixteen-byte-tag").expect("call"), i);
            assert_eq!(moving.small(i, "sixteen-byte-tag").expect("call"), i);
            assert_eq!(post.small(i, "sixteen-byte-tag").expect("call"), i);
            assert_eq!(p.bytes(&[1, 2, 3]).expect("call"), 3);
        }
    });
    assert_eq!(n, 0, "allocations on the hot path");
    // From inside another context (release, enter, re-enter) too.
    let p2 = p.clone();
    outer
        .enter(move |_| p2.small(0, "warm-up"))
        .expect("enter")
        .expect("call");
    let n = outer.enter(|_| {
        allocations_during(|| {
            for i in 0..1000 {
                p.small(i, "sixteen-byte-tag").expect("call");
            }
        })
    });
    assert_eq!(n.expect("enter"), 0, "allocations on the nested hot path");
}

/// Runs the ignored `child_*` properties in a child process with a watchdog.
#[test]
fn decoders_never_panic_abort_or_overallocate() {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args(["--ignored", "--test-threads=1", "child_"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the test binary");
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("decoder properties did not finish within 240 s (hang?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "child failed ({status}; a signal means it aborted):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("3 passed"),
        "the child must run all three properties:\n{stdout}"
    );
}
