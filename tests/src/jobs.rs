//! Job files for tests: [`JobFile`], a builder over TOML tables that starts
//! from `configs/local.toml` ([`JobFile::local`]) or from a tiny job of one
//! scheduler, server and worker ([`JobFile::tiny`]), and [`job_in`] for the
//! tests that rewrite `configs/local.toml` as text.
//!
//! ```no_run
//! # let (dir, key) = (std::path::Path::new("/tmp"), std::path::Path::new("/tmp/k"));
//! use warden_tests::JobFile;
//! let job = JobFile::local()
//!     .ports(31000, 31010)
//!     .epochs(3)
//!     .checkpoint(&dir.join("ckpt"), Some(key))
//!     .set("checkpoint", "every_steps", 20)
//!     .write(dir.join("job.toml"));
//! ```

use std::path::{Path, PathBuf};

use crate::repo_root;

/// A job file being built: its tables in order, each with its keys in
/// order and every value already written as TOML. [`JobFile::set`] replaces
/// a key's value or adds the key (and the table) at the end.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct JobFile {
    tables: Vec<Table>,
    /// TOML appended as it is after the last table.
    tail: String,
}

#[derive(Debug, Clone)]
struct Table {
    /// `job`, `cluster.hosts`, ...
    name: String,
    /// `[[name]]` rather than `[name]`.
    array: bool,
    entries: Vec<(String, String)>,
}

/// A TOML value as written in a job file.
pub trait TomlValue {
    /// The value in TOML syntax.
    fn to_toml(&self) -> String;
}

macro_rules! toml_display {
    ($($t:ty),*) => {$(
        impl TomlValue for $t {
            fn to_toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
toml_display!(bool, u16, u32, u64, usize, i32, i64);

impl TomlValue for f64 {
    fn to_toml(&self) -> String {
        // `{:?}` keeps the fractional part of whole numbers (`1.0`).
        format!("{self:?}")
    }
}

impl TomlValue for str {
    fn to_toml(&self) -> String {
        // A JSON string is a TOML basic string.
        serde_json::to_string(self).unwrap()
    }
}

impl TomlValue for String {
    fn to_toml(&self) -> String {
        self.as_str().to_toml()
    }
}

impl TomlValue for Path {
    fn to_toml(&self) -> String {
        self.to_str().expect("test paths are UTF-8").to_toml()
    }
}

impl TomlValue for PathBuf {
    fn to_toml(&self) -> String {
        self.as_path().to_toml()
    }
}

impl<T: TomlValue + ?Sized> TomlValue for &T {
    fn to_toml(&self) -> String {
        (**self).to_toml()
    }
}

impl<T: TomlValue> TomlValue for [T] {
    fn to_toml(&self) -> String {
        format!("[{}]", self.iter().map(TomlValue::to_toml).collect::<Vec<_>>().join(", "))
    }
}

impl<T: TomlValue, const N: usize> TomlValue for [T; N] {
    fn to_toml(&self) -> String {
        self.as_slice().to_toml()
    }
}

impl<T: TomlValue> TomlValue for Vec<T> {
    fn to_toml(&self) -> String {
        self.as_slice().to_toml()
    }
}

/// TOML written by hand, used as it is (an inline table, say).
#[derive(Debug, Clone)]
pub struct Raw(pub String);

impl TomlValue for Raw {
    fn to_toml(&self) -> String {
        self.0.clone()
    }
}

/// The tiny job of [`JobFile::tiny`].
const TINY: &str = r#"
[job]
name = "role-test"
seed = 1

[cluster]
user = "warden"
ports = [29500, 29599]

[[cluster.hosts]]
address = "127.0.0.1"
scheduler = 1
servers = 1
workers = 1

[model]
kind = "softmax"
inputs = 4
classes = 2

[data]
format = "idx"
train_images = "x"
train_labels = "x"
test_images = "x"
test_labels = "x"

[optimizer]
kind = "sgd"
lr = 0.5

[training]
epochs = 1
batch_size = 1

[limits]
first_message_timeout_ms = 500
"#;

impl JobFile {
    /// `configs/local.toml` (1 scheduler, 2 servers, 2 workers on this
    /// machine, softmax on the shipped Fashion-MNIST subset, 5 epochs) with
    /// absolute data paths, so that it works from any directory.
    pub fn local() -> JobFile {
        JobFile::parse(&local_text())
    }

    /// A job of one scheduler, server and worker on 127.0.0.1 that the roles
    /// can run in-process (see [`crate::RoleCluster`]): softmax of 4 inputs
    /// and 2 classes, SGD with lr 0.5, one epoch of batch size 1, data files
    /// that are never read, and `[limits] first_message_timeout_ms = 500`,
    /// its last table.
    pub fn tiny() -> JobFile {
        JobFile::parse(TINY)
    }

    /// A job file of tables and `key = value` lines, as `configs/local.toml`
    /// is written (comments are dropped; a value takes one line).
    pub fn parse(text: &str) -> JobFile {
        let mut job = JobFile::default();
        for line in text.lines() {
            let line = strip_comment(line).trim();
            if line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
                job.tables.push(Table { name: name.trim().to_string(), array: true, entries: Vec::new() });
            } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                job.tables.push(Table { name: name.trim().to_string(), array: false, entries: Vec::new() });
            } else {
                let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not `key = value`: {line}"));
                let table = job.tables.last_mut().unwrap_or_else(|| panic!("a key before any table: {line}"));
                table.entries.push((key.trim().to_string(), value.trim().to_string()));
            }
        }
        job
    }

    /// Sets `key` of the (first) table `table` to `value`, adding the key,
    /// and the table, at the end if they are not there yet.
    pub fn set(mut self, table: &str, key: &str, value: impl TomlValue) -> JobFile {
        let value = value.to_toml();
        let t = match self.tables.iter().position(|t| t.name == table) {
            Some(i) => &mut self.tables[i],
            None => {
                self.tables.push(Table { name: table.to_string(), array: false, entries: Vec::new() });
                self.tables.last_mut().unwrap()
            }
        };
        match t.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => t.entries.push((key.to_string(), value)),
        }
        self
    }

    /// The job without table `table` (every one of that name).
    pub fn without(mut self, table: &str) -> JobFile {
        self.tables.retain(|t| t.name != table);
        self
    }

    /// `[cluster] ports = [first, last]`.
    pub fn ports(self, first: u16, last: u16) -> JobFile {
        self.set("cluster", "ports", [first, last])
    }

    /// `[training] epochs`.
    pub fn epochs(self, epochs: u32) -> JobFile {
        self.set("training", "epochs", epochs)
    }

    /// `[checkpoint] dir`, and `key_file` when given (without one, a launch
    /// keeps its checkpoint key in memory).
    pub fn checkpoint(self, dir: &Path, key_file: Option<&Path>) -> JobFile {
        let job = self.set("checkpoint", "dir", dir);
        match key_file {
            Some(key) => job.set("checkpoint", "key_file", key),
            None => job,
        }
    }

    /// TOML appended after the last table, as it is (for keys of that
    /// table, or for what the builder cannot say, such as invalid TOML).
    pub fn append(mut self, toml: &str) -> JobFile {
        self.tail.push_str(toml);
        self.tail.push('\n');
        self
    }

    /// The job file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let (open, close) = if t.array { ("[[", "]]") } else { ("[", "]") };
            out.push_str(&format!("{open}{}{close}\n", t.name));
            for (k, v) in &t.entries {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        out.push_str(&self.tail);
        out
    }

    /// Writes the job file to `path` and returns the path.
    pub fn write(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref().to_path_buf();
        std::fs::write(&path, self.render()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}

/// `line` without a trailing `# comment` (a `#` inside a string is kept).
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '#' if !in_string => return &line[..i],
            _ => {}
        }
    }
    line
}

