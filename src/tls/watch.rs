//! Certificate files watched on disk: when a TLS listener's certificate, key or OCSP file
//! changes (a renewal, say), its certificates are loaded again and swapped in for new
//! handshakes, without a reload; connections already open keep their sessions. A file
//! that does not load leaves the previous certificates serving, with a log line saying
//! which file and why.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::certs::{self, CertFiles, Which};
use super::resolver::CertStore;
use crate::config::ListenerConfig;
use crate::runtime::Shared;
use crate::server::every;
use crate::tls::server::TlsListener;

/// How often the files are looked at: a renewal is picked up within this.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// What tells that a file changed: its modification time, size and inode (a renewal
/// often writes a new file and renames it over the old).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// What `path` looks like now; `None` if it cannot be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Watches the certificate files of every TLS listener until shutdown.
pub async fn watch_certificates(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    // Per listener and file: listeners sharing a file each notice its change.
    let mut seen: HashMap<(String, PathBuf), Option<Stamp>> = HashMap::new();
    every(CHECK_EVERY, shutdown, move || {
        let runtime = shared.load();
        for (config, listener) in runtime.config.listeners.iter().zip(&runtime.listeners) {
            let (Some(tls_config), Some(_)) = (&config.tls, &listener.tls) else {
                continue;
            };
            let mut changed = false;
            for c in &tls_config.certificates {
                for path in [Some(&c.cert), Some(&c.key), c.ocsp.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    let now = stamp(path);
                    // Compared, the first time, with the file as the config saw it when it
                    // loaded it: a change made before this first look counts too.
                    let before = seen
                        .entry((config.name.clone(), path.clone()))
                        .or_insert_with(|| c.stamp_of(path));
                    if *before != now {
                        *before = now;
                        changed = true;
                    }
                }
            }
            if changed {
                reload_current(&shared, &config.name);
            }
        }
    })
    .await
}

/// Loads the certificates of listener `name` again and serves them, under the lock a
/// rebuild takes: a rebuild (a DNS answer, an admin change) then either comes before, and
/// this swaps into what it built, or after, and starts from these.
fn reload_current(shared: &Shared, name: &str) {
    shared.remember(|inputs| {
        let runtime = shared.load();
        let Some(i) = runtime.config.listeners.iter().position(|l| l.name == name) else {
            return;
        };
        let (config, Some(tls)) = (&runtime.config.listeners[i], &runtime.listeners[i].tls) else {
            return;
        };
        let Some(loaded) = reload(config, tls) else {
            return;
        };
        let listener = inputs.file.listeners.iter_mut().find(|l| l.name == name);
        let (Some(file_tls), Some(served)) = (listener.and_then(|l| l.tls.as_mut()), &config.tls)
        else {
            return;
        };
        // Matched by files, not by position: the file's list is what the served one was
        // built from, unless a reload changed it meanwhile.
        for c in &mut file_tls.certificates {
            let same = served
                .certificates
                .iter()
                .position(|s| s.cert == c.cert && s.key == c.key && s.ocsp == c.ocsp);
            if let Some(j) = same {
                c.loaded = loaded[j].clone();
                c.stamps = c
                    .stamps
                    .iter()
                    .map(|(p, _)| (p.clone(), stamp(p)))
                    .collect();
            }
        }
    });
}

/// Loads `config`'s certificates again and, if every one loads, serves them and returns
/// them.
fn reload(config: &ListenerConfig, tls: &TlsListener) -> Option<Vec<Arc<certs::Loaded>>> {
    let tls_config = config.tls.as_ref()?;
    let provider = super::provider();
    let now = SystemTime::now();
    let mut loaded = Vec::new();
    for c in &tls_config.certificates {
        let files = CertFiles {
            cert: &c.cert,
            key: &c.key,
            ocsp: c.ocsp.as_deref(),
        };
        match certs::load(&files, &provider, now) {
            Ok(cert) => {
                for warning in &cert.warnings {
                    tracing::warn!(listener = %config.name, "{warning}");
                }
                loaded.push(Arc::new(cert));
            }
            Err(e) => {
                let file = match e.which {
                    Which::Cert => &c.cert,
                    Which::Key => &c.key,
                    Which::Ocsp => c.ocsp.as_ref().unwrap_or(&c.cert),
                };
                tracing::error!(
                    listener = %config.name,
                    file = %file.display(),
                    "certificates not reloaded, the previous ones keep serving: {}",
                    e.message
                );
                return None;
            }
        }
    }
    tls.resolver.replace(CertStore::new(loaded.clone()));
    tracing::info!(listener = %config.name, "certificate files changed on disk: reloaded");
    Some(loaded)
}
