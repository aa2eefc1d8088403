//! Rules: how operators write them (`pattern`), rule files (`file`), the
//! engine that turns lists into kernel map entries (`engine`), and the local
//! list that `blokir rules add/del` edits and that is kept on disk (`store`),
//! and how much one update may take away from a list (`shrink`).

pub mod engine;
pub mod file;
pub mod first_look;
pub mod formats;
pub mod node_store;
pub mod pattern;
pub mod shrink;
pub mod store;
pub mod table;

pub use engine::{ChangeSummary, CheckResult, Engine, EngineError, Target};
pub use pattern::{Action, Rule, Scope};

/// The list that `blokir rules add/del` edit.
pub const LOCAL_LIST: &str = "local";
