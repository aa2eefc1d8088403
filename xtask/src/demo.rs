//! `cargo xtask demo`: filled in by the namespace demo.
pub fn run(_iface: Option<&str>) -> anyhow::Result<()> {
    anyhow::bail!("demo not written yet")
}
