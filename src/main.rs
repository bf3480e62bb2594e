//! `cvm`: the command line ([`cli`]), a thin layer over the `cvm` and `cvm-vmm` libraries,
//! and the benches ([`bench`], `cvm bench`) from the top-level `benches/`.

#[path = "../benches/mod.rs"]
mod bench;
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
