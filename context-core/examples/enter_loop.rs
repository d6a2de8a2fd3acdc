//! Profiling aid: a tight loop of idle entries (for perf/callgrind), `cargo run --release --example enter_loop`.
fn main() {
    let b = context_core::Context::new("b");
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(50_000_000);
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(b.enter(|_| ()));
    }
    println!("{:.2} ns per enter", t0.elapsed().as_nanos() as f64 / n as f64);
}
