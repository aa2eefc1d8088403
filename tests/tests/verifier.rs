//! The object loads on this kernel, and the verifier's work stays well under
//! its limit.

use blokir_tests::Loaded;

/// The verifier gives up at 1M processed instructions; fail at half.
const BUDGET: u32 = 500_000;

#[test]
fn verifier_accepts_the_programs_within_half_its_budget() {
    let l = Loaded::new(&[]);
    for (name, n) in l.kernel.verified_instructions().unwrap() {
        let n = n.expect("kernel reports verified_insns (5.16+)");
        println!("verifier processed {n} instructions for {name} (budget {BUDGET})");
        assert!(n < BUDGET, "verifier processed {n} instructions for {name}, over the budget of {BUDGET}");
    }
}