/// `configs/local.toml` with absolute data paths.
fn local_text() -> String {
    let data = repo_root().join("data");
    std::fs::read_to_string(repo_root().join("configs/local.toml")).unwrap().replace("../data", data.to_str().unwrap())
}

/// `configs/local.toml` rewritten into `dir/job.toml` with absolute data
/// paths, other ports and each `(from, to)` of `replace` applied once to
/// its text (for tests whose point is the text, such as a missing file's
/// name; otherwise see [`JobFile::local`]).
pub fn job_in(dir: &Path, ports: (u16, u16), replace: &[(&str, &str)]) -> PathBuf {
    let mut text = local_text().replace("ports = [29500, 29599]", &format!("ports = [{}, {}]", ports.0, ports.1));
    for (from, to) in replace {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// Parsing and rendering keeps every key and value of the shipped job.
    #[test]
    fn local_renders_to_the_same_keys_and_values_as_configs_local_toml() {
        assert_eq!(table(&JobFile::local().render()), table(&local_text()));
        assert_eq!(table(&JobFile::tiny().render()), table(TINY));
    }

    #[test]
    fn set_replaces_a_value_or_adds_the_key_and_the_table() {
        let dir = Path::new("/tmp/a dir \"quoted\"");
        let job = JobFile::local()
            .ports(31000, 31010)
            .epochs(3)
            .set("model", "kind", "mlp")
            .set("model", "hidden", [32u32])
            .set("model", "dropout", 0.2)
            .checkpoint(dir, Some(&dir.join("k")));
        let t = table(&job.render());
        assert_eq!(t["cluster"]["ports"], toml::Value::Array(vec![31000.into(), 31010.into()]));
        assert_eq!(t["training"]["epochs"].as_integer(), Some(3));
        assert_eq!(t["training"]["batch_size"].as_integer(), Some(64));
        assert_eq!(t["model"]["kind"].as_str(), Some("mlp"));
        assert_eq!(t["model"]["dropout"].as_float(), Some(0.2));
        assert_eq!(t["checkpoint"]["dir"].as_str(), dir.to_str());
        assert_eq!(t["checkpoint"]["key_file"].as_str(), dir.join("k").to_str());
        assert_eq!(t["cluster"]["hosts"][0]["workers"].as_integer(), Some(2));
    }

    #[test]
    fn comments_are_dropped_but_not_inside_strings() {
        assert_eq!(strip_comment(r#"a = "x # y" # z"#), r#"a = "x # y" "#);
        assert_eq!(strip_comment(r#"a = "x \" # y" # z"#), r#"a = "x \" # y" "#);
    }
}
