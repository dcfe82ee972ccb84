//! Lower-case hexadecimal, the one spelling of bytes as text in warden's
//! files, ids, digests and keys. A few lines that no dependency is worth.

/// `bytes` as lower-case hex digits.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Fills `out` from exactly `2 * out.len()` hex digits (either case);
/// `false`, with `out` in an unspecified state, for anything else.
pub fn decode_into(text: &str, out: &mut [u8]) -> bool {
    let t = text.as_bytes();
    if t.len() != out.len() * 2 {
        return false;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        match (digit(t[2 * i]), digit(t[2 * i + 1])) {
            (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
            _ => return false,
        }
    }
    true
}

/// The bytes of an even number of hex digits.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let mut out = vec![0; text.len() / 2];
    decode_into(text, &mut out).then_some(out)
}

/// The bytes of exactly `N * 2` hex digits.
pub fn decode_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0; N];
    decode_into(text, &mut out).then_some(out)
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
        assert_eq!(encode(&[0x0f, 0xa0]), "0fa0");
        assert_eq!(decode("0FA0"), Some(vec![0x0f, 0xa0]));
        for bad in ["0", "0g", "+1", " 01", "é1"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
        assert_eq!(decode_array::<2>("0fa0"), Some([0x0f, 0xa0]));
        assert_eq!(decode_array::<2>("0fa"), None);
    }
}
