//! `cargo bench -p warden-kernels`: GB/s of the server kernels against a
//! plain copy of the same bytes and against a naive scalar loop.
//!
//! Every figure counts each byte read and each byte written once. Sizes are
//! per gradient (4 KiB, 1 MiB, 64 MiB, 512 MiB) with N = 1, 2, 4, 8 workers.
//! `WARDEN_BENCH_MAX_MIB` caps the largest size (default 512).

use std::hint::black_box;
use std::time::{Duration, Instant};

use warden_kernels::{Grad, GradPrep, Isa, Rule, Update, aggregate_update_with};

/// Best time per call of `f`, timing batches of calls that each last at
/// least a millisecond (so clock overhead never counts), for at least `min`.
fn time(min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut reps = 1u32;
    loop {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        if t.elapsed() >= Duration::from_millis(1) || reps >= 1 << 20 {
            break;
        }
        reps *= 2;
    }
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 3 || start.elapsed() < min {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / f64::from(reps));
        runs += 1;
    }
    best
}

/// The naive loop: one pass per gradient into a sum, then an update pass.
#[inline(never)]
fn naive_sgd(params: &mut [f32], acc: &mut [f32], grads: &[Vec<f32>], lr: f32, scale: f32) {
    for a in acc.iter_mut() {
        *a = 0.0;
    }
    for g in grads {
        for i in 0..acc.len() {
            acc[i] += g[i];
        }
    }
    for i in 0..params.len() {
        params[i] -= lr * acc[i] * scale;
    }
}

fn main() {
    let max_mib: usize = std::env::var("WARDEN_BENCH_MAX_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let isa = Isa::best();
    println!("warden-kernels bench: isa={isa:?} threads=1 and {threads}; GB/s count bytes read + written");
    for isa in Isa::ALL {
        if !isa.supported() {
            println!("  (not measured: {isa:?} is not supported by this CPU)");
        }
    }
    println!(
        "{:>9} {:>2} {:>5} {:>8} | {:>8} {:>6} | {:>8} {:>6} | {:>8} {:>6} | {:>8} {:>7}",
        "size", "N", "rule", "threads", "fused", "/copy", "copy", "", "naive", "/copy", "fused/", "naive"
    );
    for (label, bytes) in [("4 KiB", 4usize << 10), ("1 MiB", 1 << 20), ("64 MiB", 64 << 20), ("512 MiB", 512 << 20)] {
        if bytes > max_mib << 20 {
            println!("{label:>9} skipped (WARDEN_BENCH_MAX_MIB={max_mib})");
            continue;
        }
        let n = bytes / 4;
        let min = if bytes <= 1 << 20 { Duration::from_millis(300) } else { Duration::from_millis(400) };
        for workers in [1usize, 2, 4, 8] {
            let grads: Vec<Vec<f32>> = (0..workers).map(|k| vec![1e-3 * (k as f32 + 1.0); n]).collect();
            let views: Vec<Grad<'_>> = grads.iter().map(|g| Grad::F32(g)).collect();
            let mut params = vec![0.5f32; n];
            for (rule, name, state) in [
                (Rule::Sgd, "sgd", 0usize),
                (Rule::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled_decay: 0.0, t: 10 }, "adam", 2),
            ] {
                if name == "adam" && bytes > 64 << 20 {
                    continue; // keeps the largest size within memory and time
                }
                let mut s1 = vec![0.0f32; if state > 0 { n } else { 0 }];
                let mut s2 = vec![0.0f32; if state > 1 { n } else { 0 }];
                let u = Update {
                    lr: 1e-6,
                    prep: GradPrep { scale: 1.0 / workers as f32, clip: 0.0, weight_decay: 0.0 },
                    rule,
                };
                // Reads: N gradients + params + state; writes: params + state.
                let traffic = (workers + 2 + 2 * state) * bytes;
                // A copy that moves the same traffic: traffic/2 bytes read and written.
                let src = vec![1u8; traffic / 2];
                let mut dst = vec![0u8; traffic / 2];
                let copy_s = time(min, || {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&mut dst);
                });
                let copy = traffic as f64 / copy_s / 1e9;
                let mut acc = vec![0.0f32; n];
                let naive_s = if name == "sgd" {
                    time(min, || naive_sgd(black_box(&mut params), &mut acc, black_box(&grads), 1e-6, 0.5))
                } else {
                    f64::NAN
                };
                // The same useful traffic as the fused kernel, so the ratios compare work done.
                let naive = traffic as f64 / naive_s / 1e9;
                let split = n >= 2 * warden_kernels::parallel::MIN_PER_THREAD;
                for t in [1, threads] {
                    if t > 1 && !split {
                        break; // below the split size every thread count is the same single pass
                    }
                    let fused_s = time(min, || {
                        aggregate_update_with(isa, t, black_box(&mut params), &mut s1, &mut s2, black_box(&views), u)
                    });
                    let fused = traffic as f64 / fused_s / 1e9;
                    println!(
                        "{label:>9} {workers:>2} {name:>5} {t:>8} | {fused:>8.2} {:>6.2} | {copy:>8.2} {:>6} | {naive:>8.2} {:>6.2} | {:>8.2}",
                        fused / copy,
                        "",
                        naive / copy,
                        naive_s / fused_s,
                    );
                    if t == threads {
                        break;
                    }
                }
            }
        }
    }
}
