//! TensorBoard event files: scalars written where `tensorboard --logdir`
//! finds them.
//!
//! An event file is a sequence of records (length, masked CRC-32C of the
//! length, an `Event` protocol buffer, masked CRC-32C of it). Only two small
//! messages are needed, `Event { wall_time, step, file_version | summary }`
//! and `Summary { repeated Value { tag, simple_value } }`, so they are
//! encoded here by hand: a protobuf crate and generated code would be far
//! larger than the twenty lines of encoding. TensorBoard's own reader is
//! what the tests read the files back with.

use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), as TFRecord frames use it.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC: rotated and offset, so a CRC of data that holds
/// CRCs stays well distributed.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = CRC32C.checksum(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends a protobuf varint.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with its wall time and step, then `rest` (its other fields).
fn event(wall_time: f64, step: u64, rest: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(16 + rest.len());
    e.push(1 << 3 | 1); // wall_time: double
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3); // step: int64
    varint(&mut e, step);
    e.extend_from_slice(rest);
    e
}

/// A `Summary` of scalar values, as field 5 of an `Event`.
fn summary(values: &[(&str, f64)]) -> Vec<u8> {
    let mut s = Vec::new();
    for (tag, value) in values {
        let mut v = Vec::new();
        bytes_field(&mut v, 1, tag.as_bytes());
        v.push(2 << 3 | 5); // simple_value: float
        v.extend_from_slice(&(*value as f32).to_le_bytes());
        bytes_field(&mut s, 1, &v);
    }
    let mut field = Vec::new();
    bytes_field(&mut field, 5, &s);
    field
}

/// One record: the framing around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

/// An event file being written; every call appends and flushes, so a
/// running TensorBoard sees each point as it comes.
#[derive(Debug)]
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.SECONDS.warden` (and `dir`) and
    /// writes the file-version event TensorBoard expects first.
    pub fn create(dir: &Path, wall_time: f64) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("events.out.tfevents.{}.warden", wall_time as u64));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path)?;
        let mut w = EventWriter { file, path };
        let mut version = Vec::new();
        bytes_field(&mut version, 3, b"brain.Event:2");
        w.append(&event(wall_time, 0, &version))?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends scalars `(tag, value)` at `step`; values that are not numbers
    /// are left out.
    pub fn scalars(&mut self, wall_time: f64, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let finite: Vec<(&str, f64)> = values.iter().copied().filter(|(_, v)| v.is_finite()).collect();
        if finite.is_empty() {
            return Ok(());
        }
        self.append(&event(wall_time, step, &summary(&finite)))
    }

    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&record(data))?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C check value, and TFRecord's mask of it (rotated right by
    /// 15 bits, plus 0xa282ead8), worked out by hand.
    #[test]
    fn checksums_are_castagnoli_masked() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn varints_and_records_are_framed() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
    }
}
