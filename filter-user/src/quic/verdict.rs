//! What a name read from a QUIC hello gets: the TLS rules, as the kernel's
//! match stage applies them to a ClientHello over TCP (see `model::matched`):
//! a block rule blocks; one of an ECH-outer list blocks only a hello with
//! ECH, so it waits for the end of the hello if ECH was not seen yet.

use filter_common::name::Decision;
use filter_common::rules::RuleRef;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Block(RuleRef),
    /// An allow rule matched (counted as allowed), or no rule did.
    Pass(Option<RuleRef>),
    /// An ECH-outer rule matched a hello whose end (and ECH) is unread.
    WaitForEch(RuleRef),
}

/// `decision` for a hello with `ech` seen so far, `ended` or not;
/// `ech_outer` says whether a rule's list is an ECH-outer list.
pub fn verdict(decision: Decision, ech: bool, ended: bool, ech_outer: impl Fn(RuleRef) -> bool) -> Verdict {
    match decision {
        Decision::Block(rule) if ech_outer(rule) && !ech => {
            if ended {
                Verdict::Pass(None)
            } else {
                Verdict::WaitForEch(rule)
            }
        }
        Decision::Block(rule) => Verdict::Block(rule),
        Decision::Allow(rule) => Verdict::Pass(Some(rule)),
        Decision::NoMatch => Verdict::Pass(None),
    }
}
