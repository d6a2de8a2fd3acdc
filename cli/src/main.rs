//! `ctx`: placeholder, replaced below.
fn main() {}
