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
use std::collections::BTreeMap;
use std::io::Read;
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
        (u64, &str),
        // Zero-sized elements read no bytes: only the bounded wrapper stops a claimed length of
        // 2^64 from looping (a hang the parent's watchdog reports).
        Vec<()>,
        BTreeMap<(), ()>,
        (u8, Vec<()>),
        Option<Vec<Vec<()>>>
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
        // 0: the object the body is for; 1: the other object, under the body's service;
        // 2: the body's object, under the other service.
        target in prop_oneof![6 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)],
        req in valid_body(),
        body in prop_oneof![
            // Mostly a valid request body, then damaged (below), so that decoding gets far into it.
            4 => Just(None),
            1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Some),
        ],
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
        cut in proptest::option::weighted(0.2, any::<proptest::sample::Index>()),
        extra in proptest::option::weighted(0.25, proptest::collection::vec(any::<u8>(), 1..8)),
        header_len in prop_oneof![
            // The header's length is the body's: the server gets to decode the body.
            8 => Just(None),
            1 => Just(Some(u32::MAX)),
            1 => (0u32..200).prop_map(Some),
        ],
        header_edit in proptest::option::weighted(0.1, (0..frame::HEADER_LEN, any::<u8>())),
    ) {
        thread_local! {
            static TARGET: (Context, Exports<Small>, [context_proxy::ObjectId; 2]) = {
                let ctx = Context::new("fuzz");
                let h = ctx.enter(|cx| cx.adopt(Sampler)).expect("enter").expect("adopt");
                let b = ctx.enter(|cx| cx.adopt(context_proxy::Buffer::<u8>::zeroed(16))).expect("enter").expect("adopt");
                let mut ex = Exports::new();
                let id = ex.export::<SampleService, Sampler>(h);
                let bid = ex.export::<BufferService<u8>, context_proxy::Buffer<u8>>(b);
                (ctx, ex, [id, bid])
            };
        }
        TARGET.with(|(ctx, ex, ids)| {
            // A valid frame for one of the objects (or the wrong one), then damaged: body bytes
            // changed, cut or extended, the body replaced, the length forged, a header byte changed.
            let sample = <SampleService as context_proxy::Service>::ID;
            let buffer = <BufferService<u8> as context_proxy::Service>::ID;
            let (own, other) = match &req {
                ValidBody::Sample(_) => ((sample, ids[0]), (buffer, ids[1])),
                ValidBody::Buffer(_) => ((buffer, ids[1]), (sample, ids[0])),
            };
            let (service, object) = [own, (own.0, other.1), (other.0, own.1)][target];
            let mut f = Vec::new();
            match &req {
                ValidBody::Sample(r) => frame::encode::<Small, _>(&mut f, FrameKind::Request, service, object, &r.as_request()),
                ValidBody::Buffer(r) => frame::encode::<Small, _>(&mut f, FrameKind::Request, service, object, &r.as_request()),
            }
            .expect("encode");
            let valid_len = f.len() - frame::HEADER_LEN;
            let mut damaged = false;
            if let Some(b) = &body {
                f.truncate(frame::HEADER_LEN);
                f.extend_from_slice(b);
                damaged = true;
            }
            let n = f.len() - frame::HEADER_LEN;
            for (at, to) in &edits {
                if n > 0 {
                    let i = frame::HEADER_LEN + at.index(n);
                    damaged |= f[i] != *to;
                    f[i] = *to;
                }
            }
            if let Some(c) = cut {
                f.truncate(frame::HEADER_LEN + c.index(n + 1));
            }
            f.extend_from_slice(extra.as_deref().unwrap_or_default());
            damaged |= f.len() - frame::HEADER_LEN != valid_len;
            let body_len = u32::try_from(f.len() - frame::HEADER_LEN).expect("small");
            let forged = header_len.is_some_and(|l| l != body_len);
            f[4..8].copy_from_slice(&header_len.unwrap_or(body_len).to_le_bytes());
            if let Some((at, to)) = header_edit {
                damaged |= f[at] != to;
                f[at] = to;
            }
            let mut reply = Vec::new();
            let (r, peak) = peak_during(|| ctx.enter(|cx| ex.serve(cx, &f, &mut reply)));
            prop_assert!(r.is_ok(), "serving must not panic: {r:?}");
            prop_assert!(peak <= bound(), "peak {peak}");
            let (h, _) = frame::parse(&reply, LIMIT).expect("the server always answers with a valid frame");
            prop_assert!(matches!(h.kind, FrameKind::Reply | FrameKind::Error));
            if !damaged && !forged && target == 0 {
                // Undamaged: the server decoded the body and called the method.
                prop_assert_eq!(h.kind, FrameKind::Reply, "a valid request failed: {:?}", req);
            }
            Ok(())
        })?;
    }
}

