//! `cargo bench -p warden-kernels`: GB/s of the server kernels against a
//! plain copy of the same bytes and against a naive scalar loop.
//!
//! Every figure counts each byte read and each byte written once. Sizes are
//! per gradient (4 KiB, 1 MiB, 64 MiB, 512 MiB) with N = 1, 2, 4, 8 workers.
//! `WARDEN_BENCH_MAX_MIB` caps the largest size (default 512). Then the
//! other kernels, the robust combinations (trimmed mean, median) and the
//! few-row matrix products of serving (`sgemm` against `sgemm_packed`).
//! Names after `--` (fused, others, robust, products) run those sections only.

use std::hint::black_box;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use warden_kernels::{
    Grad, GradPrep, Isa, PackedB, Rule, Strides, Update, aggregate_update_with, convert, sgemm, sgemm_packed, sum_with,
    twobit,
};

/// Best time per call of each of `f(0)`, ..., `f(k - 1)`. Each is timed in
/// batches of calls lasting at least a millisecond (so clock overhead never
/// counts), and the batches take turns for at least `min` per function: on
/// a machine whose memory bandwidth moves with its neighbours' load, every
/// function then sees the same conditions, and their ratios hold still.
fn time_all(min: Duration, k: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    let reps: Vec<u32> = (0..k)
        .map(|i| {
            f(i);
            let mut reps = 1u32;
            loop {
                let t = Instant::now();
                for _ in 0..reps {
                    f(i);
                }
                if t.elapsed() >= Duration::from_millis(1) || reps >= 1 << 20 {
                    return reps;
                }
                reps *= 2;
            }
        })
        .collect();
    let mut best = vec![f64::INFINITY; k];
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < 3 || start.elapsed() < min * k as u32 {
        for i in 0..k {
            let t = Instant::now();
            for _ in 0..reps[i] {
                f(i);
            }
            best[i] = best[i].min(t.elapsed().as_secs_f64() / f64::from(reps[i]));
        }
        rounds += 1;
    }
    best
}

