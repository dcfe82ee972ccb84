//! `[data]`: the data set's format and files, which every model but the
//! synthetic and external ones needs.

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::{ModelKind, SpecError, Src, path_in, raw};

/// `[data]`, with paths resolved against the job file's directory.
#[derive(Debug, Clone, Serialize)]
pub struct DataSpec {
    /// File format.
    pub format: DataFormat,
    /// Training data.
    pub train: DataFiles,
    /// Test data; without it, `test_fraction` of the training set is held out.
    pub test: Option<DataFiles>,
    /// Share of the training set held out when no test files are given.
    pub test_fraction: f32,
    /// CSV: the first line is a header.
    pub header: bool,
    /// Factor applied to every feature (IDX: 1/255 by default).
    pub scale: f32,
}

/// Where one split's data is.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum DataFiles {
    /// IDX images and labels files.
    Idx {
        /// Images.
        images: PathBuf,
        /// Labels.
        labels: PathBuf,
    },
    /// One CSV or LIBSVM file.
    File(PathBuf),
}

impl DataFiles {
    /// Every file named, with the job-file key it came from.
    pub fn files(&self, split: &str) -> Vec<(String, PathBuf)> {
        match self {
            DataFiles::Idx { images, labels } => {
                vec![(format!("{split}_images"), images.clone()), (format!("{split}_labels"), labels.clone())]
            }
            DataFiles::File(p) => vec![(split.to_string(), p.clone())],
        }
    }
}

/// Data formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// MNIST's IDX, raw or gzip.
    Idx,
    /// Comma-separated: label first, then the features.
    Csv,
    /// LIBSVM / SVMlight: `label index:value ...`, indices from 1.
    Libsvm,
}

/// Checks `[data]`, which the model kind requires (softmax, mlp) or refuses
/// (synthetic, external).
pub(super) fn convert_data(
    src: &Src<'_>,
    data: Option<&Spanned<raw::Data>>,
    kind: ModelKind,
    base_dir: &Path,
) -> Result<Option<DataSpec>, SpecError> {
    match (data, kind) {
        (Some(d), ModelKind::External) => {
            Err(src.err(d.span(), "your program reads its own data; warden passes none", "remove [data]"))
        }
        (Some(d), ModelKind::Synthetic) => Err(src.err(d.span(), "the synthetic model reads no data", "remove [data]")),
        (None, ModelKind::Softmax | ModelKind::Mlp) => {
            Err(src.err(0..0, "missing field `data`", "add it; configs/local.toml shows every section with its keys"))
        }
        (None, ModelKind::Synthetic | ModelKind::External) => Ok(None),
        (Some(d), ModelKind::Softmax | ModelKind::Mlp) => convert_table(src, d, base_dir).map(Some),
    }
}

/// The `[data]` table of a model that reads data.
fn convert_table(src: &Src<'_>, raw_data: &Spanned<raw::Data>, base_dir: &Path) -> Result<DataSpec, SpecError> {
    let d = raw_data.get_ref();
    let format = match d.format.get_ref().as_str() {
        "idx" => DataFormat::Idx,
        "csv" => DataFormat::Csv,
        "libsvm" => DataFormat::Libsvm,
        other => {
            return Err(src.err(
                d.format.span(),
                format!("unknown data format `{other}`"),
                "supported: \"idx\", \"csv\", \"libsvm\"",
            ));
        }
    };
    let (train, test) = if format == DataFormat::Idx {
        idx_files(src, raw_data, base_dir)?
    } else {
        text_files(src, raw_data, base_dir)?
    };
    let test_fraction = match &d.test_fraction {
        Some(f) if test.is_some() => {
            return Err(src.err(
                f.span(),
                "test_fraction applies only when no test files are given",
                "remove test_fraction, or the test files",
            ));
        }
        Some(f) if !(*f.get_ref() > 0.0 && *f.get_ref() < 0.9) => {
            return Err(src.err(
                f.span(),
                format!("test_fraction must be in (0, 0.9), not {}", f.get_ref()),
                "0.1 holds out a tenth of the training set",
            ));
        }
        Some(f) => *f.get_ref() as f32,
        None => 0.1,
    };
    if let (Some(h), false) = (&d.header, format == DataFormat::Csv) {
        return Err(src.err(h.span(), "`header` applies to CSV files only", "remove it"));
    }
    let scale = match &d.scale {
        Some(v) if !(v.get_ref().is_finite() && *v.get_ref() != 0.0) => {
            return Err(src.err(
                v.span(),
                "scale must be a finite, non-zero number",
                "for example scale = 0.00392 (1/255)",
            ));
        }
        Some(v) => *v.get_ref() as f32,
        None if format == DataFormat::Idx => 1.0 / 255.0,
        None => 1.0,
    };
    Ok(DataSpec { format, train, test, test_fraction, header: d.header.as_ref().is_some_and(|h| *h.get_ref()), scale })
}

/// A data file named in `[data]`, relative to the job file or absolute.
fn data_path(src: &Src<'_>, base_dir: &Path, p: &Spanned<String>) -> Result<PathBuf, SpecError> {
    path_in(src, base_dir, p, "name a file, relative to the job file or absolute")
}

/// IDX data: images and labels files for training, and for testing both or neither.
fn idx_files(
    src: &Src<'_>,
    raw_data: &Spanned<raw::Data>,
    base_dir: &Path,
) -> Result<(DataFiles, Option<DataFiles>), SpecError> {
    let d = raw_data.get_ref();
    if let Some(k) = [&d.train, &d.test].iter().find_map(|k| k.as_ref()) {
        return Err(src.err(
            k.span(),
            "IDX data is named with train_images/train_labels (and test_images/test_labels)",
            "use those keys, or set format = \"csv\" or \"libsvm\"",
        ));
    }
    let (Some(ti), Some(tl)) = (&d.train_images, &d.train_labels) else {
        return Err(src.err(raw_data.span(), "IDX data needs train_images and train_labels", "name both files"));
    };
    let train = DataFiles::Idx { images: data_path(src, base_dir, ti)?, labels: data_path(src, base_dir, tl)? };
    let test = match (&d.test_images, &d.test_labels) {
        (Some(i), Some(l)) => {
            Some(DataFiles::Idx { images: data_path(src, base_dir, i)?, labels: data_path(src, base_dir, l)? })
        }
        (None, None) => None,
        (Some(k), None) | (None, Some(k)) => {
            return Err(src.err(
                k.span(),
                "test_images and test_labels go together",
                "name both, or neither to hold out test_fraction of the training set",
            ));
        }
    };
    Ok((train, test))
}

/// CSV or LIBSVM data: one `train` file and perhaps one `test` file.
fn text_files(
    src: &Src<'_>,
    raw_data: &Spanned<raw::Data>,
    base_dir: &Path,
) -> Result<(DataFiles, Option<DataFiles>), SpecError> {
    let d = raw_data.get_ref();
    if let Some(k) = [&d.train_images, &d.train_labels, &d.test_images, &d.test_labels].iter().find_map(|k| k.as_ref())
    {
        return Err(src.err(
            k.span(),
            "CSV and LIBSVM data are named with `train` (and `test`)",
            "use train = \"file\", or set format = \"idx\"",
        ));
    }
    let Some(t) = &d.train else {
        return Err(src.err(raw_data.span(), "the training file is missing", "add train = \"path/to/train.csv\""));
    };
    let train = DataFiles::File(data_path(src, base_dir, t)?);
    let test = d.test.as_ref().map(|p| data_path(src, base_dir, p)).transpose()?.map(DataFiles::File);
    Ok((train, test))
}
