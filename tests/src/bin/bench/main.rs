//! `cargo xtask bench [--quick]` runs this (release build, as root): the
//! per-packet cost of every packet class under BPF_PROG_TEST_RUN against a
//! no-op XDP program, its scaling from 10 to 2M rules, list load and swap
//! times, kernel memory per rule, the real daemon's memory, and the same DNS
//! traffic through a veth router filtered by blokir, by iptables string
//! rules, and not at all.
//!
//! ```text
//! bench [--quick] [--out DIR] [--blokir PATH] [--no-veth]
//! ```
//!
//! Writes DIR/REPORT.md, DIR/summary.json and DIR/cost.png (DIR defaults to
//! bench/results). See REPORT.md for the method.

mod micro;
mod names;
mod packets;
mod report;
mod veth;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, bail};

pub struct Args {
    pub quick: bool,
    pub out: PathBuf,
    pub blokir: Option<PathBuf>,
    pub veth: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args { quick: false, out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results"), blokir: None, veth: true };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next().context("--out needs a directory")?.into(),
            "--blokir" => a.blokir = Some(it.next().context("--blokir needs a path")?.into()),
            "--no-veth" => a.veth = false,
            "-h" | "--help" => {
                println!("usage: bench [--quick] [--out DIR] [--blokir PATH] [--no-veth]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: bench [--quick] [--out DIR] [--blokir PATH] [--no-veth])"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let (counts, samples) = if args.quick { (vec![10, 10_000, 100_000, 200_000], 2_000) } else { (vec![10, 10_000, 1_000_000, 2_000_000], 20_000) };
    let max = *counts.iter().max().expect("counts");
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let tmp = tempfile::Builder::new().prefix("blokir-bench-").tempdir()?;

    let t = Instant::now();
    let list = names::List::generate(max, 2026);
    let index = list.index();
    eprintln!("bench: generated {max} names in {:.1} s", t.elapsed().as_secs_f64());

    let micro = micro::run(&list, &index, &micro::Params { counts: counts.clone(), samples, dir: tmp.path().to_path_buf() })?;

    let veth = if args.veth {
        let blokir = match &args.blokir {
            Some(p) => p.clone(),
            None => blokir_tests::blokir_bin()?,
        };
        Some(veth::run(&list, &index, &veth::Params { quick: args.quick, blokir, dir: tmp.path().to_path_buf(), max_rules: max })?)
    } else {
        None
    };
    let elapsed = started.elapsed().as_secs_f64();
    report::write(&args, &micro, veth.as_ref(), &counts, samples, elapsed)?;
    eprintln!("bench: done in {elapsed:.0} s; see {}", args.out.join("REPORT.md").display());
    Ok(())
}
