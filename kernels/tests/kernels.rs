//! Every kernel on every instruction-set path this CPU can run, against a
//! float64 scalar reference. Paths the CPU cannot run are reported on
//! stderr (and fail the run when `WARDEN_REQUIRE_ISA` names them).

use half::{bf16, f16};
use warden_kernels::{Grad, GradPrep, Isa, Rule, Update, aggregate_update_with, convert, sum_with, twobit};

/// Lengths from the issue: empty, one, odd, cache-resident, large, and one
/// larger than the thread split (which starts at 2 x 2^18 elements).
const LENGTHS: [usize; 6] = [0, 1, 7, 1003, 1 << 20, (1 << 20) + 4099];

fn isas() -> Vec<Isa> {
    let required: Vec<String> = std::env::var("WARDEN_REQUIRE_ISA")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().to_lowercase())
        .collect();
    let mut run = Vec::new();
    for isa in Isa::ALL {
        if isa.supported() {
            run.push(isa);
        } else {
            eprintln!("NOT TESTED on this CPU: {isa:?} (not supported)");
            assert!(!required.contains(&format!("{isa:?}").to_lowercase()), "{isa:?} is required but unsupported");
        }
    }
    run
}

/// Deterministic test values with a spread of magnitudes and signs.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ((x % 20001) as f32 / 10000.0 - 1.0) * if x.is_multiple_of(7) { 30.0 } else { 1.0 }
        })
        .collect()
}

/// Within `rel` of `want`, measured against `mag` (the size of the terms
/// that made it, since f32 rounding scales with those, not the result).
fn close_to(got: f32, want: f64, rel: f64, mag: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if want.is_infinite() {
        return f64::from(got) == want;
    }
    (f64::from(got) - want).abs() <= rel * want.abs().max(mag).max(1e-3)
}

fn close(got: f32, want: f64, rel: f64) -> bool {
    close_to(got, want, rel, 1.0)
}

/// Encodings of a gradient, decoded back exactly (what the reference sums).
enum Enc {
    F32,
    F32Le,
    F16,
    /// Half precision at an even address: decoded in place, where the
    /// misaligned `F16` is decoded value by value.
    F16Aligned,
    Bf16,
    TwoBit(f32),
}

struct Encoded {
    bytes: Vec<u8>,
    floats: Vec<f32>,
    exact: Vec<f64>,
    enc: Enc,
}

