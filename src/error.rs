//! Typed errors for user mistakes: each names the file (and line) and says what to do.

use std::path::PathBuf;

/// A mistake in the user's input or configuration. Shown as one clear message, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum ClueError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}\n  hint: {hint}")]
    BadRow {
        path: PathBuf,
        line: u64,
        message: String,
        hint: &'static str,
    },
    #[error("{path}: {message}\n  hint: {hint}")]
    BadFile {
        path: PathBuf,
        message: String,
        hint: String,
    },
    #[error("invalid configuration: {message}\n  hint: {hint}")]
    Config { message: String, hint: String },
}

impl ClueError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ClueError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(message: impl Into<String>, hint: impl Into<String>) -> Self {
        ClueError::Config {
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub fn bad_file(
        path: impl Into<PathBuf>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        ClueError::BadFile {
            path: path.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }
}

/// The text of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

pub type Result<T, E = ClueError> = std::result::Result<T, E>;