/// Where the copy baseline writes: `len` bytes half a page away (modulo
/// 4096) from the source. Two fresh vectors of the same size usually start
/// 16 bytes apart modulo a page, and this machine's `memcpy` (`rep movsb`)
/// copies such a pair of 8 to 64 KiB at 4-6 GB/s instead of 90-170: the
/// baseline would measure that quirk rather than the memory.
struct CopyDst {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl CopyDst {
    fn copy(&mut self, src: &[u8]) {
        self.buf[self.at..self.at + self.len].copy_from_slice(src);
        black_box(&mut self.buf);
    }
}

/// A source of `len` bytes and a destination for copying it (see [`CopyDst`]).
fn copy_buffers(len: usize) -> (Vec<u8>, CopyDst) {
    let src = vec![1u8; len];
    let buf = vec![0u8; len + 4096];
    let want = (src.as_ptr() as usize + 2048) % 4096;
    let at = (want + 4096 - buf.as_ptr() as usize % 4096) % 4096;
    (src, CopyDst { buf, at, len })
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
    // `cargo bench -p warden-kernels -- robust` runs the sections named
    // (fused, others, robust, products); no name runs them all.
    let names: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |section: &str| names.is_empty() || names.iter().any(|n| n == section);
    if run("fused") {
        fused(max_mib, threads);
    }
    if run("others") {
        others(max_mib);
    }
    if run("robust") {
        robust(max_mib, threads);
    }
    if run("products") {
        products();
    }
}

/// The fused aggregate-and-update kernel against a copy and a naive loop.
fn fused(max_mib: usize, threads: usize) {
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
                let (src, mut dst) = copy_buffers(traffic / 2);
                let mut acc = vec![0.0f32; n];
                let split = n >= 2 * warden_kernels::parallel::MIN_PER_THREAD;
                // Timed in turns: 0 copy, 1 naive (SGD only), 2 fused on one
                // thread, 3 fused on every thread (when the slice is split).
                let which: Vec<usize> = [0, 1, 2, 3]
                    .into_iter()
                    .filter(|&w| (w != 1 || name == "sgd") && (w != 3 || (split && threads > 1)))
                    .collect();
                let times = time_all(min, which.len(), |i| match which[i] {
                    0 => {
                        dst.copy(black_box(&src));
                    }
                    1 => naive_sgd(black_box(&mut params), &mut acc, black_box(&grads), 1e-6, 0.5),
                    w => aggregate_update_with(
                        isa,
                        if w == 2 { 1 } else { threads },
                        black_box(&mut params),
                        &mut s1,
                        &mut s2,
                        black_box(&views),
                        u,
                    ),
                });
                let of = |w: usize| which.iter().position(|&x| x == w).map_or(f64::NAN, |i| times[i]);
                let copy = traffic as f64 / of(0) / 1e9;
                let naive_s = of(1);
                // The same useful traffic as the fused kernel, so the ratios compare work done.
                let naive = traffic as f64 / naive_s / 1e9;
                for t in [1, threads] {
                    if t > 1 && !which.contains(&3) {
                        break; // below the split size every thread count is the same single pass
                    }
                    let fused_s = of(if t == 1 { 2 } else { 3 });
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

/// The robust combinations (`trimmed_mean` with trim 1, `median`, and
/// centered clipping, `ccl`, whose traffic is counted as the others' though
/// it reads the gradients twice) inside the fused SGD update, against the
/// mean through the same kernel and a copy of the same traffic, N = 3 to 8 full-precision gradients of 64 MiB
/// (or `WARDEN_BENCH_MAX_MIB`), on every thread. Target: each robust rule at
/// least 0.5 of copy.
fn robust(max_mib: usize, threads: usize) {
    use warden_kernels::{Combine, centered_clip_update_with, combine_update_with};
    let bytes = (64usize << 20).min(max_mib << 20);
    let n = bytes / 4;
    println!();
    println!(
        "robust aggregation, SGD, {} MiB per gradient, {threads} threads; GB/s count bytes read + written",
        bytes >> 20
    );
    println!(
        "{:>2} | {:>8} | {:>8} {:>6} | {:>8} {:>6} {:>6} | {:>8} {:>6} {:>6} | {:>8} {:>6} {:>6}",
        "N", "copy", "mean", "/copy", "trimmed", "/copy", "/mean", "median", "/copy", "/mean", "ccl", "/copy", "/mean"
    );
    let isa = Isa::best();
    for workers in [3usize, 4, 5, 8] {
        let grads: Vec<Vec<f32>> =
            (0..workers).map(|k| (0..n).map(|i| ((i * (k + 3)) % 1000) as f32 * 1e-6).collect()).collect();
        let views: Vec<Grad<'_>> = grads.iter().map(|g| Grad::F32(g)).collect();
        let mut params = vec![0.5f32; n];
        let u = Update {
            lr: 1e-6,
            prep: GradPrep { scale: 1.0 / workers as f32, clip: 0.0, weight_decay: 0.0 },
            rule: Rule::Sgd,
        };
        let traffic = (workers + 2) * bytes;
        let (src, mut dst) = copy_buffers(traffic / 2);
        let combines = [Combine::Mean, Combine::TrimmedMean { trim: 1 }, Combine::Median];
        let mut center = vec![0f32; n];
        let times = time_all(Duration::from_millis(400), 5, |i| match i {
            0 => dst.copy(black_box(&src)),
            4 => {
                let (p, c) = (black_box(&mut params), &mut center);
                centered_clip_update_with(isa, threads, p, &mut [], &mut [], c, black_box(&views), u, 1.0);
            }
            _ => {
                let c = combines[i - 1];
                combine_update_with(isa, threads, black_box(&mut params), &mut [], &mut [], black_box(&views), u, c);
            }
        });
        let gbs: Vec<f64> = times.iter().map(|t| traffic as f64 / t / 1e9).collect();
        println!(
            "{workers:>2} | {:>8.2} | {:>8.2} {:>6.2} | {:>8.2} {:>6.2} {:>6.2} | {:>8.2} {:>6.2} {:>6.2} | {:>8.2} {:>6.2} {:>6.2}",
            gbs[0],
            gbs[1],
            gbs[1] / gbs[0],
            gbs[2],
            gbs[2] / gbs[0],
            gbs[2] / gbs[1],
            gbs[3],
            gbs[3] / gbs[0],
            gbs[3] / gbs[1],
            gbs[4],
            gbs[4] / gbs[0],
            gbs[4] / gbs[1],
        );
    }
}

/// The forward pass of a served model: a few rows (inputs that arrived
/// together) times the 784 x 256 weights of the default MLP's first layer
/// (800 KB, beyond this machine's 512 KiB L2), with `sgemm` on the
/// row-major weights and with `sgemm_packed` on the same weights laid out
/// once. The two take turns, as above.
fn products() {
    let (k, n) = (784, 256);
    let b: Vec<f32> = (0..k * n).map(|i| (i % 97) as f32 * 0.01 - 0.3).collect();
    let Some(packed) = PackedB::new(k, n, &b, Strides::row_major(n)) else {
        println!("\nfew-row products: no packed kernel on this CPU");
        return;
    };
    println!();
    println!("few-row products, {k} x {n} weights, one thread: us per call");
    println!("{:>5} | {:>8} {:>7} | {:>8} {:>7} | {:>7}", "rows", "sgemm", "/row", "packed", "/row", "packed/");
    let a: Vec<f32> = (0..48 * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut c = vec![0f32; 48 * n];
    for m in [1usize, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48] {
        let t = time_all(Duration::from_millis(200), 2, |which| {
            if which == 0 {
                sgemm(m, k, n, black_box(&a), Strides::row_major(k), &b, Strides::row_major(n), &mut c, false);
            } else {
                sgemm_packed(m, black_box(&a), k, &packed, &mut c);
            }
            black_box(&mut c);
        });
        let us = |s: f64| s * 1e6;
        println!(
            "{m:>5} | {:>8.1} {:>7.2} | {:>8.1} {:>7.2} | {:>7.2}",
            us(t[0]),
            us(t[0]) / m as f64,
            us(t[1]),
            us(t[1]) / m as f64,
            t[1] / t[0]
        );
    }
}

/// The other kernels, on one thread, against a copy of the same traffic and
/// a naive per-element loop: sums of N = 4 gradients in full precision,
/// half precision and 2-bit (decoding fused into the sum), and the wire
/// encodings (f16, bf16, 2-bit with error feedback).
fn others(max_mib: usize) {
    println!();
    println!("other kernels, one thread, N = 4 for the sums; GB/s count bytes read + written");
    println!(
        "{:>9} {:>14} | {:>8} {:>6} | {:>8} | {:>8} {:>6} | {:>8}",
        "size", "kernel", "GB/s", "/copy", "copy", "naive", "/copy", "/naive"
    );
    let isa = Isa::best();
    for (label, bytes) in [("4 KiB", 4usize << 10), ("1 MiB", 1 << 20), ("64 MiB", 64 << 20)] {
        if bytes > max_mib << 20 {
            continue;
        }
        let n = bytes / 4;
        let row = |name: &str, traffic: usize, kernel: &mut dyn FnMut(), naive: &mut dyn FnMut()| {
            let (src, mut dst) = copy_buffers(traffic / 2);
            let times = time_all(Duration::from_millis(300), 3, |i| match i {
                0 => {
                    dst.copy(black_box(&src));
                }
                1 => naive(),
                _ => kernel(),
            });
            let gbs = |t: f64| traffic as f64 / t / 1e9;
            let (copy, naive, kernel) = (gbs(times[0]), gbs(times[1]), gbs(times[2]));
            println!(
                "{label:>9} {name:>14} | {kernel:>8.2} {:>6.2} | {copy:>8.2} | {naive:>8.2} {:>6.2} | {:>8.2}",
                kernel / copy,
                naive / copy,
                kernel / naive
            );
        };
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let grads: Vec<Vec<f32>> = (0..4).map(|k| values.iter().map(|v| v * (k + 1) as f32).collect()).collect();
        let mut halves = Vec::new();
        convert::extend_f16_le(&mut halves, &values);
        let mut residual = vec![0f32; n];
        let mut packed = Vec::new();
        twobit::encode(&values, &mut residual, 0.1, &mut packed);
        let mut out = vec![0f32; n];
        let mut acc = vec![0f32; n];

        let views: Vec<Grad<'_>> = grads.iter().map(|g| Grad::F32(g)).collect();
        row("sum f32", 5 * bytes, &mut || sum_with(isa, 1, black_box(&mut out), black_box(&views)), &mut || {
            acc.fill(0.0);
            for g in &grads {
                for i in 0..n {
                    acc[i] += g[i];
                }
            }
            black_box(&mut acc);
        });
        let views = vec![Grad::F16Le(&halves); 4];
        row(
            "sum f16",
            2 * bytes + bytes,
            &mut || sum_with(isa, 1, black_box(&mut out), black_box(&views)),
            &mut || {
                acc.fill(0.0);
                for _ in 0..4 {
                    for (a, c) in acc.iter_mut().zip(halves.chunks_exact(2)) {
                        *a += f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
                black_box(&mut acc);
            },
        );
        let views = vec![Grad::TwoBit { packed: &packed, len: n, threshold: 0.1 }; 4];
        let table = [0.0, 0.1, -0.1, 0.0];
        row(
            "sum 2-bit",
            4 * n.div_ceil(4) + bytes,
            &mut || sum_with(isa, 1, black_box(&mut out), black_box(&views)),
            &mut || {
                acc.fill(0.0);
                for _ in 0..4 {
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a += table[usize::from((packed[i / 4] >> (2 * (i % 4))) & 3)];
                    }
                }
                black_box(&mut acc);
            },
        );
        let mut bytes_out: Vec<u8> = Vec::with_capacity(2 * bytes);
        let mut naive_out: Vec<u8> = Vec::with_capacity(2 * bytes);
        for bf in [false, true] {
            row(
                if bf { "encode bf16" } else { "encode f16" },
                bytes + bytes / 2,
                &mut || {
                    bytes_out.clear();
                    if bf {
                        convert::extend_bf16_le(&mut bytes_out, black_box(&values));
                    } else {
                        convert::extend_f16_le(&mut bytes_out, black_box(&values));
                    }
                    black_box(&mut bytes_out);
                },
                &mut || {
                    naive_out.clear();
                    for x in black_box(&values) {
                        let b = if bf { bf16::from_f32(*x).to_bits() } else { f16::from_f32(*x).to_bits() };
                        naive_out.extend_from_slice(&b.to_le_bytes());
                    }
                    black_box(&mut naive_out);
                },
            );
        }
        let mut r2 = vec![0f32; n];
        let mut p2 = vec![0u8; n.div_ceil(4)];
        row(
            "encode 2-bit",
            3 * bytes + n.div_ceil(4),
            &mut || {
                packed.clear();
                twobit::encode_with(isa, black_box(&values), &mut residual, 0.1, &mut packed);
                black_box(&mut packed);
            },
            &mut || {
                p2.fill(0);
                for (i, (g, r)) in black_box(&values).iter().zip(r2.iter_mut()).enumerate() {
                    let v = *r + *g;
                    let (code, rest) = if v >= 0.1 {
                        (1u8, v - 0.1)
                    } else if v <= -0.1 {
                        (2, v + 0.1)
                    } else {
                        (0, v)
                    };
                    *r = rest;
                    p2[i / 4] |= code << (2 * (i % 4));
                }
                black_box(&mut p2);
            },
        );
    }
}
