//! `--max-shrink`: how much of a list one update may take away. An emptied
//! rule file, or a list server answering an empty or cut-off body, would
//! otherwise lift a whole list without anyone noticing; an update that
//! removes more than this share of the rules in force is refused (the last
//! good version stays) unless it is forced.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A share of a list's rules, in whole percent (0 to 100). 100 lets any
/// update through, emptying included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct MaxShrink(u8);

impl MaxShrink {
    pub const DEFAULT: MaxShrink = MaxShrink(50);

    pub fn percent(self) -> u8 {
        self.0
    }

    /// Refuses going from `in_force` rules to `new` if that removes more
    /// than this share of them.
    pub fn check(self, in_force: usize, new: usize) -> Result<(), Shrunk> {
        let removed = in_force.saturating_sub(new);
        // removed / in_force > percent / 100, without rounding.
        if (removed as u128) * 100 > u128::from(self.0) * in_force as u128 { Err(Shrunk { in_force, new, limit: self }) } else { Ok(()) }
    }
}

impl Default for MaxShrink {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for MaxShrink {
    type Error = String;
    fn try_from(p: u8) -> Result<Self, String> {
        if p <= 100 { Ok(MaxShrink(p)) } else { Err(format!("{p}%: a share is at most 100%")) }
    }
}

impl From<MaxShrink> for u8 {
    fn from(m: MaxShrink) -> u8 {
        m.0
    }
}

/// `50%` or `50`.
impl FromStr for MaxShrink {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_suffix('%').unwrap_or(s);
        match digits.parse::<u8>() {
            Ok(p) if p <= 100 => Ok(MaxShrink(p)),
            _ => Err(format!("{s:?} is not a share of a list: a percentage from 0% to 100%, e.g. 50%")),
        }
    }
}

impl fmt::Display for MaxShrink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// An update refused for taking away too much of its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the new version has {new} rules where {in_force} are in force: it would remove {}% of the list, more than --max-shrink {limit} allows (an emptied or cut-off source?); refused, the rules in force stay",
    removed_percent(*in_force, *new)
)]
pub struct Shrunk {
    pub in_force: usize,
    pub new: usize,
    pub limit: MaxShrink,
}

impl Shrunk {
    /// The refusal of list `list`'s update, saying how to force it.
    pub fn refusal(self, list: &str, force: &str) -> ShrinkRefused {
        ShrinkRefused { list: list.to_string(), shrunk: self, force: force.to_string() }
    }
}

/// A refused update, for the operator: the list, why, and the command that
/// puts the new version in force anyway.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("list {list}: {shrunk}; `{force}` puts it in force")]
pub struct ShrinkRefused {
    pub list: String,
    pub shrunk: Shrunk,
    pub force: String,
}

fn removed_percent(in_force: usize, new: usize) -> usize {
    (in_force.saturating_sub(new) as u128 * 100 / (in_force.max(1) as u128)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_with_or_without_a_percent_sign() {
        assert_eq!("50%".parse(), Ok(MaxShrink(50)));
        assert_eq!("0".parse(), Ok(MaxShrink(0)));
        assert_eq!("100%".parse(), Ok(MaxShrink(100)));
        for bad in ["101%", "-1", "", "%", "50 %", "0.5"] {
            assert!(bad.parse::<MaxShrink>().unwrap_err().contains("0% to 100%"), "{bad:?}");
        }
        assert_eq!(serde_json::to_string(&MaxShrink(30)).unwrap(), "30");
        assert!(serde_json::from_str::<MaxShrink>("120").is_err());
    }

    #[test]
    fn more_than_the_share_is_refused_exactly_the_share_is_not() {
        let half = MaxShrink::DEFAULT;
        assert_eq!(half.check(1000, 500), Ok(()));
        assert_eq!(half.check(1000, 499), Err(Shrunk { in_force: 1000, new: 499, limit: half }));
        assert!(half.check(1000, 0).is_err(), "emptied");
        assert_eq!(half.check(0, 0), Ok(()), "nothing in force: nothing to lose");
        assert_eq!(half.check(3, 1000), Ok(()), "growing");
        assert_eq!(MaxShrink(100).check(1000, 0), Ok(()));
        assert!(MaxShrink(0).check(1000, 999).is_err());
        assert_eq!(MaxShrink(0).check(1000, 1000), Ok(()));
        let e = half.check(2_000_000, 200_000).unwrap_err().to_string();
        assert!(e.contains("200000 rules where 2000000 are in force") && e.contains("remove 90% of the list") && e.contains("--max-shrink 50%"), "{e}");
    }
}