impl Encoded {
    fn new(v: &[f32], enc: Enc) -> Encoded {
        // One leading byte: the payload is misaligned (two for F16Aligned).
        let mut bytes = if matches!(enc, Enc::F16Aligned) { vec![0xEE; 2] } else { vec![0xEE] };
        let exact: Vec<f64> = match enc {
            Enc::F32 | Enc::F32Le => {
                convert::extend_f32_le(&mut bytes, v);
                v.iter().map(|x| f64::from(*x)).collect()
            }
            Enc::F16 | Enc::F16Aligned => {
                convert::extend_f16_le(&mut bytes, v);
                v.iter().map(|x| f64::from(f16::from_f32(*x).to_f32())).collect()
            }
            Enc::Bf16 => {
                convert::extend_bf16_le(&mut bytes, v);
                v.iter().map(|x| f64::from(bf16::from_f32(*x).to_f32())).collect()
            }
            Enc::TwoBit(t) => {
                let mut residual = vec![0.0; v.len()];
                twobit::encode(v, &mut residual, t, &mut bytes);
                // With a zero residual: exactly +-t or 0 by the threshold rule.
                v.iter()
                    .map(|x| {
                        if *x >= t {
                            f64::from(t)
                        } else if *x <= -t {
                            -f64::from(t)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        };
        Encoded { bytes, floats: v.to_vec(), exact, enc }
    }

    fn grad(&self) -> Grad<'_> {
        let b = &self.bytes[if matches!(self.enc, Enc::F16Aligned) { 2 } else { 1 }..];
        match self.enc {
            Enc::F32 => Grad::F32(&self.floats),
            Enc::F32Le => Grad::F32Le(b),
            Enc::F16 | Enc::F16Aligned => Grad::F16Le(b),
            Enc::Bf16 => Grad::Bf16Le(b),
            Enc::TwoBit(threshold) => Grad::TwoBit { packed: b, len: self.floats.len(), threshold },
        }
    }
}

fn encodings(n: usize, k: u32) -> Vec<Encoded> {
    vec![
        Encoded::new(&values(n, k), Enc::F32),
        Encoded::new(&values(n, k + 10), Enc::F32Le),
        Encoded::new(&values(n, k + 20), Enc::F16),
        Encoded::new(&values(n, k + 25), Enc::F16Aligned),
        Encoded::new(&values(n, k + 30), Enc::Bf16),
        Encoded::new(&values(n, k + 40), Enc::TwoBit(0.5)),
    ]
}

fn reference_update(p: &mut [f64], s1: &mut [f64], s2: &mut [f64], g: &[f64], u: &Update) {
    let (scale, c, wd) = (f64::from(u.prep.scale), f64::from(u.prep.clip), f64::from(u.prep.weight_decay));
    let lr = f64::from(u.lr);
    for i in 0..p.len() {
        let mut gi = g[i] * scale;
        if c > 0.0 {
            gi = if gi > c {
                c
            } else if gi < -c {
                -c
            } else {
                gi
            };
        }
        gi += wd * p[i];
        match u.rule {
            Rule::Sgd => p[i] -= lr * gi,
            Rule::Momentum { momentum, nesterov } => {
                let mu = f64::from(momentum);
                s1[i] = mu * s1[i] + gi;
                p[i] -= lr * if nesterov { gi + mu * s1[i] } else { s1[i] };
            }
            Rule::Adam { beta1, beta2, eps, decoupled_decay, t } => {
                let (b1, b2) = (f64::from(beta1), f64::from(beta2));
                let step = lr * (1.0 - b2.powi(t as i32)).sqrt() / (1.0 - b1.powi(t as i32));
                s1[i] = b1 * s1[i] + (1.0 - b1) * gi;
                s2[i] = b2 * s2[i] + (1.0 - b2) * gi * gi;
                p[i] -= step * s1[i] / (s2[i].sqrt() + f64::from(eps)) + lr * f64::from(decoupled_decay) * p[i];
            }
        }
    }
}

/// The updates tried on `len` values from `workers` gradients: every rule
/// (only one on large sizes, enough to exercise the thread split), without
/// and with clipping at `clip`.
fn updates(len: usize, workers: usize, clip: f32) -> Vec<Update> {
    let rules = rules().into_iter().filter(|r| len <= 100_000 || matches!(r, Rule::Adam { t: 3, .. }));
    rules
        .flat_map(|rule| {
            [0.0, clip].map(|clip| Update {
                lr: 0.05,
                prep: GradPrep { scale: 1.0 / workers as f32, clip, weight_decay: 1e-3 },
                rule,
            })
        })
        .collect()
}

/// Parameters and two slots of optimizer state, `len` long, as the update
/// tests start them.
fn start_state(len: usize, seed: u32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let p = values(len, seed + 2);
    let s1 = values(len, seed + 1).iter().map(|v| v.abs() * 0.1).collect();
    let s2 = values(len, seed).iter().map(|v| v.abs() * 0.01).collect();
    (p, s1, s2)
}

/// A copy of `state` after `aggregate_update_with` on its slices from `off`.
fn updated(
    isa: Isa,
    threads: usize,
    off: usize,
    state: &(Vec<f32>, Vec<f32>, Vec<f32>),
    grads: &[Grad<'_>],
    u: Update,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut p, mut s1, mut s2) = state.clone();
    aggregate_update_with(isa, threads, &mut p[off..], &mut s1[off..], &mut s2[off..], grads, u);
    (p, s1, s2)
}

fn rules() -> Vec<Rule> {
    vec![
        Rule::Sgd,
        Rule::Momentum { momentum: 0.9, nesterov: false },
        Rule::Momentum { momentum: 0.9, nesterov: true },
        Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled_decay: 0.0, t: 3 },
        Rule::Adam { beta1: 0.9, beta2: 0.99, eps: 1e-6, decoupled_decay: 0.01, t: 1 },
    ]
}

#[test]
fn aggregate_update_matches_the_f64_reference_on_every_path() {
    for isa in isas() {
        for &len in &LENGTHS {
            // f32 slices start one element into their allocation (misaligned
            // for every vector width); encoded gradients one byte in.
            let off = usize::from(len > 1);
            let n = len - off;
            let all = encodings(n, len as u32);
            for workers in [1usize, 2, 4, 6] {
                // Six: full precision, then the rest, so the four-per-pass
                // path (F32, F32Le, F32, F32Le) runs before the others.
                let chosen: Vec<&Encoded> = if workers == 6 {
                    [0, 1, 0, 1, 2, 4].iter().map(|&k| &all[k]).collect()
                } else {
                    all.iter().cycle().skip(workers).take(workers).collect()
                };
                let grads: Vec<Grad<'_>> = chosen.iter().map(|e| e.grad()).collect();
                let g64: Vec<f64> = (0..n).map(|i| chosen.iter().map(|e| e.exact[i]).sum()).collect();
                for u in updates(len, workers, 0.7) {
                    let (rule, clip) = (u.rule, u.prep.clip);
                    let state = start_state(len, 97);
                    let (p0, s10, s20) = &state;
                    let widen = |v: &[f32]| v[off..].iter().map(|x| f64::from(*x)).collect::<Vec<f64>>();
                    let (mut r, mut ra, mut rb) = (widen(p0), widen(s10), widen(s20));
                    reference_update(&mut r, &mut ra, &mut rb, &g64, &u);
                    for threads in [1, 2] {
                        let (p, _, _) = updated(isa, threads, off, &state, &grads, u);
                        for (i, (got, want)) in p[off..].iter().zip(&r).enumerate() {
                            // Adam divides by sqrt(v): f32 rounding is relative to the step size.
                            assert!(
                                close_to(*got, *want, 2e-5, 10.0),
                                "{isa:?} n={n} workers={workers} {rule:?} clip={clip} threads={threads} at {i}: {got} vs {want}"
                            );
                        }
                        assert_eq!(p[..off], p0[..off], "nothing outside the slice is touched");
                    }
                }
            }
        }
    }
}

#[test]
fn sum_matches_the_reference_and_zero_grads_give_zero() {
    for isa in isas() {
        for &n in &LENGTHS {
            let all = encodings(n, 7);
            let grads: Vec<Grad<'_>> = all.iter().map(|e| e.grad()).collect();
            for threads in [1, 2] {
                let mut out = vec![f32::NAN; n];
                sum_with(isa, threads, &mut out, &grads);
                for (i, got) in out.iter().enumerate() {
                    let want: f64 = all.iter().map(|e| e.exact[i]).sum();
                    let mag: f64 = all.iter().map(|e| e.exact[i].abs()).sum();
                    assert!(close_to(*got, want, 1e-6, mag), "{isa:?} n={n} at {i}: {got} vs {want}");
                }
                sum_with(isa, threads, &mut out, &[]);
                assert!(out.iter().all(|v| *v == 0.0));
            }
        }
    }
}

/// Full-precision gradients are summed four per pass; wherever such a group
/// falls among other encodings, the result is bit-identical to adding the
/// decoded gradients one at a time, left to right, in f32.
#[test]
fn grouped_full_precision_sums_equal_one_at_a_time_bit_for_bit() {
    use Enc::*;
    // Runs of 2, 3 and 4 full-precision gradients, first (overwriting the
    // sum) and after other encodings (adding to it).
    let layouts: [&[fn() -> Enc]; 7] = [
        &[|| F16Aligned, || TwoBit(0.5), || F16],
        &[|| F32, || F32Le, || F32, || F32Le],
        &[|| F32, || F32Le, || F32, || Bf16, || F32, || F32, || F32Le],
        &[|| F16, || F32, || F32Le, || TwoBit(0.25), || F32Le, || F16Aligned],
        &[|| F32Le, || F32, || F32Le, || F32, || F32Le, || F32, || F32Le, || F32],
        &[|| F16, || F32, || F32Le, || F32, || F32Le, || Bf16],
        &[|| F32, || F32Le, || TwoBit(0.5), || F32, || F32, || F32Le, || F32, || F32],
    ];
    for isa in isas() {
        for &n in &LENGTHS {
            for layout in layouts {
                let enc: Vec<Encoded> =
                    layout.iter().enumerate().map(|(k, e)| Encoded::new(&values(n, 50 + k as u32), e())).collect();
                let grads: Vec<Grad<'_>> = enc.iter().map(|e| e.grad()).collect();
                let mut want = vec![0f32; n];
                for (k, e) in enc.iter().enumerate() {
                    for (w, x) in want.iter_mut().zip(&e.exact) {
                        // Every encoding here decodes exactly to an f32.
                        *w = if k == 0 { *x as f32 } else { *w + *x as f32 };
                    }
                }
                for threads in [1, 2] {
                    let mut out = vec![f32::NAN; n];
                    sum_with(isa, threads, &mut out, &grads);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    assert!(bits(&out) == bits(&want), "{isa:?} n={n} {} gradients threads={threads}", layout.len());
                }
            }
        }
    }
}

/// Up to eight gradients all in full precision are summed as the update
/// reads them (no block buffer); the result is bit-identical to updating
/// with their sum made one gradient at a time, left to right. Nine go
/// through the block buffer and must agree the same way.
#[test]
fn gradients_summed_while_updating_equal_the_sum_then_the_update_bit_for_bit() {
    use Enc::*;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for isa in isas() {
        for &len in &[1usize, 7, 1003, (1 << 20) + 4099] {
            let off = usize::from(len > 1);
            let n = len - off;
            for workers in 1..=9 {
                let enc: Vec<Encoded> = (0..workers)
                    .map(|k| Encoded::new(&values(n, 60 + k as u32), if k % 2 == 0 { F32 } else { F32Le }))
                    .collect();
                let grads: Vec<Grad<'_>> = enc.iter().map(|e| e.grad()).collect();
                let mut sum = vec![0f32; n];
                for (k, e) in enc.iter().enumerate() {
                    for (s, x) in sum.iter_mut().zip(&e.floats) {
                        *s = if k == 0 { *x } else { *s + *x };
                    }
                }
                for u in updates(len, workers, 0.01) {
                    let (rule, clip) = (u.rule, u.prep.clip);
                    let state = start_state(len, 91);
                    let want = updated(isa, 1, off, &state, &[Grad::F32(&sum)], u);
                    for threads in [1, 2] {
                        let (p, s1, s2) = updated(isa, threads, off, &state, &grads, u);
                        let what = format!("{isa:?} n={n} workers={workers} {rule:?} clip={clip} threads={threads}");
                        assert!(bits(&p) == bits(&want.0), "parameters differ: {what}");
                        assert!(bits(&s1) == bits(&want.1) && bits(&s2) == bits(&want.2), "state differs: {what}");
                    }
                }
            }
        }
    }
}

#[test]
fn nan_and_infinity_propagate_as_in_the_reference() {
    for isa in isas() {
        let g = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, 1.0];
        for rule in rules() {
            for clip in [0.0, 0.5] {
                let u = Update { lr: 0.1, prep: GradPrep { scale: 1.0, clip, weight_decay: 0.0 }, rule };
                let mut p = [1.0, 1.0, 1.0, f32::NAN, f32::INFINITY];
                let (mut s1, mut s2) = (vec![0.0; 5], vec![0.0; 5]);
                let mut r: Vec<f64> = p.iter().map(|v| f64::from(*v)).collect();
                let (mut ra, mut rb) = (vec![0.0; 5], vec![0.0; 5]);
                reference_update(&mut r, &mut ra, &mut rb, &g.map(f64::from), &u);
                aggregate_update_with(isa, 1, &mut p, &mut s1, &mut s2, &[Grad::F32(&g)], u);
                for i in 0..5 {
                    assert!(close(p[i], r[i], 1e-6), "{isa:?} {rule:?} clip={clip} at {i}: {} vs {}", p[i], r[i]);
                }
            }
        }
    }
}

#[test]
fn half_conversions_round_to_nearest_even_at_the_edges() {
    // f16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1.0).
    let cases_f16: [(f32, u16); 8] = [
        (1.0 + 2f32.powi(-11), 0x3C00),
        (1.0 + 3.0 * 2f32.powi(-11), 0x3C02),
        (65504.0, 0x7BFF),
        (65520.0, 0x7C00),        // rounds up to infinity
        (2f32.powi(-24), 0x0001), // smallest subnormal
        (2f32.powi(-25), 0x0000), // halfway to zero: even is zero
        (-0.0, 0x8000),
        (f32::INFINITY, 0x7C00),
    ];
    let mut out = Vec::new();
    convert::extend_f16_le(&mut out, &cases_f16.map(|c| c.0));
    for (i, (v, bits)) in cases_f16.iter().enumerate() {
        assert_eq!(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]), *bits, "f16 of {v:e}");
    }
    let cases_bf16: [(f32, u16); 5] = [
        (f32::from_bits(0x3F80_8000), 0x3F80), // tie, even stays
        (f32::from_bits(0x3F81_8000), 0x3F82), // tie, odd rounds up
        (f32::from_bits(0x3F80_8001), 0x3F81), // above the tie
        (f32::MAX, 0x7F80),                    // overflows to infinity
        (-1.0, 0xBF80),
    ];
    let mut out = Vec::new();
    convert::extend_bf16_le(&mut out, &cases_bf16.map(|c| c.0));
    for (i, (v, bits)) in cases_bf16.iter().enumerate() {
        assert_eq!(u16::from_le_bytes([out[2 * i], out[2 * i + 1]]), *bits, "bf16 of {v:e}");
    }
    // NaN stays NaN both ways.
    let mut out = Vec::new();
    convert::extend_f16_le(&mut out, &[f32::NAN]);
    convert::extend_bf16_le(&mut out, &[f32::NAN]);
    let mut back = [0.0f32; 2];
    for isa in isas() {
        sum_with(isa, 1, &mut back[..1], &[Grad::F16Le(&out[..2])]);
        sum_with(isa, 1, &mut back[1..], &[Grad::Bf16Le(&out[2..])]);
        assert!(back[0].is_nan() && back[1].is_nan());
    }
}

