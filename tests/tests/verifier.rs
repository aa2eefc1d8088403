//! The object loads on this kernel, and the verifier's work stays well under
//! its limit.

use blokir_tests::Loaded;

/// The verifier gives up at 1M processed instructions; fail at half.
const BUDGET: u32 = 500_000;

#[test]
fn verifier_accepts_the_program_within_half_its_budget() {
    let mut l = Loaded::new(&[]);
    let n = l.kernel.verified_instructions().unwrap().expect("kernel reports verified_insns (5.16+)");
    println!("verifier processed {n} instructions (budget {BUDGET})");
    assert!(n < BUDGET, "verifier processed {n} instructions, over the budget of {BUDGET}");
}
