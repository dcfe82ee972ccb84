//! The fused aggregate-and-update kernel, and plain sums.
//!
//! One pass over memory. When every gradient is in full precision (up to
//! eight), each element's gradients are summed as the update reads them,
//! every stream in flight at once. Otherwise, for each block of [`BLOCK`]
//! elements, the workers' gradients are decoded and summed into an
//! L1-resident buffer, then scaled, clipped and applied to the parameters
//! and optimizer state of that block. Both add in gradient order, so both
//! give the same bits. Large slices are split over threads on block
//! boundaries.

use crate::grad::{BLOCK, Grad, decode_block};
use crate::isa::{Isa, multiversion};
use crate::robust::{Combine, centered_block, combine_block};

/// Per-element gradient preprocessing shared by every update rule: the
/// summed gradient is scaled (1 / workers), clipped to `[-clip, clip]` when
/// `clip > 0` (MXNet's `clip_gradient`, elementwise so it shards cleanly),
/// and L2 weight decay added unless the rule decouples it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradPrep {
    /// Factor applied to the summed gradient.
    pub scale: f32,
    /// Elementwise clip bound; 0 disables.
    pub clip: f32,
    /// L2 weight decay coupled into the gradient.
    pub weight_decay: f32,
}

/// The update rule and its numbers for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `p -= lr * g`.
    Sgd,
    /// `v = mu * v + g; p -= lr * (nesterov ? g + mu * v : v)` (state1 = v).
    Momentum {
        /// Momentum coefficient.
        momentum: f32,
        /// Nesterov look-ahead.
        nesterov: bool,
    },
    /// Adam / AdamW with bias correction (state1 = m, state2 = v).
    Adam {
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator term.
        eps: f32,
        /// Decoupled weight decay (AdamW); 0 for Adam.
        decoupled_decay: f32,
        /// Update number from 1, for bias correction.
        t: u64,
    },
}

/// Everything one update needs besides the slices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// Learning rate in force.
    pub lr: f32,
    /// Gradient preprocessing.
    pub prep: GradPrep,
    /// The rule.
    pub rule: Rule,
}

/// Slots of optimizer state a rule needs (each as long as the parameters).
pub fn state_slots(rule: &Rule) -> usize {
    match rule {
        Rule::Sgd => 0,
        Rule::Momentum { .. } => 1,
        Rule::Adam { .. } => 2,
    }
}

#[inline(always)]
fn clip(g: f32, lo: f32, hi: f32) -> f32 {
    // Comparisons, not min/max, so a NaN gradient stays NaN.
    if g > hi {
        hi
    } else if g < lo {
        lo
    } else {
        g
    }
}

/// Where an update reads element `i`'s summed gradient: a block of sums
/// already made, or the workers' full-precision gradients themselves.
trait Summed {
    /// Panics unless element `n - 1` exists (lets the compiler drop the
    /// bounds checks of [`Summed::at`] below `n`).
    fn check(&self, n: usize);
    /// Element `i`'s summed gradient.
    fn at(&self, i: usize) -> f32;
}

impl Summed for [f32] {
    #[inline(always)]
    fn check(&self, n: usize) {
        assert!(self.len() >= n);
    }
    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        self[i]
    }
}

/// `M` full-precision gradients (little-endian bytes), summed left to
/// right as they are read: the same additions in the same order as
/// [`add_n`], so the same bits.
struct SumOf<'a, const M: usize>([&'a [[u8; 4]]; M]);

impl<const M: usize> Summed for SumOf<'_, M> {
    #[inline(always)]
    fn check(&self, n: usize) {
        for g in &self.0 {
            assert!(g.len() >= n);
        }
    }
    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        let mut s = f32::from_le_bytes(self.0[0][i]);
        for g in &self.0[1..] {
            s += f32::from_le_bytes(g[i]);
        }
        s
    }
}

