//! Which kernels run blokir, and the one line an operator reads when this
//! one does not: below the floor, or a verifier that refused a program.

use std::{fmt, path::PathBuf};

/// The oldest kernel whose verifier and features the programs are written
/// for (no `bpf_loop`, no kfuncs: see the README's verifier section).
pub const FLOOR: (u32, u32) = (5, 15);
/// The kernels `cargo xtask test` boots and runs the suites on.
pub const TESTED: &str = "6.1, 6.12 and 6.18";
/// The same, as `major.minor`.
pub const TESTED_VERSIONS: [(u32, u32); 3] = [(6, 1), (6, 12), (6, 18)];
/// `blokir run` and `blokir replay` exit with this code when the kernel
/// cannot run blokir.
pub const EXIT_UNSUPPORTED: u8 = 4;

/// Why this kernel cannot run blokir.
#[derive(Debug)]
pub enum Unsupported {
    /// The release is older than [`FLOOR`] (or unreadable).
    BelowFloor { kernel: String },
    /// The verifier refused `program`; its log is in `log` (None when it
    /// could not be written) and the syscall's error is `error`.
    Refused { kernel: String, program: String, error: String, log: Option<PathBuf> },
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let supported = format!("blokir supports Linux {}.{} and later (tested: {TESTED})", FLOOR.0, FLOOR.1);
        match self {
            Self::BelowFloor { kernel } => write!(f, "this kernel is Linux {kernel}: {supported}; nothing was loaded"),
            Self::Refused { kernel, program, error, log } => {
                write!(f, "Linux {kernel}'s verifier refused the XDP program {program} ({}; {error}): {supported}", feature(program))?;
                match log {
                    Some(path) => write!(f, "; the verifier's log is in {}", path.display()),
                    None => write!(f, "; the verifier's log could not be saved"),
                }
            }
        }
    }
}

impl std::error::Error for Unsupported {}

/// What each program does, as an operator would name the feature.
pub fn feature(program: &str) -> &'static str {
    match program {
        "blokir" => "packet parsing, the entry of every feature",
        "blokir_dns" => "DNS query names",
        "blokir_tls" => "TLS ClientHello server names",
        "blokir_http" => "HTTP Host names",
        "blokir_dns_tcp" => "DNS queries over TCP",
        "blokir_dns_tcp_read" => "DNS queries over TCP",
        "blokir_dns_tcp_question" => "DNS queries over TCP",
        "blokir_match" => "matching TLS, HTTP and DNS-over-TCP names with the rules",
        "blokir_reply" => "DNS answers and TCP resets",
        "blokir_rewrite" => "fake segments told by a rewritten copy of a TLS or HTTP name",
        _ => "an unnamed stage",
    }
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    // SAFETY: uname fills the zeroed struct it is given; release is then a
    // NUL-terminated string inside it.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "(unknown)".into();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
    }
}

/// `major.minor` of a release such as `6.1.0-57-amd64`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails on a kernel below the floor, before anything is loaded.
pub fn check_floor() -> Result<(), Unsupported> {
    let kernel = release();
    match version(&kernel) {
        Some(v) if v >= FLOOR => Ok(()),
        _ => Err(Unsupported::BelowFloor { kernel }),
    }
}

/// The refusal of `program`, its verifier log saved to a file of its own so
/// that the message stays one line.
pub fn refused(program: &str, error: &std::io::Error, verifier_log: &str) -> Unsupported {
    let path = std::env::temp_dir().join(format!("blokir-verifier-{program}.log"));
    let log = std::fs::write(&path, verifier_log).ok().map(|()| path);
    Unsupported::Refused { kernel: release(), program: program.into(), error: error.to_string(), log }
}

/// The [`Unsupported`] cause of an error, if it has one.
pub fn find(e: &anyhow::Error) -> Option<&Unsupported> {
    e.chain().find_map(|c| c.downcast_ref::<Unsupported>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(version("6.12.118+deb12-amd64"), Some((6, 12)));
        assert_eq!(version("5.15.0-126-generic"), Some((5, 15)));
        assert_eq!(version("2.6.78-fc"), Some((2, 6)));
        assert_eq!(version("garbage"), None);
        assert!(version("5.14.21").unwrap() < FLOOR && version("5.15.0").unwrap() >= FLOOR);
    }

    #[test]
    fn refusal_is_one_line_naming_kernel_program_feature_and_floor() {
        let log = "func#0 @0\n0: R1=ctx() R10=fp0\nback-edge from insn 495 to 496\n";
        let e = refused("blokir_dns", &std::io::Error::from_raw_os_error(libc::EINVAL), log);
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        for part in ["Linux ", "blokir_dns", "DNS query names", "5.15 and later", TESTED, "blokir-verifier-blokir_dns.log"] {
            assert!(line.contains(part), "{part:?} missing from {line}");
        }
        let Unsupported::Refused { log: Some(path), .. } = &e else { panic!("{e:?}") };
        assert_eq!(std::fs::read_to_string(path).unwrap(), log);
        let wrapped = anyhow::Error::new(e).context("loading");
        assert!(find(&wrapped).is_some());
    }
}
