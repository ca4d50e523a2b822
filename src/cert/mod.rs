//! A certificate authority for development, behind `fulcrum cert`: a local CA, the server
//! and client certificates it signs, and a description of any certificate file. It only
//! makes and reads files; serving them is [`crate::tls`]'s job.

mod ca;
pub mod cli;
mod files;
mod inspect;
mod issue;

use std::io;
use std::path::PathBuf;

pub use ca::{CaFiles, DEFAULT_CA_NAME, default_ca_dir, init_ca};
pub use inspect::{fingerprint_sha256, inspect};
pub use issue::{
    DEFAULT_DAYS, DemoCert, IssueRequest, Issued, KeyKind, Usage, default_demo_dir, default_prefix,
    demo_certificate, issue,
};

/// What went wrong making or reading a certificate, as a sentence naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: a CA already exists there; pass --force to replace it (certificates it signed will no longer be trusted)", path.display())]
    CaExists { path: PathBuf },
    #[error("there is no CA in {dir}: make one first with `fulcrum cert ca init --dir {dir}`", dir = dir.display())]
    NoCa { dir: PathBuf },
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The request itself is wrong: a name that is not a DNS name or IP address, no name, 0 days.
    #[error("{0}")]
    Request(String),
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl CertError {
    fn invalid(path: &std::path::Path, reason: impl Into<String>) -> CertError {
        CertError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl From<CertError> for io::Error {
    fn from(e: CertError) -> io::Error {
        let kind = match &e {
            CertError::Io { source, .. } => source.kind(),
            CertError::NoCa { .. } => io::ErrorKind::NotFound,
            CertError::CaExists { .. } => io::ErrorKind::AlreadyExists,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}