/// An owned request, to encode as a valid body.
#[derive(Debug, Clone)]
enum SampleReq {
    Small(u64, String),
    Owned(String, Vec<u64>, Vec<Vec<u8>>, Option<(u8, i128)>),
    Bytes(Vec<u8>),
}

impl SampleReq {
    fn as_request(&self) -> SampleRequest<'_> {
        match self {
            Self::Small(n, tag) => SampleRequest::Small { n: *n, tag },
            Self::Owned(s, v, nested, o) => SampleRequest::Owned {
                s: s.clone(),
                v: v.clone(),
                nested: nested.clone(),
                o: *o,
            },
            Self::Bytes(b) => SampleRequest::Bytes { b },
        }
    }
}

/// An owned buffer request.
#[derive(Debug, Clone)]
enum BufferReq {
    Len,
    Read(u64, u64),
    Write(u64, Vec<u8>),
}

impl BufferReq {
    fn as_request(&self) -> BufferRequest<'_> {
        match self {
            Self::Len => BufferRequest::Len,
            Self::Read(start, end) => BufferRequest::Read {
                start: *start,
                end: *end,
            },
            Self::Write(start, bytes) => BufferRequest::Write {
                start: *start,
                bytes,
            },
        }
    }
}

#[derive(Debug, Clone)]
enum ValidBody {
    Sample(SampleReq),
    Buffer(BufferReq),
}

/// Well-formed request bodies for both exported services (the buffer holds 16 bytes: in-range and
/// out-of-range requests are both answered with a reply).
fn valid_body() -> impl Strategy<Value = ValidBody> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..24);
    let sample = prop_oneof![
        (any::<u64>(), "[a-z]{0,20}").prop_map(|(n, t)| SampleReq::Small(n, t)),
        (
            "[a-z]{0,12}",
            proptest::collection::vec(any::<u64>(), 0..4),
            proptest::collection::vec(bytes(), 0..3),
            any::<Option<(u8, i128)>>(),
        )
            .prop_map(|(s, v, n, o)| SampleReq::Owned(s, v, n, o)),
        bytes().prop_map(SampleReq::Bytes),
    ];
    let buffer = prop_oneof![
        Just(BufferReq::Len),
        (0u64..20, 0u64..20).prop_map(|(a, b)| BufferReq::Read(a, b)),
        (0u64..20, bytes()).prop_map(|(a, b)| BufferReq::Write(a, b)),
    ];
    prop_oneof![
        2 => sample.prop_map(ValidBody::Sample),
        1 => buffer.prop_map(ValidBody::Buffer),
    ]
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

/// Reads `r` to its end on a thread of its own.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// The last `n` bytes of `s` (a shrinking property can print megabytes).
fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
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
    // Read both pipes while the child runs: a failing property prints on every shrink step, and
    // a child blocked on a full pipe would look like a hang (and its output would be lost).
    let out_reader = drain(child.stdout.take().expect("stdout"));
    let err_reader = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut hung = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            hung = true;
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The child has exited, so both pipes reach end of file.
    let stdout = String::from_utf8_lossy(&out_reader.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
    assert!(
        !hung,
        "decoder properties did not finish within 240 s (hang?):\n{}\n{}",
        tail(&stdout, 16 << 10),
        tail(&stderr, 16 << 10)
    );
    assert!(
        status.success(),
        "child failed ({status}; a signal means it aborted):\n{}\n{}",
        tail(&stdout, 16 << 10),
        tail(&stderr, 16 << 10)
    );
    assert!(
        stdout.contains("3 passed"),
        "the child must run all three properties:\n{stdout}"
    );
}
