//! Input quoted back in an error, bounded: a hostile list (a file, or a URL
//! whose server someone else controls) must not make its errors as large as
//! itself on stderr, in a socket reply or in `lists.json`.

/// A run of text without whitespace (a quoted name, label or word) keeps
/// this many characters.
const RUN_KEEP: usize = 48;
/// Runs longer than this are cut to `RUN_KEEP`.
const RUN_MAX: usize = 64;

/// `text` with every whitespace-free run longer than 64 characters cut to
/// 48 and its size noted, then the whole cut to `max` bytes (at a character
/// boundary) with what was left out noted.
pub fn shorten(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max + 64));
    let mut rest = text;
    while !rest.is_empty() {
        let run_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (run, after) = rest.split_at(run_end);
        if run.chars().count() > RUN_MAX {
            let keep = run.char_indices().nth(RUN_KEEP).map_or(run.len(), |(i, _)| i);
            out.push_str(&run[..keep]);
            out.push_str(&format!("…[{} bytes]", run.len()));
        } else {
            out.push_str(run);
        }
        let space_end = after.find(|c: char| !c.is_whitespace()).unwrap_or(after.len());
        out.push_str(&after[..space_end]);
        rest = &after[space_end..];
        if out.len() > max {
            break;
        }
    }
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let left = out.len() - cut;
        out.truncate(cut);
        out.push_str(&format!("… [{left} more bytes]"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn short_text_is_untouched() {
        let s = "list.rules:3: label \"é-x\" is longer than 63 bytes";
        assert_eq!(shorten(s, 512), s);
    }

    #[test]
    fn a_huge_run_keeps_its_head_and_size() {
        let label = "a".repeat(50_000_000);
        let s = shorten(&format!("f:1: label {label:?} is longer than 63 bytes"), 512);
        assert_eq!(s, format!("f:1: label \"{}…[50000002 bytes] is longer than 63 bytes", "a".repeat(47)));
    }

    #[test]
    fn many_runs_are_cut_as_a_whole_at_a_character_boundary() {
        let s = shorten(&"éé ".repeat(10_000), 101);
        assert!(s.len() <= 101 + 32 && s.ends_with("more bytes]"), "{s}");
        let multi = shorten(&"ж".repeat(100), 512);
        assert!(multi.starts_with(&"ж".repeat(48)) && multi.ends_with("…[200 bytes]"), "{multi}");
    }
}
