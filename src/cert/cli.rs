//! The `fulcrum cert` subcommands: their arguments, and what they print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{CertError, IssueRequest, KeyKind, Usage};

#[derive(Subcommand)]
pub enum CertCommand {
    /// Manage the local CA that signs development certificates.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Issue a server (or client) certificate signed by the local CA.
    Issue(IssueArgs),
    /// Describe each certificate in a PEM or DER file.
    Inspect {
        /// The certificate file (a PEM chain, or one DER certificate).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create the CA: an ECDSA P-256 key (ca.key) and a certificate valid for 10 years (ca.pem).
    Init {
        /// Where the CA goes [default: $FULCRUM_CA_DIR, else $XDG_DATA_HOME/fulcrum/ca, else
        /// ~/.local/share/fulcrum/ca].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The CA certificate's common name.
        #[arg(long, default_value = super::DEFAULT_CA_NAME)]
        name: String,
        /// Replace a CA already there (what it signed is then no longer trusted).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct IssueArgs {
    /// A DNS name (app.test, *.app.test) or IP address the certificate is for; repeat for
    /// more. The first is also the subject's common name.
    #[arg(long = "name", value_name = "NAME", required = true)]
    names: Vec<String>,
    /// A client certificate (clientAuth), for mTLS, instead of a server one (serverAuth).
    #[arg(long)]
    client: bool,
    /// The CA's directory [default: as for `fulcrum cert ca init`].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write PREFIX.pem and PREFIX.key [default: the first name, `*` as `_wildcard`].
    #[arg(long, value_name = "PREFIX")]
    out: Option<PathBuf>,
    /// Days the certificate is valid (397: the longest browsers accept).
    #[arg(long, default_value_t = super::DEFAULT_DAYS)]
    days: u32,
    /// An RSA 2048 key instead of ECDSA P-256, for clients that take nothing else.
    #[arg(long)]
    rsa: bool,
}

/// Runs a `fulcrum cert` command: 0 on success, 1 with the reason on stderr.
pub fn run(command: CertCommand) -> ExitCode {
    let outcome = match command {
        CertCommand::Ca {
            command: CaCommand::Init { dir, name, force },
        } => ca_init(dir, &name, force),
        CertCommand::Issue(args) => issue(args),
        CertCommand::Inspect { file } => super::inspect(&file).map(|text| print!("{text}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The CA's directory: `--dir` if given, else the default.
fn ca_dir(dir: &Option<PathBuf>) -> Result<PathBuf, CertError> {
    dir.clone().or_else(super::default_ca_dir).ok_or_else(|| {
        CertError::Request(
            "cannot tell where the CA lives: neither FULCRUM_CA_DIR, XDG_DATA_HOME nor HOME \
             is set; pass --dir"
                .into(),
        )
    })
}

/// ` --dir DIR` when the user chose the directory, so that the next command they copy
/// finds the same CA.
fn dir_flag(dir: &Option<PathBuf>) -> String {
    match dir {
        Some(dir) => format!(" --dir {}", shell_word(dir)),
        None => String::new(),
    }
}

fn ca_init(dir: Option<PathBuf>, name: &str, force: bool) -> Result<(), CertError> {
    let ca_dir = ca_dir(&dir)?;
    let files = super::init_ca(&ca_dir, name, force)?;
    println!("Created the CA \"{name}\":");
    println!("  certificate  {}", files.cert.display());
    println!("  key          {} (keep it private)", files.key.display());
    println!();
    println!("Next, issue a certificate for your site:");
    println!(
        "  fulcrum cert issue{} --name app.test --name 127.0.0.1",
        dir_flag(&dir)
    );
    println!(
        "Clients accept what it signs once they trust {} (e.g. curl --cacert).",
        files.cert.display()
    );
    Ok(())
}

fn issue(args: IssueArgs) -> Result<(), CertError> {
    let ca_dir = ca_dir(&args.dir)?;
    let request = IssueRequest {
        // DNS names are case-insensitive; certificates and file names read best in lower case.
        names: args.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        usage: if args.client {
            Usage::Client
        } else {
            Usage::Server
        },
        key: if args.rsa {
            KeyKind::Rsa2048
        } else {
            KeyKind::EcdsaP256
        },
        days: args.days,
    };
    // With no name, `issue` says so; clap already insists on one.
    let first = request.names.first().cloned().unwrap_or_default();
    let prefix = args.out.unwrap_or_else(|| super::default_prefix(&first));
    let issued = super::issue(&ca_dir, &request, &prefix)?;
    let kind = match request.usage {
        Usage::Server => "server",
        Usage::Client => "client",
    };
    println!(
        "Issued a {kind} certificate for {}, valid for {} days, signed by {}:",
        request.names.join(", "),
        request.days,
        issued.ca.display()
    );
    println!(
        "  chain  {} (the certificate, then the CA's)",
        issued.cert.display()
    );
    println!("  key    {}", issued.key.display());
    println!();
    match request.usage {
        Usage::Server => {
            println!(
                "For a Fulcrum TLS listener (relative paths start from the config file's directory):"
            );
            println!();
            println!("[listeners.https.tls]");
            println!(
                "certificates = [{{ cert = {}, key = {} }}]",
                toml_string(&issued.cert),
                toml_string(&issued.key)
            );
            println!();
            println!(
                "Clients must trust {}, e.g. curl --cacert {} https://{}/",
                issued.ca.display(),
                shell_word(&issued.ca),
                host_for_url(&first)
            );
        }
        Usage::Client => {
            println!(
                "For a Fulcrum TLS listener to accept clients with certificates from this CA:"
            );
            println!();
            println!("[listeners.https.tls]");
            println!("client_auth = \"required\"");
            println!("client_ca = {}", toml_string(&issued.ca));
            println!();
            println!(
                "A client presents it with e.g. curl --cert {} --key {}",
                shell_word(&issued.cert),
                shell_word(&issued.key)
            );
        }
    }
    Ok(())
}

/// `path` as a TOML basic string.
fn toml_string(path: &Path) -> String {
    let text = path.display().to_string();
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `path` as one shell word: quoted only when it needs to be.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// A name as the host of a URL: IPv6 in brackets, a wildcard as one name it covers.
fn host_for_url(name: &str) -> String {
    if name.contains(':') {
        format!("[{name}]")
    } else {
        name.replacen("*.", "www.", 1)
    }
}