#[test]
fn two_bit_with_error_feedback_sums_to_the_uncompressed_total() {
    for isa in isas() {
        let n = 1003;
        let threshold = 0.05;
        let mut residual = vec![0.0f32; n];
        let mut received = vec![0.0f32; n];
        let mut sent_total = vec![0.0f64; n];
        for step in 0..400u32 {
            let g: Vec<f32> = values(n, step).iter().map(|v| v * 0.01).collect();
            for (t, v) in sent_total.iter_mut().zip(&g) {
                *t += f64::from(*v);
            }
            let mut packed = Vec::new();
            twobit::encode_with(isa, &g, &mut residual, threshold, &mut packed);
            assert_eq!(packed.len(), twobit::packed_len(n));
            let mut acc = received.clone();
            sum_with(isa, 1, &mut acc, &[Grad::F32(&received), Grad::TwoBit { packed: &packed, len: n, threshold }]);
            received = acc;
        }
        // What arrived plus what is still held back is exactly what was
        // pushed (nothing is lost, only delayed), and only whole multiples of
        // the threshold ever travel.
        for i in 0..n {
            let total = f64::from(received[i]) + f64::from(residual[i]);
            assert!((total - sent_total[i]).abs() < 1e-3, "{isa:?} at {i}: {total} vs {}", sent_total[i]);
            let units = f64::from(received[i]) / f64::from(threshold);
            assert!((units - units.round()).abs() < 1e-3, "only multiples of the threshold arrive: {units}");
        }
    }
}

