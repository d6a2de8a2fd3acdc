//! The cheat path: plain buffers copied directly between contexts, and its serialized twin.

use context_core::{Context, Handle};
use context_proxy::{Bincode, Buffer, BufferService, CallError, Proxy, copy, copy_plain};

#[test]
fn copy_between_contexts_and_within_one() -> anyhow::Result<()> {
    let (a, b) = (Context::new("a"), Context::new("b"));
    let src: Proxy<BufferService<u32>> =
        Proxy::adopt(&a, Buffer::from((0..100u32).collect::<Vec<_>>()))?;
    let dst: Proxy<BufferService<u32>> = Proxy::adopt(&b, vec![0u32; 50])?;
    copy(&src, 10..20, &dst, 5)?;
    let got = dst.read(0..50)?;
    assert_eq!(&got[5..15], &(10..20).collect::<Vec<_>>()[..]);
    assert!(got[..5].iter().chain(&got[15..]).all(|&x| x == 0));

    // Out of range on either side: an error, nothing written.
    assert!(matches!(
        copy(&src, 90..110, &dst, 0),
        Err(CallError::OutOfRange { .. })
    ));
    assert!(matches!(
        copy(&src, 0..10, &dst, 45),
        Err(CallError::OutOfRange { .. })
    ));
    assert!(matches!(
        copy(&src, 0..10, &dst, usize::MAX),
        Err(CallError::OutOfRange { .. })
    ));
    assert_eq!(dst.read(0..50)?, got);

    // Within one buffer (overlapping ranges), and between two buffers of one context.
    copy(&src, 0..50, &src, 1)?;
    assert_eq!(src.read(0..4)?, [0, 0, 1, 2]);
    let other: Proxy<BufferService<u32>> = Proxy::adopt(&a, Box::<[u32]>::from(vec![7u32; 4]))?;
    copy(&other, 0..4, &src, 0)?;
    assert_eq!(src.read(0..5)?, [7, 7, 7, 7, 3]);

    // Caller inside a third context: it is released and re-entered as usual.
    let c = Context::new("c");
    let (s2, d2) = (src.clone(), dst.clone());
    c.enter(move |_| copy(&s2, 0..2, &d2, 0))??;
    assert_eq!(dst.read(0..2)?, [7, 7]);

    // Direct reads and writes from the caller's memory.
    let mut out = [0u32; 3];
    src.read_into(4, &mut out)?;
    assert_eq!(out, [3, 4, 5]);
    dst.write_from(47, &[1, 2, 3])?;
    assert_eq!(dst.read(47..50)?, [1, 2, 3]);
    assert!(matches!(
        dst.write_from(48, &[1, 2, 3]),
        Err(CallError::OutOfRange { .. })
    ));
    assert!(matches!(
        dst.read(40..60),
        Err(CallError::OutOfRange { .. })
    ));
    assert_eq!(dst.len()?, 50);
    Ok(())
}

#[test]
fn cheat_path_errors() -> anyhow::Result<()> {
    let (a, b) = (Context::new("a"), Context::new("b"));
    let src: Proxy<BufferService<u8>> = Proxy::adopt(&a, Buffer::<u8>::zeroed(16))?;
    let dst: Proxy<BufferService<u8>> = Proxy::adopt(&b, Buffer::<u8>::zeroed(16))?;

    // Element sizes must agree for copy_plain.
    let wide: Proxy<BufferService<u64>> = Proxy::adopt(&b, Buffer::<u64>::zeroed(2))?;
    assert!(matches!(
        copy_plain(&src, 0..8, &wide, 0),
        Err(CallError::Unsupported(_))
    ));

    // A removed buffer, a closed context.
    let h: Handle<Buffer<u8>> = dst.handle().expect("handle");
    b.enter(|cx| cx.remove(h))??;
    assert!(matches!(
        copy(&src, 0..4, &dst, 0),
        Err(CallError::Removed(_))
    ));
    let live: Proxy<BufferService<u8>> = Proxy::adopt(&b, Buffer::<u8>::zeroed(16))?;
    a.close()?;
    assert!(matches!(
        copy(&src, 0..4, &live, 0),
        Err(CallError::Closed(_))
    ));

    // A pinned context from another thread: the cheat path refuses; the serialized path works.
    let p = Context::pinned("p")?;
    let pinned: Proxy<BufferService<u8>> = Proxy::adopt(&p, Buffer::<u8>::zeroed(4))?;
    let free: Proxy<BufferService<u8>> =
        Proxy::adopt(&Context::new("f"), Buffer::from(vec![9u8; 4]))?;
    assert!(matches!(
        copy(&free, 0..4, &pinned, 0),
        Err(CallError::Enter(_))
    ));
    pinned.write(0, &free.read(0..4)?)?;
    assert_eq!(pinned.read(0..4)?, [9; 4]);
    Ok(())
}

#[test]
fn serialized_copy_of_a_large_buffer_needs_a_large_limit() -> anyhow::Result<()> {
    type Big = Bincode<{ 64 << 20 }>;
    let (a, b) = (Context::new("a"), Context::new("b"));
    let n = 20 << 20;
    let src: Proxy<BufferService<u8>, Big> = Proxy::adopt(&a, Buffer::from(vec![3u8; n]))?;
    let dst: Proxy<BufferService<u8>, Big> = Proxy::adopt(&b, Buffer::<u8>::zeroed(n))?;
    dst.write(0, &src.read(0..n)?)?;
    let mut probe = [0u8; 2];
    dst.read_into(n - 2, &mut probe)?;
    assert_eq!(probe, [3, 3]);

    // The default 16 MiB limit refuses it with a typed error, at the target (reply too large).
    let small: Proxy<BufferService<u8>> =
        Proxy::new(&a, src.handle::<Buffer<u8>>().expect("handle"))?;
    assert!(matches!(
        small.read(0..n),
        Err(CallError::Frame(_) | CallError::Codec(_))
    ));
    assert!(matches!(
        small.write(0, &vec![0u8; n]),
        Err(CallError::Frame(_) | CallError::Codec(_))
    ));
    Ok(())
}

/// Zero-sized elements: no bytes travel, the lengths still come out right.
#[test]
fn zero_sized_elements_read_as_many_as_asked() -> anyhow::Result<()> {
    let a = Context::new("a");
    let z: Proxy<BufferService<()>> = Proxy::adopt(&a, Buffer::<()>::zeroed(4))?;
    assert_eq!(z.len()?, 4);
    assert_eq!(z.read(0..2)?, vec![(); 2]);
    assert_eq!(z.read(1..4)?.len(), 3);
    assert!(matches!(
        z.read(2..9),
        Err(CallError::OutOfRange { len: 4, .. })
    ));
    Ok(())
}
