//! `cvm`: the command line ([`cli`]), a thin layer over the `cvm` and `cvm-vmm` libraries,
//! and the benches (`bench`, `cvm bench`, with the default feature `bench`) from the top-level
//! `benches/`.

#[cfg(feature = "bench")]
#[path = "../benches/mod.rs"]
mod bench;
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