#[test]
fn malformed_gradients_are_refused() {
    let mut p = vec![0.0f32; 4];
    let bad = std::panic::catch_unwind(move || {
        aggregate_update_with(
            Isa::Scalar,
            1,
            &mut p,
            &mut [],
            &mut [],
            &[Grad::F32Le(&[0u8; 12])],
            Update { lr: 0.1, prep: GradPrep { scale: 1.0, clip: 0.0, weight_decay: 0.0 }, rule: Rule::Sgd },
        )
    });
    assert!(bad.is_err(), "a gradient of the wrong length must not be applied");
}

/// The robust combinations on every instruction-set path, against the plain
/// reference (`robust::reference`: decode, sort each column with
/// `total_cmp`, add the kept values in order), to the bit: every encoding
/// mixed, odd lengths, one to nine gradients, with negative zeros and ties
/// among the values, then one update with the combined gradient.
#[test]
fn trimmed_mean_and_median_equal_the_scalar_reference_bit_for_bit() {
    use warden_kernels::{Combine, combine_update_with, robust};
    for len in [1, 7, 1003, 4096 * 3 + 5, (1 << 19) + 4099] {
        let all = encodings(len, 300);
        let zeros = vec![-0.0f32; len];
        let ties: Vec<f32> = values(len, 300).iter().map(|v| v.round()).collect();
        let mut grads: Vec<Grad<'_>> = all.iter().map(Encoded::grad).collect();
        grads.extend([Grad::F32(&zeros), Grad::F32(&ties), Grad::F32(&ties)]);
        for n in 1..=grads.len() {
            let gs = &grads[..n];
            let mut combines = vec![Combine::Median];
            combines.extend((0..=(n - 1) / 2).map(|trim| Combine::TrimmedMean { trim }));
            for combine in combines {
                let want = robust::reference(gs, combine);
                for isa in isas() {
                    for threads in [1, 2] {
                        let u = Update {
                            lr: 0.05,
                            prep: GradPrep { scale: 99.0, clip: 0.7, weight_decay: 1e-3 },
                            rule: Rule::Momentum { momentum: 0.9, nesterov: false },
                        };
                        let (mut p, mut s1, mut s2) = start_state(len, 7);
                        let (mut rp, mut rs1, mut rs2) = (p.clone(), s1.clone(), s2.clone());
                        combine_update_with(isa, threads, &mut p, &mut s1, &mut s2, gs, u, combine);
                        // The reference's gradient, applied with the scale of an average.
                        let u1 = Update { prep: GradPrep { scale: 1.0, ..u.prep }, ..u };
                        aggregate_update_with(Isa::Scalar, 1, &mut rp, &mut rs1, &mut rs2, &[Grad::F32(&want)], u1);
                        let differ = p.iter().zip(&rp).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                        assert_eq!(differ, 0, "{combine:?} of {n} at {len} on {isa:?}, {threads} threads");
                        assert_eq!(
                            s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            rs1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
    }
}

/// What the rules are for: one gradient of five pushed at -100x moves the
/// mean far off, and neither the trimmed mean nor the median.
#[test]
fn one_hostile_gradient_of_five_moves_the_mean_and_not_the_robust_rules() {
    use warden_kernels::{Combine, robust};
    let honest: Vec<Vec<f32>> =
        (0..4).map(|k| values(1000, 500 + k).iter().map(|v| v * 0.01 + 0.5).collect()).collect();
    let hostile: Vec<f32> = honest[0].iter().map(|v| v * -100.0).collect();
    let mut grads: Vec<Grad<'_>> = honest.iter().map(|v| Grad::F32(v)).collect();
    grads.push(Grad::F32(&hostile));
    let mean: Vec<f32> = robust::reference(&grads, Combine::Mean).iter().map(|s| s / 5.0).collect();
    for (combine, name) in [(Combine::TrimmedMean { trim: 1 }, "trimmed mean"), (Combine::Median, "median")] {
        let got = robust::reference(&grads, combine);
        for i in 0..1000 {
            let lo = honest.iter().map(|v| v[i]).fold(f32::INFINITY, f32::min);
            let hi = honest.iter().map(|v| v[i]).fold(f32::NEG_INFINITY, f32::max);
            assert!((lo..=hi).contains(&got[i]), "{name}: {} outside the honest range [{lo}, {hi}]", got[i]);
        }
    }
    assert!(mean.iter().all(|m| *m < -3.0), "the mean follows the hostile worker");
}

/// The squared norm of every encoding against the f64 sum of its exact
/// values, on every instruction-set path, and `None` for a NaN or an
/// infinity anywhere.
#[test]
fn sum_of_squares_matches_the_reference_and_refuses_what_is_not_finite() {
    for len in [1usize, 7, 1003, 70_001] {
        for e in encodings(len, 900) {
            let want: f64 = e.exact.iter().map(|v| v * v).sum();
            let got = e.grad().finite_sum_squares().expect("finite values");
            assert!((got - want).abs() <= 1e-4 * want.max(1.0), "{len}: {got} vs {want}");
        }
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let mut v = values(1003, 5);
        v[1001] = bad;
        for enc in [Enc::F32, Enc::F32Le, Enc::F16, Enc::Bf16] {
            assert_eq!(Encoded::new(&v, enc).grad().finite_sum_squares(), None);
        }
    }
}

/// Squares of little-endian f32 bytes added a piece at a time, cut
/// anywhere (mid-value too), equal the whole at once to the bit; a NaN in
/// any piece, or bytes that end mid-value, give `None`.
#[test]
fn sums_of_squares_in_pieces_equal_the_whole_at_once() {
    let v = values(70_001, 3);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let whole = warden_kernels::Grad::F32Le(&bytes).finite_sum_squares().unwrap();
    for cuts in [vec![1usize], vec![64, 4096], vec![3, 5, 7, 262_144], vec![65_537, 13]] {
        let mut acc = warden_kernels::SquaresLe::default();
        let (mut at, mut i) = (0, 0);
        while at < bytes.len() {
            let end = (at + cuts[i % cuts.len()]).min(bytes.len());
            acc.add(&bytes[at..end]);
            (at, i) = (end, i + 1);
        }
        assert_eq!(acc.finish().map(f64::to_bits), Some(whole.to_bits()), "cut every {cuts:?}");
    }
    let mut bad = v.clone();
    bad[40_000] = f32::NAN;
    let bad: Vec<u8> = bad.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut acc = warden_kernels::SquaresLe::default();
    bad.chunks(1000).for_each(|c| acc.add(c));
    assert_eq!(acc.finish(), None);
    let mut acc = warden_kernels::SquaresLe::default();
    acc.add(&bytes[..4001]);
    assert_eq!(acc.finish(), None, "bytes that end mid-value");
}

/// Centered clipping on every instruction-set path and thread count equals
/// its plain reference to the bit (then one update with that gradient), and
/// a gradient far from the center moves the result by at most radius / N.
#[test]
fn centered_clipping_equals_its_reference_and_bounds_an_outlier() {
    use warden_kernels::{centered_clip_update_with, robust};
    for len in [1usize, 7, 1003, (1 << 19) + 4099] {
        let all = encodings(len, 700);
        let grads: Vec<Grad<'_>> = all.iter().map(Encoded::grad).collect();
        let start_center: Vec<f32> = values(len, 701).iter().map(|v| v * 0.1).collect();
        for radius in [0.01f32, 1.0, 1e6] {
            let want = robust::centered_reference(&grads, &start_center, radius);
            for isa in isas() {
                for threads in [1, 2] {
                    let u = Update {
                        lr: 0.05,
                        prep: GradPrep { scale: 99.0, clip: 0.0, weight_decay: 1e-3 },
                        rule: Rule::Sgd,
                    };
                    let (mut p, mut s1, mut s2) = start_state(len, 9);
                    let mut rp = p.clone();
                    let mut center = start_center.clone();
                    centered_clip_update_with(isa, threads, &mut p, &mut s1, &mut s2, &mut center, &grads, u, radius);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&center),
                        bits(&want),
                        "center at {len}, radius {radius}, {isa:?}, {threads} threads"
                    );
                    let u1 = Update { prep: GradPrep { scale: 1.0, ..u.prep }, ..u };
                    aggregate_update_with(Isa::Scalar, 1, &mut rp, &mut [], &mut [], &[Grad::F32(&want)], u1);
                    assert_eq!(bits(&p), bits(&rp));
                }
            }
        }
    }
    // Four gradients at the center and one 1e6 away: the result moves by radius / 5.
    let center = vec![0.5f32; 1000];
    let far: Vec<f32> = center.iter().map(|c| c + 1e6 / (1000f32).sqrt()).collect();
    let mut grads: Vec<Grad<'_>> = (0..4).map(|_| Grad::F32(&center)).collect();
    grads.push(Grad::F32(&far));
    let got = robust::centered_reference(&grads, &center, 2.0);
    let moved: f64 = got.iter().zip(&center).map(|(g, c)| f64::from(g - c).powi(2)).sum::<f64>().sqrt();
    assert!((moved - 2.0 / 5.0).abs() < 1e-3, "moved {moved}");
}
