//! The error a command ends with, [`CliError`]: what went wrong (one error
//! or several) and the exit code it means. [`crate::cli::main`] prints it,
//! once, as `error: ` and the error's cause chain ([`Chain`]); commands
//! never print their own errors.

use std::error::Error;
use std::fmt;

use crate::cli::{EXIT_FAILED, EXIT_USAGE};

/// Any error, boxed as a command's cause.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub struct CliError {
    code: u8,
    errors: Vec<BoxError>,
    trailer: Option<String>,
}

impl CliError {
    /// A failure of `code` with one error.
    pub fn new(code: u8, error: impl Into<BoxError>) -> Self {
        CliError { code, errors: vec![error.into()], trailer: None }
    }

    /// Bad input: an invalid job file, a missing file, bad flags ([`EXIT_USAGE`]).
    pub fn usage(error: impl Into<BoxError>) -> Self {
        CliError::new(EXIT_USAGE, error)
    }

    /// Something failed that the input did not cause ([`EXIT_FAILED`]).
    pub fn failed(error: impl Into<BoxError>) -> Self {
        CliError::new(EXIT_FAILED, error)
    }

    /// A failure of `code` with every one of `errors` (at least one), each
    /// printed on a line of its own: a command that went on past one bad
    /// item (a host, a table, a series) reports them all at the end.
    pub fn several(code: u8, errors: Vec<BoxError>) -> Self {
        debug_assert!(!errors.is_empty(), "a failure names at least one error");
        CliError { code, errors, trailer: None }
    }

    /// Adds a line printed after the errors, without `error: ` (a count,
    /// what to do next).
    pub fn with_trailer(mut self, trailer: impl Into<String>) -> Self {
        self.trailer = Some(trailer.into());
        self
    }

    /// The process exit code.
    pub fn code(&self) -> u8 {
        self.code
    }

    /// The text for stderr: a line `error: CHAIN` per error, then the
    /// trailer, each line ending in a newline.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for e in &self.errors {
            out += &format!("error: {}\n", Chain(e.as_ref()));
        }
        if let Some(t) = &self.trailer {
            out += &format!("{t}\n");
        }
        out
    }
}

/// An error described by what was being done: `context: source`.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Context {
    context: String,
    #[source]
    source: BoxError,
}

impl Context {
    /// `error`, described as what was being done (`context: error`).
    pub fn new(context: impl Into<String>, error: impl Into<BoxError>) -> Self {
        Context { context: context.into(), source: error.into() }
    }
}

/// An error and its causes on one line, joined by `: `. A cause whose text
/// the previous one already contains is left out: many errors put their
/// source's text into their own message, and it is said once.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            if !text.is_empty() && !said.contains(&text) {
                write!(f, ": {text}")?;
            }
            said = text;
            next = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("setup failed: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_chain_is_joined_once_and_repeated_causes_are_skipped() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(Chain(&Outer("a.toml", io())).to_string(), "cannot read a.toml: no such file");
        // The cause's text is in the message already: said once.
        assert_eq!(Chain(&Repeats(io())).to_string(), "setup failed: no such file");
        let e = CliError::failed(Context::new("loading the job", Outer("a.toml", io())));
        assert_eq!(e.report(), "error: loading the job: cannot read a.toml: no such file\n");
        assert_eq!(e.code(), EXIT_FAILED);
    }

    #[test]
    fn several_errors_are_a_line_each_then_the_trailer() {
        let e = CliError::several(EXIT_USAGE, vec!["first".into(), Repeats(std::io::Error::other("x")).into()])
            .with_trailer("2 problem(s)");
        assert_eq!(e.report(), "error: first\nerror: setup failed: x\n2 problem(s)\n");
        assert_eq!(e.code(), EXIT_USAGE);
    }
}
