//! Training data: IDX files (MNIST / Fashion-MNIST), raw or gzip.
//!
//! Every error names the file and says what was expected, since a bad path
//! or a truncated download is the most common way a job fails to start.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

use crate::job::spec::{DataFiles, DataFormat, DataSpec, ModelSpec};
use crate::train::train_rng::{Stream, rng};

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

/// Data files the agent opened while it could (see [`open_before_drop`]),
/// taken by [`read_all`] in place of opening them by name.
static OPENED: std::sync::Mutex<Vec<(PathBuf, std::fs::File)>> = std::sync::Mutex::new(Vec::new());

/// Opens every data file of `spec` now and keeps the descriptors for the
/// loaders. A worker's agent calls this before it drops to the job's uid:
/// the files are the launching user's (the repository's `data/` under a
/// home directory only root can enter, say), and the job's uid may read
/// exactly these, through these descriptors, without being let into the
/// directories around them. Parsing (gzip, IDX, CSV) still happens after
/// the drop.
pub fn open_before_drop(spec: &DataSpec) -> Result<(), DataError> {
    let mut files = spec.train.files("train");
    if let Some(test) = &spec.test {
        files.extend(test.files("test"));
    }
    let mut opened = Vec::new();
    for (_, path) in files {
        let file = std::fs::File::open(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        opened.push((path, file));
    }
    OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(opened);
    Ok(())
}

fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    use std::io::Seek;
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let kept = {
        let opened = OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        opened.iter().find(|(p, _)| p == path).map(|(_, f)| f.try_clone())
    };
    let mut file = match kept {
        Some(f) => f.map_err(io)?,
        None => std::fs::File::open(path).map_err(io)?,
    };
    let mut out = Vec::new();
    let mut head = [0u8; 2];
    file.rewind().map_err(io)?;
    let n = file.read(&mut head).map_err(io)?;
    let gz = n == 2 && head == [0x1f, 0x8b];
    file.rewind().map_err(io)?;
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
        let hint = match (dims, want_dims) {
            (1, 3) => ": it holds labels, not images; are the images and labels files swapped?",
            (3, 1) => ": it holds images, not labels; are the images and labels files swapped?",
            _ => "",
        };
        return Err(bad(format!("has {dims} dimensions, expected {want_dims}{hint}")));
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
pub fn load_idx(
    images: &Path,
    labels: &Path,
    features: usize,
    classes: usize,
    scale: f32,
) -> Result<Dataset, DataError> {
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
    check_labels(labels, &y, classes, 0)?;
    let x = pixels.iter().map(|&p| f32::from(p) * scale).collect();
    Ok(Dataset { features, x, y })
}

fn check_labels(path: &Path, y: &[u8], classes: usize, first_record: usize) -> Result<(), DataError> {
    if let Some((i, l)) = y.iter().enumerate().find(|(_, l)| **l as usize >= classes) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            problem: format!("record {} has label {l}, but [model] classes = {classes}", i + first_record),
        });
    }
    Ok(())
}

fn parse_label(path: &Path, line_no: usize, text: &str, classes: usize) -> Result<u8, DataError> {
    let bad = |why: String| DataError::Format { path: path.to_path_buf(), problem: format!("line {line_no}: {why}") };
    let v: i64 = text.trim().parse().map_err(|_| bad(format!("label `{}` is not a whole number", text.trim())))?;
    if v < 0 || v as usize >= classes {
        return Err(bad(format!("label {v} is outside 0..{classes} ([model] classes = {classes})")));
    }
    Ok(v as u8)
}

