//! Security randomness: only ever from the operating system's CSPRNG.
//!
//! Keys, job ids and nonces come from here. The training RNG (seeded, and
//! recorded for reproducibility) lives in [`crate::train::train_rng`] and must never
//! be used for anything secret; clippy's `disallowed-methods` keeps ad-hoc
//! generators such as `rand::rng()` out of the tree.

/// `N` bytes from the OS CSPRNG (getrandom(2)).
///
/// Panics only if the kernel cannot provide randomness at all, in which case
/// no secret can be made safely and stopping is the right outcome.
#[allow(clippy::disallowed_methods)] // the one place the OS CSPRNG is read
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the OS CSPRNG (getrandom) is unavailable");
    out
}

/// A random u64 from the OS CSPRNG, for example a training seed left unset.
pub fn u64() -> u64 {
    u64::from_le_bytes(bytes())
}
