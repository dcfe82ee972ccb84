//! Training data: IDX files (MNIST / Fashion-MNIST), raw or gzip.
//!
//! Every error names the file and says what was expected, since a bad path
//! or a truncated download is the most common way a job fails to start.

use std::io::Read;
use std::path::{Path, PathBuf};

/// A data-loading error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not what it should be.
    #[error("{path}: {problem}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// A labelled set: `n` rows of `features` floats in [0, 1].
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Features per sample.
    pub features: usize,
    /// Row-major samples.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<u8>,
}

impl Dataset {
    /// Samples in the set.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The contiguous shard `rank` of `of` (sizes differ by at most one).
    pub fn shard(&self, rank: usize, of: usize) -> Dataset {
        let n = self.len();
        let start = n * rank / of;
        let end = n * (rank + 1) / of;
        Dataset {
            features: self.features,
            x: self.x[start * self.features..end * self.features].to_vec(),
            y: self.y[start..end].to_vec(),
        }
    }
}

/// Upper bound on an IDX file's decoded size: protects against a header that
/// claims absurd dimensions.
const MAX_IDX_BYTES: u64 = 4 << 30;

fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    let mut head = [0u8; 2];
    let gz = {
        let mut f = &file;
        let n = f.read(&mut head).map_err(io)?;
        n == 2 && head == [0x1f, 0x8b]
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    reader
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Format { path: path.to_path_buf(), problem: format!("cannot decompress: {e}") })?;
    if out.len() as u64 > MAX_IDX_BYTES {
        return Err(DataError::Format { path: path.to_path_buf(), problem: "larger than 4 GiB".into() });
    }
    Ok(out)
}

/// Parses an IDX file of unsigned bytes: returns its dimensions and payload.
fn parse_idx(path: &Path, bytes: &[u8], want_dims: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |problem: String| DataError::Format { path: path.to_path_buf(), problem };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{:02x} is not supported (expected unsigned bytes, 0x08)",
            bytes[2]
        )));
    }
    let dims = bytes[3] as usize;
    if dims != want_dims {
        return Err(bad(format!("has {dims} dimensions, expected {want_dims}")));
    }
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let shape: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected =
        shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)).ok_or_else(|| bad("dimensions overflow".into()))?;
    let payload = &bytes[header..];
    if payload.len() != expected {
        return Err(bad(format!(
            "truncated or padded: the header promises {expected} bytes of data ({shape:?}) but the file holds {}",
            payload.len()
        )));
    }
    Ok((shape, payload.to_vec()))
}

/// Loads an images file and a labels file into a [`Dataset`].
pub fn load_idx(images: &Path, labels: &Path, features: usize, classes: usize) -> Result<Dataset, DataError> {
    let (shape, pixels) = parse_idx(images, &read_all(images)?, 3)?;
    let (lshape, y) = parse_idx(labels, &read_all(labels)?, 1)?;
    let per = shape[1] * shape[2];
    if per != features {
        return Err(DataError::Format {
            path: images.to_path_buf(),
            problem: format!(
                "images are {}x{} = {per} features, but [model] inputs = {features}; set inputs = {per}",
                shape[1], shape[2]
            ),
        });
    }
    if lshape[0] != shape[0] {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            problem: format!("has {} labels but {} has {} images", lshape[0], images.display(), shape[0]),
        });
    }
    if let Some((i, l)) = y.iter().enumerate().find(|(_, l)| **l as usize >= classes) {
        return Err(DataError::Format {
            path: labels.to_path_buf(),
            problem: format!("record {i} has label {l}, but [model] classes = {classes}"),
        });
    }
    let x = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    Ok(Dataset { features, x, y })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn truncated_file_is_named() {
        let dir = std::env::temp_dir().join(format!("warden-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("img");
        let lab = dir.join("lab");
        std::fs::write(&img, idx(&[2, 2, 2], &[0; 7])).unwrap();
        std::fs::write(&lab, idx(&[2], &[0, 1])).unwrap();
        let err = load_idx(&img, &lab, 4, 10).unwrap_err().to_string();
        assert!(err.contains("img") && err.contains("promises 8 bytes") && err.contains("holds 7"), "{err}");
        std::fs::write(&img, idx(&[2, 2, 2], &[0; 8])).unwrap();
        let ds = load_idx(&img, &lab, 4, 10).unwrap();
        assert_eq!(ds.len(), 2);
        let err = load_idx(&img, &lab, 5, 10).unwrap_err().to_string();
        assert!(err.contains("set inputs = 4"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