/// Loads a CSV file: one sample per line, the label first, then exactly
/// `features` numbers.
pub fn load_csv(path: &Path, features: usize, classes: usize, header: bool, scale: f32) -> Result<Dataset, DataError> {
    let bytes = read_all(path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| DataError::Format { path: path.to_path_buf(), problem: format!("not UTF-8 text: {e}") })?;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (i, line) in text.lines().enumerate().skip(usize::from(header)) {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split(',');
        y.push(parse_label(path, line_no, fields.next().unwrap_or(""), classes)?);
        let before = x.len();
        for (j, f) in fields.enumerate() {
            let v: f32 = f.trim().parse().map_err(|_| DataError::Format {
                path: path.to_path_buf(),
                problem: format!("line {line_no}, column {}: `{}` is not a number", j + 2, f.trim()),
            })?;
            x.push(v * scale);
        }
        let got = x.len() - before;
        if got != features {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                problem: format!("line {line_no} has {got} features, expected {features} ([model] inputs)"),
            });
        }
    }
    if y.is_empty() {
        return Err(DataError::Format { path: path.to_path_buf(), problem: "holds no samples".into() });
    }
    Ok(Dataset { features, x, y })
}

/// Loads a LIBSVM file: `label index:value ...` with indices from 1 to
/// `features`, increasing; missing indices are zero.
pub fn load_libsvm(path: &Path, features: usize, classes: usize, scale: f32) -> Result<Dataset, DataError> {
    let bytes = read_all(path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| DataError::Format { path: path.to_path_buf(), problem: format!("not UTF-8 text: {e}") })?;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.split('#').next().unwrap_or("");
        let mut parts = line.split_whitespace();
        let Some(label) = parts.next() else { continue };
        y.push(parse_label(path, line_no, label, classes)?);
        let row = x.len();
        x.resize(row + features, 0.0);
        let mut last = 0usize;
        for p in parts {
            let bad =
                |why: String| DataError::Format { path: path.to_path_buf(), problem: format!("line {line_no}: {why}") };
            let (idx, val) = p.split_once(':').ok_or_else(|| bad(format!("`{p}` is not index:value")))?;
            let idx: usize = idx.parse().map_err(|_| bad(format!("index `{idx}` is not a whole number")))?;
            if idx == 0 || idx > features {
                return Err(bad(format!("index {idx} is outside 1..={features} ([model] inputs = {features})")));
            }
            if idx <= last {
                return Err(bad(format!("index {idx} does not increase")));
            }
            last = idx;
            let v: f32 = val.parse().map_err(|_| bad(format!("value `{val}` is not a number")))?;
            x[row + idx - 1] = v * scale;
        }
    }
    if y.is_empty() {
        return Err(DataError::Format { path: path.to_path_buf(), problem: "holds no samples".into() });
    }
    Ok(Dataset { features, x, y })
}

/// Loads one split's files (the training or the test set) as the job
/// file names them.
pub fn load_files(spec: &DataSpec, files: &DataFiles, m: &ModelSpec) -> Result<Dataset, DataError> {
    match (spec.format, files) {
        (DataFormat::Idx, DataFiles::Idx { images, labels }) => {
            load_idx(images, labels, m.inputs, m.classes, spec.scale)
        }
        (DataFormat::Csv, DataFiles::File(p)) => load_csv(p, m.inputs, m.classes, spec.header, spec.scale),
        (DataFormat::Libsvm, DataFiles::File(p)) => load_libsvm(p, m.inputs, m.classes, spec.scale),
        _ => unreachable!("the spec pairs formats with their file kinds"),
    }
}

/// The training set, and the test set if the job evaluates (files given, or
/// `test_fraction` held out of the training set with the training seed).
pub fn load(
    spec: &DataSpec,
    m: &ModelSpec,
    seed: u64,
    want_test: bool,
) -> Result<(Dataset, Option<Dataset>), DataError> {
    let train = load_files(spec, &spec.train, m)?;
    match &spec.test {
        Some(files) => Ok((train, if want_test { Some(load_files(spec, files, m)?) } else { None })),
        None => {
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut rng(seed, Stream::Split));
            let n_test = ((train.len() as f64) * f64::from(spec.test_fraction)).round().max(1.0) as usize;
            if n_test >= train.len() {
                return Err(DataError::Format {
                    path: spec.train.files("train")[0].1.clone(),
                    problem: format!("{} samples are too few to hold out a test set", train.len()),
                });
            }
            let (test_idx, train_idx) = order.split_at(n_test);
            let mut train_idx = train_idx.to_vec();
            train_idx.sort_unstable();
            Ok((train.select(&train_idx), want_test.then(|| train.select(test_idx))))
        }
    }
}

