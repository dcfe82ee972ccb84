//! Splitting large slices over threads, on block boundaries.
//!
//! Scoped std threads rather than a pool crate: a kernel call on a slice
//! large enough to split takes milliseconds, so a thread spawn (tens of
//! microseconds) is noise, and nothing lingers between calls to compete with
//! the server's network tasks. The thread count defaults to half the CPUs
//! (at least 1), leaving the rest to TLS; `WARDEN_KERNEL_THREADS` or
//! [`set_threads`] override it.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::grad::BLOCK;

/// Below this many elements a slice is never split.
pub const MIN_PER_THREAD: usize = 1 << 18;

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads kernels use for large slices.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = std::env::var("WARDEN_KERNEL_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)));
            THREADS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// Sets the thread count (at least 1).
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// Calls `f(part_a, part_b, part_c, offset)` on matching chunks of up to
/// three slices (`b` and `c` may be empty), in parallel when large.
pub(crate) fn split3<F>(threads: usize, a: &mut [f32], b: &mut [f32], c: &mut [f32], f: F)
where
    F: Fn(&mut [f32], &mut [f32], &mut [f32], usize) + Sync,
{
    let n = a.len();
    let parts = threads.max(1).min(n / MIN_PER_THREAD).max(1);
    if parts == 1 {
        return f(a, b, c, 0);
    }
    let chunk = n.div_ceil(parts).div_ceil(BLOCK) * BLOCK;
    std::thread::scope(|scope| {
        let (mut a, mut b, mut c) = (a, b, c);
        let mut offset = 0;
        let mut handles = Vec::new();
        while !a.is_empty() {
            let take = chunk.min(a.len());
            let (a0, a1) = a.split_at_mut(take);
            let (b0, b1) = if b.is_empty() { (&mut [][..], b) } else { b.split_at_mut(take) };
            let (c0, c1) = if c.is_empty() { (&mut [][..], c) } else { c.split_at_mut(take) };
            (a, b, c) = (a1, b1, c1);
            let f = &f;
            if a.is_empty() {
                // The last chunk runs on the calling thread.
                f(a0, b0, c0, offset);
            } else {
                handles.push(scope.spawn(move || f(a0, b0, c0, offset)));
            }
            offset += take;
        }
        for h in handles {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}