#[inline(always)]
fn update_block<G: Summed + ?Sized>(p: &mut [f32], s1: &mut [f32], s2: &mut [f32], g: &G, u: &Update) {
    // Without clipping the comparisons are left out of the loop (they would
    // change nothing, NaN included): on one core the loop is that close to
    // its memory bound that they cost 5 to 10% of a pass beyond the caches.
    if u.prep.clip > 0.0 { update_rule::<true, G>(p, s1, s2, g, u) } else { update_rule::<false, G>(p, s1, s2, g, u) }
}

#[inline(always)]
fn update_rule<const CLIP: bool, G: Summed + ?Sized>(p: &mut [f32], s1: &mut [f32], s2: &mut [f32], g: &G, u: &Update) {
    let GradPrep { scale, clip: c, weight_decay: wd } = u.prep;
    let (lo, hi) = (-c, c);
    // The gradient of element i as the rule sees it.
    let grad = |i: usize, p: f32| {
        let x = g.at(i) * scale;
        (if CLIP { clip(x, lo, hi) } else { x }) + wd * p
    };
    let lr = u.lr;
    let n = p.len();
    g.check(n);
    match u.rule {
        Rule::Sgd => {
            for (i, p) in p.iter_mut().enumerate() {
                *p -= lr * grad(i, *p);
            }
        }
        Rule::Momentum { momentum, nesterov } => {
            let s1 = &mut s1[..n];
            if nesterov {
                for i in 0..n {
                    let g = grad(i, p[i]);
                    s1[i] = momentum * s1[i] + g;
                    p[i] -= lr * (g + momentum * s1[i]);
                }
            } else {
                for i in 0..n {
                    let g = grad(i, p[i]);
                    s1[i] = momentum * s1[i] + g;
                    p[i] -= lr * s1[i];
                }
            }
        }
        Rule::Adam { beta1, beta2, eps, decoupled_decay, t } => {
            let t = t.clamp(1, i32::MAX as u64) as i32;
            let step = lr * (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t));
            let decay = lr * decoupled_decay;
            let (s1, s2) = (&mut s1[..n], &mut s2[..n]);
            for i in 0..n {
                let g = grad(i, p[i]);
                s1[i] = beta1 * s1[i] + (1.0 - beta1) * g;
                s2[i] = beta2 * s2[i] + (1.0 - beta2) * g * g;
                p[i] -= step * s1[i] / (s2[i].sqrt() + eps) + decay * p[i];
            }
        }
    }
}

#[inline(always)]
fn sum_blocks(acc: &mut [f32], grads: &[Grad<'_>], start: usize) {
    if grads.is_empty() {
        acc.fill(0.0);
    }
    let end = start + acc.len();
    let mut k = 0;
    while k < grads.len() {
        // Full-precision gradients go up to four per pass: one pass reads
        // the streams at once (which the hardware prefetchers follow
        // together) and touches the L1 sum once instead of once per
        // gradient. The additions stay in gradient order, so the sum is
        // bit-identical to one pass per gradient.
        let group = f32_run(&grads[k..grads.len().min(k + 4)]);
        if group >= 2 {
            let g = |i: usize| f32_bytes(&grads[k + i.min(group - 1)], start, end);
            let streams = [g(0), g(1), g(2), g(3)];
            match group {
                2 => add_n::<2>(acc, &streams, k == 0),
                3 => add_n::<3>(acc, &streams, k == 0),
                _ => add_n::<4>(acc, &streams, k == 0),
            }
            k += group;
        } else {
            decode_block(acc, &grads[k].range(start, end), k == 0);
            k += 1;
        }
    }
}

/// How many of `grads`, from the first, are in full precision.
#[inline(always)]
fn f32_run(grads: &[Grad<'_>]) -> usize {
    grads.iter().take_while(|g| matches!(g, Grad::F32(_) | Grad::F32Le(_))).count()
}

/// The bytes of values `start..end` of a full-precision gradient.
#[inline(always)]
fn f32_bytes<'a>(g: &Grad<'a>, start: usize, end: usize) -> &'a [[u8; 4]] {
    match *g {
        Grad::F32(s) => bytemuck::cast_slice(&s[start..end]),
        Grad::F32Le(b) => b[start * 4..end * 4].as_chunks::<4>().0,
        _ => unreachable!("f32_run counts full-precision gradients only"),
    }
}

