//! The design note's own use case, made concrete: several instances of a real interpreter that is
//! not thread-safe (Lua, through mlua's vendored build), each in its own pinned context, called
//! through proxies from many threads, timed against the same work on one interpreter behind one
//! lock (one context for everybody, i.e. one GIL).
//!
//! ```text
//! cargo run --release -p integration-tests --example lua_interpreters [calls-per-thread]
//! ```
//!
//! `mlua::Lua` is not `Send` (built without mlua's `send` feature), so it cannot even be moved to
//! another thread: the pinned context creates it on its home thread and runs every call there.

use std::time::Instant;

use context_core::Context;
use context_proxy::{Proxy, service};

/// What a caller may ask of an interpreter.
#[service]
pub trait Interpreter {
    /// Runs `fib(n)` in Lua and returns the result.
    fn fib(&mut self, n: u32) -> Result<u64, String>;
    /// Evaluates a Lua expression that yields a number.
    fn eval(&mut self, expr: &str) -> Result<f64, String>;
}

/// One Lua state with a recursive Fibonacci defined in Lua.
struct Lua(mlua::Lua);

impl Lua {
    fn new() -> Result<Self, String> {
        let lua = mlua::Lua::new();
        lua.load("function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end")
            .exec()
            .map_err(|e| e.to_string())?;
        Ok(Self(lua))
    }
}

impl Interpreter for Lua {
    fn fib(&mut self, n: u32) -> Result<u64, String> {
        let f: mlua::Function = self.0.globals().get("fib").map_err(|e| e.to_string())?;
        f.call::<u64>(n).map_err(|e| e.to_string())
    }

    fn eval(&mut self, expr: &str) -> Result<f64, String> {
        self.0.load(expr).eval::<f64>().map_err(|e| e.to_string())
    }
}

/// `threads` threads each make `calls` calls of `fib(n)`, thread `t` using interpreter `t % len`.
fn run(
    proxies: &[Proxy<InterpreterService>],
    threads: usize,
    calls: usize,
    n: u32,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let p = proxies[t % proxies.len()].clone();
                s.spawn(move || -> anyhow::Result<u64> {
                    let mut sum = 0;
                    for _ in 0..calls {
                        sum += p.fib(n)?.map_err(anyhow::Error::msg)?;
                    }
                    Ok(sum)
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("caller thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(t0.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let threads = cores * 2;
    let n = 20;

    // One interpreter per core, each in its own pinned context (its own GIL).
    let contexts: Vec<Context> = (0..cores)
        .map(|i| Context::pinned(&format!("lua-{i}")))
        .collect::<Result<_, _>>()?;
    let mut independent = Vec::new();
    for c in &contexts {
        let p: Proxy<InterpreterService> =
            Proxy::adopt_local(c, || Lua::new().expect("Lua state"))?;
        independent.push(p);
    }
    // The baseline: one interpreter that every thread shares, behind one lock.
    let shared_ctx = Context::pinned("lua-shared")?;
    let shared: Proxy<InterpreterService> =
        Proxy::adopt_local(&shared_ctx, || Lua::new().expect("Lua state"))?;

    // Same answers from every interpreter, and errors come back as values.
    assert_eq!(independent[0].fib(20)?, Ok(6765));
    assert_eq!(shared.eval("2 ^ 10")?, Ok(1024.0));
    assert!(independent[0].eval("nil + 1")?.is_err());

    // Warm up, then time both layouts with the same threads and the same calls.
    run(&independent, threads, 5, n)?;
    run(std::slice::from_ref(&shared), threads, 5, n)?;
    let one_lock = run(std::slice::from_ref(&shared), threads, calls, n)?;
    let many = run(&independent, threads, calls, n)?;

    let total = threads * calls;
    println!("{threads} threads x {calls} calls of Lua fib({n}) = {total} calls");
    println!(
        "  one interpreter behind one lock : {:>8.1} ms  ({:.0} calls/s)",
        one_lock * 1e3,
        total as f64 / one_lock
    );
    println!(
        "  {cores} interpreters, own contexts  : {:>8.1} ms  ({:.0} calls/s)",
        many * 1e3,
        total as f64 / many
    );
    println!("  speedup: {:.2}x on {cores} cores", one_lock / many);
    Ok(())
}
