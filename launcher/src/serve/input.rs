//! Reading `{"input": [...]}`, the request nearly every client sends.
//!
//! Written by hand because serde_json reads an array of numbers through its
//! generic visitor at about 30 ns a number on the machines we measured, a
//! fifth of the server's CPU for a 784-value image, and no maintained crate
//! reads "one object, one key, an array of numbers" directly. This reader
//! takes exactly that shape and gives up (`None`) on anything else: other
//! keys, a batch, a string, a malformed number. The caller then parses the
//! body with serde_json as before, so every other request, and every error
//! message, is serde_json's.
//!
//! Each number becomes the nearest `f64`, then `f32`, as serde_json does.
//! A mantissa below 2^53 with a decimal exponent within +-22 is computed
//! with one IEEE multiplication or division (Clinger's fast path: both
//! operands are exact in `f64`, so the result is correctly rounded; see
//! [`quotient`] for how most divisions are avoided); other numbers go to
//! the standard library's parser.

/// Powers of ten exact in `f64`.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// The values of a body that is exactly `{"input": [numbers]}` (JSON
/// whitespace allowed between tokens), or `None` for any other body.
/// `expect` is the model's input width, used to size the vector.
pub fn single_input(body: &[u8], expect: usize) -> Option<Vec<f32>> {
    let mut r = Reader { b: body, at: 0 };
    r.token(b"{")?;
    r.token(b"\"input\"")?;
    r.token(b":")?;
    r.token(b"[")?;
    let mut values = Vec::with_capacity(expect.min(body.len() / 2 + 1));
    // (`token` has skipped the whitespace before the first number.)
    if r.token(b"]").is_none() {
        loop {
            values.push(r.number()?);
            // The separators clients write, "," and ", ", in one step.
            match r.b.get(r.at..r.at + 2) {
                Some([b',', b' ']) => {
                    r.at += 2;
                    continue;
                }
                Some([b',', c]) if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') => {
                    r.at += 1;
                    continue;
                }
                _ => {}
            }
            if r.token(b",").is_some() {
                r.skip_ws();
                continue;
            }
            r.token(b"]")?;
            break;
        }
    }
    r.token(b"}")?;
    r.skip_ws();
    (r.at == body.len()).then_some(values)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.at) {
            self.at += 1;
        }
    }

    /// Whitespace, then exactly `t`.
    fn token(&mut self, t: &[u8]) -> Option<()> {
        self.skip_ws();
        if self.b[self.at..].starts_with(t) {
            self.at += t.len();
            Some(())
        } else {
            None
        }
    }

    /// Digits from `*i` on, appended to `m` (wrapping; the caller checks
    /// the count); returns how many.
    #[inline(always)]
    fn digits(&self, i: &mut usize, m: &mut u64) -> usize {
        let start = *i;
        while let Some(&c) = self.b.get(*i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            *m = m.wrapping_mul(10).wrapping_add(u64::from(d));
            *i += 1;
        }
        *i - start
    }

    /// A JSON number (`-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`) as
    /// the `f32` nearest to the `f64` nearest to it; `None` if it is not a
    /// number or is beyond `f64`'s range.
    #[inline(always)]
    fn number(&mut self) -> Option<f32> {
        let (b, start) = (self.b, self.at);
        let mut i = start;
        let negative = b.get(i) == Some(&b'-');
        i += usize::from(negative);
        let mut mantissa = 0u64;
        let int_digits = self.digits(&mut i, &mut mantissa);
        if int_digits == 0 || (int_digits > 1 && b[i - int_digits] == b'0') {
            return None;
        }
        let mut frac_digits = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            frac_digits = self.digits(&mut i, &mut mantissa);
            if frac_digits == 0 {
                return None;
            }
        }
        let mut exp = -(frac_digits as i64);
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            let exp_negative = b.get(i) == Some(&b'-');
            i += usize::from(matches!(b.get(i), Some(b'-' | b'+')));
            let (exp_start, mut e) = (i, 0i64);
            while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                e = (e * 10 + i64::from(c - b'0')).min(1 << 20);
                i += 1;
            }
            if i == exp_start {
                return None;
            }
            exp += if exp_negative { -e } else { e };
        }
        self.at = i;
        // At most 19 digits cannot have wrapped; below 2^53 the mantissa is
        // exact in f64.
        if int_digits + frac_digits <= 19 && mantissa <= 1 << 53 && exp.abs() <= 22 {
            let m = mantissa as f64;
            let v = if exp >= 0 { m * POW10[exp as usize] } else { quotient(m, exp.unsigned_abs() as usize) };
            return Some(if negative { -v } else { v } as f32);
        }
        let v: f64 = std::str::from_utf8(&b[start..i]).ok()?.parse().ok()?;
        v.is_finite().then_some(v as f32)
    }
}

