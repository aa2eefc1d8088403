//! Deterministic, realistic-looking domain names: a seeded generator, so
//! every run (and the integrator's re-run) loads the very same list.

use std::collections::HashSet;

use rand::{Rng, SeedableRng, rngs::StdRng};

const SYLLABLES: &[&str] = &[
    "ka", "ri", "to", "na", "me", "lo", "sa", "pe", "di", "ku", "ba", "ne", "mo", "ta", "li", "ra", "go", "vi", "ze", "ha", "ju", "ni", "so", "fa", "win",
    "bet", "play", "shop", "net", "web", "news", "game", "club", "star", "book", "film", "tube", "live", "cash", "slot", "deal", "link", "mail", "tor", "vpn",
    "proxy", "chat", "hub", "zone", "max", "pro", "top", "one", "24", "88", "99", "x", "id", "ru", "go",
];
/// Top-level domains with rough weights, as in national block lists
/// (gambling, piracy, proxies: heavy in .com and the cheap new TLDs).
const TLDS: &[(&str, u32)] = &[
    ("com", 45),
    ("net", 8),
    ("org", 5),
    ("id", 4),
    ("co.id", 3),
    ("ru", 4),
    ("info", 3),
    ("xyz", 3),
    ("io", 2),
    ("de", 2),
    ("co.uk", 2),
    ("com.br", 2),
    ("online", 2),
    ("top", 2),
    ("site", 2),
    ("club", 1),
    ("me", 1),
    ("tv", 1),
    ("cc", 1),
    ("to", 1),
    ("live", 1),
    ("asia", 1),
];
const SUBDOMAINS: &[&str] = &["www", "m", "cdn", "api", "img", "static", "mail", "app", "web", "dl"];

pub struct NameGen {
    rng: StdRng,
    tld_total: u32,
}

impl NameGen {
    pub fn new(seed: u64) -> Self {
        NameGen { rng: StdRng::seed_from_u64(seed), tld_total: TLDS.iter().map(|t| t.1).sum() }
    }

    /// A second-level label of 2-4 syllables, sometimes with a hyphen or
    /// digits.
    pub fn label(&mut self) -> String {
        let mut s = String::new();
        for i in 0..self.rng.random_range(2..=4) {
            if i > 0 && self.rng.random_ratio(1, 12) {
                s.push('-');
            }
            s.push_str(SYLLABLES[self.rng.random_range(0..SYLLABLES.len())]);
        }
        if self.rng.random_ratio(1, 6) {
            s.push_str(&self.rng.random_range(1..1000).to_string());
        }
        s
    }

    pub fn tld(&mut self) -> &'static str {
        let mut x = self.rng.random_range(0..self.tld_total);
        for (t, w) in TLDS {
            if x < *w {
                return t;
            }
            x -= w;
        }
        "com"
    }

    /// `label.tld`, and a quarter of the time a host below it.
    pub fn name(&mut self) -> String {
        let base = format!("{}.{}", self.label(), self.tld());
        if self.rng.random_ratio(1, 4) {
            let sub = if self.rng.random_bool(0.6) { SUBDOMAINS[self.rng.random_range(0..SUBDOMAINS.len())].to_string() } else { self.label() };
            format!("{sub}.{base}")
        } else {
            base
        }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// The list: `n` distinct names; rule `i` is exact (`name`) for i % 5 < 3
/// and a subtree rule (`.name`: the name and every name below it) otherwise,
/// so every prefix of the list has the same mix.
pub struct List {
    pub names: Vec<String>,
}

impl List {
    pub fn generate(n: usize, seed: u64) -> Self {
        let mut g = NameGen::new(seed);
        let mut seen = HashSet::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        while names.len() < n {
            let name = g.name();
            if seen.insert(name.clone()) {
                names.push(name);
            }
        }
        List { names }
    }

    pub fn is_subtree(i: usize) -> bool {
        i % 5 >= 3
    }

    pub fn rule(&self, i: usize) -> String {
        if Self::is_subtree(i) { format!(".{}", self.names[i]) } else { self.names[i].clone() }
    }

    /// The first `k` rules as a rule file.
    pub fn file_text(&self, k: usize) -> String {
        let mut s = String::with_capacity(k * 24);
        s.push_str("# blokir benchmark list (generated, seeded)\n");
        for i in 0..k {
            s.push_str(&self.rule(i));
            s.push('\n');
        }
        s
    }

    /// Whether the first `k` rules block `name`.
    pub fn blocks(&self, index: &ListIndex, k: usize, name: &str) -> bool {
        if index.exact.get(name).is_some_and(|&i| i < k) {
            return true;
        }
        let mut rest = name;
        loop {
            if index.subtree.get(rest).is_some_and(|&i| i < k) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, r)) => rest = r,
                None => return false,
            }
        }
    }

    pub fn index(&self) -> ListIndex {
        let mut exact = std::collections::HashMap::new();
        let mut subtree = std::collections::HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            if Self::is_subtree(i) {
                subtree.insert(n.clone(), i);
            } else {
                exact.insert(n.clone(), i);
            }
        }
        ListIndex { exact, subtree }
    }
}

/// Name -> rule index, for checking what a list blocks.
pub struct ListIndex {
    exact: std::collections::HashMap<String, usize>,
    subtree: std::collections::HashMap<String, usize>,
}

/// `count` names from `g` that no rule of the whole list blocks.
pub fn unlisted(g: &mut NameGen, list: &List, index: &ListIndex, count: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let n = g.name();
        if !list.blocks(index, list.names.len(), &n) {
            out.push(n);
        }
    }
    out
}