/// `acc (=|+=) g[0] + ... + g[M-1]`, added left to right.
#[inline(always)]
fn add_n<const M: usize>(acc: &mut [f32], g: &[&[[u8; 4]]; 4], overwrite: bool) {
    let n = acc.len();
    let g: [&[[u8; 4]]; M] = std::array::from_fn(|i| &g[i][..n]);
    let f = f32::from_le_bytes;
    if overwrite {
        for i in 0..n {
            let mut s = f(g[0][i]);
            for gj in &g[1..] {
                s += f(gj[i]);
            }
            acc[i] = s;
        }
    } else {
        for i in 0..n {
            let mut s = acc[i];
            for gj in &g {
                s += f(gj[i]);
            }
            acc[i] = s;
        }
    }
}

/// How a robust update combines each block's gradients.
struct Robust<'a> {
    combine: Combine,
    network: &'a [(usize, usize)],
}

/// The robust path of [`aggregate_update_body`]: each block's gradients
/// combined by [`combine_block`] (already an average: the update's scale
/// is not applied again), then the rule applied to that block.
#[inline(always)]
fn robust_update_body(
    p: &mut [f32],
    s1: &mut [f32],
    s2: &mut [f32],
    grads: &[Grad<'_>],
    offset: usize,
    u: &Update,
    r: &Robust<'_>,
) {
    let u = Update { prep: GradPrep { scale: 1.0, ..u.prep }, ..*u };
    let mut rows = ROWS.with(|s| s.take());
    rows.resize(BLOCK.min(p.len()) * grads.len(), 0.0);
    by_blocks(
        p,
        s1,
        s2,
        &u,
        #[inline(always)]
        |acc, start| combine_block(acc, &mut rows, grads, offset + start, r.combine, r.network),
    );
    ROWS.with(|s| s.set(rows));
}

#[inline(always)]
fn aggregate_update_body(
    p: &mut [f32],
    s1: &mut [f32],
    s2: &mut [f32],
    grads: &[Grad<'_>],
    offset: usize,
    u: &Update,
    robust: Option<&Robust<'_>>,
) {
    if let Some(r) = robust {
        return robust_update_body(p, s1, s2, grads, offset, u, r);
    }
    let n = p.len();
    // Up to eight gradients all in full precision are summed as the update
    // reads them: one pass with every stream in flight at once, and no
    // block buffer. Beyond the caches, on one core, this measured 0.8-0.95
    // of copy where summing a block and then updating it measured 0.7-0.8
    // (docs/benchmarks.md).
    if f32_run(grads) == grads.len() {
        let g = |k: usize| f32_bytes(&grads[k], offset, offset + n);
        match grads.len() {
            1 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 1, _>(g)), u),
            2 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 2, _>(g)), u),
            3 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 3, _>(g)), u),
            4 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 4, _>(g)), u),
            5 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 5, _>(g)), u),
            6 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 6, _>(g)), u),
            7 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 7, _>(g)), u),
            8 => return update_block(p, s1, s2, &SumOf(std::array::from_fn::<_, 8, _>(g)), u),
            _ => {}
        }
    }
    // The closures are inlined on purpose: only then is their code compiled
    // for the caller's instruction set (a closure does not inherit it).
    by_blocks(
        p,
        s1,
        s2,
        u,
        #[inline(always)]
        |acc, start| sum_blocks(acc, grads, offset + start),
    );
}