impl Dataset {
    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let f = self.features;
        let mut x = Vec::with_capacity(indices.len() * f);
        for &i in indices {
            x.extend_from_slice(&self.x[i * f..(i + 1) * f]);
        }
        Dataset { features: f, x, y: indices.iter().map(|&i| self.y[i]).collect() }
    }
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
        let err = load_idx(&img, &lab, 4, 10, 1.0).unwrap_err().to_string();
        assert!(err.contains("img") && err.contains("promises 8 bytes") && err.contains("holds 7"), "{err}");
        std::fs::write(&img, idx(&[2, 2, 2], &[0; 8])).unwrap();
        let ds = load_idx(&img, &lab, 4, 10, 1.0).unwrap();
        assert_eq!(ds.len(), 2);
        let err = load_idx(&img, &lab, 5, 10, 1.0).unwrap_err().to_string();
        assert!(err.contains("set inputs = 4"), "{err}");
        std::fs::write(&lab, idx(&[2], &[0, 12])).unwrap();
        let err = load_idx(&img, &lab, 4, 10, 1.0).unwrap_err().to_string();
        assert!(err.contains("record 1 has label 12"), "{err}");
        let err = load_idx(&dir.join("missing"), &lab, 4, 10, 1.0).unwrap_err().to_string();
        assert!(err.starts_with("cannot read") && err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn csv_and_libsvm_parse_and_point_at_bad_records() {
        let dir = std::env::temp_dir().join(format!("warden-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("d.csv");
        std::fs::write(&csv, "label,a,b\n1,0.5,2\n0,1,1\n").unwrap();
        let ds = load_csv(&csv, 2, 2, true, 1.0).unwrap();
        assert_eq!((ds.y.clone(), ds.x.clone()), (vec![1, 0], vec![0.5, 2.0, 1.0, 1.0]));
        std::fs::write(&csv, "1,0.5,2\n0,1\n").unwrap();
        let err = load_csv(&csv, 2, 2, false, 1.0).unwrap_err().to_string();
        assert!(err.ends_with("line 2 has 1 features, expected 2 ([model] inputs)"), "{err}");
        std::fs::write(&csv, "1,0.5,x\n").unwrap();
        let err = load_csv(&csv, 2, 2, false, 1.0).unwrap_err().to_string();
        assert!(err.ends_with("line 1, column 3: `x` is not a number"), "{err}");
        std::fs::write(&csv, "5,0.5,1\n").unwrap();
        let err = load_csv(&csv, 2, 2, false, 1.0).unwrap_err().to_string();
        assert!(err.ends_with("line 1: label 5 is outside 0..2 ([model] classes = 2)"), "{err}");

        let svm = dir.join("d.svm");
        std::fs::write(&svm, "1 1:0.5 3:2 # comment\n0\n").unwrap();
        let ds = load_libsvm(&svm, 3, 2, 1.0).unwrap();
        assert_eq!(ds.x, vec![0.5, 0.0, 2.0, 0.0, 0.0, 0.0]);
        std::fs::write(&svm, "1 4:1\n").unwrap();
        let err = load_libsvm(&svm, 3, 2, 1.0).unwrap_err().to_string();
        assert!(err.ends_with("line 1: index 4 is outside 1..=3 ([model] inputs = 3)"), "{err}");
        std::fs::write(&svm, "1 2:1 1:1\n").unwrap();
        assert!(load_libsvm(&svm, 3, 2, 1.0).unwrap_err().to_string().ends_with("index 1 does not increase"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