/// `m / 10^e` rounded to `f64` (as one IEEE division would), when what the
/// caller keeps is that value rounded to `f32`. A division costs several
/// times the rest of a number's parse, so this multiplies by the rounded
/// reciprocal instead: that product is within 3 units in the last place of
/// the exact quotient, so it rounds to the same `f32` unless it lies within
/// a few units of an `f32` rounding midpoint (the 29 bits an `f32` drops
/// are then close to 2^28). Only there is the division done.
#[inline(always)]
fn quotient(m: f64, e: usize) -> f64 {
    let approx = m * INV_POW10[e];
    let dropped = approx.to_bits() & ((1 << 29) - 1);
    if dropped.abs_diff(1 << 28) <= 16 { m / POW10[e] } else { approx }
}

/// `10^-e` rounded to `f64`.
const INV_POW10: [f64; 23] = [
    1e0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14, 1e-15, 1e-16, 1e-17,
    1e-18, 1e-19, 1e-20, 1e-21, 1e-22,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde_json makes of the same body.
    fn serde(body: &str) -> Option<Vec<f32>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Only {
            input: Vec<f32>,
        }
        serde_json::from_str::<Only>(body).ok().map(|o| o.input)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn numbers_read_exactly_as_serde_json_reads_them() {
        let mut texts: Vec<String> = [
            "0",
            "-0",
            "0.5",
            "-0.5",
            "1",
            "255",
            "0.0039215686274509803",
            "0.12345678901234568",
            "1e-05",
            "1E+3",
            "-2.5e-3",
            "123456789012345",
            "1234567890123456789",
            "0.000001",
            "3.4028235e38",
            "1.1754944e-38",
            "1e-45",
            "7e-46",
            "9007199254740993",
            "0.30000000000000004",
            "1e22",
            "1e23",
            "4.5e-320",
            "100.0",
            "0.1000000000000000055511151231257827",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Pseudo-random values printed the way clients print them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = (x >> 11) as f64 / (1u64 << 53) as f64;
            texts.push(match i % 5 {
                0 => format!("{f}"),
                1 => format!("{:.3}", f * 255.0),
                2 => format!("{}", (x % 256) as i64 - 128),
                3 => format!("{:e}", f * 1e-7),
                _ => format!("{}", f as f32),
            });
        }
        for chunk in texts.chunks(50) {
            let body = format!("{{\"input\": [{}]}}", chunk.join(", "));
            let want = serde(&body).expect("serde_json reads it");
            let got = single_input(body.as_bytes(), chunk.len()).expect("the fast path reads it");
            assert_eq!(bits(&got), bits(&want), "{body}");
        }
    }

    #[test]
    fn the_reciprocal_gives_the_f32_of_the_division() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut near_midpoints = 0;
        for round in 0..400_000 {
            let e = 1 + (next() % 22) as usize;
            let m = if round % 2 == 0 {
                (next() >> 11) as f64 // any mantissa below 2^53
            } else {
                // A decimal as close as the digits allow to the midpoint
                // between two neighbouring f32 values: the case the
                // reciprocal alone would round the wrong way.
                let a = f32::from_bits((next() % 0x7f00_0000) as u32 + 0x0080_0000);
                let mid = (f64::from(a) + f64::from(a.next_up())) / 2.0;
                let m = (mid * POW10[e]).round();
                if !(1.0..=(1u64 << 53) as f64).contains(&m) {
                    continue;
                }
                m
            };
            let want = (m / POW10[e]) as f32;
            assert_eq!(quotient(m, e) as f32, want, "{m} / 1e{e}");
            near_midpoints += usize::from(((m * INV_POW10[e]).to_bits() & ((1 << 29) - 1)).abs_diff(1 << 28) <= 16);
        }
        assert!(near_midpoints > 100, "the midpoint cases were reached {near_midpoints} times");
    }

    #[test]
    fn whitespace_and_empty_arrays_are_fine() {
        for body in ["{\"input\":[1,2]}", " \n{ \"input\" :\t[ 1 ,2 ] }\r\n", "{\"input\":[]}"] {
            assert_eq!(single_input(body.as_bytes(), 2), serde(body), "{body}");
        }
    }

    #[test]
    fn every_other_shape_is_left_to_serde_json() {
        for body in [
            "",
            "{}",
            "[1]",
            "{\"input\": [1, 2], \"inputs\": [[1]]}",
            "{\"inputs\": [[1, 2]]}",
            "{\"input\": [1, 2]} x",
            "{\"input\": [1, 2],}",
            "{\"input\": [1, 2,]}",
            "{\"input\": [01]}",
            "{\"input\": [1.]}",
            "{\"input\": [.5]}",
            "{\"input\": [+1]}",
            "{\"input\": [1e]}",
            "{\"input\": [1e400]}",
            "{\"input\": [NaN]}",
            "{\"input\": [\"1\"]}",
            "{\"input\": [[1]]}",
            "{\"input\": [1 2]}",
            "{\"in\\u0070ut\": [1]}",
            "{\"input\": [1, 2]",
            "{\"input\": [1, -]}",
        ] {
            assert_eq!(single_input(body.as_bytes(), 2), None, "{body}");
        }
    }
}
