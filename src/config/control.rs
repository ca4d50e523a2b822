//! The `[control]` section: where the control socket that `fulcrum reload`, `fulcrum
//! upgrade` and `fulcrum ha switchover` talk to is bound, and the default derived from the
//! config file's own path when the section is absent, so that a command given the same
//! file finds the process started with it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{Checker, ConfigError, Problem, file};
use crate::config::model::ControlConfig;

/// The longest path a Unix socket address holds (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// The config file's name is kept to this many bytes in a default socket's name, so that
/// the path stays well under [`MAX_SOCKET_PATH_BYTES`].
const MAX_STEM_BYTES: usize = 32;

impl Checker {
    pub(super) fn control(&mut self, control: Spanned<file::Control>) -> Option<ControlConfig> {
        let control = control.into_inner();
        let socket = control.socket?;
        if socket.get_ref().is_empty() {
            self.error(
                socket.span(),
                "socket is empty: give a path such as \"/run/fulcrum/web.sock\", or leave [control] out for the default",
            );
            return None;
        }
        let path = absolute(&self.dir.join(socket.get_ref()));
        let bytes = path.as_os_str().len();
        if bytes > MAX_SOCKET_PATH_BYTES {
            self.error(
                socket.span(),
                format!(
                    "socket `{}` is {bytes} bytes long: a Unix socket's path holds at most {MAX_SOCKET_PATH_BYTES}",
                    path.display()
                ),
            );
            return None;
        }
        Some(ControlConfig { socket: path })
    }
}

/// The control socket of the config file at `path`, read leniently: only the file's TOML
/// syntax and `[control] socket` matter, so that `fulcrum reload` reaches the running
/// process (which then reports every problem) even when the file has errors of meaning.
pub fn socket_of(path: &Path) -> Result<PathBuf, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::plain(&name, format!("cannot read config file: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let problem = Problem {
            message: e.message().trim_end().to_string(),
            span: e.span(),
        };
        ConfigError::new(&name, &text, vec![problem])
    })?;
    let explicit = table
        .get("control")
        .and_then(|c| c.get("socket"))
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty());
    Ok(match explicit {
        Some(socket) => absolute(&path.parent().unwrap_or(Path::new("")).join(socket)),
        None => default_socket(path),
    })
}

/// The control socket of a config file without `[control] socket`: in the run directory
/// ([`run_dir`]), named after the file and a hash of its absolute path (symlinks kept).
pub fn default_socket(config_path: &Path) -> PathBuf {
    // Absolute but with symlinks kept: a deploy that swaps a link (a Kubernetes ConfigMap
    // mount, a `current` release link) changes where the file resolves to, not its name.
    let path = absolute(config_path);
    let run_dir = run_dir(|name| std::env::var_os(name), effective_uid());
    run_dir.join(socket_name(&path))
}

/// Where default control sockets live: `$FULCRUM_RUN_DIR` if set, else `/run/fulcrum` for
/// root, else `$XDG_RUNTIME_DIR/fulcrum`, else `/tmp/fulcrum-UID`. `env` reads a variable.
pub fn run_dir(env: impl Fn(&str) -> Option<OsString>, uid: u32) -> PathBuf {
    let set = |name| env(name).filter(|v: &OsString| !v.is_empty());
    if let Some(dir) = set("FULCRUM_RUN_DIR") {
        return PathBuf::from(dir);
    }
    if uid == 0 {
        return PathBuf::from("/run/fulcrum");
    }
    match set("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("fulcrum"),
        None => PathBuf::from(format!("/tmp/fulcrum-{uid}")),
    }
}

/// `STEM-HASH.sock`: the file's stem (shortened) for a reader, and 16 hex digits of a hash
/// of the whole absolute path so that two files of one name do not share a socket.
pub fn socket_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let mut short = String::new();
    for c in stem.chars() {
        if short.len() + c.len_utf8() > MAX_STEM_BYTES {
            break;
        }
        short.push(c);
    }
    format!(
        "{short}-{:016x}.sock",
        fnv1a(path.as_os_str().as_encoded_bytes())
    )
}

/// FNV-1a, 64 bits: written out rather than std's hasher, whose output may change between
/// Rust releases, because a binary upgraded in place must find the socket its predecessor
/// named.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_run_directory_follows_the_override_then_root_then_the_session() {
        let all = [
            ("FULCRUM_RUN_DIR", "/srv/ctl"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ];
        assert_eq!(run_dir(env(&all), 1000), Path::new("/srv/ctl"));
        assert_eq!(run_dir(env(&all[1..]), 0), Path::new("/run/fulcrum"));
        assert_eq!(
            run_dir(env(&all[1..]), 1000),
            Path::new("/run/user/1000/fulcrum")
        );
        assert_eq!(run_dir(env(&[]), 1000), Path::new("/tmp/fulcrum-1000"));
        // Set but empty counts as unset, as shells leave them.
        assert_eq!(
            run_dir(env(&[("FULCRUM_RUN_DIR", ""), ("XDG_RUNTIME_DIR", "")]), 7),
            Path::new("/tmp/fulcrum-7")
        );
    }

    #[test]
    fn a_socket_is_named_after_its_file_and_a_hash_of_its_path() {
        assert_eq!(
            socket_name(Path::new("/etc/fulcrum/web.toml")),
            format!("web-{:016x}.sock", fnv1a(b"/etc/fulcrum/web.toml"))
        );
        // Known FNV-1a answers, so that the names never change between builds.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn an_explicit_socket_is_relative_to_the_file_and_checked_for_length() {
        let config = |control: &str| {
            format!(
                "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
                 [upstreams.app]\nservers = [{{ address = \"127.0.0.1:1\" }}]\n{control}"
            )
        };
        let parsed = super::super::parse(
            "/etc/fulcrum/web.toml",
            &config("[control]\nsocket = \"ctl/web.sock\"\n"),
        )
        .unwrap();
        assert_eq!(
            parsed.control.unwrap().socket,
            Path::new("/etc/fulcrum/ctl/web.sock")
        );
        let long = format!("[control]\nsocket = \"/{}\"\n", "s".repeat(120));
        let error = super::super::parse("/etc/fulcrum/web.toml", &config(&long))
            .unwrap_err()
            .to_string();
        assert!(error.contains("/etc/fulcrum/web.toml:8:10"), "{error}");
        assert!(error.contains("at most 107"), "{error}");
        let error = super::super::parse(
            "/etc/fulcrum/web.toml",
            &config("[control]\nsocket = \"\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("socket is empty"), "{error}");
        let error = super::super::parse(
            "/etc/fulcrum/web.toml",
            &config("[control]\nsockt = \"x\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/etc/fulcrum/web.toml:8:1"), "{error}");
        assert!(
            super::super::parse("/etc/fulcrum/web.toml", &config(""))
                .unwrap()
                .control
                .is_none()
        );
    }

    proptest! {
        #[test]
        fn default_names_are_short_single_components_and_tell_paths_apart(
            a in "(/[^/\\x00]{1,60}){1,4}",
            b in "(/[^/\\x00]{1,60}){1,4}",
        ) {
            let name = socket_name(Path::new(&a));
            prop_assert!(!name.contains('/'));
            prop_assert!(name.len() <= MAX_STEM_BYTES + 22, "{name}");
            prop_assert!(
                Path::new("/run/fulcrum").join(&name).as_os_str().len() <= MAX_SOCKET_PATH_BYTES
            );
            prop_assert_eq!(&name, &socket_name(Path::new(&a)));
            if a != b {
                prop_assert_ne!(name, socket_name(Path::new(&b)));
            }
        }
    }
}