/// The update of `p` (and its state) block by block, each block's
/// gradient made by `fill(block, start)` into an L1-resident buffer first.
/// The buffer is written before it is read (`fill` overwrites), so it is
/// not zeroed: a fresh 16 KiB array per call would be, and at
/// cache-resident sizes that memset cost as much as the update itself.
#[inline(always)]
fn by_blocks(p: &mut [f32], s1: &mut [f32], s2: &mut [f32], u: &Update, mut fill: impl FnMut(&mut [f32], usize)) {
    let n = p.len();
    let mut acc = SCRATCH.with(|s| s.take());
    acc.resize(BLOCK.min(n), 0.0);
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let a = &mut acc[..len];
        fill(a, start);
        let end = start + len;
        let (b1, b2): (&mut [f32], &mut [f32]) = (
            if s1.is_empty() { &mut [] } else { &mut s1[start..end] },
            if s2.is_empty() { &mut [] } else { &mut s2[start..end] },
        );
        update_block(&mut p[start..end], b1, b2, &*a, u);
        start = end;
    }
    SCRATCH.with(|s| s.set(acc));
}

thread_local! {
    /// Each thread's block buffer for [`aggregate_update_body`], kept
    /// between calls.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Each thread's decoded rows for [`robust_update_body`].
    static ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

#[inline(always)]
fn sum_body(out: &mut [f32], grads: &[Grad<'_>], offset: usize) {
    let n = out.len();
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        sum_blocks(&mut out[start..start + len], grads, offset + start);
        start += len;
    }
}

multiversion!(fn aggregate_update_isa(p: &mut [f32], s1: &mut [f32], s2: &mut [f32], grads: &[Grad<'_>], offset: usize, u: &Update, robust: Option<&Robust<'_>>) => aggregate_update_body);
multiversion!(fn sum_isa(out: &mut [f32], grads: &[Grad<'_>], offset: usize) => sum_body);

/// `center` becomes the centered-clipping combination of the gradients'
/// values `offset..offset + center.len()`, block by block.
#[inline(always)]
fn centered_body(center: &mut [f32], grads: &[Grad<'_>], offset: usize, weights: &[f32]) {
    let n = center.len();
    let mut acc = SCRATCH.with(|s| s.take());
    let mut row = ROWS.with(|s| s.take());
    acc.resize(BLOCK.min(n), 0.0);
    row.resize(BLOCK.min(n), 0.0);
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let c = &mut center[start..start + len];
        centered_block(&mut acc[..len], &mut row, c, grads, offset + start, weights);
        c.copy_from_slice(&acc[..len]);
        start += len;
    }
    SCRATCH.with(|s| s.set(acc));
    ROWS.with(|s| s.set(row));
}

multiversion!(fn centered_isa(center: &mut [f32], grads: &[Grad<'_>], offset: usize, weights: &[f32]) => centered_body);

/// Centered clipping ([`crate::robust::centered_weights`]) and the update:
/// `center` (the previous step's combined gradient, zeros at the start)
/// becomes this step's, then `u` is applied with it as the gradient (its
/// `scale` unused: the combination is an average already). Two passes over
/// the gradients (their distances to the center, then the combination) and
/// one update pass.
///
/// # Panics
/// As [`aggregate_update_with`], and if `center` is not as long as `params`.
#[allow(clippy::too_many_arguments)]
pub fn centered_clip_update_with(
    isa: Isa,
    threads: usize,
    params: &mut [f32],
    state1: &mut [f32],
    state2: &mut [f32],
    center: &mut [f32],
    grads: &[Grad<'_>],
    u: Update,
    radius: f32,
) {
    let n = params.len();
    check(n, grads);
    assert_eq!(center.len(), n, "the center is as long as the parameters");
    let weights = crate::robust::centered_weights(grads, center, radius, threads);
    crate::parallel::split3(threads, center, &mut [], &mut [], |c, _, _, offset| {
        centered_isa(isa, c, grads, offset, &weights)
    });
    let u = Update { prep: GradPrep { scale: 1.0, ..u.prep }, ..u };
    aggregate_update_with(isa, threads, params, state1, state2, &[Grad::F32(center)], u);
}

fn check(n: usize, grads: &[Grad<'_>]) {
    for (k, g) in grads.iter().enumerate() {
        assert!(g.is_well_formed(), "gradient {k} is malformed");
        assert_eq!(g.len(), n, "gradient {k} has {} values, expected {n}", g.len());
    }
}

/// Sums the gradients, then scales, clips and applies `u` to `params` and
/// the optimizer state (`state1`, `state2`: empty or as long as `params`,
/// as [`state_slots`] says), in one pass, with the best instruction set and
/// the configured threads.
///
/// # Panics
/// If a gradient's length differs from the parameters' or a needed state
/// slot is missing.
pub fn aggregate_update(params: &mut [f32], state1: &mut [f32], state2: &mut [f32], grads: &[Grad<'_>], u: Update) {
    aggregate_update_with(Isa::best(), crate::parallel::threads(), params, state1, state2, grads, u)
}

/// [`aggregate_update`] on a chosen instruction set and thread count.
///
/// # Panics
/// As [`aggregate_update`], and if `isa` is not supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub fn aggregate_update_with(
    isa: Isa,
    threads: usize,
    params: &mut [f32],
    state1: &mut [f32],
    state2: &mut [f32],
    grads: &[Grad<'_>],
    u: Update,
) {
    combine_update_with(isa, threads, params, state1, state2, grads, u, Combine::Mean)
}

/// [`aggregate_update_with`] with the gradients combined by `combine`
/// instead of summed: for [`Combine::TrimmedMean`] and [`Combine::Median`]
/// the update's `scale` is not used (the combination is an average
/// already); clipping, decay and the rule apply as always.
///
/// # Panics
/// As [`aggregate_update_with`], and if `combine` does not admit this many
/// gradients ([`Combine::admits`]).
#[allow(clippy::too_many_arguments)]
pub fn combine_update_with(
    isa: Isa,
    threads: usize,
    params: &mut [f32],
    state1: &mut [f32],
    state2: &mut [f32],
    grads: &[Grad<'_>],
    u: Update,
    combine: Combine,
) {
    let n = params.len();
    check(n, grads);
    assert!(combine.admits(grads.len()), "{combine:?} needs more than {} gradients", grads.len());
    let network = match combine {
        Combine::Mean => Vec::new(),
        _ => crate::robust::sorting_network(grads.len()),
    };
    let robust = (combine != Combine::Mean).then_some(Robust { combine, network: &network });
    let slots = state_slots(&u.rule);
    assert!(slots < 1 || state1.len() == n, "this rule needs state1 as long as the parameters");
    assert!(slots < 2 || state2.len() == n, "this rule needs state2 as long as the parameters");
    let (state1, state2) =
        (if slots >= 1 { state1 } else { &mut [][..] }, if slots >= 2 { state2 } else { &mut [][..] });
    crate::parallel::split3(threads, params, state1, state2, |p, s1, s2, offset| {
        aggregate_update_isa(isa, p, s1, s2, grads, offset, &u, robust.as_ref())
    });
}

/// `out = sum of grads` (zeros when there are none).
///
/// # Panics
/// If a gradient's length differs from `out`'s.
pub fn sum(out: &mut [f32], grads: &[Grad<'_>]) {
    sum_with(Isa::best(), crate::parallel::threads(), out, grads)
}

/// [`sum`] on a chosen instruction set and thread count.
///
/// # Panics
/// As [`sum`], and if `isa` is not supported by this CPU.
pub fn sum_with(isa: Isa, threads: usize, out: &mut [f32], grads: &[Grad<'_>]) {
    check(out.len(), grads);
    crate::parallel::split3(threads, out, &mut [], &mut [], |o, _, _, offset| sum_isa(isa, o, grads, offset));
}
